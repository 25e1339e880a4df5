"""Reading a `wirefault chaos` scenario: YAML in, a validated `Scenario` out, or every problem.

A scenario (YAML; unknown keys are errors, reported with file, line and key):

    seed: 42                       # required integer: same seed, same schedule
    duration: 20                   # required seconds; faults are lifted by then
    timeout: 5                     # optional seconds per FIFO command (default 5)
    description: what it proves    # optional text, for the people reading it
    on_failure: pause              # optional: what the first failed check (or a process
                                   #   dying by itself) does: pause (default: SIGSTOP every
                                   #   managed process and leave them so) or stop
    run_dir: runs/                 # optional folder holding one directory per run
                                   #   (default: <scenario folder>/chaos-runs)
    proxies:                       # optional: name -> where its FIFO or API URL is
      source_link:
        fifo: /tmp/a.fifo          # relative paths start at the scenario's folder; or
                                   #   api: http://HOST:PORT/proxies/NAME (exactly one)
        protocol: wallaroo         # optional: check commands against this protocol
                                   #   (without it: valid for at least one protocol)
    processes:                     # optional, ordered: started in this order, each
      sink:                        #   waiting for `ready` (names as proxy names)
        command: [python, -m, sink, --port, 7200]   # required: an argv list (numbers and
                                   #   other scalars are passed as written) or a shell
                                   #   string, run by /bin/sh -c
        cwd: work                  # optional (default: the scenario's folder)
        env: {PYTHONPATH: ../lib}  # optional, added to the runner's environment; values
                                   #   are strings, other scalars are passed as written
        ready: {port: 7200}        # optional, exactly one of port (a TCP connect
                                   #   succeeds), pattern (a regex matching a line of
                                   #   its output) or command (exits 0, retried); plus
                                   #   timeout: (seconds, default 30) and, with port,
                                   #   host: (default 127.0.0.1)
        restart: [python, -m, sink, --resume]   # optional (default: command)
        log: logs/sink.log         # optional (default: <run dir>/sink.log)
        keep_logs: 5               # optional: rotated logs kept (default 5, >= 1)
    faults:                        # optional, a network fault or a process fault each
      - name: kill-on-notify       # optional (default fault1, fault2...), unique
        proxy: source_link         # required: one of the proxies
        command: conn.onNotify().kill()   # required: a conn.* rule, not allow(); armed as
                                   #   faults.add("kill-on-notify:N").onNotify().kill()
        armed: 0.5                 # required seconds before faults.remove(...) lifts it
        every: [1.0, 3.0]          # optional seconds between armings: fixed or [min, max]
        start_after: 2             # optional first arming (default: one `every` draw;
                                   #   0 for a fault without `every`, armed once)
        times: 3                   # optional cap on armings (needs `every`)
        must_fire: 10              # optional seconds (>= armed): each arming must fire
                                   #   (its fault act on a frame) within this long,
                                   #   staying armed until it did; see chaos
      - name: crash-sink           # a process fault: `process` and `action` in place of
        process: sink              #   proxy, command, armed and must_fire (which it
        action: crash              #   must not have); crash (SIGKILL), stop (SIGTERM),
                                   #   each restarting it after `down`, or pause (SIGSTOP,
                                   #   then SIGCONT after `down`)
        down: [0.2, 1.0]           # optional seconds, fixed or [min, max], >= 0
                                   #   (default 0); its max is shorter than every's min
        every: [2, 4]              # optional, as above; so are start_after and times
    checks:                        # optional, in order
      - name: output intact        # optional
        run: cmp -s input output   # shell command, run in the scenario's folder once the
                                   #   faults are over
        every: 2                   # optional seconds: also run it in a loop while the
                                   #   run goes on
        timeout: 60                # optional seconds per attempt (default 60)
        retry_for: 20              # optional: retry (every 0.5 s) until it passes or
                                   #   this many seconds passed (default 0: one attempt)
      - name: acked                # or a progress check: a line matching `pattern` in
        progress:                  #   `file` (relative: to the scenario's folder) or in
          file: source.log         #   `process: NAME`'s output, exactly one of the two,
          pattern: acked           #   at least once in every window of `within` seconds
          within: 300              #   (run, every, timeout and retry_for do not apply)

A scenario needs faults, processes or both (proxies alone do nothing). Each check has
exactly one of `run` and `progress`.

One pass finds every problem: a bad value is recorded and skipped, and checks that depend
on it (`armed` against `every`, a command against its proxy's protocol...) are left out, so
each problem is reported once, in file order. The machinery is `yaml_reader`'s.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .yaml_reader import (
    Fields,
    ReaderError,
    ReaderErrors,
    YamlReader,
    compose,
    join_key,
    position,
)

ALLOW = "conn.allow()"
DEFAULT_TIMEOUT = 5.0
DEFAULT_CHECK_TIMEOUT = 60.0
MAX_ARMINGS = 100_000
_PROXY_NAME = re.compile(r"[A-Za-z0-9_.-]+")

TOP_REQUIRED = ("seed", "duration")
TOP_OPTIONAL = ("proxies", "faults", "timeout", "checks", "description", "processes",
                "on_failure", "run_dir")
FAULT_REQUIRED = ("proxy", "command", "armed")
FAULT_OPTIONAL = ("name", "every", "start_after", "times", "must_fire")
PROCESS_FAULT_REQUIRED = ("process", "action")
PROCESS_FAULT_OPTIONAL = ("name", "every", "start_after", "times", "down")
PROCESS_KEYS = ("cwd", "env", "ready", "restart", "log", "keep_logs")
READY_KINDS = ("port", "pattern", "command")
CHECK_KEYS = ("run", "progress", "name", "every", "timeout", "retry_for")
NOT_IN_PROCESS_FAULTS = {
    "proxy": "a fault names either a proxy or a process, not both",
    "command": "a process fault has action: in place of command:",
    "armed": "a process fault has down: in place of armed:",
    "must_fire": "only network faults can be made to fire",
}

ScenarioError = ReaderError
"""A scenario that cannot run; `str()` is `file:line:column: key: problem`."""
ScenarioErrors = ReaderErrors
"""Every problem of a scenario, in file order (`errors`), one line each in `str()`."""


@dataclass(frozen=True)
class ProxySpec:
    name: str
    fifo: str | None
    protocol: str | None
    api: str | None = None

    @property
    def target(self) -> str:
        """What `FaultProxy` is given: the API URL, else the FIFO path."""
        return self.api or self.fifo or ""


@dataclass(frozen=True)
class Interval:
    """Seconds between armings: `low` when fixed, else drawn uniformly in [low, high]."""

    low: float
    high: float

    def draw(self, rng: random.Random) -> float:
        return self.low if self.low == self.high else rng.uniform(self.low, self.high)


PROCESS_ACTIONS = ("crash", "stop", "pause")
"""crash: SIGKILL, restart after `down`; stop: SIGTERM, restart after `down`; pause:
SIGSTOP for `down`, then SIGCONT."""
ON_FAILURE = ("pause", "stop")
DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_KEEP_LOGS = 5

Command = tuple[str, ...] | str
"""An argv list (run as is) or a shell string (run by /bin/sh -c)."""


@dataclass(frozen=True)
class FaultSpec:
    """A network fault (`proxy` and `command`) or a process fault (`process` and
    `action`), on the same seeded schedule (`every`, `start_after`, `times`)."""

    name: str
    proxy: str | None
    command: str | None
    armed: float
    """Network faults: seconds armed. Process faults: 0 (their length is `down`)."""
    every: Interval | None = None
    start_after: float | None = None
    times: int | None = None
    must_fire: float | None = None
    """Seconds since each arming within which the proxy must have acted on a frame."""
    process: str | None = None
    action: str | None = None
    """One of PROCESS_ACTIONS, for a process fault."""
    down: Interval | None = None
    """Process faults: seconds between the action and the restart (crash, stop) or the
    SIGCONT (pause), drawn per application; Interval(0, 0) when not given."""

    @property
    def is_process_fault(self) -> bool:
        return self.process is not None


@dataclass(frozen=True)
class ReadySpec:
    """When a started process counts as up: exactly one of `port` (a TCP connect to
    127.0.0.1:port, or to `host`:port, succeeds), `pattern` (a line of its output matches,
    re.search) or `command` (exits 0; retried until the timeout)."""

    port: int | None = None
    host: str = "127.0.0.1"
    pattern: str | None = None
    command: Command | None = None
    timeout: float = DEFAULT_READY_TIMEOUT


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    command: Command
    cwd: Path
    """Resolved: relative paths start at the scenario's folder (the default)."""
    env: dict[str, str]
    """Added to the runner's own environment."""
    ready: ReadySpec | None = None
    restart: Command | None = None
    """What a restart runs; None: `command` again."""
    log: Path | None = None
    """Resolved; None: `<run dir>/<name>.log`."""
    keep_logs: int = DEFAULT_KEEP_LOGS
    """Rotated logs (`<log>.<n>.gz`) kept, newest first."""

    @property
    def restart_command(self) -> Command:
        return self.command if self.restart is None else self.restart


