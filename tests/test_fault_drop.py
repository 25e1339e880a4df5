"""drop() end to end: the frame never arrives, and the connection carries on.

Real PostgreSQL, real proxies in both launch modes (fault_e2e.py), psycopg and raw sockets.
"""

from __future__ import annotations

import psycopg
import pytest
from fault_e2e import Harness, command_tags, first_columns, read_replies
from pgwire import query_message

pytest_plugins = ["fault_e2e"]


def test_a_dropped_query_never_reaches_the_server(e2e: Harness):
    sock = e2e.session()
    e2e.control.send(f'faults.add("lost").onQuery(query="INSERT INTO {e2e.table}").drop()')
    # One write: the INSERT goes nowhere, the SELECT behind it is answered, and it is the
    # only thing answered (no reply to the INSERT ever comes).
    sock.sendall(query_message(f"INSERT INTO {e2e.table} VALUES (1)")
                 + query_message("SELECT 'after'"))
    replies = read_replies(sock, 1)
    assert command_tags(replies) == ["SELECT 1"]
    assert first_columns(replies) == ["after"]
    assert e2e.values() == []
    assert e2e.fault("lost").fired == 1
    # The same connection goes on: its next statements run.
    sock.sendall(query_message("SELECT 'next'"))
    assert first_columns(read_replies(sock, 1)) == ["next"]
    e2e.control.send('faults.remove("lost")')
    sock.sendall(query_message(f"INSERT INTO {e2e.table} VALUES (3)"))
    assert command_tags(read_replies(sock, 1)) == ["INSERT 0 1"]
    assert e2e.values() == [3]


def test_a_dropped_server_notice_never_reaches_the_client(e2e: Harness):
    conn = e2e.connect(autocommit=True)
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    raise_notice = "DO $$ BEGIN RAISE NOTICE 'hello %', {}; END $$"
    e2e.control.send('faults.add("quiet").fromServer().onNoticeResponse().drop()')
    conn.execute(raise_notice.format(1))
    assert notices == []
    assert e2e.fault("quiet").fired == 1
    # The statement's own reply came through and the connection is usable.
    assert conn.execute("SELECT 2").fetchone() == (2,)
    e2e.control.send('faults.remove("quiet")')
    conn.execute(raise_notice.format(3))
    assert notices == ["hello 3"]  # the handler does see notices the proxy lets through


def test_dropping_one_message_of_the_extended_protocol(e2e: Harness):
    """A dropped Execute: its statement never runs, the Sync is still answered (psycopg
    reports that no result came), and the client's next statement on the connection
    runs."""
    conn = e2e.connect(autocommit=True)
    e2e.control.send(f'faults.add("no-exec").onExecute(query="^INSERT INTO {e2e.table}")'
                     '.drop()')
    with pytest.raises(psycopg.InternalError, match="got no result"):
        conn.execute(f"INSERT INTO {e2e.table} VALUES (%s)", (1,))
    assert e2e.values() == []
    assert e2e.fault("no-exec").fired == 1
    assert conn.execute("SELECT %s::int", (5,)).fetchone() == (5,)
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
