"""The process manager of `wirefault chaos`: real children, real signals, real files.

Every process a test starts is killed by the `world` fixture's finalizer, even when the
test fails; waits are on events (a process event, a pid's exit through a pidfd, a line in
a log, a /proc state), each with a deadline, never a sleep before an assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pgserver import free_port

from wirefault.fifo_client.chaos_processes import (
    ProcessError,
    ProcessEvent,
    Supervisor,
)
from wirefault.fifo_client.chaos_reaping import read_stat, reap_leftovers
from wirefault.fifo_client.chaos_scenario import Command, ProcessSpec, ReadySpec

PY = sys.executable
DEADLINE = 10.0


def python(code: str) -> tuple[str, ...]:
    return (PY, "-c", textwrap.dedent(code))


SLEEPER = python("""
    import os, time
    print("incarnation", os.getpid(), flush=True)
    print("ready", flush=True)
    time.sleep(60)
""")


class World:
    """Supervisors of one test, the events they emitted, and every process group seen."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.events: list[ProcessEvent] = []
        self.groups: set[int] = set()
        self.supervisors: list[Supervisor] = []
        self._waiters: list[tuple[str, str, asyncio.Future[ProcessEvent]]] = []

    def spec(self, name: str, command: Command, *, ready: ReadySpec | None = None,
             keep_logs: int = 5, restart: Command | None = None) -> ProcessSpec:
        return ProcessSpec(name=name, command=command, cwd=self.tmp, env={}, ready=ready,
                           restart=restart, keep_logs=keep_logs)

    def supervisor(self, *specs: ProcessSpec) -> Supervisor:
        supervisor = Supervisor({spec.name: spec for spec in specs}, self.tmp / "run",
                                self.on_event)
        self.supervisors.append(supervisor)
        return supervisor

    def on_event(self, event: ProcessEvent) -> None:
        self.events.append(event)
        if event.pid is not None:
            self.groups.add(event.pid)
        for waiter in list(self._waiters):
            kind, process, future = waiter
            if (kind, process) == (event.kind, event.process) and not future.done():
                future.set_result(event)
                self._waiters.remove(waiter)

    async def event(self, kind: str, process: str) -> ProcessEvent:
        """The first `kind` event of `process`, waiting for it if there is none yet."""
        for event in self.events:
            if (event.kind, event.process) == (kind, process):
                return event
        future: asyncio.Future[ProcessEvent] = asyncio.get_running_loop().create_future()
        self._waiters.append((kind, process, future))
        return await asyncio.wait_for(future, DEADLINE)

    def kinds(self, *, skip: tuple[str, ...] = ("log_rotated",)) -> list[tuple[str, str]]:
        return [(e.kind, e.process) for e in self.events if e.kind not in skip]

    def cleanup(self) -> None:
        for supervisor in self.supervisors:
            for process in supervisor.processes.values():
                if process.pid is not None:
                    self.groups.add(process.pid)
            if supervisor.watchdog_pid is not None:
                self.groups.add(supervisor.watchdog_pid)
        kill_groups(self.groups)


def kill_groups(groups: set[int]) -> None:
    for pgid in groups:
        for signum in (signal.SIGKILL, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signum)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    world = World(tmp_path)
    try:
        yield world
    finally:
        world.cleanup()


def wait_gone(pid: int, timeout: float = DEADLINE) -> None:
    """Until `pid` has exited (a pidfd turns readable; a zombie counts as exited)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        assert readable, f"pid {pid} still alive after {timeout}s"
    finally:
        os.close(pidfd)


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def wait_state(pid: int, wanted: Callable[[str], bool]) -> str:
    """Until /proc/PID/stat shows a state `wanted` accepts (signals land asynchronously)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        stat = read_stat(pid)
        assert stat is not None, f"pid {pid} is gone"
        if wanted(stat.state):
            return stat.state
        assert time.monotonic() < deadline, f"pid {pid} stayed in state {stat.state}"
        await asyncio.sleep(0.01)


def wait_for_text(path: Path, text: str) -> str:
    deadline = time.monotonic() + DEADLINE
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}: {content!r}"
        time.sleep(0.02)


# --- starting ------------------------------------------------------------------------------


