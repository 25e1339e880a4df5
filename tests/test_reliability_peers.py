"""Regression tests for what the hostile-peers campaign (tests/reliability/peers_*.py)
found broken in the proxy, each against a real proxy process:

- an upstream closing first left one descriptor open per connection on the fast path (the
  client's socket: half-closed by the proxy, then read to its end, it was CLOSED for the
  layer, which closes only what is not);
- an upstream opened eagerly (raw TCP: the server may speak first) that refused was not
  logged at all;
- past `ulimit -n`, asyncio's accept loop (mitmdump's, and the runner's with --no-uvloop)
  logged a traceback per failed accept(), about 10,000 lines for 1,000 attempts, and every
  connection whose upstream failed at once kept its client socket open for good, so the
  proxy never served again.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import threading
import time

import pytest
from fifo_helpers import wait_until
from pgserver import free_port
from pgwire import startup_message
from proxy_helpers import listen_queue, running_proxy


def fd_count(pid: int) -> int:
    """The process's open descriptors, but for libuv's spare one (a descriptor of "/" that
    uvloop's loop opens on its first EMFILE, to accept and close what it cannot take)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}") != "/"
    return count


def server_that_closes_first() -> int:
    """Answers half a PostgreSQL message to the client's first bytes and closes."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)

    def run() -> None:
        while True:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"R" + struct.pack("!I", 100) + b"x" * 20)

    threading.Thread(target=run, daemon=True).start()
    return server.getsockname()[1]


def echo_server() -> int:
    server = socket.create_server(("127.0.0.1", 0), backlog=2048)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def run() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=run, daemon=True).start()
    return server.getsockname()[1]


@pytest.mark.parametrize("kind", ["runner", "mitmdump"])
def test_an_upstream_that_closes_first_leaves_no_descriptor_open(kind: str) -> None:
    with running_proxy(server_that_closes_first(), kind=kind) as proxy:
        pid = proxy.process.pid
        for _ in range(3):  # warm-up: lazily opened descriptors of the process itself
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
                sock.sendall(startup_message())
                while sock.recv(65536):
                    pass
        assert wait_until(lambda: fd_count(pid) <= 64, 5)
        before = fd_count(pid)
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
                sock.sendall(startup_message())
                while sock.recv(65536):  # the proxy passes the close on
                    pass
        assert wait_until(lambda: fd_count(pid) <= before, 10), \
            f"{fd_count(pid) - before} descriptors left open by 20 connections"


@pytest.mark.parametrize("kind", ["runner", "mitmdump"])
def test_a_refused_eager_upstream_is_logged_once_per_connection(kind: str) -> None:
    dead = free_port()
    with running_proxy(dead, kind=kind, protocol="raw") as proxy:  # raw: eager
        # the start-up check's own connection was refused too: its line first
        assert wait_until(lambda: "cannot connect to upstream" in proxy.log(), 5)
        before = proxy.log().count("cannot connect to upstream")
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
                assert sock.recv(10) == b""  # closed, as the refusal is passed on
        assert wait_until(
            lambda: proxy.log().count("cannot connect to upstream") - before == 5, 5), \
            proxy.log()
        assert f"127.0.0.1:{dead}" in proxy.log()


@pytest.mark.parametrize("extra", [["--no-uvloop"], []], ids=["asyncio", "uvloop"])
def test_past_the_descriptor_limit_the_proxy_logs_little_and_serves_again(
        extra: list[str]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    with running_proxy(echo_server(), protocol="raw", extra_args=extra) as proxy:
        pid = proxy.process.pid
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (256, 256))
        baseline = fd_count(pid)
        lines_before = len(proxy.log().splitlines())
        clients = []
        for _ in range(1000):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", proxy.port))
            clients.append(sock)
        wait_until(lambda: fd_count(pid) >= 240, 5)
        time.sleep(1)  # let the accept loop fail for a while: what it logs is the point
        for sock in clients:
            sock.close()
        # the attempts still queued are accepted and closed in turn
        assert wait_until(lambda: listen_queue(proxy.port) == 0 and
                          fd_count(pid) <= baseline, 30), \
            f"{fd_count(pid) - baseline} descriptors left open"
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(b"hello")
            assert sock.recv(16) == b"hello"
        assert proxy.process.poll() is None
        lines = proxy.log().splitlines()[lines_before:]
        assert len(lines) <= 10, "\n".join(lines[:20])
        assert not any("Traceback" in line for line in lines)