@dataclass(frozen=True)
class ProgressSpec:
    """A line matching `pattern` (re.search) must appear, in `file` or in `process`'s
    output (exactly one of the two), at least once in every window of `within` seconds."""

    pattern: str
    within: float
    file: Path | None = None
    process: str | None = None


@dataclass(frozen=True)
class CheckSpec:
    """A shell check (`run`) or a progress check (`progress`), exactly one of the two. A
    shell check runs once the faults are over, or, with `every`, in a loop while the run
    goes on (and once more at the end)."""

    name: str
    run: str | None
    timeout: float = DEFAULT_CHECK_TIMEOUT
    retry_for: float = 0.0
    every: float | None = None
    progress: ProgressSpec | None = None


@dataclass(frozen=True)
class Scenario:
    path: Path
    seed: int
    duration: float
    timeout: float
    proxies: dict[str, ProxySpec]
    faults: tuple[FaultSpec, ...]
    checks: tuple[CheckSpec, ...] = ()
    processes: dict[str, ProcessSpec] = field(default_factory=dict)
    """In start order (the file's order)."""
    on_failure: str = "pause"
    """What the first failed check does: one of ON_FAILURE."""
    run_dir: Path | None = None
    """Resolved `run_dir`: the folder of the runs' directories; None: the default,
    `<scenario folder>/chaos-runs`."""




