"""Shared harness of the end-to-end tests of issue #12's fault actions (tests/test_fault_*.py).

A pytest plugin (the test modules name it in `pytest_plugins`), so that its session-scoped
proxies are one pair for all those modules, not a pair per module: starting a proxy takes
about a second, and the whole set must stay quick.

Every test runs against both launch modes, `wirefault proxy` (the runner) and `mitmdump -s`
(the addon, as Citus's harness starts it), and mitmdump once more with its fast path off,
so that every read goes through mitmproxy's own connection handler: the layer is the same
everywhere, but the executor of its commands is driven two ways (relay_io.py).

Real PostgreSQL (the session's `pg`), real proxy processes, psycopg or raw sockets
(pgwire.py) when a test must control exactly what is written and read.

The test modules also import helpers from here before pytest loads it as a plugin, too
late for pytest to rewrite its asserts (which carry their own messages), hence the marker
that tells pytest not to try: PYTEST_DONT_REWRITE.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from fifo_helpers import wait_until
from pgserver import PostgresServer
from pgwire import open_session
from proxy_helpers import RunningProxy, running_proxy

from wirefault.fifo_client import FaultProxy
from wirefault.fifo_client.client import FaultInfo

LAUNCHES: dict[str, tuple[str, list[str]]] = {
    "runner": ("runner", []),
    "mitmdump": ("mitmdump", []),
    "mitmdump-slow-path": ("mitmdump", ["--set", "fast_path=false"]),
}

TIMER_SLACK = 0.02
"""Seconds a measured hold may fall short of the one asked for: the proxy's event-loop
timers (uvloop/libuv) count from a cached loop time and round to milliseconds, so a timer
may fire a tick or so early. Far below every delay the tests measure."""

DEADLINE = 30.0
"""Seconds to wait for something that must happen (generous: a busy CI machine)."""

QUIET_WINDOW = 0.5
"""Seconds a test watches for something that must NOT happen (a reply, a close). A correct
proxy never fails such a check, however slow the machine; a wrong one would have sent in
milliseconds."""


# -- the proxies and the per-test harness ---------------------------------------------------


@pytest.fixture(scope="session", params=list(LAUNCHES))
def fault_launch(request) -> tuple[str, list[str]]:
    """(kind, extra arguments) of one launch mode, for tests that need a fresh proxy."""
    return LAUNCHES[request.param]


@pytest.fixture(scope="session")
def fault_proxy(pg: PostgresServer, fault_launch) -> Iterator[RunningProxy]:
    kind, extra = fault_launch
    with running_proxy(pg.port, kind=kind, extra_args=extra) as running:
        yield running


@dataclass
class Harness:
    """One test's view of a proxy: its control channel, connections through it, a table."""

    pg: PostgresServer
    proxy: RunningProxy
    table: str
    control: FaultProxy = field(init=False)
    _sockets: list[socket.socket] = field(default_factory=list)
    _connections: list[psycopg.Connection] = field(default_factory=list)
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(4))

    def __post_init__(self) -> None:
        self.control = FaultProxy(self.proxy.fifo, timeout=DEADLINE)

    # connections through the proxy (closed when the test ends)

    def connect(self, **kwargs: Any) -> psycopg.Connection:
        connection = self.pg.connect(port=self.proxy.port, **kwargs)
        self._connections.append(connection)
        return connection

    def session(self) -> socket.socket:
        """A raw, trust-authenticated session through the proxy, ready for a query."""
        sock = open_session(self.proxy.port, timeout=DEADLINE)
        self._sockets.append(sock)
        return sock

    def direct(self) -> psycopg.Connection:
        """A connection to the server itself, past the proxy (to see what really happened)."""
        return self.pg.connect(autocommit=True)

    def in_thread(self, function: Callable[[], Any]) -> Future:
        return self._pool.submit(function)

    # what the server holds

    def values(self) -> list[int]:
        """The values in the test's table, read past the proxy."""
        with self.direct() as c:
            return [v for (v,) in c.execute(f"SELECT v FROM {self.table} ORDER BY v")]

    # the faults

    def fault(self, name: str) -> FaultInfo:
        found = [f for f in self.control.faults() if f.name == name]
        assert found, f"no fault {name!r} in force: {self.control.faults()}"
        return found[0]

    def wait_fired(self, name: str, times: int = 1) -> FaultInfo:
        """Wait (polling the FIFO) until the fault has fired `times` times."""
        assert wait_until(lambda: self.fault(name).fired >= times, timeout=DEADLINE), \
            self.fault(name)
        return self.fault(name)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        for connection in self._connections:
            connection.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def e2e(pg: PostgresServer, fault_proxy: RunningProxy) -> Iterator[Harness]:
    """A clean proxy (no faults) and a fresh table `v int`; afterwards every connection the
    test opened must be gone from the proxy, so a test that leaves one stuck fails here and
    does not poison the next."""
    name = f"fault_{time.monotonic_ns()}"
    with pg.connect(autocommit=True) as c:
        c.execute(f"CREATE TABLE {name} (v int)")
    harness = Harness(pg, fault_proxy, name)
    harness.control.clear_faults()
    try:
        yield harness
    finally:
        harness.control.clear_faults()  # lifts any hang() before the sockets close
        harness.close()
        assert wait_until(lambda: harness.control.status()["connections"] == 0,
                          timeout=DEADLINE), harness.control.status()
        with pg.connect(autocommit=True) as c:
            c.execute(f"DROP TABLE {name}")


