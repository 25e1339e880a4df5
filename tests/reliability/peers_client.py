"""Hostile peers, the client side: it never reads while the server floods it, it
half-closes, it vanishes mid-frame. Both launch modes.

- Never reads: an upstream sends 100 MiB (1 GiB in FULL) of PostgreSQL DataRow messages to
  a client that reads nothing. Back-pressure must stop the proxy reading the upstream: what
  the upstream manages to send stalls at a few MiB (socket buffers), and the proxy's RSS
  grows by at most 8 MiB. Once the client goes, the upstream sees the close and the
  proxy's RSS and open descriptors come back (RSS within 8 MiB of its baseline).
- Half-close: a client sends 4 MiB to an echo server and shuts down its writing
  (SHUT_WR); the whole echo must still reach it, byte-exact, then the close.
- Vanishes mid-frame: a client sends a startup message and half a query, then closes (FIN)
  or aborts (RST): the upstream must see the connection end as it does directly, and the
  proxy keep nothing open.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from pathlib import Path

from campaign import FULL, Row, Size, part
from fifo_helpers import wait_until
from peers_common import (
    LINGER_ZERO,
    FakeUpstream,
    ThreadedServer,
    fd_count,
    proxy_process,
    settled_fds,
)
from pgwire import query_message, startup_message
from proxy_helpers import rss_kib

PART = "hostile peers"
RSS_BOUND_KIB = 8 * 1024


class Flood:
    """An upstream that, once a client's first bytes came, sends `total` bytes of
    PostgreSQL DataRow messages as fast as it can; `sent` counts what the proxy took."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.ended = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self._server.accept()
        body = b"x" * (65536 - 5)
        frame = b"D" + struct.pack("!I", len(body) + 4) + body
        try:
            conn.recv(65536)
            while self.sent < self.total:
                conn.sendall(frame)
                self.sent += len(frame)
        except OSError:
            pass  # the proxy closed: what the client's going must do
        finally:
            conn.close()
            self.ended.set()
            self._server.close()


def _flood(kind: str, size: Size, work: Path) -> Row:
    total = 2**30 if size == FULL else 100 * 2**20
    flood = Flood(total)
    with proxy_process(kind, ("127.0.0.1", flood.port), work) as proc:
        pid = proc.pid
        rss_before, fds_before = rss_kib(pid), fd_count(pid)
        client = socket.create_connection(("127.0.0.1", proc.ports["proxy"]))
        client.sendall(startup_message())
        # Stalled once the count stops moving for half a second (or everything went).
        last, still_since = -1, time.monotonic()
        while flood.sent < total and time.monotonic() - still_since < 0.5:
            if flood.sent != last:
                last, still_since = flood.sent, time.monotonic()
            time.sleep(0.05)
        sent, rss_during = flood.sent, rss_kib(pid)
        client.close()
        closed = flood.ended.wait(10)
        back = wait_until(lambda: fd_count(pid) <= fds_before, 10)
        rss_after = rss_kib(pid)
    problems = []
    if sent >= total:
        problems.append("the proxy read everything: no back-pressure")
    if rss_during - rss_before > RSS_BOUND_KIB:
        problems.append(f"RSS grew {(rss_during - rss_before) / 1024:.1f} MiB")
    if not closed:
        problems.append("the upstream never saw the close")
    if not back:
        problems.append("descriptors left open")
    if rss_after - rss_before > RSS_BOUND_KIB:
        problems.append(f"RSS {(rss_after - rss_before) / 1024:.1f} MiB over baseline after")
    figure = (f"upstream got {sent / 2**20:.1f} of {total / 2**20:.0f} MiB out; RSS "
              f"{rss_before / 1024:.1f} -> {rss_during / 1024:.1f} -> "
              f"{rss_after / 1024:.1f} MiB; fds back to {fds_before}")
    return Row(PART, f"client never reads while the server floods it, {kind}",
               f"{total / 2**20:,.0f} MiB", "; ".join(problems) or "nothing", figure,
               not problems)


def _echo_after_half_close(port: int, payload: bytes) -> tuple[bytes, bool]:
    """Send `payload`, SHUT_WR, read everything: (what came back, whether it ended)."""
    got = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(payload),
                                                  sock.shutdown(socket.SHUT_WR)))
        sender.start()
        try:
            while chunk := sock.recv(1 << 16):
                got += chunk
            ended = True
        except TimeoutError:
            ended = False
        sender.join()
    return bytes(got), ended


