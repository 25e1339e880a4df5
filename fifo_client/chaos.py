"""`wirefault chaos SCENARIO.yaml`: arm faults on running proxies on a seeded schedule.

    wirefault chaos scenario.yaml              # run it; timeline and summary on stdout
    wirefault chaos scenario.yaml --dry-run    # print the schedule, contact nobody
    wirefault chaos scenario.yaml --json       # the timeline as JSON lines instead
    wirefault chaos scenario.yaml --seed 7     # another seed, same scenario

A scenario (YAML; unknown keys are errors, reported with file, line and key):

    seed: 42                       # required integer: same seed, same schedule
    duration: 20                   # required seconds; faults are lifted by then
    timeout: 5                     # optional seconds per FIFO command (default 5)
    proxies:                       # required: name -> where its FIFO is
      source_link:
        fifo: /tmp/a.fifo          # relative paths start at the scenario's folder
        protocol: wallaroo         # optional: check commands against this protocol
                                   #   (without it: valid for at least one protocol)
    faults:                        # required, non-empty
      - name: kill-on-notify       # optional (default fault1, fault2...), unique
        proxy: source_link         # required: one of the proxies
        command: conn.onNotify().kill()   # required: a conn.* rule, not allow()
        armed: 0.5                 # required seconds before conn.allow() restores
        every: [1.0, 3.0]          # optional seconds between armings: fixed or [min, max]
        start_after: 2             # optional first arming (default: one `every` draw;
                                   #   0 for a fault without `every`, armed once)
        times: 3                   # optional cap on armings (needs `every`)
    checks:                        # optional, run in order once the faults are over
      - name: output intact        # optional
        run: cmp -s input output   # required shell command, run in the scenario's folder
        timeout: 60                # optional seconds per attempt (default 60)
        retry_for: 20              # optional: retry (every 0.5 s) until it passes or
                                   #   this many seconds passed (default 0: one attempt)

The schedule is computed up front from the seed: each fault draws its intervals from its
own `random.Random(f"{seed}/{name}")`, so adding a fault leaves the others' times alone.
A proxy holds one rule at a time, so faults on the same proxy never overlap: when a
window would start while another is armed on that proxy, it is postponed until that one
is lifted (shown as "postponed"); a window cannot outlast `duration` (cut short there),
and one that cannot start before `duration` is dropped. Each proxy's windows run in order
on their own task, so a slow proxy never delays another's faults.

The runner talks to proxies only through `FaultProxy`. Exit status: 0 when every check
passed, 1 when a check failed, 2 for a bad scenario, a proxy that does not answer before
the start, or any fault command that failed during the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

import yaml
from yaml.constructor import SafeConstructor

from .client import FaultProxy
from .errors import WirefaultError

EXIT_PASS = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_RUN = 2
ALLOW = "conn.allow()"
DEFAULT_TIMEOUT = 5.0
DEFAULT_CHECK_TIMEOUT = 60.0
CHECK_RETRY_PAUSE = 0.5
CHECK_OUTPUT_CHARS = 2000
MAX_ARMINGS = 100_000
_PROXY_NAME = re.compile(r"[A-Za-z0-9_.-]+")


# -- the scenario ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxySpec:
    name: str
    fifo: str
    protocol: str | None


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


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; ScenarioError names the line and key at fault."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(path, None, None, "", f"cannot read: {exc}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise ScenarioError(path, line, column, "", f"invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(path, None, None, "", f"invalid YAML: {exc}") from None
    if root is None:
        raise ScenarioError(path, 1, 1, "", "the scenario is empty")
    try:
        return _Reader(path).scenario(root)
    except yaml.MarkedYAMLError as exc:  # a scalar no safe constructor accepts (`!tag`)
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise ScenarioError(path, line, column, "", f"invalid YAML: {exc.problem}") from None


Fields = dict[str, tuple[yaml.Node, yaml.Node]]


class _Reader:
    """Turns the composed YAML node tree into a Scenario, failing at the first problem."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.constructor = SafeConstructor()
        self.duration = 0.0

    def fail(self, node: yaml.Node, key: str, problem: str) -> NoReturn:
        mark = node.start_mark
        raise ScenarioError(self.path, mark.line + 1, mark.column + 1, key, problem)

    # -- shapes ----------------------------------------------------------------------------

    def mapping(self, node: yaml.Node, key: str, required: tuple[str, ...],
                optional: tuple[str, ...]) -> Fields:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, key, f"expected a mapping, got {self.describe(node)}")
        fields: Fields = {}
        known = required + optional
        for key_node, value_node in node.value:
            name = self.constructor.construct_object(key_node, deep=True)
            where = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str):
                self.fail(key_node, where, "keys must be strings")
            if name in fields:
                self.fail(key_node, where, "duplicate key")
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                self.fail(key_node, where,
                          f"unknown key (expected {', '.join(known)}){suggestion}")
            fields[name] = (key_node, value_node)
        for name in required:
            if name not in fields:
                self.fail(node, f"{key}.{name}" if key else name, "missing required key")
        return fields

    def sequence(self, node: yaml.Node, key: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, key, f"expected a list, got {self.describe(node)}")
        return list(node.value)

    def describe(self, node: yaml.Node) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        return repr(self.constructor.construct_object(node))

    def scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return node
        return self.constructor.construct_object(node)

    def string(self, node: yaml.Node, key: str) -> str:
        value = self.scalar(node)
        if not isinstance(value, str) or not value.strip():
            self.fail(node, key, f"expected a non-empty string, got {self.describe(node)}")
        return value.strip()

    def number(self, node: yaml.Node, key: str, *, minimum: float = 0.0,
               inclusive: bool = False) -> float:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            self.fail(node, key, f"expected a number of seconds, got {self.describe(node)}")
        if value < minimum or (value == minimum and not inclusive):
            bound = ">=" if inclusive else ">"
            self.fail(node, key, f"must be {bound} {minimum:g}, got {value:g}")
        return float(value)

    def integer(self, node: yaml.Node, key: str, minimum: int | None = None) -> int:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(node, key, f"expected an integer, got {self.describe(node)}")
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

    def scenario(self, root: yaml.Node) -> Scenario:
        top = self.mapping(root, "", ("seed", "duration", "proxies", "faults"),
                           ("timeout", "checks", "description"))
        seed = self.integer(top["seed"][1], "seed")
        duration = self.duration = self.number(top["duration"][1], "duration")
        timeout = DEFAULT_TIMEOUT
        if "timeout" in top:
            timeout = self.number(top["timeout"][1], "timeout")
        if "description" in top:
            self.string(top["description"][1], "description")
        proxies = self.proxies(top["proxies"][1])
        fault_nodes = self.sequence(top["faults"][1], "faults")
        if not fault_nodes:
            self.fail(top["faults"][1], "faults", "needs at least one fault")
        faults = tuple(self.fault(node, f"faults[{i}]", i, proxies)
                       for i, node in enumerate(fault_nodes))
        self.unique_names(fault_nodes, faults)
        checks = ()
        if "checks" in top:
            checks = tuple(self.check(node, f"checks[{i}]", i)
                           for i, node in enumerate(self.sequence(top["checks"][1], "checks")))
        return Scenario(
            path=self.path,
            seed=seed,
            duration=duration,
            timeout=timeout,
            proxies=proxies,
            faults=faults,
            checks=checks,
        )

    def proxies(self, node: yaml.Node) -> dict[str, ProxySpec]:
        if not isinstance(node, yaml.MappingNode) or not node.value:
            self.fail(node, "proxies", "expected a mapping of proxy names to {fifo: PATH}")
        proxies: dict[str, ProxySpec] = {}
        for key_node, value_node in node.value:
            name = self.scalar(key_node)
            key = f"proxies.{name}"
            if not isinstance(name, str) or not _PROXY_NAME.fullmatch(name):
                self.fail(key_node, key, "proxy names use letters, digits, '_', '.', '-'")
            if name in proxies:
                self.fail(key_node, key, "duplicate key")
            fields = self.mapping(value_node, key, ("fifo",), ("protocol",))
            fifo = Path(self.string(fields["fifo"][1], f"{key}.fifo")).expanduser()
            protocol = None
            if "protocol" in fields:
                protocol = self.protocol(fields["protocol"][1], f"{key}.protocol")
            proxies[name] = ProxySpec(name, str(self.path.parent / fifo), protocol)
        return proxies

    def protocol(self, node: yaml.Node, key: str) -> str:
        from wirefault import protocols

        name = self.string(node, key)
        if name not in protocols.names():
            self.fail(node, key, f"unknown protocol {name!r}; known: "
                                 f"{', '.join(protocols.names())}")
        return name

    def fault(self, node: yaml.Node, key: str, index: int,
              proxies: dict[str, ProxySpec]) -> FaultSpec:
        fields = self.mapping(node, key, ("proxy", "command", "armed"),
                              ("name", "every", "start_after", "times"))
        values = {name: value_node for name, (_, value_node) in fields.items()}
        proxy = self.string(values["proxy"], f"{key}.proxy")
        if proxy not in proxies:
            self.fail(values["proxy"], f"{key}.proxy",
                      f"no proxy named {proxy!r}; proxies: {', '.join(proxies)}")
        command = self.command(values["command"], f"{key}.command", proxies[proxy].protocol)
        armed = self.number(values["armed"], f"{key}.armed")
        every = self.interval(values["every"], f"{key}.every") if "every" in fields else None
        if every is not None and self.duration / every.low > MAX_ARMINGS:
            self.fail(values["every"], f"{key}.every",
                      f"would arm the fault more than {MAX_ARMINGS} times in {self.duration:g} s")
        if every is not None and armed >= every.low:
            self.fail(values["armed"], f"{key}.armed",
                      f"{armed:g} s is not shorter than every's minimum {every.low:g} s")
        times = None
        if "times" in fields:
            if every is None:
                self.fail(fields["times"][0], f"{key}.times", "needs every")
            times = self.integer(values["times"], f"{key}.times", minimum=1)
        start_after = None
        if "start_after" in fields:
            start_after = self.number(values["start_after"], f"{key}.start_after",
                                      inclusive=True)
        name = self.string(values["name"], f"{key}.name") if "name" in fields \
            else f"fault{index + 1}"
        return FaultSpec(name, proxy, command, armed, every, start_after, times)

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

    def unique_names(self, nodes: list[yaml.Node], faults: tuple[FaultSpec, ...]) -> None:
        seen: set[str] = set()
        for index, (node, fault) in enumerate(zip(nodes, faults, strict=True)):
            if fault.name in seen:
                self.fail(node, f"faults[{index}].name", f"duplicate fault name {fault.name!r}")
            seen.add(fault.name)

    def check(self, node: yaml.Node, key: str, index: int) -> CheckSpec:
        fields = self.mapping(node, key, ("run",), ("name", "timeout", "retry_for"))
        run = self.string(fields["run"][1], f"{key}.run")
        name = self.string(fields["name"][1], f"{key}.name") if "name" in fields \
            else f"check{index + 1}"
        timeout = DEFAULT_CHECK_TIMEOUT
        if "timeout" in fields:
            timeout = self.number(fields["timeout"][1], f"{key}.timeout")
        retry_for = 0.0
        if "retry_for" in fields:
            retry_for = self.number(fields["retry_for"][1], f"{key}.retry_for", inclusive=True)
        return CheckSpec(name, run, timeout, retry_for)


