"""`wirefault chaos SCENARIO.yaml`: arm faults on running proxies on a seeded schedule.

    wirefault chaos scenario.yaml              # run it; timeline and summary on stdout
    wirefault chaos scenario.yaml --dry-run    # print the schedule, contact nobody
    wirefault chaos scenario.yaml --json       # the timeline as JSON lines instead
    wirefault chaos scenario.yaml --seed 7     # another seed, same scenario

The scenario format is described in `chaos_scenario`, the schedule in `chaos_schedule`.
Every arming is a named fault on its proxy: the scenario's `conn.*` rule sent as
`faults.add("<fault>:<arming>")...` and lifted with `faults.remove(...)`, so several faults
are in force on one proxy at once. Each window runs on its own task, and each proxy's
exchanges take turns, so a slow proxy never delays another's faults. A fault with
`must_fire` stays armed past its planned lift until it fired, for at most `must_fire`
seconds since its arming, and meanwhile holds the scenario clock (`chaos_clock`) that every
proxy arms its faults by. The proxy counts each fault's firings: the runner polls that
count (the fault's `fired` in `faults.list()`) once the arming command returned, and the
fault fired when it is 1 or more. The runner never reads a proxy's recorder, so all it
recorded during the run is still there afterwards.

The runner talks to proxies only through `FaultProxy`. Exit status: 0 when every check
passed, 1 when a check failed, 2 for a bad scenario, a proxy that does not answer before
the start, a fault command that failed or a must-fire fault that did not fire; 130 when
interrupted and 141 when stdout was closed (e.g. piped into `head`): the run then stops,
and either way every proxy is set back to `conn.allow()` (which removes every fault).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

from .chaos_clock import ScenarioClock
from .chaos_report import (
    EXIT_BAD_RUN,
    EXIT_CHECK_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT_CLOSED,
    EXIT_PASS,
    CheckResult,
    OutputClosed,
    Reporter,
    Tally,
    print_schedule,
    print_summary,
    window_note,
)
from .chaos_scenario import (
    ALLOW,
    DEFAULT_CHECK_TIMEOUT,
    DEFAULT_TIMEOUT,
    MAX_ARMINGS,
    CheckSpec,
    FaultSpec,
    Interval,
    ProxySpec,
    Scenario,
    ScenarioError,
    ScenarioErrors,
    load_scenario,
)
from .chaos_schedule import Schedule, Window, build_schedule
from .client import LIST_FAULTS, FaultProxy
from .errors import WirefaultError

CHECK_RETRY_PAUSE = 0.5
CHECK_OUTPUT_CHARS = 2000
WATCH_INTERVAL = 0.1
"""Seconds between two `faults.list()` polls of a proxy whose must-fire fault is armed."""

T = TypeVar("T")

__all__ = [
    "ALLOW", "CHECK_OUTPUT_CHARS", "CHECK_RETRY_PAUSE", "DEFAULT_CHECK_TIMEOUT",
    "DEFAULT_TIMEOUT", "EXIT_BAD_RUN", "EXIT_CHECK_FAILED", "EXIT_INTERRUPTED",
    "EXIT_OUTPUT_CLOSED", "EXIT_PASS", "MAX_ARMINGS", "WATCH_INTERVAL", "CannotStart",
    "CheckResult", "CheckSpec", "FaultSpec", "Interval", "OutputClosed", "ProxySpec",
    "ProxyUnreachable", "Reporter", "Runner", "Scenario", "ScenarioError", "ScenarioErrors",
    "Schedule", "Tally", "Window", "build_parser", "build_schedule", "load_scenario", "main",
    "print_schedule", "print_summary",
]


class CannotStart(WirefaultError):
    """The run cannot begin: nothing was armed."""


class ProxyUnreachable(CannotStart):
    pass


class Runner:
    def __init__(self, scenario: Scenario, schedule: Schedule, reporter: Reporter) -> None:
        self.scenario = scenario
        self.schedule = schedule
        self.reporter = reporter
        self.tally = Tally()
        self.clients = {name: FaultProxy(spec.target, timeout=scenario.timeout)
                        for name, spec in scenario.proxies.items()}
        self.clock = ScenarioClock()
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._turns: dict[str, asyncio.Lock] = {}
        """Per proxy: its exchanges queue here, in order, each with its whole timeout
        (rather than in the client's thread lock, whose wait counts against it)."""

    def elapsed(self) -> float:
        return self.clock.elapsed()

    async def run(self) -> Tally:
        await self._preflight()
        self.reporter.emit("start", seed=self.schedule.seed, duration=self.schedule.duration,
                           proxies=sorted(self.clients))
        self.clock.start()
        try:
            await self._drive_every_proxy()
            await self.clock.until(self.schedule.duration)
        finally:
            await self._lift_everything()
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

    async def _drive_every_proxy(self) -> None:
        """Each window on its own task, started at its arming time (windows come in arming
        order), so windows on one proxy overlap as scheduled and only the windows in force
        have a task; when stdout goes away in one, the others are cancelled with it."""
        try:
            async with asyncio.TaskGroup() as group:
                for window in self.schedule.windows:
                    await self.clock.until(window.arm)
                    group.create_task(self._drive(window))
        except* OutputClosed:
            raise OutputClosed from None

    async def _drive(self, window: Window) -> None:
        # The armed time is real seconds from the arming, whatever holds the clock: a fault
        # armed before a hold is lifted on time, it cannot starve the waiting one.
        lift_at = time.monotonic() + window.disarm - window.arm
        if not await self._send(window, window.arm_command, "armed", window.command,
                                window_note(window)):
            return  # nothing to lift: the proxy refused the fault
        self.tally.note_armed(window.proxy)
        if window.must_fire is not None:
            await self._keep_armed_until_fired(window, lift_at)
        await asyncio.sleep(max(0.0, lift_at - time.monotonic()))
        await self._send(window, window.lift_command, "disarmed", window.lift_command)

    async def _call(self, proxy: str, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in a thread, after this proxy's earlier exchanges. A cancelled
        run still waits for it (in `_lift_everything`), so no arming can land after the
        final conn.allow()."""
        async with self._turns.setdefault(proxy, asyncio.Lock()):
            future = asyncio.get_running_loop().run_in_executor(None, function, *args)
            self._in_flight.add(future)
            future.add_done_callback(self._in_flight.discard)
            return await asyncio.shield(future)

    async def _send(self, window: Window, command: str, event: str, shown: str,
                    note: str = "") -> bool:
        """Send `command`; the timeline shows `shown` (the scenario's rule, for an arming)."""
        try:
            await self._call(window.proxy, self.clients[window.proxy].send, command)
        except WirefaultError as exc:
            self._error(window, shown, str(exc))
            return False
        self.reporter.step(event, self.elapsed(), window.proxy, window.fault, shown, note,
                           name=window.name)
        return True

    def _error(self, window: Window, command: str, problem: str) -> None:
        moment = self.elapsed()
        self.tally.errors.append(f"+{moment:.3f}s {window.proxy} {window.fault}: {problem}")
        self.reporter.step("error", moment, window.proxy, window.fault, command, problem,
                           name=window.name, error=problem)

    # -- must_fire -------------------------------------------------------------------------

    async def _keep_armed_until_fired(self, window: Window, lift_at: float) -> None:
        """Poll the proxy until the fault fired: until its planned lift (`lift_at`,
        monotonic), then holding the scenario clock, for at most `must_fire` seconds since
        the arming."""
        assert window.must_fire is not None
        deadline = time.monotonic() + window.must_fire
        holding = False
        try:
            while not await self._fired(window):
                now = time.monotonic()
                # Past its lift it waited, even when a slow poll also took it past its bound.
                if not holding and lift_at <= now and lift_at < deadline:
                    holding = True
                    self.clock.hold()
                    self.reporter.step("waiting", self.elapsed(), window.proxy, window.fault,
                                       window.command, "not fired yet: scenario clock held",
                                       name=window.name)
                if now >= deadline:
                    self._error(window, window.command,
                                f"did not fire within {window.must_fire:g}s of being armed")
                    return
                wake = min(deadline, now + WATCH_INTERVAL)
                if not holding:  # be there at the planned lift, to hold the clock on time
                    wake = min(wake, lift_at)
                await asyncio.sleep(wake - now)
        finally:
            if holding:
                self.clock.release()

    async def _fired(self, window: Window) -> bool:
        """Ask the proxy once: True when this arming's fault fired (its own count in
        `faults.list()`, whatever other faults do), or when the proxy cannot say (an error,
        or the fault is gone: nothing more can be seen)."""
        try:
            listed = await self._call(window.proxy, self.clients[window.proxy].faults)
        except WirefaultError as exc:
            self._error(window, LIST_FAULTS, str(exc))
            return True
        fault = next((info for info in listed if info.name == window.name), None)
        if fault is None:  # removed behind the run's back (conn.* or faults.* by hand)
            self._error(window, LIST_FAULTS, f"fault {window.name} is no longer on the "
                                             f"proxy: it can no longer be seen firing")
            return True
        if fault.fired < 1:
            return False
        self.tally.note_fired(window.proxy)
        frames = fault.fired
        self.reporter.step("fired", self.elapsed(), window.proxy, window.fault, window.command,
                           f"acted on {frames} frame{'' if frames == 1 else 's'}",
                           name=window.name, frames=frames)
        return True

    # -- the end ---------------------------------------------------------------------------

    async def _lift_everything(self) -> None:
        """Leave no fault armed, whatever happened (a cancelled run included): let the
        exchanges still in flight finish, then conn.allow() everywhere."""
        if self._in_flight:
            await asyncio.wait(list(self._in_flight))
        for client in self.clients.values():
            with contextlib.suppress(WirefaultError):
                await asyncio.to_thread(client.allow)
        self.tally.held = self.clock.held()

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
            await _kill(process)
            return None, f"timed out after {check.timeout:g}s"
        except asyncio.CancelledError:  # an interrupted run leaves no check running
            await _kill(process)
            raise
        return process.returncode, output.decode("utf-8", "replace")


async def _kill(process: asyncio.subprocess.Process) -> None:
    """Kill the check's whole process group (it runs in its own session) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


# -- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wirefault chaos",
        description="Arm faults on running wirefault proxies on a seeded schedule, "
                    "then run the scenario's checks.",
        epilog="exit status: 0 checks passed, 1 a check failed, 2 bad scenario, "
               "unreachable proxy, failed fault command or must-fire fault that did not "
               "fire, 130 interrupted, 141 stdout closed (the run stops; proxies are "
               "set back to conn.allow())",
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
    except ScenarioErrors as exc:
        for error in exc.errors:
            print(f"wirefault chaos: {error}", file=err)
        return EXIT_BAD_RUN
    schedule = build_schedule(scenario, args.seed)
    reporter = Reporter(out, args.json, max(len(name) for name in scenario.proxies))
    try:
        if args.dry_run:
            print_schedule(schedule, reporter)
            return EXIT_PASS
        return _run(Runner(scenario, schedule, reporter), err)
    except OutputClosed:
        if not args.dry_run:
            print("wirefault chaos: stdout was closed: stopped the run (no checks run); "
                  "every proxy was set back to conn.allow()", file=err)
        return EXIT_OUTPUT_CLOSED


def _run(runner: Runner, err: TextIO) -> int:
    try:
        tally = asyncio.run(runner.run())
    except CannotStart as exc:
        print(f"wirefault chaos: {exc}", file=err)
        return EXIT_BAD_RUN
    except KeyboardInterrupt:
        print("wirefault chaos: interrupted; every proxy was set back to conn.allow()",
              file=err)
        return EXIT_INTERRUPTED
    print_summary(runner.schedule, tally, runner.reporter)
    return tally.exit_status()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
