"""What a run leaves on disk so nothing it started outlives it: `<run dir>/processes.json`.

The runner rewrites the file (atomically) at every start and restart: its own pid, the
watchdog's, and per managed process its name, pid, process group, command, log and
start time (field 22 of /proc/PID/stat, clock ticks since boot). The start time is what
tells "still the process we started" from "a new process that got the same pid".

Two readers kill what a dead runner left: the watchdog (`chaos_watchdog`) as soon as the
runner is gone, and `reap_leftovers` at the next run's start, for when the watchdog died
too. Neither touches a world left paused on purpose (`left_paused: true`), nor a run that
stopped cleanly (`stopped: true`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_FILE = "processes.json"


@dataclass(frozen=True)
class ProcStat:
    state: str
    """One letter: R, S, D, T, Z, ..."""
    pgrp: int
    start_time: int


def read_stat(pid: int) -> ProcStat | None:
    """The process's state, group and start time, or None when there is no such pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return ProcStat(state=fields[0], pgrp=int(fields[2]), start_time=int(fields[19]))


def start_time(pid: int) -> int | None:
    stat = read_stat(pid)
    return None if stat is None else stat.start_time


def is_alive(pid: int, started: int | None) -> bool:
    """`pid` is running (not a zombie) and, when `started` is known, is the same process."""
    stat = read_stat(pid)
    if stat is None or stat.state in "ZXx":
        return False
    return started is None or stat.start_time == started


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Replace `<run_dir>/processes.json` at once: a reader sees the old or the new one."""
    path = run_dir / STATE_FILE
    partial = path.with_name(f".{STATE_FILE}.{os.getpid()}")
    partial.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(partial, path)


def read_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _group_members(pgid: int, not_before: int) -> list[int]:
    """Live processes in group `pgid` started no earlier than its leader was."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if (stat is not None and stat.pgrp == pgid and stat.state not in "ZXx"
                    and stat.start_time >= not_before):
                members.append(int(entry))
    return members


def kill_recorded(entry: dict[str, Any]) -> bool:
    """SIGKILL the group of one recorded process if it is still ours and alive.

    The leader's pid is checked against its recorded start time; when the leader is gone
    but members of its group live on (a shell's children), the group id cannot have been
    handed to anyone else while they exist, so they are killed too.
    """
    pid, pgid, started = entry.get("pid"), entry.get("pgid"), entry.get("start_time")
    if not isinstance(pid, int) or not isinstance(pgid, int) or not isinstance(started, int):
        return False
    leader = read_stat(pid)
    if leader is not None and leader.start_time != started:
        return False  # the pid was reused: not ours
    if not _group_members(pgid, started):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
        return True
    return False


def runner_alive(state: dict[str, Any]) -> bool:
    pid = state.get("runner_pid")
    return isinstance(pid, int) and is_alive(pid, state.get("runner_start_time"))


def reap_leftovers(run_root: Path) -> list[str]:
    """Kill what runs under `run_root` left behind when their runner (and its watchdog)
    died: one line per kill, "reaped sink (pid N) left by run DIR"."""
    lines = []
    for path in sorted(run_root.glob(f"*/{STATE_FILE}")):
        run_dir = path.parent
        state = read_state(run_dir)
        if (state is None or state.get("left_paused") or state.get("stopped")
                or state.get("reaped") or runner_alive(state)):
            continue
        for entry in state.get("processes", []):
            if kill_recorded(entry):
                lines.append(f"reaped {entry.get('name')} (pid {entry['pid']}) left by run "
                             f"{run_dir}")
        state["reaped"] = "next run"
        with contextlib.suppress(OSError):
            write_state(run_dir, state)
    return lines
