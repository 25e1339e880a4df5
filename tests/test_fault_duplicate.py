"""duplicate(n=1) end to end: the frame is forwarded n + 1 times.

Real PostgreSQL, real proxies in both launch modes (fault_e2e.py), psycopg and raw sockets.
"""

from __future__ import annotations

from fault_e2e import Harness, command_tags, first_columns, read_replies
from pgwire import query_message

pytest_plugins = ["fault_e2e"]


def test_a_duplicated_query_runs_n_plus_one_times(e2e: Harness):
    sock = e2e.session()
    e2e.control.send(
        f'faults.add("twice-more").onQuery(query="INSERT INTO {e2e.table}").duplicate(2)')
    sock.sendall(query_message(f"INSERT INTO {e2e.table} VALUES (7)"))
    # The server ran it three times and answered each: three CommandComplete/ReadyForQuery.
    replies = read_replies(sock, 3)
    assert command_tags(replies) == ["INSERT 0 1"] * 3
    assert [kind for kind, _ in replies] == ["C", "Z"] * 3
    assert e2e.values() == [7, 7, 7]
    fault = e2e.fault("twice-more")
    assert (fault.matched, fault.fired) == (1, 1)
    # No fourth copy comes, and the connection goes on.
    sock.sendall(query_message("SELECT 'next'"))
    replies = read_replies(sock, 1)
    assert (command_tags(replies), first_columns(replies)) == (["SELECT 1"], ["next"])


def test_a_duplicated_server_notice_reaches_the_client_twice(e2e: Harness):
    conn = e2e.connect(autocommit=True)
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    e2e.control.send('faults.add("echo").fromServer().onNoticeResponse().duplicate()')
    conn.execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
    assert notices == ["hello", "hello"]  # n defaults to 1: one extra copy
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_duplicated_data_rows_are_rows_the_client_reads(e2e: Harness):
    conn = e2e.connect(autocommit=True)
    e2e.control.send(
        'faults.add("rows").fromServer().onDataRow().contains(b"dup").duplicate(3)')
    rows = conn.execute("SELECT 'dup' UNION ALL SELECT 'single'").fetchall()
    assert rows == [("dup",)] * 4 + [("single",)]
    assert e2e.fault("rows").fired == 1
