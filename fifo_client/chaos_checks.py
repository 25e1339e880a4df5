"""The checks of a `wirefault chaos` run: shell checks (once at the end, or in a loop while
the run goes on with `every`) and progress checks (a matching line in every window of
`within` seconds, in a file or in a managed process's output).

A shell check runs in its own session in the scenario's folder, with
`WIREFAULT_CHAOS_SEED` and `WIREFAULT_CHAOS_RUN_DIR` set; it passes on exit 0, and with
`retry_for` is retried every CHECK_RETRY_PAUSE seconds until it passes or that long
passed. A check that times out or is cancelled has its whole process group killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from .chaos_report import CheckResult
from .chaos_scenario import CheckSpec, ProgressSpec
from .transport import FORKS

CHECK_RETRY_PAUSE = 0.5
CHECK_OUTPUT_CHARS = 2000
FILE_POLL_INTERVAL = 0.2
"""Seconds between two looks at the size of a file a progress check watches."""


async def run_shell_check(check: CheckSpec, cwd: Path, env: dict[str, str]) -> CheckResult:
    """Run `check.run` (retried per `retry_for`) and say how it went."""
    assert check.run is not None
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        status, output = await _run_shell(check.run, check.timeout, cwd, env)
        waited = time.monotonic() - started
        if status == 0 or waited + CHECK_RETRY_PAUSE > check.retry_for:
            break
        await asyncio.sleep(CHECK_RETRY_PAUSE)
    return CheckResult(check.name, check.run, status == 0, status,
                       round(time.monotonic() - started, 3), attempts,
                       output[-CHECK_OUTPUT_CHARS:])


async def _run_shell(command: str, timeout: float, cwd: Path,
                     env: dict[str, str]) -> tuple[int | None, str]:
    async with FORKS.forking():  # no FIFO exchange in flight meanwhile (transport.py)
        process = await asyncio.create_subprocess_shell(
            command, cwd=cwd, env={**os.environ, **env},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        await kill_group(process)
        return None, f"timed out after {timeout:g}s"
    except asyncio.CancelledError:  # an interrupted run leaves no check running
        await kill_group(process)
        raise
    return process.returncode, output.decode("utf-8", "replace")


async def kill_group(process: asyncio.subprocess.Process) -> None:
    """Kill the check's whole process group (it runs in its own session) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


async def check_every(check: CheckSpec, run: Callable[[CheckSpec], Awaitable[CheckResult]],
                      report: Callable[[CheckResult], None]) -> None:
    """Run the check every `check.every` seconds (start to start; right away again when
    one took longer) until cancelled or it fails; `report` sees each result."""
    assert check.every is not None
    while True:
        started = time.monotonic()
        result = await run(check)
        report(result)
        if not result.passed:
            return
        await asyncio.sleep(max(0.0, started + check.every - time.monotonic()))


class ProgressWatch:
    """One progress check: lines come in through `feed` (from a process's line listener,
    or from `follow_file`); `watch` returns once a window of `within` seconds went by with
    no matching line (a failure), and runs until cancelled otherwise."""

    def __init__(self, check: CheckSpec, folder: Path) -> None:
        assert check.progress is not None
        self.check = check
        self.spec: ProgressSpec = check.progress
        self.file = None if self.spec.file is None else folder / self.spec.file
        """The watched file; a relative one is in the scenario's folder."""
        self.pattern = re.compile(self.spec.pattern)
        self.started = time.monotonic()
        self.last_seen: float | None = None
        """Monotonic time of the last matching line."""
        self.matches = 0
        self.longest_gap = 0.0
        self._seen = asyncio.Event()

    @property
    def source(self) -> str:
        return f"process {self.spec.process}" if self.spec.process else str(self.file)

    def describe(self) -> str:
        return f"progress: /{self.spec.pattern}/ in {self.source} every {self.spec.within:g}s"

    def start(self) -> None:
        """The first window starts now (the run's start): earlier lines do not count."""
        self.started = time.monotonic()
        self.last_seen = None
        self.matches = 0

    def feed(self, line: str) -> None:
        if not self.pattern.search(line):
            return
        now = time.monotonic()
        self.longest_gap = max(self.longest_gap, now - (self.last_seen or self.started))
        self.last_seen = now
        self.matches += 1
        self._seen.set()

    def deadline(self) -> float:
        return (self.last_seen or self.started) + self.spec.within

    async def watch(self) -> CheckResult:
        """Return the failure once a window passes without a match."""
        while (remaining := self.deadline() - time.monotonic()) > 0:
            self._seen.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._seen.wait(), remaining)
        return self.result()

    def result(self) -> CheckResult:
        """How it stands now: failed when the current window is over without a match."""
        now = time.monotonic()
        gap = now - (self.last_seen or self.started)
        self.longest_gap = max(self.longest_gap, gap)
        passed = gap < self.spec.within
        if passed:
            output = f"{self.matches} matching line{'' if self.matches == 1 else 's'}, " \
                     f"longest gap {self.longest_gap:.2f}s"
        elif self.last_seen is None:
            output = f"no line matching {self.spec.pattern!r} in {self.source} " \
                     f"in the first {self.spec.within:g}s"
        else:
            output = f"no line matching {self.spec.pattern!r} in {self.source} for " \
                     f"{self.spec.within:g}s (last one {gap:.2f}s ago, " \
                     f"{self.matches} before)"
        return CheckResult(self.check.name, self.describe(), passed, None,
                           round(now - self.started, 3), 1, output, matches=self.matches)

    async def follow_file(self) -> None:
        """Feed the lines appended to `spec.file`, looking every FILE_POLL_INTERVAL s; a
        file not there yet has no lines, one that shrank (rotated) is read from the top."""
        assert self.file is not None
        path = self.file
        offset = 0
        partial = b""
        while True:
            try:
                size = path.stat().st_size
            except OSError:
                size = 0
            if size < offset:
                offset, partial = 0, b""
            if size > offset:
                chunk = await asyncio.to_thread(_read_from, path, offset)
                offset += len(chunk)
                *lines, partial = (partial + chunk).split(b"\n")
                for line in lines:
                    self.feed(line.decode("utf-8", "replace"))
            await asyncio.sleep(FILE_POLL_INTERVAL)


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read()
    except OSError:
        return b""