# -- the schedule ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One arming of a fault: armed at `arm`, lifted at `disarm` (seconds since start)."""

    proxy: str
    fault: str
    command: str
    planned: float
    arm: float
    disarm: float
    cut: bool = False
    """True when `duration` cut the window short."""

    @property
    def postponed(self) -> float:
        return round(self.arm - self.planned, 3)


@dataclass(frozen=True)
class Schedule:
    seed: int
    duration: float
    windows: tuple[Window, ...]
    dropped: tuple[Window, ...] = ()

    def for_proxy(self, proxy: str) -> list[Window]:
        return [w for w in self.windows if w.proxy == proxy]


def _arm_times(fault: FaultSpec, rng: random.Random, duration: float) -> Iterator[float]:
    if fault.every is None:
        yield fault.start_after or 0.0
        return
    moment = fault.start_after if fault.start_after is not None else fault.every.draw(rng)
    count = 0
    while moment < duration and (fault.times is None or count < fault.times):
        yield moment
        count += 1
        moment += fault.every.draw(rng)


def build_schedule(scenario: Scenario, seed: int | None = None) -> Schedule:
    """Every window of the run, in arming order; the same seed gives the same schedule."""
    seed = scenario.seed if seed is None else seed
    planned: list[tuple[float, int, FaultSpec]] = []
    for order, fault in enumerate(scenario.faults):
        rng = random.Random(f"{seed}/{fault.name}")
        planned += [(round(t, 3), order, fault)
                    for t in _arm_times(fault, rng, scenario.duration)]
    windows: list[Window] = []
    dropped: list[Window] = []
    free_at = dict.fromkeys(scenario.proxies, 0.0)
    for moment, _, fault in sorted(planned, key=lambda item: item[:2]):
        arm = max(moment, free_at[fault.proxy])
        end = round(arm + fault.armed, 3)
        window = Window(fault.proxy, fault.name, fault.command, moment, arm,
                        min(end, scenario.duration), end > scenario.duration)
        if arm >= scenario.duration:
            dropped.append(window)
            continue
        windows.append(window)
        free_at[fault.proxy] = window.disarm
    return Schedule(seed, scenario.duration, tuple(windows), tuple(dropped))


