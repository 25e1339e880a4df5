"""What `wirefault chaos` prints: the timeline (text or JSON lines, and the run log), the
summary with its table of faults, and the tally that decides the exit status."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from .chaos_schedule import Schedule, Window

EXIT_PASS = 0
EXIT_CHECK_FAILED = 1
"""A check failed, or a managed process failed (crashed by itself, or did not come back)."""
EXIT_BAD_RUN = 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT, as a shell reports a command stopped by Ctrl-C."""
EXIT_TERMINATED = 143
"""128 + SIGTERM."""
EXIT_OUTPUT_CLOSED = 141
"""128 + SIGPIPE, as a shell reports any command whose reader went away (`| head`)."""


class OutputClosed(Exception):
    """Whoever read the timeline went away (stdout is a closed pipe)."""


@dataclass
class CheckResult:
    name: str
    run: str
    """The shell command, or for a progress check what it watches."""
    passed: bool
    status: int | None
    seconds: float
    attempts: int
    output: str
    matches: int | None = None
    """Progress checks: the matching lines seen."""


@dataclass
class FaultCount:
    """One scenario fault over the run: `applied` armings (network) or actions (process);
    for network faults, the armings the proxy saw fire (`fired`, with `frames` acted on)
    and those whose count could not be read (`unknown`)."""

    kind: str
    """"network" or "process"."""
    target: str
    applied: int = 0
    fired: int = 0
    frames: int = 0
    unknown: int = 0

    def fired_text(self) -> str:
        if self.kind == "process":
            return "-"
        if self.applied and not self.fired and not self.unknown:
            return "never fired"
        unknown = f" (+{self.unknown} unknown)" if self.unknown else ""
        return f"{self.fired} ({self.frames} frame{'' if self.frames == 1 else 's'}){unknown}"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "target": self.target,
                                "applied": self.applied}
        if self.kind == "network":
            data |= {"fired": self.fired, "frames": self.frames,
                     "never_fired": bool(self.applied and not self.fired and not self.unknown)}
        return data


@dataclass
class Tally:
    armed: dict[str, int] = field(default_factory=dict)
    fired: dict[str, int] = field(default_factory=dict)
    """Must-fire armings seen firing, per proxy."""
    held: float = 0.0
    """Seconds the scenario clock stood still for must-fire faults."""
    errors: list[str] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    faults: dict[str, FaultCount] = field(default_factory=dict)
    """Per scenario fault, in the scenario's order."""
    check_runs: dict[str, list[int]] = field(default_factory=dict)
    """`every` checks: [passed, failed] runs while the run went on."""
    failure: str | None = None
    """What failed the run while it went on (a check, a process): the run stopped there."""
    failed_check: bool = False
    run_dir: str | None = None
    paused: list[dict[str, Any]] = field(default_factory=list)
    """The processes left stopped (SIGSTOP) after a failure: name, pid, pgid, logs."""

    def note_armed(self, proxy: str) -> None:
        self.armed[proxy] = self.armed.get(proxy, 0) + 1

    def note_fired(self, proxy: str) -> None:
        self.fired[proxy] = self.fired.get(proxy, 0) + 1

    def note_check_run(self, result: CheckResult) -> None:
        runs = self.check_runs.setdefault(result.name, [0, 0])
        runs[0 if result.passed else 1] += 1

    def exit_status(self) -> int:
        if self.failure is not None:
            return EXIT_CHECK_FAILED
        if self.errors:
            return EXIT_BAD_RUN
        return EXIT_PASS if all(check.passed for check in self.checks) else EXIT_CHECK_FAILED


class EventSink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...


