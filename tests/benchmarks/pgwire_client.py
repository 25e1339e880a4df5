"""A minimal PostgreSQL client that pipelines simple queries on one connection.

The memory workload needs one connection to carry a million frames quickly and to stop at
exact frame counts. pgbench waits for each answer; this client keeps a window of queries in
flight, so a proxy frames at its full rate, and it counts ReadyForQuery messages to know
exactly how many queries (hence frames) have crossed. Written against the wire format
directly (trust authentication only) so it depends on nothing under test.
"""

from __future__ import annotations

import random
import selectors
import socket
import struct

PROTOCOL_3_0 = 196608
FRAMES_PER_QUERY = 5
"""Query, RowDescription, DataRow, CommandComplete, ReadyForQuery."""


class WireError(RuntimeError):
    """The server answered with an error or closed the connection."""


def _startup(user: str, database: str) -> bytes:
    body = struct.pack("!i", PROTOCOL_3_0)
    body += b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    return struct.pack("!i", len(body) + 4) + body


def _query(text: str) -> bytes:
    data = text.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(data) + 4) + data


def _terminate() -> bytes:
    return b"X" + struct.pack("!i", 4)


class PipelinedClient:
    """One connection; `run_queries(n)` sends n pgbench-style selects and waits for all."""

    def __init__(self, port: int, user: str = "postgres", database: str = "postgres",
                 window: int = 256, accounts: int = 100_000, seed: int = 1) -> None:
        self.window = window
        self.accounts = accounts
        self.random = random.Random(seed)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()
        self.sock.sendall(_startup(user, database))
        self._read_until_ready(1)
        self.sock.setblocking(False)

    def _count_ready(self) -> int:
        """Consume whole messages from the buffer; return how many were ReadyForQuery."""
        buffer = self._buffer
        offset, ready = 0, 0
        while len(buffer) - offset >= 5:
            kind = buffer[offset]
            (length,) = struct.unpack_from("!i", buffer, offset + 1)
            end = offset + 1 + length
            if end > len(buffer):
                break
            if kind == 0x5A:  # 'Z'
                ready += 1
            elif kind == 0x45:  # 'E'
                raise WireError(bytes(buffer[offset:end]).decode(errors="replace"))
            offset = end
        del buffer[:offset]
        return ready

    def _read_until_ready(self, wanted: int) -> None:
        seen = 0
        while seen < wanted:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise WireError("connection closed by the other side")
            self._buffer += chunk
            seen += self._count_ready()

    def _next_query(self) -> bytes:
        aid = self.random.randint(1, self.accounts)
        return _query(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};")

    def run_queries(self, count: int, timeout: float = 300.0) -> None:
        """Send `count` queries, at most `window` unanswered at a time; wait for every answer."""
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        sent = answered = 0
        pending = b""
        try:
            while answered < count:
                if not pending and sent < count and sent - answered < self.window:
                    batch = min(count - sent, self.window - (sent - answered), 64)
                    pending = b"".join(self._next_query() for _ in range(batch))
                    sent += batch
                events = selector.select(timeout)
                if not events:
                    raise WireError(f"no progress for {timeout} s ({answered}/{count} answered)")
                for _, mask in events:
                    if mask & selectors.EVENT_READ:
                        chunk = self.sock.recv(262144)
                        if not chunk:
                            raise WireError("connection closed by the other side")
                        self._buffer += chunk
                        answered += self._count_ready()
                    if mask & selectors.EVENT_WRITE and pending:
                        written = self.sock.send(pending)
                        pending = pending[written:]
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if pending or (
                    sent < count and sent - answered < self.window) else 0)
                selector.modify(self.sock, want)
        finally:
            selector.close()

    def close(self) -> None:
        try:
            self.sock.setblocking(True)
            self.sock.sendall(_terminate())
        except OSError:
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> PipelinedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
