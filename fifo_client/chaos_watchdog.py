"""The watchdog of one `wirefault chaos` run: `python -m wirefault.fifo_client.chaos_watchdog
RUN_DIR`.

The runner starts it in its own session with fd 0 one end of a socket pair whose other end
only the runner holds, so when the runner dies, however it dies (SIGKILL included), the
watchdog reads end-of-file. It then kills every process group recorded in
`RUN_DIR/processes.json` that is still the process the runner started (`chaos_reaping`),
and appends what it killed to `RUN_DIR/watchdog.log`.

What the runner may say before it goes:
- `done`: a clean end, the runner stopped everything itself; exit.
- `paused` with the output pipes of the managed processes (SCM_RIGHTS): the world is left
  stopped for a person to look at. Nothing is killed; the watchdog keeps copying each
  process's output into its log, so a process resumed with `kill -CONT` does not die of a
  broken pipe, and exits when every pipe is closed (the processes are gone).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path

from .chaos_reaping import kill_recorded, read_state, write_state

LOG_FILE = "watchdog.log"


def _log(run_dir: Path, message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with (run_dir / LOG_FILE).open("a") as log:
        log.write(f"{stamp} {message}\n")


def _receive(channel: socket.socket) -> tuple[bytes, list[int]]:
    """Everything the runner sends until it closes its end, and the fds passed with it."""
    data, fds = b"", []
    while True:
        try:
            chunk, new_fds, _flags, _addr = socket.recv_fds(channel, 65536, 64)
        except ConnectionResetError:
            break
        fds.extend(new_fds)
        if not chunk:
            break
        data += chunk
    return data, fds


def _drain(run_dir: Path, pipes: dict[int, Path]) -> None:
    """Copy each pipe into its log file until every one reads end-of-file."""
    logs = {fd: path.open("ab", buffering=0) for fd, path in pipes.items()}
    while logs:
        readable, _, _ = select.select(list(logs), [], [])
        for fd in readable:
            chunk = os.read(fd, 65536)
            if chunk:
                logs[fd].write(chunk)
            else:
                logs.pop(fd).close()
                os.close(fd)
    _log(run_dir, "every paused process is gone; watchdog exits")


def _runner_gone(run_dir: Path) -> None:
    state = read_state(run_dir)
    if state is None:
        _log(run_dir, "runner gone; no processes.json, nothing to kill")
        return
    runner = state.get("runner_pid")
    if state.get("left_paused"):
        _log(run_dir, f"runner {runner} gone; the world was left paused on purpose: "
                      "killing nothing")
        return
    killed = []
    for entry in state.get("processes", []):
        if kill_recorded(entry):
            killed.append(f"{entry.get('name')} (pid {entry['pid']}, group {entry['pgid']})")
    if killed:
        for what in killed:
            _log(run_dir, f"runner {runner} gone: killed {what}")
    else:
        _log(run_dir, f"runner {runner} gone: nothing of its was left running")
    state["reaped"] = "watchdog"
    write_state(run_dir, state)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m wirefault.fifo_client.chaos_watchdog RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[1])
    # Only the runner decides when this process ends: not a Ctrl-C meant for the runner,
    # nor a hang-up of the terminal it was started from.
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    channel = socket.socket(fileno=0)
    data, fds = _receive(channel)
    words = data.split(b"\n", 1)
    if words[0] == b"done":
        return 0
    if words[0] == b"paused":
        entries = json.loads(words[1] or b"[]")
        names = ", ".join(f"{e['name']} (pid {e['pid']}, group {e['pgid']})" for e in entries)
        _log(run_dir, f"runner {os.getppid()} left the world paused: {names or 'nothing'}; "
                      "killing nothing, keeping their logs going")
        _drain(run_dir, {fd: Path(e["log"]) for fd, e in zip(fds, entries, strict=False)})
        return 0
    for fd in fds:
        os.close(fd)
    _runner_gone(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