def load_scenario(path: str | Path, folder: str | Path | None = None) -> Scenario:
    """Read and validate a scenario file; ScenarioErrors lists every problem found.
    Relative paths start at `folder`, by default the file's own folder (--replay reads a
    run directory's copy of the scenario in its original's folder)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioErrors([ScenarioError(path, None, None, "", f"cannot read: {exc}")]) \
            from None
    root = compose(path, text)
    if root is None:
        raise ScenarioErrors([ScenarioError(path, 1, 1, "", "the scenario is empty")])
    reader = _ScenarioReader(path, None if folder is None else Path(folder))
    scenario = reader.attempt(reader.scenario, root)
    if reader.errors or scenario is None:
        raise ScenarioErrors(sorted(reader.errors, key=position))
    return scenario


def _one_of(options: tuple[str, ...]) -> str:
    return ", ".join(options[:-1]) + f" or {options[-1]}"


class _ScenarioReader(YamlReader):
    """Turns the composed YAML node tree into a Scenario, collecting every problem."""

    def __init__(self, path: Path, folder: Path | None) -> None:
        super().__init__(path, folder)
        self.duration: float | None = None
        self.declared_proxies: dict[str, None] = {}
        """Every proxy name given, valid spec or not, in file order."""
        self.declared_processes: dict[str, None] = {}
        """Likewise for processes."""
        self.fault_names: set[str] = set()

    def span(self, node: yaml.Node, key: str, *, inclusive: bool = False) -> Interval:
        return Interval(*self.interval(node, key, inclusive=inclusive))

    def choice(self, node: yaml.Node, key: str, options: tuple[str, ...]) -> str:
        value = self.string(node, key)
        if value not in options:
            self.fail(node, key, f"expected {_one_of(options)}, got {value!r}")
        return value

    def folder_path(self, node: yaml.Node, key: str) -> Path:
        return Path(self.path_in_scenario_folder(node, key))

    # -- sections --------------------------------------------------------------------------

    def scenario(self, root: yaml.Node) -> Scenario | None:
        count = len(self.errors)
        top = self.mapping(root, "", TOP_REQUIRED, TOP_OPTIONAL)
        seed = self.field(top, "seed", "", self.integer)
        self.duration = self.field(top, "duration", "", self.number)
        timeout = self.field(top, "timeout", "", self.number)
        self.field(top, "description", "", self.string)
        on_failure = self.field(top, "on_failure", "", self.choice, ON_FAILURE)
        run_dir = self.field(top, "run_dir", "", self.folder_path)
        proxies = self.field(top, "proxies", "", self.proxies)
        processes = self.field(top, "processes", "", self.processes)
        faults = self.field(top, "faults", "", self.faults, proxies)
        checks = self.field(top, "checks", "", self.checks)
        if "faults" not in top and "processes" not in top:
            self.report(root, "faults", "missing required key (a scenario needs faults, "
                                        "processes or both)")
        if not self.clean_since(count) or seed is None or self.duration is None:
            return None
        return Scenario(
            path=self.path,
            seed=seed,
            duration=self.duration,
            timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
            proxies=proxies or {},
            faults=faults or (),
            checks=checks or (),
            processes=processes or {},
            on_failure=on_failure or ON_FAILURE[0],
            run_dir=run_dir,
        )

    def entry_name(self, node: yaml.Node, key: str, declared: dict[str, None],
                   kind: str) -> str:
        """The name of a proxy or a process, recorded in `declared` even when bad (so
        references to it have no problem of their own)."""
        name = self.scalar(node, key)
        where = f"{key}.{name}"
        if isinstance(name, str) and name in declared:
            self.fail(node, where, "duplicate key")
        if isinstance(name, str):
            declared[name] = None
        if not isinstance(name, str) or not _PROXY_NAME.fullmatch(name):
            self.fail(node, where, f"{kind} names use letters, digits, '_', '.', '-'")
        return name

    def reference(self, node: yaml.Node, key: str, declared: dict[str, None],
                  kind: str) -> str:
        name = self.string(node, key)
        if name not in declared:
            kinds = "proxies" if kind == "proxy" else f"{kind}es"
            known = f"{kinds}: {', '.join(declared)}" if declared \
                else f"the scenario declares no {kinds}"
            self.fail(node, key, f"no {kind} named {name!r}; {known}")
        return name

    def proxies(self, node: yaml.Node, key: str) -> dict[str, ProxySpec]:
        if not isinstance(node, yaml.MappingNode) or not node.value:
            self.fail(node, key, "expected a mapping of proxy names to {fifo: PATH} or {api: URL}")
        proxies: dict[str, ProxySpec] = {}
        for key_node, value_node in node.value:
            name = self.attempt(self.entry_name, key_node, key, self.declared_proxies, "proxy")
            if name is None:
                continue
            spec = self.attempt(self.proxy, value_node, f"{key}.{name}", name)
            if spec is not None:
                proxies[name] = spec
        return proxies

    def proxy(self, node: yaml.Node, key: str, name: str) -> ProxySpec | None:
        count = len(self.errors)
        fields = self.mapping(node, key, (), ("fifo", "protocol"), {"api": "fifo"})
        if "fifo" in fields and "api" in fields:
            self.report(fields["api"][0], join_key(key, "api"),
                        "give either fifo or api, not both")
        elif "fifo" not in fields and "api" not in fields:
            self.report(node, join_key(key, "fifo"), "missing required key (fifo or api)")
        fifo = self.field(fields, "fifo", key, self.path_in_scenario_folder)
        api = self.field(fields, "api", key, self.api_url)
        protocol = self.field(fields, "protocol", key, self.protocol)
        if not self.clean_since(count) or (fifo is None and api is None):
            return None
        return ProxySpec(name, fifo, protocol, api)

    def api_url(self, node: yaml.Node, key: str) -> str:
        from .http_transport import is_api_url, parse_proxy_url

        url = self.string(node, key)
        try:
            if not is_api_url(url):
                raise ValueError
            parse_proxy_url(url)
        except ValueError:
            self.fail(node, key, f"expected http://HOST:PORT/proxies/NAME, got {url!r}")
        return url

    # -- processes -------------------------------------------------------------------------

    def processes(self, node: yaml.Node, key: str) -> dict[str, ProcessSpec]:
        if not isinstance(node, yaml.MappingNode) or not node.value:
            self.fail(node, key, "expected a mapping of process names to {command: ...}")
        processes: dict[str, ProcessSpec] = {}
        for key_node, value_node in node.value:
            name = self.attempt(self.entry_name, key_node, key, self.declared_processes,
                                "process")
            if name is None:
                continue
            spec = self.attempt(self.process, value_node, f"{key}.{name}", name)
            if spec is not None:
                processes[name] = spec
        return processes

    def process(self, node: yaml.Node, key: str, name: str) -> ProcessSpec | None:
        count = len(self.errors)
        fields = self.mapping(node, key, ("command",), PROCESS_KEYS)
        command = self.field(fields, "command", key, self.process_command)
        cwd = self.field(fields, "cwd", key, self.folder_path)
        env = self.field(fields, "env", key, self.environment)
        ready = self.field(fields, "ready", key, self.ready)
        restart = self.field(fields, "restart", key, self.process_command)
        log = self.field(fields, "log", key, self.folder_path)
        keep_logs = self.field(fields, "keep_logs", key, self.integer, minimum=1)
        if not self.clean_since(count) or command is None:
            return None
        return ProcessSpec(name, command, cwd or self.folder, env or {}, ready, restart,
                           log, DEFAULT_KEEP_LOGS if keep_logs is None else keep_logs)

    def process_command(self, node: yaml.Node, key: str) -> Command:
        """An argv list (a tuple) or a shell string."""
        if isinstance(node, yaml.SequenceNode):
            if not node.value:
                self.fail(node, key, "expected an argv list or a shell string, got an empty "
                                     "list")
            argv = tuple(self.argument(item, f"{key}[{index}]")
                         for index, item in enumerate(node.value))
            if not argv[0].strip():
                self.fail(node.value[0], f"{key}[0]", "the program to run is empty")
            return argv
        value = self.scalar(node, key)
        if not isinstance(value, str) or not value.strip():
            self.fail(node, key, "expected an argv list or a shell string, got "
                                 f"{self.describe(node, key)}")
        return value.strip()

    def argument(self, node: yaml.Node, key: str) -> str:
        """A string as is; another scalar (7200, 1.5, true) as written in the file, since
        that is what a command line or an environment would hold."""
        value = self.scalar(node, key)
        if isinstance(node, yaml.ScalarNode) and value is not None:
            text = value if isinstance(value, str) else node.value
            if "\0" in text:
                self.fail(node, key, "contains a NUL character")
            return text
        self.fail(node, key, f"expected a string, got {self.describe(node, key)}")

    def environment(self, node: yaml.Node, key: str) -> dict[str, str]:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, key, "expected a mapping of variable names to values, got "
                                 f"{self.describe(node, key)}")
        env: dict[str, str] = {}
        seen: set[str] = set()
        for key_node, value_node in node.value:
            name = self.attempt(self.scalar, key_node, key)
            where = join_key(key, str(name))
            if not isinstance(name, str) or not name or "=" in name or "\0" in name:
                self.report(key_node, where, "variable names are non-empty strings without "
                                             "'='")
                continue
            if name in seen:
                self.report(key_node, where, "duplicate key")
                continue
            seen.add(name)
            value = self.attempt(self.argument, value_node, where)
            if value is not None:
                env[name] = value
        return env

    def ready(self, node: yaml.Node, key: str) -> ReadySpec | None:
        count = len(self.errors)
        fields = self.mapping(node, key, (), (*READY_KINDS, "timeout", "host"))
        kinds = [kind for kind in READY_KINDS if kind in fields]
        if not kinds:
            self.report(node, key, f"needs one of {_one_of(READY_KINDS)}")
        elif len(kinds) > 1:
            self.report(fields[kinds[1]][0], join_key(key, kinds[1]),
                        f"give one of {_one_of(READY_KINDS)}, not both {kinds[0]} and "
                        f"{kinds[1]}")
        port = self.field(fields, "port", key, self.integer, minimum=1, maximum=65535)
        host = self.field(fields, "host", key, self.string)
        if "host" in fields and "port" not in fields:
            self.report(fields["host"][0], join_key(key, "host"), "only with port")
        pattern = self.field(fields, "pattern", key, self.regex)
        command = self.field(fields, "command", key, self.process_command)
        timeout = self.field(fields, "timeout", key, self.number)
        if not self.clean_since(count):
            return None
        return ReadySpec(port, host or ReadySpec.host, pattern, command,
                         DEFAULT_READY_TIMEOUT if timeout is None else timeout)

    # -- faults ----------------------------------------------------------------------------

    def faults(self, node: yaml.Node, key: str,
               proxies: dict[str, ProxySpec] | None) -> tuple[FaultSpec, ...]:
        items = self.sequence(node, key)
        if not items:
            self.fail(node, key, "needs at least one fault (leave faults out for none)")
        faults = [self.attempt(self.fault, item, f"{key}[{index}]", index, proxies or {})
                  for index, item in enumerate(items)]
        return tuple(fault for fault in faults if fault is not None)

    def fault(self, node: yaml.Node, key: str, index: int,
              proxies: dict[str, ProxySpec]) -> FaultSpec | None:
        if isinstance(node, yaml.MappingNode) and any(
                isinstance(name, yaml.ScalarNode) and name.value in PROCESS_FAULT_REQUIRED
                for name, _ in node.value):
            return self.process_fault(node, key, index)
        count = len(self.errors)
        fields = self.mapping(node, key, FAULT_REQUIRED, FAULT_OPTIONAL,
                              others=(*PROCESS_FAULT_REQUIRED, "down"))
        if "down" in fields:
            self.report(fields["down"][0], join_key(key, "down"),
                        "only for process faults (with process: and action:)")
        name = self.fault_name(node, fields, key, index)
        proxy = self.field(fields, "proxy", key, self.reference, self.declared_proxies,
                           "proxy")
        spec = proxies.get(proxy or "")
        protocol = spec.protocol if spec else None
        command = self.field(fields, "command", key, self.command, protocol)
        armed = self.field(fields, "armed", key, self.number)
        every = self.field(fields, "every", key, self.span)
        self.check_armings(fields, key, every)
        if armed is not None and every is not None and armed >= every.low:
            self.report(fields["armed"][1], f"{key}.armed",
                        f"{armed:g} s is not shorter than every's minimum {every.low:g} s")
        times = self.times(fields, key)
        start_after = self.field(fields, "start_after", key, self.number, inclusive=True)
        must_fire = self.field(fields, "must_fire", key, self.number)
        if must_fire is not None and armed is not None and must_fire < armed:
            self.report(fields["must_fire"][1], f"{key}.must_fire",
                        f"{must_fire:g} s is shorter than armed ({armed:g} s)")
        if not self.clean_since(count) or None in (name, proxy, command, armed):
            return None
        return FaultSpec(name, proxy, command, armed, every, start_after, times, must_fire)

    def process_fault(self, node: yaml.Node, key: str, index: int) -> FaultSpec | None:
        count = len(self.errors)
        fields = self.mapping(node, key, PROCESS_FAULT_REQUIRED, PROCESS_FAULT_OPTIONAL,
                              others=(*FAULT_REQUIRED, "must_fire"))
        for other, problem in NOT_IN_PROCESS_FAULTS.items():
            if other in fields:
                self.report(fields[other][0], join_key(key, other), problem)
        name = self.fault_name(node, fields, key, index)
        process = self.field(fields, "process", key, self.reference,
                             self.declared_processes, "process")
        action = self.field(fields, "action", key, self.choice, PROCESS_ACTIONS)
        every = self.field(fields, "every", key, self.span)
        self.check_armings(fields, key, every)
        down = self.field(fields, "down", key, self.span, inclusive=True)
        if down is not None and every is not None and down.high >= every.low:
            what = "its max " if down.low != down.high else ""
            self.report(fields["down"][1], f"{key}.down",
                        f"{what}{down.high:g} s is not shorter than every's minimum "
                        f"{every.low:g} s")
        times = self.times(fields, key)
        start_after = self.field(fields, "start_after", key, self.number, inclusive=True)
        if not self.clean_since(count) or None in (name, process, action):
            return None
        return FaultSpec(name, None, None, 0.0, every, start_after, times, None, process,
                         action, down or Interval(0.0, 0.0))

    def fault_name(self, node: yaml.Node, fields: Fields, key: str, index: int) -> str | None:
        if "name" in fields:
            name_node = fields["name"][1]
            name = self.attempt(self.string, name_node, f"{key}.name")
        else:
            name_node, name = node, f"fault{index + 1}"
        if name in self.fault_names:
            self.report(name_node, f"{key}.name", f"duplicate fault name {name!r}")
        elif name is not None:
            self.fault_names.add(name)
        return name

    def check_armings(self, fields: Fields, key: str, every: Interval | None) -> None:
        if every is not None and self.duration is not None \
                and self.duration / every.low > MAX_ARMINGS:
            self.report(fields["every"][1], f"{key}.every",
                        f"would arm the fault more than {MAX_ARMINGS} times in "
                        f"{self.duration:g} s")

    def times(self, fields: Fields, key: str) -> int | None:
        if "times" in fields and "every" not in fields:
            self.report(fields["times"][0], f"{key}.times", "needs every")
            return None
        return self.field(fields, "times", key, self.integer, minimum=1)

    def command(self, node: yaml.Node, key: str, protocol: str | None) -> str:
        """A conn.* rule valid for the proxy's protocol; without one, for some protocol."""
        from wirefault import protocols
        from wirefault.proxy import dsl

        text = self.string(node, key)
        candidates = [protocol] if protocol else protocols.names()
        errors: list[dsl.CommandError] = []
        for name in candidates:
            try:
                parsed = dsl.parse(text, name)
            except dsl.CommandError as exc:
                errors.append(exc)
                continue
            if not isinstance(parsed, dsl.Rule) or parsed.action.name == "allow":
                self.fail(node, key, f"expected a conn.* rule other than {ALLOW}")
            return text
        # The most telling error: the one that got furthest, preferably with a suggestion.
        best = max(errors, key=lambda exc: (exc.column, "did you mean" in exc.message))
        checked = f"protocol {protocol}" if protocol else \
            f"no protocol given; checked against {', '.join(candidates)}"
        self.fail(node, key, f"{best} ({checked})")

    # -- checks ----------------------------------------------------------------------------

    def checks(self, node: yaml.Node, key: str) -> tuple[CheckSpec, ...]:
        checks = [self.attempt(self.check, item, f"{key}[{index}]", index)
                  for index, item in enumerate(self.sequence(node, key))]
        return tuple(check for check in checks if check is not None)

    def check(self, node: yaml.Node, key: str, index: int) -> CheckSpec | None:
        count = len(self.errors)
        fields = self.mapping(node, key, (), CHECK_KEYS)
        if "run" in fields and "progress" in fields:
            self.report(fields["progress"][0], join_key(key, "progress"),
                        "give either run or progress, not both")
        elif "run" not in fields and "progress" not in fields:
            self.report(node, join_key(key, "run"), "missing required key")
        elif "progress" in fields:
            for other in ("every", "timeout", "retry_for"):
                if other in fields:
                    self.report(fields[other][0], join_key(key, other),
                                "only with run (a progress check watches the whole run)")
        run = self.field(fields, "run", key, self.string)
        progress = self.field(fields, "progress", key, self.progress)
        name = self.field(fields, "name", key, self.string) if "name" in fields \
            else f"check{index + 1}"
        every = self.field(fields, "every", key, self.number)
        timeout = self.field(fields, "timeout", key, self.number)
        retry_for = self.field(fields, "retry_for", key, self.number, inclusive=True)
        if not self.clean_since(count) or (run is None and progress is None) or name is None:
            return None
        return CheckSpec(name, run, DEFAULT_CHECK_TIMEOUT if timeout is None else timeout,
                         retry_for or 0.0, every, progress)

    def progress(self, node: yaml.Node, key: str) -> ProgressSpec | None:
        count = len(self.errors)
        fields = self.mapping(node, key, ("pattern", "within"), ("file",), {"process": "file"})
        if "file" in fields and "process" in fields:
            self.report(fields["process"][0], join_key(key, "process"),
                        "give either file or process, not both")
        elif "file" not in fields and "process" not in fields:
            self.report(node, join_key(key, "file"), "missing required key (file or process)")
        pattern = self.field(fields, "pattern", key, self.regex)
        within = self.field(fields, "within", key, self.number)
        file = self.field(fields, "file", key, self.folder_path)
        process = self.field(fields, "process", key, self.reference,
                             self.declared_processes, "process")
        if not self.clean_since(count) or pattern is None or within is None \
                or (file is None and process is None):
            return None
        return ProgressSpec(pattern, within, file, process)
