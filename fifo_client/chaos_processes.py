"""The managed processes of a `wirefault chaos` scenario: start, crash, stop, pause, restart.

Each process runs in its own session, so it is its own process group and every signal goes
to the whole group (`os.killpg`): a shell command's children die with the shell. Its
stdout and stderr are one pipe the manager reads: each chunk is appended to the log as it
comes and split into lines for the readiness pattern and the line listeners (plain
callbacks, called in the reader, which never waits for anything else, so the child is never
held up by a listener queue).

Exits are seen through a pidfd (Linux), not through asyncio's subprocess transports, which
kill their child when closed: a world left paused must outlive the runner's event loop.

`Supervisor` owns the processes of one run: it starts a watchdog (`chaos_watchdog`) before
the first one and keeps `<run dir>/processes.json` (`chaos_reaping`) current, so that
nothing outlives the run even when the runner is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chaos_logs import LogRotator
from .chaos_reaping import reap_leftovers, start_time, write_state
from .chaos_scenario import Command, ProcessSpec
from .errors import WirefaultError
from .transport import FORKS

READY_RETRY = 0.05
"""Seconds between readiness attempts (port connects, ready commands)."""
DRAIN_TIMEOUT = 1.0
"""Seconds to wait, once a process exited, for the rest of its output: a process that left
its group keeps the pipe open, and then the manager stops reading it."""
READ_BURST = 16
"""Reads per wake-up, so a child writing without a pause cannot starve the event loop."""
MAX_LINE = 65536
"""A longer line is handed to the listeners in pieces of this many characters."""
WATCHDOG_EXIT_TIMEOUT = 5.0

__all__ = ["ManagedProcess", "ProcessError", "ProcessEvent", "Supervisor", "reap_leftovers"]


class ProcessError(WirefaultError):
    """A managed process did not come up: one line naming it, the reason and its log."""


@dataclass
class ProcessEvent:
    kind: str
    """started, ready, crashed, stopped, paused, resumed, restarted, exited, log_rotated."""
    process: str
    pid: int | None
    detail: str = ""


def argv_of(command: Command) -> list[str]:
    return ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


def _killpg(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _exit_future(popen: subprocess.Popen[bytes]) -> asyncio.Future[int]:
    """A future of the child's exit status, set when it exits (and is reaped)."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int] = loop.create_future()

    def settle(code: int) -> None:
        if not exited.done():
            exited.set_result(code)

    try:
        pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):
        # No pidfd (old kernel): a thread of its own waits for this one child.
        def wait() -> None:
            code = popen.wait()
            loop.call_soon_threadsafe(settle, code)

        threading.Thread(target=wait, name=f"wait-{popen.pid}", daemon=True).start()
        return exited

    def on_exit() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        code = popen.poll()
        settle(0 if code is None else code)

    loop.add_reader(pidfd, on_exit)
    return exited