class Reporter:
    """Writes the timeline as text lines or as JSON lines; OutputClosed once the reader
    is gone, after which the output is discarded (so the interpreter's last flush of a
    closed stdout cannot fail either)."""

    def __init__(self, out: TextIO, as_json: bool, width: int) -> None:
        self.out = out
        self.as_json = as_json
        self.width = width
        self.log: EventSink | None = None
        """The run log: every event goes there too, with its `t`."""
        self.clock: Callable[[], float] | None = None
        """Seconds since the start, for the run log's events that carry no `t`."""

    def emit(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            moment = fields.get("t")
            if moment is None:
                moment = round(self.clock(), 3) if self.clock else 0.0
            rest = {key: value for key, value in fields.items() if key != "t"}
            self.log.write({"event": event, "t": moment, **rest})
        if self.as_json:
            self._write(json.dumps({"event": event, **fields}))

    def line(self, text: str) -> None:
        if not self.as_json:
            self._write(text)

    def _write(self, text: str) -> None:
        try:
            print(text, file=self.out, flush=True)
        except BrokenPipeError:
            self._discard_the_rest()
            raise OutputClosed from None

    def _discard_the_rest(self) -> None:
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.out.fileno())
            os.close(devnull)

    def step(self, event: str, moment: float, proxy: str, fault: str, command: str,
             note: str = "", **extra: Any) -> None:
        self.emit(event, t=round(moment, 3), proxy=proxy, fault=fault, command=command,
                  **extra)
        suffix = f"  ({note})" if note else ""
        self.line(f"+{moment:8.3f}s  {proxy:<{self.width}}  {event:<9} {fault}: "
                  f"{command}{suffix}")

    def event(self, event: str, moment: float, target: str, note: str = "",
              **fields: Any) -> None:
        """A process or check event: `+   2.104s  crash      sink  (crash-sink, down 0.4s)`."""
        self.emit(event, t=round(moment, 3), **fields)
        # One line per event, whatever a command or a check's output holds.
        suffix = f"  ({note})" if note else ""
        line = f"+{moment:8.3f}s  {event:<10} {target}{suffix}"
        self.line(line.replace("\r", "\\r").replace("\n", "\\n"))


def window_note(window: Window) -> str:
    notes = []
    if window.cut:
        notes.append("cut at duration")
    if window.must_fire is not None:
        notes.append(f"must fire within {window.must_fire:g}s")
    return ", ".join(notes)


RESTART_EVENT = {"crash": "restart", "stop": "restart", "pause": "resume"}
"""What ends a process window: the restart after a crash or stop, the SIGCONT of a pause."""


def process_note(window: Window) -> str:
    return f"{window.name}, down {window.disarm - window.arm:.3g}s"


def print_schedule(schedule: Schedule, reporter: Reporter) -> None:
    reporter.line(f"schedule: seed {schedule.seed}, duration {schedule.duration:g}s, "
                  f"{len(schedule.windows)} windows")
    # In time order, as the run will print them; a lift comes before an arming at the same
    # moment (that is the order a proxy receives them).
    steps = sorted([(w.arm, 1, i, w) for i, w in enumerate(schedule.windows)]
                   + [(w.disarm, 0, i, w) for i, w in enumerate(schedule.windows)],
                   key=lambda step: step[:3])
    for _, arming, _, window in steps:
        if window.process is not None:
            assert window.action is not None
            event = window.action if arming else RESTART_EVENT[window.action]
            moment = window.arm if arming else window.disarm
            reporter.event(event, moment, window.process, process_note(window),
                           process=window.process, fault=window.fault, name=window.name,
                           down=round(window.disarm - window.arm, 3))
        elif arming:
            extra = {"disarm": window.disarm, "cut": window.cut, "must_fire": window.must_fire}
            reporter.step("armed", window.arm, window.proxy, window.fault, window.command,
                          window_note(window), name=window.name, **extra)
        else:
            reporter.step("disarmed", window.disarm, window.proxy, window.fault,
                          window.lift_command, name=window.name)
    for window in schedule.dropped:
        if window.process is not None:
            reporter.event("dropped", window.arm, window.process, "no room before duration",
                           process=window.process, fault=window.fault, name=window.name)
            continue
        reporter.step("dropped", window.arm, window.proxy, window.fault, window.command,
                      "no room before duration", name=window.name)


def print_fault_table(tally: Tally, reporter: Reporter) -> None:
    """The final table: per fault, its target, how often applied and (network) fired."""
    if not tally.faults:
        return
    rows = [("fault", "target", "applied", "fired")]
    rows += [(name, f"{'process' if count.kind == 'process' else 'proxy'} {count.target}",
              str(count.applied), count.fired_text()) for name, count in tally.faults.items()]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    reporter.line("faults:")
    for name, target, applied, fired in rows:
        reporter.line(f"  {name:<{widths[0]}}  {target:<{widths[1]}}  "
                      f"{applied:>{widths[2]}}  {fired}".rstrip())


