"""What the hostile-peers parts share: proxy processes whose log goes to a file (the
runner, mitmdump, `wirefault serve`), a proxy's open descriptors and CPU time, fake
upstreams that misbehave on purpose, and a healthy loop run in a process of its own.

The healthy loop runs in a child process (tests/reliability/peers_healthy.py) so that what
the parent does to the proxy (hundreds of threads, fake servers) cannot slow the loop down
by itself: its latency through the proxy is what is compared, alone and during."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from campaign import Size
from fifo_helpers import wait_until
from latency_rule import latency_problems
from pgserver import free_port
from proxy_helpers import BIN, _command, proxy_environment, read_line, wait_for_port

from wirefault.fifo_client import FaultProxy

HERE = Path(__file__).resolve().parent
LINGER_ZERO = struct.pack("ii", 1, 0)
PG_HALF_FRAME = b"R" + struct.pack("!I", 100) + b"x" * 20
"""The first 25 bytes of a 101-byte PostgreSQL message: what a server dying mid-frame sent."""


def fd_count(pid: int) -> int:
    """The process's open socket descriptors (in /proc/PID/fd): what a connection holds.
    The loop's own descriptors (io_uring, eventfd, pipes, libuv's spare one of "/" after a
    first EMFILE) are opened lazily, once, and are no connection's."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def settled_fds(pid: int, warm_up) -> int:
    """The process's descriptors after `warm_up()` (one connection through it, so that what
    the process opens lazily on its first connections is open already) has ended: the
    baseline a part compares with."""
    start = fd_count(pid)
    warm_up()
    wait_until(lambda: fd_count(pid) <= start, 3)
    return fd_count(pid)


@dataclass
class Proc:
    """A proxy process started here: its pid, its listening port(s) and its log file."""

    process: subprocess.Popen
    log_path: Path
    ports: dict[str, int]

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 2)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


@contextlib.contextmanager
def proxy_process(kind: str, upstream: tuple[str, int], work: Path,
                  protocol: str = "postgres") -> Iterator[Proc]:
    """`wirefault proxy` (kind "runner") or mitmdump in front of `upstream`, which may be a
    host name (tests/proxy_helpers.running_proxy knows 127.0.0.1 only)."""
    folder = Path(tempfile.mkdtemp(prefix="proxy-", dir=work))
    fifo = str(folder / "wirefault.fifo")
    port = free_port()
    sentinel = free_port()  # a port number to find in the command and give its host
    command = [part.replace(f"127.0.0.1:{sentinel}", f"{upstream[0]}:{upstream[1]}")
               for part in _command(kind, port, sentinel, fifo, protocol, None, [], 3.0)]
    log_path = folder / "proxy.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   env=proxy_environment())
    try:
        wait_for_port(port, process)
        FaultProxy(fifo, timeout=30).wait_ready()
        yield Proc(process, log_path, {"proxy": port})
    finally:
        _stop(process)


@contextlib.contextmanager
def serve_process(proxies: dict[str, tuple[str, int, str]], work: Path) -> Iterator[Proc]:
    """`wirefault serve` with the named proxies, NAME: (upstream host, port, protocol), all
    in one process and one event loop; its stderr goes to a file."""
    lines = ["proxies:"]
    for name, (host, port, protocol) in proxies.items():
        lines += [f"  - name: {name}", f"    listen: 127.0.0.1:{free_port()}",
                  f"    upstream: {host}:{port}", f"    protocol: {protocol}"]
    config = work / "serve.yaml"
    config.write_text("\n".join(lines) + "\n")
    log_path = work / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(BIN / "wirefault"), "serve", "--api", "none", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True, env=proxy_environment())
    try:
        ready = read_line(process.stdout).split()
        assert ready and ready[0] == "ready", log_path.read_text()
        ports = {w.split("=")[0]: int(w.rpartition(":")[2]) for w in ready[1:]}
        yield Proc(process, log_path, ports)
    finally:
        _stop(process)


class ThreadedServer:
    """A loopback TCP server serving each connection it accepts in a thread of its own
    (`_serve`, for subclasses), until `close`."""

    def __init__(self, backlog: int) -> None:
        self._server = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._server.close()


class FakeUpstream(ThreadedServer):
    """A TCP server that misbehaves as `mode` says, for every connection it accepts:
    "reset" (reads the client's first bytes, then RST), "midframe" (answers half a
    PostgreSQL message and closes), "stall" (accepts, reads, never answers: it only notices
    the close), "echo" (a well-behaved echo). `closed` counts the connections it saw end."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.closed = 0
        self._lock = threading.Lock()
        super().__init__(backlog=4096)

    def _serve(self, conn: socket.socket) -> None:
        mode = self.mode
        try:
            data = conn.recv(65536)
            if mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
            elif mode == "midframe":
                conn.sendall(PG_HALF_FRAME)
            elif mode == "echo":
                while data:
                    conn.sendall(data)
                    data = conn.recv(65536)
            else:  # stall: wait for the other side to go, answering nothing
                while data:
                    data = conn.recv(65536)
        except OSError:
            pass
        finally:
            conn.close()
            with self._lock:
                self.closed += 1


def probe(port: int, host: str = "127.0.0.1", wait: float = 5.0,
          first: bytes | None = None) -> tuple[str, bytes, float]:
    """Connect, send a PostgreSQL startup message, read until the end: what the client saw
    ("refused", "unresolved", "reset", "closed", or "open" after `wait` s), the bytes it
    got, and the seconds it took."""
    from pgwire import startup_message

    started = time.monotonic()
    got = b""
    try:
        with socket.create_connection((host, port), timeout=wait) as sock:
            sock.sendall(startup_message() if first is None else first)
            while chunk := sock.recv(65536):
                got += chunk
            outcome = "closed"
    except ConnectionRefusedError:
        outcome = "refused"
    except socket.gaierror:
        outcome = "unresolved"
    except ConnectionResetError:
        outcome = "reset"
    except TimeoutError:
        outcome = "open"
    return outcome, got, time.monotonic() - started


class HealthyLoop:
    """A child process running a checksummed echo loop through a proxy (peers_healthy.py):
    `measure(seconds)` runs it and returns its figures (round trips, p50/p99 in ms, errors)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "peers_healthy.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        self.echo_port = int(read_line(self.process.stdout))

    def start(self, port: int, seconds: float) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{port} {seconds}\n")
        self.process.stdin.flush()

    def result(self, timeout: float = 60) -> dict:
        line = read_line(self.process.stdout, timeout)
        return json.loads(line) if line else {"errors": 1, "p50": 0.0, "p99": 0.0,
                                              "max": 0.0, "n": 0}

    def measure(self, port: int, seconds: float) -> dict:
        self.start(port, seconds)
        return self.result()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def ratio_ok(during: dict, alone: dict, size: Size) -> bool:
    """No error, no stall, and the median within latency_rule's bound at `size`: FULL, the
    issue's 2x of the same loop alone; QUICK, 10x or alone + 50 ms, as a 2x rule on a
    sub-millisecond median fails on a busy CI machine's luck, not on the proxy."""
    return not during["errors"] and during["n"] > 0 and not latency_problems(
        size, alone["p50"] / 1000, during["p50"] / 1000, during.get("max", 0.0) / 1000)