# -- reporting ------------------------------------------------------------------------------


@dataclass
class CheckResult:
    name: str
    run: str
    passed: bool
    status: int | None
    seconds: float
    attempts: int
    output: str


@dataclass
class Tally:
    armed: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)

    def exit_status(self) -> int:
        if self.errors:
            return EXIT_BAD_RUN
        return EXIT_PASS if all(check.passed for check in self.checks) else EXIT_CHECK_FAILED


class Reporter:
    """Writes the timeline as text lines or as JSON lines."""

    def __init__(self, out: TextIO, as_json: bool, width: int) -> None:
        self.out = out
        self.as_json = as_json
        self.width = width

    def emit(self, event: str, **fields: Any) -> None:
        if self.as_json:
            print(json.dumps({"event": event, **fields}), file=self.out, flush=True)

    def line(self, text: str) -> None:
        if not self.as_json:
            print(text, file=self.out, flush=True)

    def step(self, event: str, moment: float, proxy: str, fault: str, command: str,
             note: str = "", **extra: Any) -> None:
        self.emit(event, t=round(moment, 3), proxy=proxy, fault=fault, command=command,
                  **extra)
        suffix = f"  ({note})" if note else ""
        self.line(f"+{moment:8.3f}s  {proxy:<{self.width}}  {event:<9} {fault}: "
                  f"{command}{suffix}")


