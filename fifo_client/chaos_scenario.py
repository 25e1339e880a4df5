"""Reading a `wirefault chaos` scenario: YAML in, a validated `Scenario` out, or every problem.

A scenario (YAML; unknown keys are errors, reported with file, line and key):

    seed: 42                       # required integer: same seed, same schedule
    duration: 20                   # required seconds; faults are lifted by then
    timeout: 5                     # optional seconds per FIFO command (default 5)
    proxies:                       # required: name -> where its FIFO or API URL is
      source_link:
        fifo: /tmp/a.fifo          # relative paths start at the scenario's folder; or
                                   #   api: http://HOST:PORT/proxies/NAME (exactly one)
        protocol: wallaroo         # optional: check commands against this protocol
                                   #   (without it: valid for at least one protocol)
    faults:                        # required, non-empty
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
    checks:                        # optional, run in order once the faults are over
      - name: output intact        # optional
        run: cmp -s input output   # required shell command, run in the scenario's folder
        timeout: 60                # optional seconds per attempt (default 60)
        retry_for: 20              # optional: retry (every 0.5 s) until it passes or
                                   #   this many seconds passed (default 0: one attempt)

One pass finds every problem: a bad value is recorded and skipped, and checks that depend
on it (`armed` against `every`, a command against its proxy's protocol...) are left out, so
each problem is reported once, in file order.
"""

from __future__ import annotations

import difflib
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml
from yaml.constructor import SafeConstructor

from .errors import WirefaultError

ALLOW = "conn.allow()"
DEFAULT_TIMEOUT = 5.0
DEFAULT_CHECK_TIMEOUT = 60.0
MAX_ARMINGS = 100_000
_PROXY_NAME = re.compile(r"[A-Za-z0-9_.-]+")

TOP_REQUIRED = ("seed", "duration", "proxies", "faults")
TOP_OPTIONAL = ("timeout", "checks", "description")
FAULT_REQUIRED = ("proxy", "command", "armed")
FAULT_OPTIONAL = ("name", "every", "start_after", "times", "must_fire")

T = TypeVar("T")


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


@dataclass(frozen=True)
class FaultSpec:
    name: str
    proxy: str
    command: str
    armed: float
    every: Interval | None = None
    start_after: float | None = None
    times: int | None = None
    must_fire: float | None = None
    """Seconds since each arming within which the proxy must have acted on a frame."""


@dataclass(frozen=True)
class CheckSpec:
    name: str
    run: str
    timeout: float = DEFAULT_CHECK_TIMEOUT
    retry_for: float = 0.0


@dataclass(frozen=True)
class Scenario:
    path: Path
    seed: int
    duration: float
    timeout: float
    proxies: dict[str, ProxySpec]
    faults: tuple[FaultSpec, ...]
    checks: tuple[CheckSpec, ...] = ()


class ScenarioError(WirefaultError):
    """A scenario that cannot run; `str()` is `file:line:column: key: problem`."""

    def __init__(self, path: Path | str, line: int | None, column: int | None, key: str,
                 problem: str) -> None:
        self.path, self.line, self.column, self.key = str(path), line, column, key
        where = self.path if line is None else f"{self.path}:{line}:{column}"
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


class ScenarioErrors(ScenarioError):
    """Every problem of a scenario, in file order: `errors`, one line each in `str()`. The
    location attributes are the first problem's."""

    def __init__(self, errors: Sequence[ScenarioError]) -> None:
        self.errors = tuple(errors)
        first = self.errors[0]
        self.path, self.line, self.column, self.key = first.path, first.line, first.column, \
            first.key
        WirefaultError.__init__(self, "\n".join(str(error) for error in self.errors))


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; ScenarioErrors lists every problem found."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioErrors([ScenarioError(path, None, None, "", f"cannot read: {exc}")]) \
            from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:  # the syntax is broken: nothing after it can be trusted
        raise ScenarioErrors([_yaml_error(path, exc)]) from None
    if root is None:
        raise ScenarioErrors([ScenarioError(path, 1, 1, "", "the scenario is empty")])
    reader = _Reader(path)
    scenario = reader.attempt(reader.scenario, root)
    if reader.errors or scenario is None:
        raise ScenarioErrors(sorted(reader.errors, key=_position))
    return scenario