def test_processes_start_in_order_each_waiting_for_its_kind_of_readiness(world: World) -> None:
    port = free_port()
    listener = world.spec("listener", python(f"""
        import socket, time
        server = socket.create_server(("127.0.0.1", {port}))
        time.sleep(60)
    """), ready=ReadySpec(port=port, timeout=5))
    talker = world.spec("talker", python("""
        import time
        print("warming up", flush=True)
        print("listening on 7200", flush=True)
        time.sleep(60)
    """), ready=ReadySpec(pattern=r"listening on \d+", timeout=5))
    flagger = world.spec("flagger", "touch flag && exec sleep 60",
                         ready=ReadySpec(command="test -f flag", timeout=5))

    async def scenario() -> None:
        supervisor = world.supervisor(listener, talker, flagger)
        await supervisor.start_all()
        assert world.kinds() == [
            ("started", "listener"), ("ready", "listener"), ("started", "talker"),
            ("ready", "talker"), ("started", "flagger"), ("ready", "flagger")]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        state = json.loads((world.tmp / "run" / "processes.json").read_text())
        assert state["runner_pid"] == os.getpid()
        assert [(p["name"], p["pid"], p["pgid"]) for p in state["processes"]] == [
            (name, process.pid, process.pid) for name, process in supervisor.processes.items()]
        watchdog = supervisor.watchdog_pid
        assert watchdog is not None
        await supervisor.stop_all(grace=2)
        await asyncio.to_thread(wait_gone, watchdog)
        assert world.kinds()[6:] == [
            ("stopped", "flagger"), ("stopped", "talker"), ("stopped", "listener")]
        await supervisor.stop_all(grace=2)  # idempotent
        assert len(world.events) == 9

    asyncio.run(scenario())
    log = world.tmp / "run" / "talker.log"
    assert log.read_text() == "warming up\nlistening on 7200\n"  # kept plain at the end
    state = json.loads((world.tmp / "run" / "processes.json").read_text())
    assert state["stopped"] is True
    assert "killed" not in (world.tmp / "run" / "watchdog.log").read_text()


def test_a_process_not_ready_in_time_is_killed_with_one_line(world: World) -> None:
    slow = world.spec("slow", SLEEPER, ready=ReadySpec(pattern="never printed", timeout=0.3))

    async def scenario() -> None:
        supervisor = world.supervisor(slow)
        with pytest.raises(ProcessError) as caught:
            await supervisor.start_all()
        log = world.tmp / "run" / "slow.log"
        assert str(caught.value) == f"process slow: not ready within 0.3s (log: {log})"
        pid = world.events[0].pid
        assert pid is not None and group_gone(pid)
        assert supervisor.processes["slow"].state == "down"
        assert "incarnation" in log.read_text()

    asyncio.run(scenario())


def test_a_process_exiting_before_ready_fails_the_start_and_stops_the_others(
        world: World) -> None:
    first = world.spec("first", SLEEPER, ready=ReadySpec(pattern="ready"))
    bad = world.spec("bad", python("""
        import sys
        print("boom: no config", flush=True)
        sys.exit(3)
    """), ready=ReadySpec(port=free_port(), timeout=5))

    async def scenario() -> None:
        supervisor = world.supervisor(first, bad)
        with pytest.raises(ProcessError) as caught:
            await supervisor.start_all()
        log = world.tmp / "run" / "bad.log"
        assert str(caught.value) == (
            f"process bad: exited before ready (exit status 3) (log: {log})")
        assert log.read_text() == "boom: no config\n"
        assert world.kinds() == [("started", "first"), ("ready", "first"),
                                 ("started", "bad"), ("stopped", "first")]
        assert all(event.kind != "exited" for event in world.events)

    asyncio.run(scenario())


def test_a_command_that_cannot_run_is_one_line(world: World) -> None:
    missing = world.spec("missing", ("/nonexistent/bin/sink", "--listen", "7200"))

    async def scenario() -> None:
        with pytest.raises(ProcessError) as caught:
            await world.supervisor(missing).start_all()
        log = world.tmp / "run" / "missing.log"
        assert str(caught.value) == (f"process missing: cannot run '/nonexistent/bin/sink': "
                                     f"No such file or directory (log: {log})")

    asyncio.run(scenario())


