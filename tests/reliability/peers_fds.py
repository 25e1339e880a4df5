"""Hostile peers, file descriptors: a proxy limited to 256 open files (`ulimit -n 256`, set
on the running process with prlimit) gets 1,000 simultaneous connection attempts (2,000 in
FULL).

It must stay up, take what it can and refuse (close) or queue the rest, never spin its loop
(its CPU time while the attempts wait is measured), log it in a few lines (not one per
attempt), and once the clients are gone serve a fresh connection again with its
descriptors back to where they were. Both launch modes, the runner on uvloop and on
asyncio's own loop (mitmdump's), whose accept loops fail differently."""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from pathlib import Path

from campaign import FULL, Row, Size, part
from fifo_helpers import wait_until
from peers_common import FakeUpstream, fd_count, proxy_process
from proxy_helpers import listen_queue
from workloads import cpu_seconds

PART = "hostile peers"
LIMIT = 256


def attempts(size: Size) -> int:
    return 2000 if size == FULL else 1000


def _storm(kind: str, extra: list[str], size: Size, work: Path) -> Row:
    import peers_common

    count = attempts(size)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 100:  # this process holds every client socket
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1000), hard))
    echo = FakeUpstream("echo")
    original = peers_common._command
    peers_common._command = lambda *a: original(*a) + extra
    try:
        with proxy_process(kind, ("127.0.0.1", echo.port), work, protocol="raw") as proc:
            peers_common._command = original
            pid = proc.pid
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
            baseline = fd_count(pid)
            log_before = len(proc.log().splitlines())
            clients = []
            for _ in range(count):
                sock = socket.socket()
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect(("127.0.0.1", proc.ports["proxy"]))
                clients.append(sock)
            wait_until(lambda: fd_count(pid) >= LIMIT - 8, 5)  # the proxy is full
            cpu_before, started = cpu_seconds(pid), time.monotonic()
            time.sleep(2.0)  # measuring CPU over a span: this wait is the measurement
            busy = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - started)
            peak = fd_count(pid)
            served = refused = 0
            for sock in clients:
                with contextlib.suppress(OSError):
                    sock.send(b"ping")
            time.sleep(0.5)
            for sock in clients:
                try:
                    data = sock.recv(16)
                    if data == b"ping":
                        served += 1
                    elif not data:
                        refused += 1
                except BlockingIOError:
                    pass  # queued: neither served nor closed yet
                except OSError:
                    refused += 1
            queued = count - served - refused
            for sock in clients:
                sock.close()
            # the attempts still queued are accepted now, and closed: wait for the last
            wait_until(lambda: listen_queue(proc.ports["proxy"]) == 0 and
                       fd_count(pid) <= baseline, 30)
            with socket.create_connection(("127.0.0.1", proc.ports["proxy"]), timeout=10) as s:
                s.sendall(b"hello")
                fresh = s.recv(16) == b"hello"
            back = wait_until(lambda: fd_count(pid) <= baseline, 15)
            lines = [line for line in proc.log().splitlines()[log_before:] if line.strip()]
            problems = []
            if not proc.alive():
                problems.append("the proxy exited")
            if busy > 0.5:
                problems.append(f"its loop spun at {busy:.0%} CPU")
            if len(lines) > 20:
                problems.append(f"{len(lines)} log lines")
            if not back:
                problems.append(f"{fd_count(pid) - baseline} descriptors left open")
            if not fresh:
                problems.append("a fresh connection was not served")
            figure = (f"served {served}, closed {refused}, queued {queued}; CPU "
                      f"{busy:.0%} while full; fds {baseline} -> {peak} -> {fd_count(pid)}; "
                      f"{len(lines)} log lines; a fresh connection served")
    finally:
        peers_common._command = original
        echo.close()
    return Row(PART, f"ulimit -n {LIMIT}, {kind}{' ' + ' '.join(extra) if extra else ''}",
               f"{count:,} simultaneous connections", "; ".join(problems) or "nothing",
               figure, not problems)


@part("peers_fds")
def run(size: Size, work: Path) -> list[Row]:
    return [_storm("runner", [], size, work), _storm("runner", ["--no-uvloop"], size, work),
            _storm("mitmdump", [], size, work)]
