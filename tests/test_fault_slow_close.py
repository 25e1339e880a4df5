"""slow_close(ms), end to end: once the fault fired on a connection, a side's close reaches
the other side ms later (the server's backend stays in pg_stat_activity until then); a
connection the fault never fired on closes at once."""

from __future__ import annotations

import socket
import time

import pytest
from fault_e2e_shaping import (
    TIMER_SLACK,
    backend_alive,
    error_code,
    faults_by_name,
    read_to_eof,
    split_messages,
    through,
    wait_for,
)
from pgwire import open_session, query_message, read_until_ready

pytest_plugins = ["fault_e2e_shaping"]

MS = 1200
PROMPT = 0.8
"""A close that is not held reaches the server well within this (it takes milliseconds)."""


def session_with_pid(port: int, arm: bool) -> tuple[socket.socket, int]:
    """A raw session and its backend's pid; `arm` runs the query the fault fires on."""
    sock = open_session(port)
    marker = "'arm-slow-close'" if arm else "'plain'"
    sock.sendall(query_message(f"SELECT pg_backend_pid(), {marker}"))
    row = next(m for m in split_messages(read_until_ready(sock)) if m[:1] == b"D")
    # DataRow: type, length, column count (2 bytes), first column's length (4), its text
    size = int.from_bytes(row[7:11], "big")
    return sock, int(row[11:11 + size])


@pytest.mark.parametrize("close", ["close", "half-close"])
def test_the_client_s_close_reaches_the_server_ms_later(wf_proxy, pg, wf_control, close):
    wf_control.send(f'faults.add("sc").onQuery(query="arm-slow-close").slow_close({MS})')
    armed, armed_pid = session_with_pid(wf_proxy.port, arm=True)
    plain, plain_pid = session_with_pid(wf_proxy.port, arm=False)
    assert faults_by_name(wf_control)["sc"][1] == 1
    started = time.monotonic()
    for sock in (armed, plain):
        if close == "close":
            sock.close()
        else:
            sock.shutdown(socket.SHUT_WR)
    # the connection the fault never fired on goes at once...
    wait_for(lambda: not backend_alive(pg, plain_pid), 30, "the plain backend to exit")
    assert time.monotonic() - started < PROMPT
    # ...while the armed one is still there, until ms after the close
    assert backend_alive(pg, armed_pid)
    wait_for(lambda: not backend_alive(pg, armed_pid), 30, "the armed backend to exit")
    assert time.monotonic() - started >= MS / 1000 - TIMER_SLACK
    if close == "half-close":  # the server's close comes back to the client, then EOF
        for sock in (armed, plain):
            sock.settimeout(10)
            assert read_to_eof(sock) == b""
            sock.close()


def test_without_the_fault_the_server_sees_the_close_at_once(wf_proxy, pg, wf_control):
    sock, pid = session_with_pid(wf_proxy.port, arm=True)
    started = time.monotonic()
    sock.close()
    wait_for(lambda: not backend_alive(pg, pid), 30, "the backend to exit")
    assert time.monotonic() - started < PROMPT


def test_the_server_s_close_reaches_the_client_ms_later(wf_proxy, pg, wf_control):
    """The server ends the session (pg_terminate_backend): its FATAL error arrives at once,
    the EOF behind it ms later."""
    wf_control.send(f'faults.add("sc").onQuery(query="arm-slow-close").slow_close({MS})')
    sock, pid = session_with_pid(wf_proxy.port, arm=True)
    sock.settimeout(30)
    with pg.connect(autocommit=True) as direct:
        started = time.monotonic()
        assert direct.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    first = b""
    while not any(m[:1] == b"E" for m in split_messages(first)):
        chunk = sock.recv(65536)
        assert chunk, "EOF before the server's FATAL error"
        first += chunk
    assert error_code(first) == "57P01", first  # admin_shutdown, not held
    assert time.monotonic() - started < PROMPT
    assert read_to_eof(sock) == b""  # nothing after the error but the close...
    assert time.monotonic() - started >= MS / 1000 - TIMER_SLACK  # ...ms later
    sock.close()


def test_a_psycopg_close_reaches_the_server_ms_later(wf_proxy, pg, wf_control):
    wf_control.send(f'faults.add("sc").onQuery(query="arm-slow-close").slow_close({MS})')
    conn = through(wf_proxy, pg)
    pid = conn.info.backend_pid
    conn.execute("SELECT 'arm-slow-close'")
    started = time.monotonic()
    conn.close()
    wait_for(lambda: not backend_alive(pg, pid), 30, "the backend to exit")
    assert time.monotonic() - started >= MS / 1000 - TIMER_SLACK