class _Run:
    """One incarnation of a managed process: its child, output pipe and log file."""

    def __init__(self, process: ManagedProcess, popen: subprocess.Popen[bytes], out_fd: int,
                 log: Any) -> None:
        self.process = process
        self.popen = popen
        self.pid = popen.pid
        self.start_time = start_time(popen.pid)
        self.out_fd = out_fd
        self.log = log
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.exited = _exit_future(popen)
        self.drained: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[int] = loop.create_future()
        self.cause: str | None = None
        """Set before the supervisor makes it exit (crash, stop); None: it died by itself."""
        self.ready = False
        self.ready_listener: Callable[[str], None] | None = None
        self.handed_off = False
        self.watcher: asyncio.Task[None] | None = None
        self._partial = b""
        os.set_blocking(out_fd, False)
        loop.add_reader(out_fd, self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(READ_BURST):
            try:
                chunk = os.read(self.out_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.stop_reading()
                return
            self._write_log(chunk)
            self._feed(chunk)

    def _write_log(self, chunk: bytes) -> None:
        if self.log is None:
            return
        try:
            view = memoryview(chunk)
            while view:
                view = view[self.log.write(view):]
        except OSError as exc:
            # Keep reading (the child must not block on a full pipe), stop logging.
            self.loop.call_exception_handler({
                "message": f"process {self.process.name}: cannot write {self.process.log_path}",
                "exception": exc})
            self.log.close()
            self.log = None

    def _feed(self, chunk: bytes) -> None:
        *lines, partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            # Cut at the same places whether the line came whole or in many chunks.
            for start in range(0, max(len(line), 1), MAX_LINE):
                self._deliver(line[start:start + MAX_LINE])
        while len(partial) > MAX_LINE:
            self._deliver(partial[:MAX_LINE])
            partial = partial[MAX_LINE:]
        self._partial = partial

    def _deliver(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        listeners = list(self.process._listeners)
        if self.ready_listener is not None:
            listeners.insert(0, self.ready_listener)
        for listener in listeners:
            try:
                listener(line)
            except Exception as exc:
                self.loop.call_exception_handler({
                    "message": f"line listener of process {self.process.name} failed",
                    "exception": exc})

    def stop_reading(self) -> None:
        """End of output (or giving up on it): deliver the last partial line, close."""
        if self.out_fd < 0:
            return
        self.loop.remove_reader(self.out_fd)
        if not self.handed_off:
            os.close(self.out_fd)
        self.out_fd = -1
        if self._partial:
            self._deliver(self._partial)
            self._partial = b""
        if self.log is not None:
            self.log.close()
            self.log = None
        if not self.drained.done():
            self.drained.set_result(None)


class ManagedProcess:
    """One process of the scenario, across its restarts."""

    def __init__(self, spec: ProcessSpec, log_path: Path,
                 on_event: Callable[[ProcessEvent], None],
                 on_spawn: Callable[[ManagedProcess], None] | None = None,
                 run_env: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.env = {**os.environ, **(run_env or {}), **spec.env}
        """The runner's environment, the run's own variables, then the scenario's."""
        self.name = spec.name
        self.pid: int | None = None
        self.log_path = log_path
        self.restarts = 0
        self.state = "down"
        self._on_event = on_event
        self._on_spawn = on_spawn
        self._listeners: list[Callable[[str], None]] = []
        self._run: _Run | None = None
        self._rotator = LogRotator(log_path, spec.keep_logs)
        self.lock = asyncio.Lock()
        """Held by `Supervisor.apply`, so two faults on one process take turns."""

    @property
    def start_time(self) -> int | None:
        return None if self._run is None else self._run.start_time

    @property
    def command(self) -> Command:
        """What the current (or next) incarnation runs."""
        return self.spec.restart_command if self.restarts else self.spec.command

    def _emit(self, kind: str, detail: str = "") -> None:
        self._on_event(ProcessEvent(kind, self.name, self.pid, detail))

    def _fail(self, reason: str) -> ProcessError:
        return ProcessError(f"process {self.name}: {reason} (log: {self.log_path})")

    def add_line_listener(self, callback: Callable[[str], None]) -> None:
        """Call `callback(line)` for every line of output, of this and later incarnations.
        It runs in the reader: it must be quick and must not block."""
        self._listeners.append(callback)

    def _spawn(self, command: Command) -> _Run:
        argv = argv_of(command)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 (closed at end of output)
        read_fd, write_fd = os.pipe()
        try:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
                cwd=self.spec.cwd, env=self.env,
                start_new_session=True)
        except OSError as exc:
            os.close(read_fd)
            log.close()
            raise self._fail(f"cannot run {argv[0]!r}: {exc.strerror}") from None
        finally:
            os.close(write_fd)
        run = _Run(self, popen, read_fd, log)
        self._run, self.pid, self.state = run, run.pid, "running"
        run.watcher = asyncio.get_running_loop().create_task(self._watch(run))
        if self._on_spawn is not None:
            self._on_spawn(self)
        return run

    async def _watch(self, run: _Run) -> None:
        code = await run.exited
        # The leader is gone; whatever it left in its group (a shell's children) goes too.
        _killpg(run.pid, signal.SIGKILL)
        if not run.handed_off:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(run.drained), DRAIN_TIMEOUT)
            run.stop_reading()
        if self._run is run:
            self.state, self.pid = "down", None
        run.done.set_result(code)
        if run.cause is None and run.ready and not run.handed_off:
            self._on_event(ProcessEvent("exited", self.name, run.pid, _describe_exit(code)))
            if self._on_spawn is not None:
                self._on_spawn(self)

    async def start(self, *, restart: bool = False) -> None:
        """Spawn the command (the restart command with `restart`) and wait until ready."""
        if self.state != "down":
            return
        if restart:
            self.restarts += 1
        async with FORKS.forking():
            run = self._spawn(self.spec.restart_command if restart else self.spec.command)
        if not restart:
            command = self.command
            self._emit("started", command if isinstance(command, str) else shlex.join(command))
        began = time.monotonic()
        await self._wait_ready(run)
        took = f"ready after {time.monotonic() - began:.2f}s"
        self._emit("restarted" if restart else "ready",
                   f"restart {self.restarts}, {took}" if restart else took)

    async def _wait_ready(self, run: _Run) -> None:
        ready = self.spec.ready
        if ready is None:
            checker = None
        elif ready.pattern is not None:
            pattern = re.compile(ready.pattern)
            seen: asyncio.Future[None] = run.loop.create_future()

            def match(line: str) -> None:
                if not seen.done() and pattern.search(line):
                    seen.set_result(None)

            run.ready_listener = match
            checker = asyncio.ensure_future(seen)
        elif ready.port is not None:
            checker = asyncio.ensure_future(_port_open(ready.host, ready.port))
        else:
            assert ready.command is not None
            checker = asyncio.ensure_future(self._ready_command(ready.command))
        try:
            if checker is not None:
                finished, _ = await asyncio.wait(
                    {checker, run.done}, timeout=ready.timeout if ready else None,
                    return_when=asyncio.FIRST_COMPLETED)
                if not finished:
                    assert ready is not None
                    await self._kill(run, "not ready")
                    raise self._fail(f"not ready within {ready.timeout:g}s")
            if run.done.done() or run.exited.done():
                # Dead before (or as) it came up: that is no start.
                code = await run.done
                raise self._fail(f"exited before ready ({_describe_exit(code)})")
            run.ready = True
        finally:
            run.ready_listener = None
            if checker is not None and not checker.done():
                checker.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await checker

    async def _ready_command(self, command: Command) -> None:
        while True:
            async with FORKS.forking():
                probe = await asyncio.create_subprocess_exec(
                    *argv_of(command), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, cwd=self.spec.cwd,
                    env=self.env, start_new_session=True)
            try:
                if await probe.wait() == 0:
                    return
            finally:
                if probe.returncode is None:
                    _killpg(probe.pid, signal.SIGKILL)
                    await probe.wait()
            await asyncio.sleep(READY_RETRY)

    async def _kill(self, run: _Run, cause: str) -> int:
        run.cause = run.cause or cause
        _killpg(run.pid, signal.SIGKILL)
        return await asyncio.shield(run.done)

    async def crash(self) -> None:
        """SIGKILL to the group, reap, rotate the log."""
        run = self._run
        if run is None or self.state == "down":
            return
        await self._kill(run, "crash")
        self._emit_for(run, "crashed", "SIGKILL")
        self._rotate()

    async def stop(self, grace: float = 5.0, *, rotate: bool = True) -> None:
        """SIGTERM to the group (and SIGCONT, should it be paused), SIGKILL after `grace`
        seconds. `rotate=False` keeps the log as `<log>` (the end of a run)."""
        run = self._run
        if run is None or self.state == "down":
            return
        run.cause = run.cause or "stop"
        _killpg(run.pid, signal.SIGTERM)
        # A stopped process only acts on the SIGTERM once it runs again.
        _killpg(run.pid, signal.SIGCONT)
        detail = "SIGTERM"
        try:
            await asyncio.wait_for(asyncio.shield(run.done), grace)
        except TimeoutError:
            detail = f"SIGTERM, then SIGKILL after {grace:g}s"
            await self._kill(run, "stop")
        self._emit_for(run, "stopped", detail)
        if rotate:
            self._rotate()

    def _emit_for(self, run: _Run, kind: str, detail: str) -> None:
        self._on_event(ProcessEvent(kind, self.name, run.pid, detail))

    def pause(self) -> None:
        """SIGSTOP to the group."""
        if self._run is not None and self.state == "running":
            _killpg(self._run.pid, signal.SIGSTOP)
            self.state = "paused"
            self._emit("paused")

    def resume(self) -> None:
        """SIGCONT to the group."""
        if self._run is not None and self.state == "paused":
            _killpg(self._run.pid, signal.SIGCONT)
            self.state = "running"
            self._emit("resumed")

    def _rotate(self) -> None:
        def rotated(gz: Path) -> None:
            self._on_event(ProcessEvent("log_rotated", self.name, None, f"log -> {gz.name}"))

        self._rotator.rotate(rotated)

    async def wait_logs(self) -> None:
        """Until every rotated log is compressed (and old ones pruned)."""
        await self._rotator.wait()

    def hand_off_output(self) -> int | None:
        """Stop reading the output pipe and give its read end away (to the watchdog, when
        the world is left paused). The caller owns the fd returned."""
        run = self._run
        if run is None or run.out_fd < 0:
            return None
        fd = run.out_fd
        run.handed_off = True
        run.stop_reading()
        return fd

    def record(self) -> dict[str, Any]:
        """This process's entry in processes.json."""
        return {"name": self.name, "pid": self.pid, "pgid": self.pid,
                "start_time": self.start_time if self.pid else None,
                "command": self.command if isinstance(self.command, str)
                else list(self.command),
                "log": str(self.log_path), "state": self.state, "restarts": self.restarts}


async def _port_open(host: str, port: int) -> None:
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (OSError, TimeoutError):
            await asyncio.sleep(READY_RETRY)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


class Supervisor:
    """The managed processes of one run, its watchdog and its processes.json."""

    def __init__(self, specs: dict[str, ProcessSpec], run_dir: Path,
                 on_event: Callable[[ProcessEvent], None],
                 run_env: dict[str, str] | None = None) -> None:
        self.run_dir = run_dir
        self._on_event = on_event
        self.processes: dict[str, ManagedProcess] = {
            name: ManagedProcess(spec, spec.log or run_dir / f"{name}.log", on_event,
                                 on_spawn=lambda _process: self._write_state(),
                                 run_env=run_env)
            for name, spec in specs.items()}
        self.watchdog_pid: int | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_exit: asyncio.Future[int] | None = None
        self._channel: socket.socket | None = None
        self._closing = asyncio.Event()
        self._stopped = False
        self.left_paused = False

    def _write_state(self) -> None:
        write_state(self.run_dir, {
            "runner_pid": os.getpid(), "runner_start_time": start_time(os.getpid()),
            "watchdog_pid": self.watchdog_pid, "left_paused": self.left_paused,
            "stopped": self._stopped,
            "processes": [process.record() for process in self.processes.values()]})

    async def _start_watchdog(self) -> None:
        ours, theirs = socket.socketpair()
        # Popen, not an asyncio transport: closing a transport kills its child, and a
        # watchdog tending a paused world must outlive the runner's event loop.
        with (self.run_dir / "watchdog.log").open("ab") as errors:
            async with FORKS.forking():
                self._watchdog = subprocess.Popen(
                    [sys.executable, "-m", "wirefault.fifo_client.chaos_watchdog",
                     str(self.run_dir)],
                    stdin=theirs.fileno(), stdout=subprocess.DEVNULL, stderr=errors,
                    start_new_session=True)
        self._watchdog_exit = _exit_future(self._watchdog)
        # Only the runner may hold its end: if a child inherited it, the runner's death
        # would not read as end-of-file. (Python's fds are not inheritable by default.)
        theirs.close()
        self._channel = ours
        self.watchdog_pid = self._watchdog.pid

    def _tell_watchdog(self, message: bytes, fds: list[int]) -> None:
        """Say the last word to the watchdog and close our end; the fds are passed on."""
        if self._channel is not None:
            with contextlib.suppress(OSError):
                if fds:
                    socket.send_fds(self._channel, [message], fds)
                else:
                    self._channel.sendall(message)
            self._channel.close()
            self._channel = None
        for fd in fds:
            os.close(fd)

    async def _end_watchdog(self) -> None:
        self._tell_watchdog(b"done\n", [])
        if self._watchdog is not None and self._watchdog_exit is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._watchdog_exit),
                                       WATCHDOG_EXIT_TIMEOUT)
            except TimeoutError:
                _killpg(self._watchdog.pid, signal.SIGKILL)
                await self._watchdog_exit

    async def start_all(self) -> None:
        """Start the watchdog, then every process in order, each waiting until ready. On
        any failure stop what started and re-raise."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        await self._start_watchdog()
        self._write_state()
        try:
            for process in self.processes.values():
                await process.start()
        except BaseException:
            await self.stop_all()
            raise

    async def apply(self, action: str, name: str, down: float) -> None:
        """One process fault: crash or stop, wait `down` seconds, restart and wait until
        ready; or pause, wait `down`, resume. Once the run is ending (stop_all,
        pause_world) it does nothing more; on a process that exited by itself, nothing."""
        process = self.processes[name]
        if action not in ("crash", "stop", "pause"):
            raise ValueError(f"unknown process action {action!r}")
        async with process.lock:
            if self._closing.is_set() or process.state == "down":
                return
            if action == "pause":
                process.pause()
            elif action == "crash":
                await process.crash()
            else:
                await process.stop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), down)
            if self._closing.is_set():
                return
            if action == "pause":
                process.resume()
                return
            try:
                await process.start(restart=True)
            except ProcessError:
                if not self._closing.is_set():
                    raise

    async def stop_all(self, grace: float = 5.0) -> None:
        """Stop every process, last started first, then let the watchdog go. Idempotent.
        After `pause_world` the paused processes are left alone on purpose."""
        self._closing.set()
        if self.left_paused:
            return
        for process in reversed(list(self.processes.values())):
            await process.stop(grace, rotate=False)
        for process in self.processes.values():
            await process.wait_logs()
        if not self._stopped and self._channel is not None:
            self._stopped = True
            self._write_state()
        await self._end_watchdog()

    def pause_world(self) -> list[tuple[str, int]]:
        """SIGSTOP every process and leave it so for a person to look: processes.json
        says `left_paused`, and the watchdog takes over their output pipes instead of
        killing them. Returns (name, process group) of each paused process."""
        self._closing.set()
        paused = []
        for process in self.processes.values():
            if process.pid is not None and process.state != "down":
                process.pause()
                paused.append((process.name, process.pid))
        self.left_paused = True
        if self._channel is not None:
            self._write_state()
            entries, fds = [], []
            for process in self.processes.values():
                if process.state != "down":
                    fd = process.hand_off_output()
                    if fd is not None:
                        entries.append({"name": process.name, "pid": process.pid,
                                        "pgid": process.pid, "log": str(process.log_path)})
                        fds.append(fd)
            self._tell_watchdog(b"paused\n" + json.dumps(entries).encode(), fds)
        return paused
