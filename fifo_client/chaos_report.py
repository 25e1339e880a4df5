"""What `wirefault chaos` prints: the timeline (text or JSON lines), the summary, and the
tally that decides the exit status."""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, TextIO

from .chaos_schedule import Schedule, Window

EXIT_PASS = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_RUN = 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT, as a shell reports a command stopped by Ctrl-C."""
EXIT_OUTPUT_CLOSED = 141
"""128 + SIGPIPE, as a shell reports any command whose reader went away (`| head`)."""


class OutputClosed(Exception):
    """Whoever read the timeline went away (stdout is a closed pipe)."""


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
    fired: dict[str, int] = field(default_factory=dict)
    """Must-fire armings seen firing, per proxy."""
    held: float = 0.0
    """Seconds the scenario clock stood still for must-fire faults."""
    errors: list[str] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)

    def note_armed(self, proxy: str) -> None:
        self.armed[proxy] = self.armed.get(proxy, 0) + 1

    def note_fired(self, proxy: str) -> None:
        self.fired[proxy] = self.fired.get(proxy, 0) + 1

    def exit_status(self) -> int:
        if self.errors:
            return EXIT_BAD_RUN
        return EXIT_PASS if all(check.passed for check in self.checks) else EXIT_CHECK_FAILED


class Reporter:
    """Writes the timeline as text lines or as JSON lines; OutputClosed once the reader
    is gone, after which the output is discarded (so the interpreter's last flush of a
    closed stdout cannot fail either)."""

    def __init__(self, out: TextIO, as_json: bool, width: int) -> None:
        self.out = out
        self.as_json = as_json
        self.width = width

    def emit(self, event: str, **fields: Any) -> None:
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


def window_note(window: Window) -> str:
    notes = []
    if window.cut:
        notes.append("cut at duration")
    if window.must_fire is not None:
        notes.append(f"must fire within {window.must_fire:g}s")
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
            extra = {"disarm": window.disarm, "cut": window.cut, "must_fire": window.must_fire}
            reporter.step("armed", window.arm, window.proxy, window.fault, window.command,
                          window_note(window), name=window.name, **extra)
        else:
            reporter.step("disarmed", window.disarm, window.proxy, window.fault,
                          window.lift_command, name=window.name)
    for window in schedule.dropped:
        reporter.step("dropped", window.arm, window.proxy, window.fault, window.command,
                      "no room before duration", name=window.name)


def print_summary(schedule: Schedule, tally: Tally, reporter: Reporter) -> None:
    status = tally.exit_status()
    passed = sum(check.passed for check in tally.checks)
    reporter.emit("summary", seed=schedule.seed, duration=schedule.duration,
                  armed=tally.armed, fired=tally.fired, held=round(tally.held, 3),
                  errors=tally.errors,
                  checks={"passed": passed, "failed": len(tally.checks) - passed},
                  exit=status)
    per_proxy = ", ".join(f"{name} {count}" for name, count in sorted(tally.armed.items()))
    watched = ""
    if any(window.must_fire is not None for window in schedule.windows):
        watched = f"{sum(tally.fired.values())} seen firing, clock held {tally.held:.2f}s, "
    reporter.line(f"summary: seed {schedule.seed}, {schedule.duration:g}s, "
                  f"{sum(tally.armed.values())} faults armed ({per_proxy or 'none'}), "
                  f"{watched}{len(tally.errors)} errors, "
                  f"{passed}/{len(tally.checks)} checks passed")
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