def print_summary(schedule: Schedule, tally: Tally, reporter: Reporter) -> None:
    status = tally.exit_status()
    passed = sum(check.passed for check in tally.checks)
    extra: dict[str, Any] = {}
    if tally.failure is not None:
        extra["failure"] = tally.failure
    if tally.paused:
        extra["paused"] = tally.paused
    reporter.emit("summary", seed=schedule.seed, duration=schedule.duration,
                  armed=tally.armed, fired=tally.fired, held=round(tally.held, 3),
                  errors=tally.errors,
                  checks={"passed": passed, "failed": len(tally.checks) - passed},
                  faults={name: count.to_json() for name, count in tally.faults.items()},
                  run_dir=tally.run_dir, **extra, exit=status)
    print_fault_table(tally, reporter)
    if tally.run_dir is not None:
        reporter.line(f"run log: {tally.run_dir}/run.jsonl")
    per_proxy = ", ".join(f"{name} {count}" for name, count in sorted(tally.armed.items()))
    watched = ""
    if any(window.must_fire is not None for window in schedule.windows):
        watched = f"{sum(tally.fired.values())} seen firing, clock held {tally.held:.2f}s, "
    applied = ""
    if any(count.kind == "process" for count in tally.faults.values()):
        actions = sum(c.applied for c in tally.faults.values() if c.kind == "process")
        applied = f"{actions} process faults applied, "
    reporter.line(f"summary: seed {schedule.seed}, {schedule.duration:g}s, "
                  f"{sum(tally.armed.values())} faults armed ({per_proxy or 'none'}), "
                  f"{applied}{watched}{len(tally.errors)} errors, "
                  f"{passed}/{len(tally.checks)} checks passed")
    if tally.failure is not None:
        reporter.line(f"  failure: {tally.failure}")
    for error in tally.errors:
        reporter.line(f"  error: {error}")
    for name, (ok, bad) in tally.check_runs.items():
        reporter.line(f"  check {name}: {ok + bad} run(s) while running, {bad} failed")
    for check in tally.checks:
        if check.passed:
            verdict = "passed"
        elif check.matches is not None:
            verdict = "FAILED"
        else:
            verdict = f"FAILED (exit {check.status})"
        if check.matches is not None:
            reporter.line(f"  check {check.name}: {verdict}: {check.output}")
            continue
        reporter.line(f"  check {check.name}: {verdict} after {check.attempts} attempt(s), "
                      f"{check.seconds:.2f}s")
        if not check.passed and check.output:
            reporter.line("    " + check.output.rstrip().replace("\n", "\n    "))
    print_paused(tally, reporter)
    words = {EXIT_PASS: "pass",
             EXIT_CHECK_FAILED: "check failed" if tally.failure is None or tally.failed_check
             else "failed"}
    reporter.line(f"verdict: {words.get(status, 'errors')} (exit {status})")


def print_paused(tally: Tally, reporter: Reporter) -> None:
    """Where to look and what to type after a failure paused the world."""
    if not tally.paused:
        return
    groups = " ".join(f"-{info['pgid']}" for info in tally.paused)
    reporter.line("world paused: every managed process is stopped (SIGSTOP), as it was:")
    width = max(len(info["name"]) for info in tally.paused)
    for info in tally.paused:
        reporter.line(f"  {info['name']:<{width}}  pid {info['pid']}  pgid {info['pgid']}  "
                      f"log {info['log']}")
        for older in info.get("older_logs", []):
            reporter.line(f"  {'':<{width}}  older log {older}")
    # `-s NAME --`: the form sh (dash), bash, zsh and /bin/kill all take with negative
    # process group ids (dash refuses `kill -CONT -- -PGID`).
    reporter.line(f"  resume them: kill -s CONT -- {groups}")
    # A stopped process only acts on SIGTERM once continued.
    reporter.line(f"  stop them:   kill -s TERM -- {groups} && kill -s CONT -- {groups}")