# -- PostgreSQL's wire protocol, read by hand --------------------------------------------------


def parse_messages(data: bytes) -> list[tuple[str, bytes]]:
    """The whole typed messages in `data`: (type letter, body)."""
    out = []
    at = 0
    while at + 5 <= len(data):
        (length,) = struct.unpack("!I", data[at + 1:at + 5])
        if at + 1 + length > len(data):
            break
        out.append((chr(data[at]), data[at + 5:at + 1 + length]))
        at += 1 + length
    return out


def read_replies(sock: socket.socket, count: int, timeout: float = DEADLINE
                 ) -> list[tuple[str, bytes]]:
    """Every message up to and including the `count`-th ReadyForQuery (AssertionError on EOF
    or when they do not come in time). The caller expects exactly `count` replies to what
    it has sent: anything read after them is an error too, not silently dropped."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        messages = parse_messages(data)
        if sum(kind == "Z" for kind, _ in messages) >= count:
            ready = [i for i, (kind, _) in enumerate(messages) if kind == "Z"][count - 1]
            assert ready == len(messages) - 1 and sum(
                1 + 4 + len(body) for _, body in messages) == len(data), \
                f"more than {count} replies: {messages}"
            return messages
        left = deadline - time.monotonic()
        assert left > 0, f"no {count} ReadyForQuery within {timeout} s: {messages}"
        sock.settimeout(left)
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before {count} ReadyForQuery: {messages}"
        data += chunk


def command_tags(messages: list[tuple[str, bytes]]) -> list[str]:
    return [body.rstrip(b"\0").decode() for kind, body in messages if kind == "C"]


def first_columns(messages: list[tuple[str, bytes]]) -> list[str]:
    """The first column of every DataRow, as text."""
    values = []
    for kind, body in messages:
        if kind == "D":
            (length,) = struct.unpack("!i", body[2:6])
            values.append(body[6:6 + length].decode())
    return values


def error_fields(messages: list[tuple[str, bytes]]) -> list[dict[str, str]]:
    """The fields of every ErrorResponse: {'S': severity, 'C': code, 'M': message, ...}."""
    errors = []
    for kind, body in messages:
        if kind == "E":
            fields = {}
            for item in body.split(b"\0"):
                if item:
                    fields[chr(item[0])] = item[1:].decode()
            errors.append(fields)
    return errors


def assert_quiet(sock: socket.socket, window: float = QUIET_WINDOW) -> None:
    """Nothing arrives on `sock` and it is not closed, for `window` seconds."""
    readable, _, _ = select.select([sock], [], [], window)
    if readable:
        sock.setblocking(False)
        try:
            chunk = sock.recv(65536)
        finally:
            sock.setblocking(True)
        raise AssertionError("closed" if not chunk else f"data arrived: {parse_messages(chunk)}")


def read_to_eof(sock: socket.socket, timeout: float = DEADLINE) -> bytes:
    """Everything until the peer closes (a reset counts as a close)."""
    data = b""
    sock.settimeout(timeout)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data
