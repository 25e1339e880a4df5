"""hang(ms=None) end to end: from the triggering frame on, nothing is forwarded either way
and nothing is closed, until the fault is removed; hang(ms) closes the connection later.

Real PostgreSQL, real proxies in both launch modes (fault_e2e.py), psycopg and raw sockets.
"Nothing happens" is watched for QUIET_WINDOW seconds (a correct proxy never fails that);
everything that must happen is waited for.
"""

from __future__ import annotations

import time

import psycopg
import pytest
from fault_e2e import (
    QUIET_WINDOW,
    TIMER_SLACK,
    Harness,
    assert_quiet,
    command_tags,
    first_columns,
    read_replies,
    read_to_eof,
)
from pgwire import query_message

pytest_plugins = ["fault_e2e"]


def test_a_hung_query_is_held_until_the_fault_is_removed(e2e: Harness):
    sock = e2e.session()
    other = e2e.connect(autocommit=True)
    e2e.control.send(f'faults.add("stuck").onQuery(query="INSERT INTO {e2e.table}").hang()')
    sock.sendall(query_message(f"INSERT INTO {e2e.table} VALUES (1)"))
    e2e.wait_fired("stuck")
    # What the client wrote after the trigger waits behind it.
    sock.sendall(query_message("SELECT 'behind'"))
    assert_quiet(sock)  # no reply, no close
    assert e2e.values() == []  # the server never saw the INSERT
    # Another connection through the proxy is not affected, nor is a new one.
    assert other.execute("SELECT 2").fetchone() == (2,)
    with e2e.connect(autocommit=True) as new:
        assert new.execute("SELECT 3").fetchone() == (3,)
    e2e.control.send('faults.remove("stuck")')
    replies = read_replies(sock, 2)
    assert command_tags(replies) == ["INSERT 0 1", "SELECT 1"]
    assert first_columns(replies) == ["behind"]
    assert e2e.values() == [1]
    # Once released the connection works as before.
    sock.sendall(query_message("SELECT 'free'"))
    assert first_columns(read_replies(sock, 1)) == ["free"]


def test_a_hang_on_a_server_frame_stops_both_directions(e2e: Harness):
    sock = e2e.session()
    e2e.control.send(
        'faults.add("mute").fromServer().onCommandComplete(command="^INSERT").hang()')
    sock.sendall(query_message(f"INSERT INTO {e2e.table} VALUES (1)"))
    e2e.wait_fired("mute")
    assert e2e.values() == [1]  # the server ran it; its reply is what hangs
    sock.sendall(query_message(f"INSERT INTO {e2e.table} VALUES (2)"))
    assert_quiet(sock)
    assert e2e.values() == [1]  # the client's next query did not get through either
    e2e.control.send("faults.clear()")
    replies = read_replies(sock, 2)
    assert command_tags(replies) == ["INSERT 0 1", "INSERT 0 1"]
    assert e2e.values() == [1, 2]


def test_a_psycopg_query_waits_out_a_hang(e2e: Harness):
    conn = e2e.connect(autocommit=True)
    backend = conn.info.backend_pid
    e2e.control.send('faults.add("stuck").onQuery(query="WAIT").hang()')
    held = e2e.in_thread(lambda: conn.execute("SELECT 'WAIT'").fetchone())
    e2e.wait_fired("stuck")
    with e2e.direct() as c:  # the server's side of the connection saw no query: idle
        assert c.execute("SELECT state, query FROM pg_stat_activity WHERE pid = %s",
                         (backend,)).fetchone()[0] == "idle"
    assert not held.done()
    e2e.control.send('faults.remove("stuck")')
    assert held.result(30) == ("WAIT",)


def test_hang_with_ms_closes_the_connection_that_much_later(e2e: Harness):
    sock = e2e.session()
    e2e.control.send(f'faults.add("timeout").onQuery(query="INSERT INTO {e2e.table}")'
                     '.hang(400)')
    started = time.monotonic()
    sock.sendall(query_message(f"INSERT INTO {e2e.table} VALUES (1)"))
    assert read_to_eof(sock) == b""  # no reply, then the close
    assert time.monotonic() - started >= 0.4 - TIMER_SLACK
    assert e2e.values() == []


def test_hang_with_ms_fails_a_psycopg_query(e2e: Harness):
    conn = e2e.connect(autocommit=True)
    e2e.control.send('faults.add("timeout").onQuery(query="GONE").hang(300)')
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 'GONE'")
    assert time.monotonic() - started >= 0.3 - TIMER_SLACK
    assert conn.closed


def test_a_spent_hang_lasts_until_it_is_removed(e2e: Harness):
    """times(1): the fault fires once and is spent, but stays listed; its hang() lasts until
    the fault is removed, and an unrelated command must not lift it."""
    sock = e2e.session()
    e2e.control.send('faults.add("once").onQuery(query="ONCE").times(1).hang()')
    sock.sendall(query_message("SELECT 'ONCE'"))
    assert e2e.wait_fired("once").state == "spent"
    e2e.control.send('faults.add("unrelated").onQuery(query="^NOTHING").drop()')
    assert_quiet(sock)
    e2e.control.send('faults.remove("once")')
    assert first_columns(read_replies(sock, 1)) == ["ONCE"]


def test_a_removed_timed_hang_does_not_close_a_later_hang(e2e: Harness):
    """hang(600) fires and is removed before its 600 ms: its timer must not close the
    connection, not even while another, untimed hang() holds it."""
    sock = e2e.session()
    e2e.control.send('faults.add("timed").onQuery(query="FIRST").hang(600)')
    started = time.monotonic()
    sock.sendall(query_message("SELECT 'FIRST'"))
    e2e.wait_fired("timed")
    e2e.control.send('faults.remove("timed")')
    assert first_columns(read_replies(sock, 1)) == ["FIRST"]
    e2e.control.send('faults.add("untimed").onQuery(query="SECOND").hang()')
    sock.sendall(query_message("SELECT 'SECOND'"))
    e2e.wait_fired("untimed")
    # Watch past the removed hang's 600 ms: no close, no reply.
    assert_quiet(sock, window=max(0.6 - (time.monotonic() - started), 0) + QUIET_WINDOW)
    e2e.control.send('faults.remove("untimed")')
    assert first_columns(read_replies(sock, 1)) == ["SECOND"]