def _window_note(window: Window) -> str:
    notes = []
    if window.postponed:
        notes.append(f"postponed {window.postponed:g}s")
    if window.cut:
        notes.append("cut at duration")
    return ", ".join(notes)


def print_schedule(schedule: Schedule, reporter: Reporter) -> None:
    reporter.line(f"schedule: seed {schedule.seed}, duration {schedule.duration:g}s, "
                  f"{len(schedule.windows)} windows")
    # In time order, as the run will print them; a lift comes before an arming at the same
    # moment (that is the order a proxy receives them).
    steps = sorted([(w.arm, 1, i, w) for i, w in enumerate(schedule.windows)]
                   + [(w.disarm, 0, i, w) for i, w in enumerate(schedule.windows)],
                   key=lambda step: step[:3])
    for _, arming, _, window in steps:
        if arming:
            extra = {"planned": window.planned, "disarm": window.disarm,
                     "postponed": window.postponed, "cut": window.cut}
            reporter.step("armed", window.arm, window.proxy, window.fault, window.command,
                          _window_note(window), **extra)
        else:
            reporter.step("disarmed", window.disarm, window.proxy, window.fault, ALLOW)
    for window in schedule.dropped:
        reporter.step("dropped", window.arm, window.proxy, window.fault, window.command,
                      "no room before duration", planned=window.planned)