# --- faults --------------------------------------------------------------------------------


def test_crash_then_restart_after_down_rotates_the_log(world: World) -> None:
    worker = world.spec("worker", SLEEPER, ready=ReadySpec(pattern="^ready$"))

    async def scenario() -> None:
        supervisor = world.supervisor(worker)
        await supervisor.start_all()
        process = supervisor.processes["worker"]
        old_pid = process.pid
        began = time.monotonic()
        await supervisor.apply("crash", "worker", 0.2)
        assert time.monotonic() - began >= 0.2
        assert process.pid is not None and process.pid != old_pid
        assert process.restarts == 1 and process.state == "running"
        rotated = await world.event("log_rotated", "worker")
        assert rotated.detail == "log -> worker.log.1.gz"
        crashed, restarted = [e for e in world.events if e.kind != "log_rotated"][2:4]
        assert (crashed.kind, crashed.pid, crashed.detail) == ("crashed", old_pid, "SIGKILL")
        assert (restarted.kind, restarted.pid) == ("restarted", process.pid)
        log = world.tmp / "run" / "worker.log"
        with gzip.open(log.with_name("worker.log.1.gz"), "rt") as old:
            assert old.read() == f"incarnation {old_pid}\nready\n"
        assert log.read_text() == f"incarnation {process.pid}\nready\n"
        assert not log.with_name("worker.log.1").exists()
        await supervisor.stop_all(grace=2)

    asyncio.run(scenario())


def test_only_the_newest_keep_logs_rotated_logs_are_kept(world: World) -> None:
    worker = world.spec("worker", SLEEPER, ready=ReadySpec(pattern="^ready$"), keep_logs=2)

    async def scenario() -> None:
        supervisor = world.supervisor(worker)
        await supervisor.start_all()
        pids = []
        for _ in range(4):
            pids.append(supervisor.processes["worker"].pid)
            await supervisor.apply("crash", "worker", 0)
        await supervisor.processes["worker"].wait_logs()
        run = world.tmp / "run"
        assert sorted(p.name for p in run.glob("worker.log*")) == [
            "worker.log", "worker.log.3.gz", "worker.log.4.gz"]
        with gzip.open(run / "worker.log.4.gz", "rt") as newest:
            assert newest.read().startswith(f"incarnation {pids[3]}\n")
        with gzip.open(run / "worker.log.3.gz", "rt") as older:
            assert older.read().startswith(f"incarnation {pids[2]}\n")
        await supervisor.stop_all(grace=2)

    asyncio.run(scenario())