def _half_close(kind: str, size: Size, work: Path) -> Row:
    payload = os.urandom(64 * 2**20 if size == FULL else 4 * 2**20)
    echo = FakeUpstream("echo")
    count = 10 if size == FULL else 3
    try:
        direct, direct_ended = _echo_after_half_close(echo.port, payload)
        with proxy_process(kind, ("127.0.0.1", echo.port), work, protocol="raw") as proc:
            fds_before = settled_fds(
                proc.pid, lambda: _echo_after_half_close(proc.ports["proxy"], b"warm-up"))
            results = [_echo_after_half_close(proc.ports["proxy"], payload)
                       for _ in range(count)]
            back = wait_until(lambda: fd_count(proc.pid) <= fds_before, 10)
    finally:
        echo.close()
    want = hashlib.sha256(payload).hexdigest()
    problems = []
    if hashlib.sha256(direct).hexdigest() != want or not direct_ended:
        problems.append("the direct echo differed (the test's own fault)")
    wrong = sum(1 for got, _ in results if hashlib.sha256(got).hexdigest() != want)
    hung = sum(1 for _, ended in results if not ended)
    if wrong:
        problems.append(f"{wrong} replies incomplete after SHUT_WR")
    if hung:
        problems.append(f"{hung} closes never reached the client")
    if not back:
        problems.append("descriptors left open")
    figure = (f"{len(payload) / 2**20:.0f} MiB echoed after SHUT_WR, sha256 equal on "
              f"{count - wrong} of {count}; close seen by {count - hung}; fds back")
    return Row(PART, f"client half-closes (SHUT_WR), {kind}",
               f"{count} connections x {len(payload) / 2**20:.0f} MiB",
               "; ".join(problems) or "nothing", figure, not problems)


class Recorder(ThreadedServer):
    """An upstream that records how each connection ended: "closed" or "reset"."""

    def __init__(self) -> None:
        self.ends: list[str] = []
        super().__init__(backlog=256)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while conn.recv(65536):
                    pass
                self.ends.append("closed")
            except OSError:
                self.ends.append("reset")


def _vanish(port: int, abort: bool) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        query = query_message("SELECT 'a client that vanishes mid-frame'")
        sock.sendall(startup_message() + query[:len(query) // 2])
        if abort:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)


def _vanishes(kind: str, size: Size, work: Path) -> Row:
    count = 200 if size == FULL else 20
    recorder = Recorder()
    try:
        for abort in (False, True):
            for _ in range(count):
                _vanish(recorder.port, abort)
        wait_until(lambda: len(recorder.ends) >= 2 * count, 10)
        direct = sorted(set(recorder.ends))
        recorder.ends.clear()
        with proxy_process(kind, ("127.0.0.1", recorder.port), work) as proc:
            fds_before = settled_fds(proc.pid, lambda: _vanish(proc.ports["proxy"], False))
            wait_until(lambda: len(recorder.ends) >= 1, 5)
            recorder.ends.clear()
            for abort in (False, True):
                for _ in range(count):
                    _vanish(proc.ports["proxy"], abort)
            seen_all = wait_until(lambda: len(recorder.ends) >= 2 * count, 10)
            back = wait_until(lambda: fd_count(proc.pid) <= fds_before, 10)
            fds_after = fd_count(proc.pid)
            alive = proc.alive()
    finally:
        recorder.close()
    problems = []
    if not seen_all:
        problems.append(f"{2 * count - len(recorder.ends)} upstream sides never closed")
    if not back:
        problems.append("descriptors left open")
    if not alive:
        problems.append("the proxy exited")
    figure = (f"upstream saw directly: {'/'.join(direct)}; through the proxy: "
              f"{'/'.join(sorted(set(recorder.ends)))} ({len(recorder.ends)} of "
              f"{2 * count}); fds {fds_before} -> {fds_after}")
    return Row(PART, f"client vanishes mid-frame (FIN and RST), {kind}",
               f"{2 * count} connections", "; ".join(problems) or "nothing", figure,
               not problems)


@part("peers_client")
def run(size: Size, work: Path) -> list[Row]:
    rows = []
    for kind in ("runner", "mitmdump"):
        rows += [_flood(kind, size, work), _half_close(kind, size, work),
                 _vanishes(kind, size, work)]
    return rows