def print_summary(schedule: Schedule, tally: Tally, reporter: Reporter) -> None:
    status = tally.exit_status()
    passed = sum(check.passed for check in tally.checks)
    reporter.emit("summary", seed=schedule.seed, duration=schedule.duration,
                  armed=tally.armed, errors=tally.errors,
                  checks={"passed": passed, "failed": len(tally.checks) - passed},
                  exit=status)
    per_proxy = ", ".join(f"{name} {count}" for name, count in sorted(tally.armed.items()))
    reporter.line(f"summary: seed {schedule.seed}, {schedule.duration:g}s, "
                  f"{sum(tally.armed.values())} faults armed ({per_proxy or 'none'}), "
                  f"{len(tally.errors)} errors, {passed}/{len(tally.checks)} checks passed")
    for error in tally.errors:
        reporter.line(f"  error: {error}")
    for check in tally.checks:
        verdict = "passed" if check.passed else f"FAILED (exit {check.status})"
        reporter.line(f"  check {check.name}: {verdict} after {check.attempts} attempt(s), "
                      f"{check.seconds:.2f}s")
        if not check.passed and check.output:
            reporter.line("    " + check.output.rstrip().replace("\n", "\n    "))
    verdict = {EXIT_PASS: "pass", EXIT_CHECK_FAILED: "check failed"}.get(status, "errors")
    reporter.line(f"verdict: {verdict} (exit {status})")


# -- running --------------------------------------------------------------------------------


class ProxyUnreachable(WirefaultError):
    pass


