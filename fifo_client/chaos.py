"""`wirefault chaos SCENARIO.yaml`: a seeded crash-and-verify loop. It starts the
scenario's managed processes, arms network faults on running proxies and applies process
faults (crash, stop, pause) on one seeded schedule, checks invariants while it runs and at
the end, and records the whole run.

    wirefault chaos scenario.yaml              # run it; timeline and summary on stdout
    wirefault chaos scenario.yaml --dry-run    # print the schedule, contact nobody
    wirefault chaos scenario.yaml --json       # the timeline as JSON lines instead
    wirefault chaos scenario.yaml --seed 7     # another seed, same scenario
    wirefault chaos scenario.yaml --run-dir D  # this run's directory (default: see below)
    wirefault chaos --replay RUN_DIR           # the recorded run's schedule, again

The scenario format is described in `chaos_scenario`, the schedule in `chaos_schedule`, the
network faults in `chaos_network`, the managed processes in `chaos_processes`, the checks in
`chaos_checks`, the run directory and `--replay` in `chaos_runlog`.

A run: every proxy is set to `conn.allow()`, the processes are started in order (each
waiting for its `ready`), then the clock starts: windows come at their times, `every`
checks loop and progress checks watch. The first failed check, or a process that dies by
itself ("crashed by itself"), or one that does not come back after a fault, fails the run
at once; the scenario's `on_failure` then pauses the world (SIGSTOP to every process, left
stopped, with the commands to resume or stop them printed) or stops it. Otherwise, once the
duration is over, every fault is lifted, the checks run, and the processes are stopped.

Exit status: 0 when every check passed, 1 when a check failed or a process failed, 2 for a
bad scenario, a proxy that does not answer or a process that does not start, a fault
command that failed or a must-fire fault that did not fire; 130 when interrupted (Ctrl-C),
143 on SIGTERM and 141 when stdout was closed (e.g. piped into `head`): the run then stops,
and in every case every proxy is set back to `conn.allow()` (which removes every fault) and
no process is left running, but those a failure paused on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from .chaos_checks import (
    CHECK_OUTPUT_CHARS,
    CHECK_RETRY_PAUSE,
    ProgressWatch,
    check_every,
    run_shell_check,
)
from .chaos_clock import ScenarioClock
from .chaos_network import WATCH_INTERVAL, CannotStart, NetworkFaults, ProxyUnreachable
from .chaos_processes import ProcessError, ProcessEvent, Supervisor
from .chaos_reaping import reap_leftovers
from .chaos_report import (
    EXIT_BAD_RUN,
    EXIT_CHECK_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT_CLOSED,
    EXIT_PASS,
    EXIT_TERMINATED,
    CheckResult,
    FaultCount,
    OutputClosed,
    Reporter,
    Tally,
    print_schedule,
    print_summary,
)
from .chaos_runlog import RunDirError, load_replay, make_run_dir, start_run_log
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

__all__ = [
    "ALLOW", "CHECK_OUTPUT_CHARS", "CHECK_RETRY_PAUSE", "DEFAULT_CHECK_TIMEOUT",
    "DEFAULT_TIMEOUT", "EXIT_BAD_RUN", "EXIT_CHECK_FAILED", "EXIT_INTERRUPTED",
    "EXIT_OUTPUT_CLOSED", "EXIT_PASS", "EXIT_TERMINATED", "MAX_ARMINGS", "WATCH_INTERVAL",
    "CannotStart", "CheckResult", "CheckSpec", "FaultSpec", "Interval", "OutputClosed",
    "ProxySpec", "ProxyUnreachable", "Reporter", "Runner", "Scenario", "ScenarioError",
    "ScenarioErrors", "Schedule", "Tally", "Window", "build_parser", "build_schedule",
    "load_scenario", "main", "print_schedule", "print_summary",
]


class Runner:
    def __init__(self, scenario: Scenario, schedule: Schedule, reporter: Reporter,
                 run_dir: Path | None = None, err: TextIO | None = None,
                 folder: Path | None = None) -> None:
        self.scenario = scenario
        self.schedule = schedule
        self.reporter = reporter
        self.run_dir = run_dir
        self.err = err
        self.folder = folder or scenario.path.parent
        """Where checks run (and relative paths start): the scenario's folder."""
        self.tally = Tally(run_dir=None if run_dir is None else str(run_dir))
        self.clock = ScenarioClock()
        self.network = NetworkFaults(scenario, self.clock, reporter, self.tally)
        self.clients = self.network.clients
        for fault in scenario.faults:
            kind, target = ("process", fault.process) if fault.is_process_fault \
                else ("network", fault.proxy)
            self.tally.faults[fault.name] = FaultCount(kind, target or "")
        self.supervisor: Supervisor | None = None
        """When the scenario has processes."""
        self.progress = {check.name: ProgressWatch(check, self.folder)
                         for check in scenario.checks if check.progress is not None}
        self.started = False
        self.terminated = False
        """Set by SIGTERM: the run was cancelled on its account."""
        self._failed: asyncio.Future[None] | None = None
        self._ending = False
        self._process_turns: dict[str, asyncio.Lock] = {}

    def elapsed(self) -> float:
        """Seconds since the start (0 before it: the processes' start-up)."""
        return self.clock.elapsed() if self.started else 0.0

    async def run(self) -> Tally:
        loop = asyncio.get_running_loop()
        self._failed = loop.create_future()
        main = asyncio.current_task()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, self._terminate, main)
        try:
            await self.network.preflight()
            await self._start_processes()
            start: dict[str, Any] = {"seed": self.schedule.seed,
                                     "duration": self.schedule.duration,
                                     "proxies": sorted(self.clients)}
            if self.scenario.processes:
                start["processes"] = list(self.scenario.processes)
            self.reporter.emit("start", **start)
            self.clock.start()
            self.started = True
            await self._while_running()
            if self.tally.failure is None:
                await self._final_checks()
            if self.tally.failure is not None \
                    or not all(check.passed for check in self.tally.checks):
                self._on_failure()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGTERM)
            await self._clean_up()
        return self.tally

    def _terminate(self, main: asyncio.Task[Any] | None) -> None:
        self.terminated = True
        if main is not None:
            main.cancel()

    # -- while it runs ---------------------------------------------------------------------

    async def _while_running(self) -> None:
        """The windows on the scenario clock, the `every` and progress checks beside them,
        until the duration is over or the run failed."""
        assert self._failed is not None
        tasks = [asyncio.create_task(self._drive_every_window()), *self._start_watchers()]
        try:
            await asyncio.wait([tasks[0], self._failed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        if self._failed.done() and self._failed.exception() is not None:
            raise self._failed.exception()  # type: ignore[misc]
        for outcome in outcomes:
            if isinstance(outcome, BaseException) \
                    and not isinstance(outcome, asyncio.CancelledError):
                raise outcome

    async def _drive_every_window(self) -> None:
        """Each window on its own task, started at its arming time (windows come in arming
        order), so windows overlap as scheduled and only the windows in force have a task;
        when stdout goes away in one, the others are cancelled with it."""
        try:
            async with asyncio.TaskGroup() as group:
                for window in self.schedule.windows:
                    await self.clock.until(window.arm)
                    drive = self._apply if window.process is not None else self.network.drive
                    group.create_task(drive(window))
        except* OutputClosed:
            raise OutputClosed from None
        await self.clock.until(self.schedule.duration)

    async def _apply(self, window: Window) -> None:
        """A process fault: crash, stop or pause the process, and bring it back after the
        window's `down`. Two windows on one process take turns (the second waits for the
        first's restart), so each finds the process up."""
        assert self.supervisor is not None and window.process and window.action
        async with self._process_turns.setdefault(window.process, asyncio.Lock()):
            process = self.supervisor.processes[window.process]
            if process.state == "down" or self.tally.failure is not None:
                return  # it died by itself: that failed the run already
            down = round(window.disarm - window.arm, 3)
            self.tally.faults[window.fault].applied += 1
            note = f"{window.name}, pid {process.pid}, down {down:g}s"
            self.reporter.event(window.action, self.elapsed(), window.process, note,
                                process=window.process, fault=window.fault,
                                name=window.name, pid=process.pid, down=down)
            try:
                await self.supervisor.apply(window.action, window.process, down)
            except ProcessError as exc:
                self._fail(str(exc), "process", process=window.process)

    def _start_watchers(self) -> list[asyncio.Task[Any]]:
        tasks = []
        for check in self.scenario.checks:
            if check.progress is not None:
                watch = self.progress[check.name]
                watch.start()
                if watch.file is not None:
                    tasks.append(asyncio.create_task(watch.follow_file()))
                tasks.append(asyncio.create_task(self._watch_progress(watch)))
            elif check.every is not None:
                tasks.append(asyncio.create_task(
                    check_every(check, self._run_check, self._checked_while_running)))
        return tasks

    async def _watch_progress(self, watch: ProgressWatch) -> None:
        self._checked_while_running(await watch.watch())

    def _checked_while_running(self, result: CheckResult) -> None:
        self.tally.note_check_run(result)
        self._report_check(result, during=True)
        if not result.passed:
            self.tally.checks.append(result)
            problem = result.output.strip().splitlines()[-1:] if result.output else []
            reason = f"check {result.name} failed"
            if result.matches is None:
                reason += f" (exit {result.status})"
            if problem:
                reason += f": {problem[0]}"
            self._fail(reason, "check", check=result.name)

    def run_env(self) -> dict[str, str]:
        """What checks and managed processes find in their environment about the run."""
        env = {"WIREFAULT_CHAOS_SEED": str(self.schedule.seed),
               # The Python running wirefault, so a scenario can start Python programs in
               # the same environment (a virtualenv's, say) without naming its path.
               "WIREFAULT_CHAOS_PYTHON": sys.executable}
        if self.run_dir is not None:
            env["WIREFAULT_CHAOS_RUN_DIR"] = str(self.run_dir)
        return env

    async def _run_check(self, check: CheckSpec) -> CheckResult:
        return await run_shell_check(check, self.folder, self.run_env())

    def _report_check(self, result: CheckResult, *, during: bool = False) -> None:
        if result.matches is not None:
            fields: dict[str, Any] = {"name": result.name, "progress": result.run,
                                      "passed": result.passed, "seconds": result.seconds,
                                      "matches": result.matches, "output": result.output}
        else:
            fields = {"name": result.name, "run": result.run, "passed": result.passed,
                      "status": result.status, "seconds": result.seconds,
                      "attempts": result.attempts, "output": result.output}
        if not during:  # after the run, as before: the summary shows them
            self.reporter.emit("check", **fields)
            return
        if result.passed:
            note = f"passed in {result.seconds:.2f}s" if result.matches is None else "passed"
        elif result.matches is not None:
            note = f"FAILED: {result.output}"
        else:
            note = f"FAILED: exit {result.status} after {result.attempts} attempt(s)"
        self.reporter.event("check", self.elapsed(), result.name, note, **fields)

    def _fail(self, reason: str, kind: str, **fields: Any) -> None:
        """The run failed (the first failure counts; those after are only shown)."""
        assert self._failed is not None
        if self._ending or self.tally.failure is not None:
            return
        moment = self.elapsed()
        self.tally.failure = f"+{moment:.3f}s {reason}"
        self.tally.failed_check = kind == "check"
        self.reporter.event("failure", moment, reason, "", reason=reason, **fields)
        if not self._failed.done():
            self._failed.set_result(None)

    # -- processes -------------------------------------------------------------------------

    async def _start_processes(self) -> None:
        """Reap what a killed earlier run left, then start the processes, in order."""
        if self.run_dir is not None:
            for line in reap_leftovers(self.run_dir.parent):
                if self.err is not None:
                    print(f"wirefault chaos: {line}", file=self.err, flush=True)
                self.reporter.event("reaped", 0.0, "", line, detail=line)
        if not self.scenario.processes:
            return
        if self.run_dir is None:
            raise CannotStart("managed processes need a run directory")
        self.supervisor = Supervisor(self.scenario.processes, self.run_dir,
                                     self._process_event, self.run_env())
        for watch in self.progress.values():
            if watch.spec.process is not None:
                self.supervisor.processes[watch.spec.process].add_line_listener(watch.feed)
        try:
            await self.supervisor.start_all()
        except ProcessError as exc:
            raise CannotStart(str(exc)) from None

    def _process_event(self, event: ProcessEvent) -> None:
        """A `ProcessEvent` from the supervisor: shown and logged; a process that exited
        when the runner did not make it fails the run."""
        note = ", ".join(part for part in (f"pid {event.pid}" if event.pid else "",
                                           event.detail) if part)
        try:
            self.reporter.event(event.kind, self.elapsed(), event.process, note,
                                process=event.process, pid=event.pid, detail=event.detail)
            if event.kind == "exited":
                self._fail(f"process {event.process} crashed by itself "
                           f"({event.detail or 'it exited'})", "process",
                           process=event.process)
        except OutputClosed:  # raised here, it would land in the supervisor's task
            self._stop_with(OutputClosed())

    def _stop_with(self, exc: BaseException) -> None:
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(exc)

    def _on_failure(self) -> None:
        """The scenario's on_failure: pause leaves every process stopped (SIGSTOP) for a
        person to look at; stop is what the clean-up does anyway."""
        if self.supervisor is None or self.scenario.on_failure != "pause":
            return
        self._ending = True
        paused = dict(self.supervisor.pause_world())
        for name, process in self.supervisor.processes.items():
            log = Path(process.log_path)
            older = sorted(str(path) for path in log.parent.glob(f"{log.name}.*"))
            info = {"name": name, "pid": process.pid, "pgid": paused.get(name),
                    "log": str(log), "older_logs": older}
            self.tally.paused.append(info)
        self.reporter.event("world_paused", self.elapsed(), ", ".join(paused),
                            "SIGSTOP: every managed process", paused=self.tally.paused)

    # -- the end ---------------------------------------------------------------------------

    async def _final_checks(self) -> None:
        """Lift every fault, then every check once (progress checks: how they stand)."""
        await self.network.lift_everything()
        for check in self.scenario.checks:
            if check.progress is not None:
                result = self.progress[check.name].result()
            else:
                result = await self._run_check(check)
            self._report_check(result)
            self.tally.checks.append(result)

    async def _clean_up(self) -> None:
        """Whatever happened: no fault armed, no process running (but a paused world)."""
        self._ending = True
        await self.network.lift_everything()
        if self.supervisor is not None and not self.tally.paused:
            await self.supervisor.stop_all()


# -- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wirefault chaos",
        description="Start the scenario's processes, arm network faults on running "
                    "wirefault proxies and apply process faults on a seeded schedule, "
                    "check invariants while it runs and at the end.",
        epilog="exit status: 0 checks passed, 1 a check or a process failed, 2 bad "
               "scenario, unreachable proxy, process that did not start, failed fault "
               "command or must-fire fault that did not fire, 130 interrupted, 143 "
               "terminated, 141 stdout closed (the run stops; proxies are set back to "
               "conn.allow(), processes stopped)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenario", type=Path, nargs="?", help="the scenario file (YAML)")
    parser.add_argument("--json", action="store_true",
                        help="write the timeline as JSON lines on stdout")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the schedule and exit without contacting any proxy")
    parser.add_argument("--seed", type=int, help="override the scenario's seed")
    parser.add_argument("--run-dir", type=Path, metavar="DIR",
                        help="this run's directory (default: a new one in the scenario's "
                             "run_dir, else in <scenario folder>/chaos-runs)")
    parser.add_argument("--replay", type=Path, metavar="RUN_DIR",
                        help="run the schedule recorded in RUN_DIR again (its "
                             "scenario.yaml, its seed); refused if it now differs")
    return parser


def main(argv: list[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run `wirefault chaos`; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the problem
        return EXIT_BAD_RUN if exc.code else EXIT_PASS
    if (args.scenario is None) == (args.replay is None):
        print("wirefault chaos: give a scenario file or --replay RUN_DIR (one of the two)",
              file=err)
        return EXIT_BAD_RUN
    if args.replay is not None and args.seed is not None:
        print("wirefault chaos: --replay runs the recorded seed; --seed does not go with it",
              file=err)
        return EXIT_BAD_RUN
    try:
        if args.replay is not None:
            scenario, schedule, source = load_replay(args.replay)
        else:
            scenario = load_scenario(args.scenario)
            schedule, source = build_schedule(scenario, args.seed), scenario.path
    except ScenarioErrors as exc:
        for error in exc.errors:
            print(f"wirefault chaos: {error}", file=err)
        return EXIT_BAD_RUN
    except RunDirError as exc:
        print(f"wirefault chaos: {exc}", file=err)
        return EXIT_BAD_RUN
    reporter = Reporter(out, args.json, max((len(name) for name in scenario.proxies),
                                            default=0))
    try:
        if args.dry_run:
            print_schedule(schedule, reporter)
            return EXIT_PASS
        folder = source.parent
        try:
            run_dir = make_run_dir(scenario, schedule.seed, args.run_dir, folder)
            log = start_run_log(run_dir, scenario, schedule, source, args.replay)
        except RunDirError as exc:
            print(f"wirefault chaos: {exc}", file=err)
            return EXIT_BAD_RUN
        runner = Runner(scenario, schedule, reporter, run_dir, err, folder)
        reporter.log, reporter.clock = log, runner.elapsed
        try:
            return _run(runner, err)
        finally:
            log.close()
    except OutputClosed:
        if not args.dry_run:
            print("wirefault chaos: stdout was closed: stopped the run (no checks run); "
                  "every proxy was set back to conn.allow()", file=err)
        return EXIT_OUTPUT_CLOSED


def _run(runner: Runner, err: TextIO) -> int:
    stopped = "every proxy was set back to conn.allow()"
    if runner.scenario.processes:
        stopped += " and every process was stopped"
    previous = signal.getsignal(signal.SIGTERM)
    try:
        tally = asyncio.run(runner.run())
    except CannotStart as exc:
        print(f"wirefault chaos: {exc}", file=err)
        return EXIT_BAD_RUN
    except KeyboardInterrupt:
        with contextlib.suppress(OutputClosed):
            runner.reporter.emit("interrupted", t=round(runner.elapsed(), 3))
        print(f"wirefault chaos: interrupted; {stopped}", file=err)
        return EXIT_INTERRUPTED
    except asyncio.CancelledError:
        if not runner.terminated:
            raise
        with contextlib.suppress(OutputClosed):
            runner.reporter.emit("terminated", t=round(runner.elapsed(), 3))
        print(f"wirefault chaos: terminated (SIGTERM); {stopped}", file=err)
        return EXIT_TERMINATED
    finally:
        with contextlib.suppress(ValueError):  # not the main thread: it was never changed
            signal.signal(signal.SIGTERM, previous)
    print_summary(runner.schedule, tally, runner.reporter)
    return tally.exit_status()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