def _yaml_error(path: Path, exc: yaml.YAMLError, key: str = "") -> ScenarioError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
    problem = getattr(exc, "problem", None) or exc
    return ScenarioError(path, line, column, key, f"invalid YAML: {problem}")


def _position(error: ScenarioError) -> tuple[int, int]:
    return error.line or 0, error.column or 0


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


Fields = dict[str, tuple[yaml.Node, yaml.Node]]


class _Reader:
    """Turns the composed YAML node tree into a Scenario, collecting every problem.

    `fail` raises a ScenarioError for the value at hand; `attempt` records it and returns
    None, so the caller carries on with the next value. None therefore means "absent or
    bad", and whatever depends on such a value is not checked."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.constructor = SafeConstructor()
        self.errors: list[ScenarioError] = []
        self.duration: float | None = None
        self.declared_proxies: dict[str, None] = {}
        """Every proxy name given, valid spec or not, in file order."""
        self.fault_names: set[str] = set()

    def error(self, node: yaml.Node, key: str, problem: str) -> ScenarioError:
        mark = node.start_mark
        return ScenarioError(self.path, mark.line + 1, mark.column + 1, key, problem)

    def fail(self, node: yaml.Node, key: str, problem: str) -> NoReturn:
        raise self.error(node, key, problem)

    def report(self, node: yaml.Node, key: str, problem: str) -> None:
        self.errors.append(self.error(node, key, problem))

    def attempt(self, read: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """`read(*args, **kwargs)`, or None once the problem it raised is recorded."""
        try:
            return read(*args, **kwargs)
        except ScenarioError as exc:
            self.errors.append(exc)
            return None

    def field(self, fields: Fields, name: str, key: str, read: Callable[..., T],
              *args: Any, **kwargs: Any) -> T | None:
        """The value of an optional (or already reported missing) field, read by `read`."""
        if name not in fields:
            return None
        return self.attempt(read, fields[name][1], _join(key, name), *args, **kwargs)

    def clean_since(self, count: int) -> bool:
        return len(self.errors) == count

    # -- shapes ----------------------------------------------------------------------------

    def construct(self, node: yaml.Node, key: str) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # a scalar no safe constructor accepts (`!tag`)
            raise _yaml_error(self.path, exc, key) from None

    def mapping(self, node: yaml.Node, key: str, required: tuple[str, ...],
                optional: tuple[str, ...], alternatives: dict[str, str] | None = None
                ) -> Fields:
        """The mapping's known keys; unknown, duplicate and missing keys are reported.
        `alternatives` maps a further key to the one it may stand in for."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, key, f"expected a mapping, got {self.describe(node, key)}")
        fields: Fields = {}
        known = required + optional
        for key_node, value_node in node.value:
            name = self.attempt(self.key_name, key_node, key, known, fields,
                                alternatives or {})
            if name is not None:
                fields[name] = (key_node, value_node)
        for name in required:
            if name not in fields:
                self.report(node, _join(key, name), "missing required key")
        return fields

    def key_name(self, node: yaml.Node, key: str, known: tuple[str, ...],
                 fields: Fields, alternatives: dict[str, str]) -> str:
        name = self.construct(node, key)
        where = _join(key, str(name))
        if not isinstance(name, str):
            self.fail(node, where, "keys must be strings")
        if name in fields:
            self.fail(node, where, "duplicate key")
        if name not in known and name not in alternatives:
            hint = difflib.get_close_matches(name, (*known, *alternatives), n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            instead = "".join(f", or {alt} in place of {of}" for alt, of in alternatives.items())
            self.fail(node, where,
                      f"unknown key (expected {', '.join(known)}){instead}{suggestion}")
        return name

    def sequence(self, node: yaml.Node, key: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, key, f"expected a list, got {self.describe(node, key)}")
        return list(node.value)

    def describe(self, node: yaml.Node, key: str) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        return repr(self.construct(node, key))

    def scalar(self, node: yaml.Node, key: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return node
        return self.construct(node, key)

    def string(self, node: yaml.Node, key: str) -> str:
        value = self.scalar(node, key)
        if not isinstance(value, str) or not value.strip():
            self.fail(node, key,
                      f"expected a non-empty string, got {self.describe(node, key)}")
        return value.strip()

    def path_in_scenario_folder(self, node: yaml.Node, key: str) -> str:
        return str(self.path.parent / Path(self.string(node, key)).expanduser())

    def number(self, node: yaml.Node, key: str, *, minimum: float = 0.0,
               inclusive: bool = False) -> float:
        value = self.scalar(node, key)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            self.fail(node, key,
                      f"expected a number of seconds, got {self.describe(node, key)}")
        if value < minimum or (value == minimum and not inclusive):
            bound = ">=" if inclusive else ">"
            self.fail(node, key, f"must be {bound} {minimum:g}, got {value:g}")
        return float(value)

    def integer(self, node: yaml.Node, key: str, minimum: int | None = None) -> int:
        value = self.scalar(node, key)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(node, key, f"expected an integer, got {self.describe(node, key)}")
        if minimum is not None and value < minimum:
            self.fail(node, key, f"must be >= {minimum}, got {value}")
        return value

    def interval(self, node: yaml.Node, key: str) -> Interval:
        if isinstance(node, yaml.ScalarNode):
            seconds = self.number(node, key)
            return Interval(seconds, seconds)
        items = self.sequence(node, key) if isinstance(node, yaml.SequenceNode) else []
        if len(items) != 2:
            self.fail(node, key, "expected seconds or [min, max]")
        low, high = (self.number(item, key) for item in items)
        if low > high:
            self.fail(node, key, f"min {low:g} is above max {high:g}")
        return Interval(low, high)

    # -- sections --------------------------------------------------------------------------

    def scenario(self, root: yaml.Node) -> Scenario | None:
        count = len(self.errors)
        top = self.mapping(root, "", TOP_REQUIRED, TOP_OPTIONAL)
        seed = self.field(top, "seed", "", self.integer)
        self.duration = self.field(top, "duration", "", self.number)
        timeout = self.field(top, "timeout", "", self.number)
        self.field(top, "description", "", self.string)
        proxies = self.field(top, "proxies", "", self.proxies)
        faults = self.field(top, "faults", "", self.faults, proxies)
        checks = self.field(top, "checks", "", self.checks)
        if not self.clean_since(count) or seed is None or self.duration is None \
                or proxies is None or faults is None:
            return None
        return Scenario(
            path=self.path,
            seed=seed,
            duration=self.duration,
            timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
            proxies=proxies,
            faults=faults,
            checks=checks or (),
        )

    def proxies(self, node: yaml.Node, key: str) -> dict[str, ProxySpec]:
        if not isinstance(node, yaml.MappingNode) or not node.value:
            self.fail(node, key, "expected a mapping of proxy names to {fifo: PATH} or {api: URL}")
        proxies: dict[str, ProxySpec] = {}
        for key_node, value_node in node.value:
            name = self.attempt(self.proxy_name, key_node, key)
            if name is None:
                continue
            spec = self.attempt(self.proxy, value_node, f"{key}.{name}", name)
            if spec is not None:
                proxies[name] = spec
        return proxies

    def proxy_name(self, node: yaml.Node, key: str) -> str:
        name = self.scalar(node, key)
        where = f"{key}.{name}"
        if isinstance(name, str) and name in self.declared_proxies:
            self.fail(node, where, "duplicate key")
        if isinstance(name, str):  # even a bad name: faults naming it have no problem of their own
            self.declared_proxies[name] = None
        if not isinstance(name, str) or not _PROXY_NAME.fullmatch(name):
            self.fail(node, where, "proxy names use letters, digits, '_', '.', '-'")
        return name

    def proxy(self, node: yaml.Node, key: str, name: str) -> ProxySpec | None:
        count = len(self.errors)
        fields = self.mapping(node, key, (), ("fifo", "protocol"), {"api": "fifo"})
        if "fifo" in fields and "api" in fields:
            self.report(fields["api"][0], _join(key, "api"),
                        "give either fifo or api, not both")
        elif "fifo" not in fields and "api" not in fields:
            self.report(node, _join(key, "fifo"), "missing required key (fifo or api)")
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

    def protocol(self, node: yaml.Node, key: str) -> str:
        from wirefault import protocols

        name = self.string(node, key)
        if name not in protocols.names():
            self.fail(node, key, f"unknown protocol {name!r}; known: "
                                 f"{', '.join(protocols.names())}")
        return name

    def faults(self, node: yaml.Node, key: str,
               proxies: dict[str, ProxySpec] | None) -> tuple[FaultSpec, ...]:
        items = self.sequence(node, key)
        if not items:
            self.fail(node, key, "needs at least one fault")
        faults = [self.attempt(self.fault, item, f"{key}[{index}]", index, proxies or {})
                  for index, item in enumerate(items)]
        return tuple(fault for fault in faults if fault is not None)

    def fault(self, node: yaml.Node, key: str, index: int,
              proxies: dict[str, ProxySpec]) -> FaultSpec | None:
        count = len(self.errors)
        fields = self.mapping(node, key, FAULT_REQUIRED, FAULT_OPTIONAL)
        name = self.fault_name(node, fields, key, index)
        proxy = self.field(fields, "proxy", key, self.proxy_reference)
        spec = proxies.get(proxy or "")
        protocol = spec.protocol if spec else None
        command = self.field(fields, "command", key, self.command, protocol)
        armed = self.field(fields, "armed", key, self.number)
        every = self.field(fields, "every", key, self.interval)
        self.check_armings(fields, key, armed, every)
        times = self.times(fields, key)
        start_after = self.field(fields, "start_after", key, self.number, inclusive=True)
        must_fire = self.field(fields, "must_fire", key, self.number)
        if must_fire is not None and armed is not None and must_fire < armed:
            self.report(fields["must_fire"][1], f"{key}.must_fire",
                        f"{must_fire:g} s is shorter than armed ({armed:g} s)")
        if not self.clean_since(count) or None in (name, proxy, command, armed):
            return None
        return FaultSpec(name, proxy, command, armed, every, start_after, times, must_fire)

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

    def proxy_reference(self, node: yaml.Node, key: str) -> str:
        proxy = self.string(node, key)
        if proxy not in self.declared_proxies:
            self.fail(node, key, f"no proxy named {proxy!r}; proxies: "
                                 f"{', '.join(self.declared_proxies)}")
        return proxy

    def check_armings(self, fields: Fields, key: str, armed: float | None,
                      every: Interval | None) -> None:
        if every is None:
            return
        if self.duration is not None and self.duration / every.low > MAX_ARMINGS:
            self.report(fields["every"][1], f"{key}.every",
                        f"would arm the fault more than {MAX_ARMINGS} times in "
                        f"{self.duration:g} s")
        if armed is not None and armed >= every.low:
            self.report(fields["armed"][1], f"{key}.armed",
                        f"{armed:g} s is not shorter than every's minimum {every.low:g} s")

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

    def checks(self, node: yaml.Node, key: str) -> tuple[CheckSpec, ...]:
        checks = [self.attempt(self.check, item, f"{key}[{index}]", index)
                  for index, item in enumerate(self.sequence(node, key))]
        return tuple(check for check in checks if check is not None)

    def check(self, node: yaml.Node, key: str, index: int) -> CheckSpec | None:
        count = len(self.errors)
        fields = self.mapping(node, key, ("run",), ("name", "timeout", "retry_for"))
        run = self.field(fields, "run", key, self.string)
        name = self.field(fields, "name", key, self.string) if "name" in fields \
            else f"check{index + 1}"
        timeout = self.field(fields, "timeout", key, self.number)
        retry_for = self.field(fields, "retry_for", key, self.number, inclusive=True)
        if not self.clean_since(count) or run is None or name is None:
            return None
        return CheckSpec(name, run, DEFAULT_CHECK_TIMEOUT if timeout is None else timeout,
                         retry_for or 0.0)