class Runner:
    def __init__(self, scenario: Scenario, schedule: Schedule, reporter: Reporter) -> None:
        self.scenario = scenario
        self.schedule = schedule
        self.reporter = reporter
        self.tally = Tally()
        self.clients = {name: FaultProxy(spec.fifo, timeout=scenario.timeout)
                        for name, spec in scenario.proxies.items()}
        self.started = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def run(self) -> Tally:
        await self._preflight()
        self.reporter.emit("start", seed=self.schedule.seed, duration=self.schedule.duration,
                           proxies=sorted(self.clients))
        self.started = time.monotonic()
        try:
            await asyncio.gather(*(self._drive(name) for name in self.clients))
            await asyncio.sleep(max(0.0, self.schedule.duration - self.elapsed()))
        finally:
            await self._allow_everywhere()
        for check in self.scenario.checks:
            self.tally.checks.append(await self._check(check))
        return self.tally

    async def _preflight(self) -> None:
        """Every proxy must answer before anything is armed; all start from allow()."""
        for name, client in self.clients.items():
            try:
                await asyncio.to_thread(client.allow)
            except WirefaultError as exc:
                raise ProxyUnreachable(f"proxy {name}: {exc}") from None

    async def _drive(self, proxy: str) -> None:
        for window in self.schedule.for_proxy(proxy):
            await self._until(window.arm)
            if await self._send(proxy, window.fault, window.command, "armed",
                                _window_note(window)):
                self.tally.armed[proxy] = self.tally.armed.get(proxy, 0) + 1
            await self._until(window.disarm)
            await self._send(proxy, window.fault, ALLOW, "disarmed")

    async def _until(self, moment: float) -> None:
        await asyncio.sleep(max(0.0, moment - self.elapsed()))

    async def _send(self, proxy: str, fault: str, command: str, event: str,
                    note: str = "") -> bool:
        try:
            await asyncio.to_thread(self.clients[proxy].send, command)
        except WirefaultError as exc:
            moment = self.elapsed()
            self.tally.errors.append(f"+{moment:.3f}s {proxy} {fault}: {exc}")
            self.reporter.step("error", moment, proxy, fault, command, str(exc),
                               error=str(exc))
            return False
        self.reporter.step(event, self.elapsed(), proxy, fault, command, note)
        return True

    async def _allow_everywhere(self) -> None:
        """Leave no fault armed, whatever happened (a cancelled run included)."""
        for client in self.clients.values():
            with contextlib.suppress(WirefaultError):
                await asyncio.to_thread(client.allow)

    async def _check(self, check: CheckSpec) -> CheckResult:
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            status, output = await self._run_shell(check)
            waited = time.monotonic() - started
            if status == 0 or waited + CHECK_RETRY_PAUSE > check.retry_for:
                break
            await asyncio.sleep(CHECK_RETRY_PAUSE)
        result = CheckResult(check.name, check.run, status == 0, status,
                             round(time.monotonic() - started, 3), attempts,
                             output[-CHECK_OUTPUT_CHARS:])
        self.reporter.emit("check", name=result.name, run=result.run, passed=result.passed,
                           status=result.status, seconds=result.seconds,
                           attempts=result.attempts, output=result.output)
        return result

    async def _run_shell(self, check: CheckSpec) -> tuple[int | None, str]:
        env = {**os.environ, "WIREFAULT_CHAOS_SEED": str(self.schedule.seed)}
        process = await asyncio.create_subprocess_shell(
            check.run, cwd=self.scenario.path.parent, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = await asyncio.wait_for(process.communicate(), check.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            await process.wait()
            return None, f"timed out after {check.timeout:g}s"
        return process.returncode, output.decode("utf-8", "replace")


# -- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wirefault chaos",
        description="Arm faults on running wirefault proxies on a seeded schedule, "
                    "then run the scenario's checks.",
        epilog="exit status: 0 checks passed, 1 a check failed, 2 bad scenario, "
               "unreachable proxy or failed fault command",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenario", type=Path, help="the scenario file (YAML)")
    parser.add_argument("--json", action="store_true",
                        help="write the timeline as JSON lines on stdout")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the schedule and exit without contacting any proxy")
    parser.add_argument("--seed", type=int, help="override the scenario's seed")
    return parser


def main(argv: list[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run `wirefault chaos`; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed the problem
        return EXIT_BAD_RUN if exc.code else EXIT_PASS
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(f"wirefault chaos: {exc}", file=err)
        return EXIT_BAD_RUN
    schedule = build_schedule(scenario, args.seed)
    reporter = Reporter(out, args.json, max(len(name) for name in scenario.proxies))
    if args.dry_run:
        with contextlib.suppress(BrokenPipeError):  # e.g. piped into `head`
            print_schedule(schedule, reporter)
        return EXIT_PASS
    runner = Runner(scenario, schedule, reporter)
    try:
        tally = asyncio.run(runner.run())
    except ProxyUnreachable as exc:
        print(f"wirefault chaos: {exc}", file=err)
        return EXIT_BAD_RUN
    except KeyboardInterrupt:
        print("wirefault chaos: interrupted; every proxy was set back to conn.allow()",
              file=err)
        return 130
    print_summary(schedule, tally, reporter)
    return tally.exit_status()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
