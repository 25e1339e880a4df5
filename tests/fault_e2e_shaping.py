"""Shared parts of the end-to-end tests of issue #12's shaping actions and filters
(test_fault_throttle / slice / slow_close / limit, test_filter_*, test_faults_compose).

A pytest plugin: the test modules name it in `pytest_plugins`, so its session-scoped
proxies are one pair for all of them (starting a proxy takes about a second). The fixture
names carry a `wf_` prefix because a plugin's fixtures are seen by every module.

Every test runs in both launch modes: the `wirefault proxy` runner (its fast path reads the
sockets itself) and mitmdump with the addon, with the fast path off so that every read goes
through mitmproxy's own connection handler. Real PostgreSQL (the session's `pg`), real
proxy processes, psycopg or raw sockets. `wf_control` clears the faults and the recorder
before and after each test, so a test sees only its own faults and frames; what stays from
earlier tests (connection numbers, the total of firings, statement tracking once switched
on) is what tests needing a clean proxy get from `fresh_proxy`.

The proxies log at INFO (`-v` for both) so that the one-line record of each firing lands in
their log file, which some tests read.

The test modules import helpers from here before pytest loads it as a plugin, too late for
pytest to rewrite its asserts (it has none), hence: PYTEST_DONT_REWRITE.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from pgwire import read_until_ready
from proxy_helpers import RunningProxy, running_proxy

from wirefault.fifo_client import FaultProxy

LAUNCHES: dict[str, tuple[str, list[str]]] = {
    "runner": ("runner", ["-v"]),
    # -v wins over proxy_helpers' --set termlog_verbosity=warn (mitmproxy applies it last)
    "mitmdump": ("mitmdump", ["-v", "--set", "fast_path=false"]),
}

TIMER_SLACK = 0.02
"""Seconds a measured hold may fall short of the one asked for: the proxy's event-loop
timers count from a cached loop time and round to milliseconds, so one may fire a tick
early. Far below every duration the tests measure."""

FIRED_LINE = re.compile(r"wirefault: fired fault=(?P<fault>\S+) conn=(?P<conn>\d+) "
                        r"client=(?P<client>\S+) frame=(?P<frame>\S+) action=(?P<action>\S+)")


@contextlib.contextmanager
def fresh_proxy(upstream_port: int, launch: str, extra_args: list[str] | None = None,
                **kwargs) -> Iterator[RunningProxy]:
    """A proxy of its own for a test that needs one (connection numbers from 1)."""
    kind, extra = LAUNCHES[launch]
    with running_proxy(upstream_port, kind=kind, extra_args=extra + (extra_args or []),
                       **kwargs) as running:
        yield running


@pytest.fixture(scope="session", params=list(LAUNCHES))
def wf_mode(request) -> str:
    """The launch mode: a key of LAUNCHES."""
    return request.param


@pytest.fixture(scope="session")
def wf_proxy(pg, wf_mode) -> Iterator[RunningProxy]:
    """One postgres proxy per launch mode, shared by every test of these modules."""
    with fresh_proxy(pg.port, wf_mode) as running:
        yield running


@pytest.fixture
def wf_control(wf_proxy) -> Iterator[FaultProxy]:
    """The shared proxy's control channel, with no fault and nothing recorded."""
    client = FaultProxy(wf_proxy.fifo, timeout=30)
    client.clear_faults()
    client.reset_traffic()
    yield client
    client.clear_faults()


@pytest.fixture
def wf_table(pg) -> Iterator[str]:
    """A fresh table (x int, payload text), dropped after the test."""
    name = f"shaping_{os.getpid()}_{time.monotonic_ns()}"
    with pg.connect(autocommit=True) as c:
        c.execute(f"CREATE TABLE {name} (x int, payload text)")
    yield name
    with pg.connect(autocommit=True) as c:
        c.execute(f"DROP TABLE {name}")


def through(proxy: RunningProxy, pg, **kwargs) -> psycopg.Connection:
    """A psycopg connection through the proxy (autocommit unless told otherwise)."""
    kwargs.setdefault("autocommit", True)
    return psycopg.connect(pg.dsn(proxy.port), **kwargs)


def count_and_sum(pg, table: str) -> tuple[int, int | None]:
    with pg.connect(autocommit=True) as c:
        return c.execute(f"SELECT count(*), sum(x) FROM {table}").fetchone()


def faults_by_name(control: FaultProxy) -> dict[str, tuple[int, int, str]]:
    """name -> (matched, fired, state), from faults.list()."""
    return {f.name: (f.matched, f.fired, f.state) for f in control.faults()}


def fired_lines(proxy: RunningProxy) -> list[dict[str, str]]:
    """The proxy's log records of firings, oldest first."""
    return [m.groupdict() for m in FIRED_LINE.finditer(proxy.log())]


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll until `predicate` holds; fail the test naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def backend_alive(pg, pid: int) -> bool:
    with pg.connect(autocommit=True) as c:
        return c.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                         (pid,)).fetchone()[0] == 1


# -- PostgreSQL messages by hand (what tests/pgwire.py does not have) ----------------------------


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def parse(statement: str, query: str) -> bytes:
    return message(b"P", statement.encode() + b"\0" + query.encode() + b"\0"
                   + struct.pack("!H", 0))


def bind(statement: str, *values: str, portal: str = "") -> bytes:
    body = portal.encode() + b"\0" + statement.encode() + b"\0" + struct.pack("!H", 0)
    body += struct.pack("!H", len(values))
    for value in values:
        body += struct.pack("!i", len(value.encode())) + value.encode()
    return message(b"B", body + struct.pack("!H", 0))


def execute(portal: str = "") -> bytes:
    return message(b"E", portal.encode() + b"\0" + struct.pack("!i", 0))


def close_statement(statement: str) -> bytes:
    return message(b"C", b"S" + statement.encode() + b"\0")


SYNC = message(b"S", b"")


def split_messages(data: bytes) -> list[bytes]:
    """Whole server messages (type byte, length, body) of `data`, in order."""
    out, at = [], 0
    while at + 5 <= len(data):
        (length,) = struct.unpack("!I", data[at + 1:at + 5])
        out.append(data[at:at + 1 + length])
        at += 1 + length
    return out


def error_code(reply: bytes) -> str | None:
    """The SQLSTATE of the first ErrorResponse in `reply`, None when there is none."""
    for msg in split_messages(reply):
        if msg[:1] == b"E":
            for part in msg[5:].split(b"\0"):
                if part[:1] == b"C":
                    return part[1:].decode()
    return None


def exchange(sock: socket.socket, data: bytes) -> bytes:
    """Write `data`, return the reply up to and including ReadyForQuery."""
    sock.sendall(data)
    return read_until_ready(sock)


def read_replies(sock: socket.socket, count: int) -> list[bytes]:
    """The next `count` replies, each up to and including its ReadyForQuery."""
    data, replies = b"", []
    while len(replies) < count:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the connection closed before the replies")
        data += chunk
        while (end := _after_ready(data)) is not None:
            replies.append(data[:end])
            data = data[end:]
    return replies


def _after_ready(data: bytes) -> int | None:
    """Where the first whole ReadyForQuery in `data` ends; None when there is none yet."""
    at = 0
    while at + 5 <= len(data):
        end = at + 1 + struct.unpack("!I", data[at + 1:at + 5])[0]
        if end > len(data):
            return None
        if data[at:at + 1] == b"Z":
            return end
        at = end
    return None


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything until the peer closes (a reset counts as the end too)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data