def test_stop_kills_a_process_ignoring_sigterm_after_the_grace(world: World) -> None:
    stubborn = world.spec("stubborn", python("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
    """), ready=ReadySpec(pattern="ready"))

    async def scenario() -> None:
        supervisor = world.supervisor(stubborn)
        await supervisor.start_all()
        process = supervisor.processes["stubborn"]
        pid = process.pid
        assert pid is not None
        began = time.monotonic()
        await process.stop(grace=0.3)
        assert time.monotonic() - began >= 0.3
        assert world.events[-1] == ProcessEvent(
            "stopped", "stubborn", pid, "SIGTERM, then SIGKILL after 0.3s")
        assert group_gone(pid) and process.state == "down"
        rotated = await world.event("log_rotated", "stubborn")
        assert rotated.detail == "log -> stubborn.log.1.gz"
        await supervisor.stop_all(grace=2)

    asyncio.run(scenario())


def test_pause_and_resume_stop_and_continue_the_group(world: World) -> None:
    sleeper = world.spec("sleeper", SLEEPER, ready=ReadySpec(pattern="^ready$"))

    async def scenario() -> None:
        supervisor = world.supervisor(sleeper)
        await supervisor.start_all()
        process = supervisor.processes["sleeper"]
        pid = process.pid
        assert pid is not None
        process.pause()
        assert process.state == "paused"
        await wait_state(pid, lambda state: state == "T")
        process.resume()
        await wait_state(pid, lambda state: state != "T")
        await supervisor.apply("pause", "sleeper", 0.05)
        assert world.kinds()[2:] == [("paused", "sleeper"), ("resumed", "sleeper")] * 2
        await wait_state(pid, lambda state: state != "T")
        # A paused process still stops: SIGTERM, then SIGCONT so it can act on it.
        process.pause()
        await wait_state(pid, lambda state: state == "T")
        await process.stop(grace=5)
        assert world.events[-1].detail == "SIGTERM"
        await supervisor.stop_all(grace=2)

    asyncio.run(scenario())


def test_a_process_dying_by_itself_is_reported_once_with_how_it_died(world: World) -> None:
    quitter = world.spec("quitter", python("""
        import signal, sys, time
        signal.signal(signal.SIGUSR1, lambda *_: sys.exit(3))
        print("ready", flush=True)
        while True:
            time.sleep(60)
    """), ready=ReadySpec(pattern="ready"))
    victim = world.spec("victim", SLEEPER, ready=ReadySpec(pattern="^ready$"))

    async def scenario() -> None:
        supervisor = world.supervisor(quitter, victim)
        await supervisor.start_all()
        quitter_pid = supervisor.processes["quitter"].pid
        victim_pid = supervisor.processes["victim"].pid
        assert quitter_pid is not None and victim_pid is not None
        os.kill(quitter_pid, signal.SIGUSR1)
        exited = await world.event("exited", "quitter")
        assert (exited.pid, exited.detail) == (quitter_pid, "exit status 3")
        os.kill(victim_pid, signal.SIGTERM)
        exited = await world.event("exited", "victim")
        assert (exited.pid, exited.detail) == (victim_pid, "signal SIGTERM")
        assert supervisor.processes["victim"].state == "down"
        state = json.loads((world.tmp / "run" / "processes.json").read_text())
        assert [p["pid"] for p in state["processes"]] == [None, None]
        await supervisor.apply("crash", "victim", 0)  # nothing to crash: no restart
        await supervisor.stop_all(grace=2)
        assert [e.kind for e in world.events].count("exited") == 2
        assert world.kinds()[4:] == [("exited", "quitter"), ("exited", "victim")]

    asyncio.run(scenario())


def test_a_shell_commands_children_die_with_its_group(world: World) -> None:
    shell = world.spec("shell", 'sleep 60 & echo "child $!"; echo ready; wait',
                       ready=ReadySpec(pattern="^ready$"))

    async def scenario() -> None:
        supervisor = world.supervisor(shell)
        children: list[int] = []
        supervisor.processes["shell"].add_line_listener(
            lambda line: children.extend(int(m[1]) for m in [re.match(r"child (\d+)", line)]
                                         if m))
        await supervisor.start_all()
        assert len(children) == 1
        stat = read_stat(children[0])
        assert stat is not None and stat.pgrp == supervisor.processes["shell"].pid
        await supervisor.processes["shell"].crash()
        await asyncio.to_thread(wait_gone, children[0])
        await supervisor.stop_all(grace=2)

    asyncio.run(scenario())


def test_a_line_listener_sees_every_line_of_every_incarnation(world: World) -> None:
    chatty = world.spec("chatty", python("""
        import time
        for n in range(2000):
            print("line", n)
        print("x" * 100000, flush=True)
        print("ready", flush=True)
        time.sleep(60)
    """), ready=ReadySpec(pattern="^ready$"))

    async def scenario() -> None:
        supervisor = world.supervisor(chatty)
        lines: list[str] = []
        supervisor.processes["chatty"].add_line_listener(lines.append)
        await supervisor.start_all()
        await supervisor.apply("crash", "chatty", 0)
        expected = [f"line {n}" for n in range(2000)] + ["x" * 65536, "x" * 34464, "ready"]
        assert lines == expected * 2
        await supervisor.stop_all(grace=2)

    asyncio.run(scenario())


# --- nothing outlives a run ----------------------------------------------------------------

RUNNER = """
import asyncio, sys
from pathlib import Path
from wirefault.fifo_client.chaos_processes import Supervisor
from wirefault.fifo_client.chaos_scenario import ProcessSpec, ReadySpec

CHILD = '''
import signal, time
signal.signal(signal.SIGCONT, lambda *_: print("resumed", flush=True))
print("up", flush=True)
while True:
    time.sleep(60)
'''

async def main():
    run_dir = Path(sys.argv[1])
    spec = ProcessSpec("sleeper", (sys.executable, "-c", CHILD), cwd=run_dir, env={},
                       ready=ReadySpec(pattern="up"))
    supervisor = Supervisor({"sleeper": spec}, run_dir, lambda event: None)
    await supervisor.start_all()
    if sys.argv[2] == "pause":
        supervisor.pause_world()
    print(supervisor.processes["sleeper"].pid, supervisor.watchdog_pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class Runner:
    """A tiny runner in a subprocess: a Supervisor with one sleeping child."""

    def __init__(self, tmp_path: Path, mode: str) -> None:
        script = tmp_path / "runner.py"
        script.write_text(RUNNER)
        self.run_dir = tmp_path / "run1"
        self.proc = subprocess.Popen([PY, str(script), str(self.run_dir), mode],
                                     stdout=subprocess.PIPE, text=True)
        self.child = self.watchdog = 0

    def read_pids(self) -> None:
        readable, _, _ = select.select([self.proc.stdout], [], [], DEADLINE)
        assert readable and self.proc.stdout is not None, "the runner never started its child"
        line = self.proc.stdout.readline()
        assert line, f"the runner died: exit status {self.proc.wait()}"
        child, watchdog = line.split()
        self.child, self.watchdog = int(child), int(watchdog)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Runners:
    """The runners of one test and every process group they started."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.started: list[Runner] = []
        self.groups: set[int] = set()

    def start(self, mode: str) -> Runner:
        runner = Runner(self.tmp, mode)
        self.started.append(runner)
        runner.read_pids()
        self.groups.update({runner.child, runner.watchdog})
        return runner

    def cleanup(self) -> None:
        for runner in self.started:
            runner.kill()
        kill_groups(self.groups)


@pytest.fixture
def runners(tmp_path: Path) -> Iterator[Runners]:
    runners = Runners(tmp_path)
    try:
        yield runners
    finally:
        runners.cleanup()


def test_the_watchdog_kills_what_a_runner_killed_with_sigkill_left(
        tmp_path: Path, runners: Runners) -> None:
    runner = runners.start("run")
    assert read_stat(runner.child) is not None
    runner.kill()
    wait_gone(runner.child)
    wait_gone(runner.watchdog)
    log = (runner.run_dir / "watchdog.log").read_text()
    assert f"runner {runner.proc.pid} gone: killed sleeper (pid {runner.child}," in log
    assert reap_leftovers(tmp_path) == []


def test_the_next_run_reaps_what_runner_and_watchdog_left(
        tmp_path: Path, runners: Runners) -> None:
    runner = runners.start("run")
    os.kill(runner.watchdog, signal.SIGKILL)
    wait_gone(runner.watchdog)
    runner.kill()
    stat = read_stat(runner.child)
    assert stat is not None and stat.state != "Z"
    assert reap_leftovers(tmp_path) == [
        f"reaped sleeper (pid {runner.child}) left by run {runner.run_dir}"]
    wait_gone(runner.child)
    assert reap_leftovers(tmp_path) == []


def test_a_world_left_paused_is_left_alone_and_keeps_its_log(
        tmp_path: Path, runners: Runners) -> None:
    runner = runners.start("pause")
    watchdog_log = runner.run_dir / "watchdog.log"
    wait_for_text(watchdog_log, "left the world paused: sleeper")
    runner.kill()
    assert reap_leftovers(tmp_path) == []
    stat = read_stat(runner.child)
    assert stat is not None and stat.state == "T"
    state = json.loads((runner.run_dir / "processes.json").read_text())
    assert state["left_paused"] is True
    # Resumed by hand, it goes on writing its log through the watchdog.
    os.killpg(runner.child, signal.SIGCONT)
    assert wait_for_text(runner.run_dir / "sleeper.log", "resumed") == "up\nresumed\n"
    assert "killed" not in watchdog_log.read_text()
    os.killpg(runner.child, signal.SIGTERM)
    wait_gone(runner.watchdog)
    assert "every paused process is gone" in watchdog_log.read_text()
