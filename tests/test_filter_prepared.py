"""Prepared statements, end to end: Bind, Execute, Describe and Close carry the `query` of
the statement they refer to (tracked per connection from Parse), so a fault can aim at the
sixth execution of a prepared INSERT, from psycopg or from a JDBC-like client writing the
messages itself; Close, DEALLOCATE and DISCARD ALL make the proxy forget a statement."""

from __future__ import annotations

import socket

import psycopg
import pytest
from fault_e2e_shaping import (
    SYNC,
    bind,
    close_statement,
    count_and_sum,
    error_code,
    exchange,
    execute,
    faults_by_name,
    fresh_proxy,
    message,
    parse,
    read_to_eof,
    through,
)
from pgwire import open_session, query_message

from wirefault.fifo_client import FaultProxy

pytest_plugins = ["fault_e2e_shaping"]


@pytest.mark.parametrize("prepare", [True, None, False],
                         ids=["prepare=True", "auto-prepared-after-5", "never-prepared"])
def test_a_psycopg_insert_loop_is_killed_at_its_sixth_execute(
        wf_proxy, pg, wf_control, wf_table, prepare):
    wf_control.send('conn.onExecute(query="^INSERT").after(5).kill()')
    done = []
    with through(wf_proxy, pg) as conn, pytest.raises(psycopg.OperationalError):
        for i in range(10):
            conn.execute(f"INSERT INTO {wf_table} (x) VALUES (%s)", (i,), prepare=prepare)
            done.append(i)
    assert done == [0, 1, 2, 3, 4]
    assert count_and_sum(pg, wf_table) == (5, 10)
    assert faults_by_name(wf_control)["conn"][1] == 1


def raw_inserts(sock: socket.socket, statement: str, values: range) -> list[bytes]:
    """Bind / Execute / Sync of `statement` per value, as JDBC runs a prepared statement;
    each reply, until the connection ends."""
    replies = []
    for value in values:
        try:
            replies.append(exchange(sock, bind(statement, str(value)) + execute() + SYNC))
        except ConnectionError:
            break
    return replies


def test_a_named_statement_on_raw_sockets_is_killed_at_its_sixth_execute(
        wf_proxy, pg, wf_control, wf_table):
    wf_control.send('conn.onExecute(query="^INSERT").after(5).kill()')
    with open_session(wf_proxy.port) as sock:
        assert error_code(exchange(sock, parse("S_1", f"INSERT INTO {wf_table} (x) VALUES ($1)")
                                   + SYNC)) is None
        replies = raw_inserts(sock, "S_1", range(10))
        assert read_to_eof(sock) == b""
    assert len(replies) == 5 and all(b"INSERT 0 1" in r for r in replies)
    assert count_and_sum(pg, wf_table) == (5, 10)


def test_bind_describe_and_close_carry_the_query_too(wf_proxy, pg, wf_control, wf_table):
    """Each aimed by its own fault, answered with an injected error the client survives."""
    insert = f"INSERT INTO {wf_table} (x) VALUES ($1)"
    wf_control.send('faults.add("b").onBind(query="^INSERT").after(2).once().error("40001")')
    wf_control.send('faults.add("d").onDescribe(query="^INSERT").error("40002")')
    wf_control.send('faults.add("c").onClose(query="^INSERT").error("40003")')
    with open_session(wf_proxy.port) as sock:
        exchange(sock, parse("S_1", insert) + SYNC)
        replies = raw_inserts(sock, "S_1", range(5))
        assert [error_code(r) for r in replies] == [None, None, "40001", None, None]
        describe = message(b"D", b"SS_1\0")
        assert error_code(exchange(sock, describe + SYNC)) == "40002"
        assert error_code(exchange(sock, close_statement("S_1") + SYNC)) == "40003"
        # the injected error kept the Close from the server: S_1 still runs
        assert error_code(exchange(sock, bind("S_1", "9") + execute() + SYNC)) is None
    assert count_and_sum(pg, wf_table) == (5, 0 + 1 + 3 + 4 + 9)
    assert {name: fired for name, (_, fired, _) in faults_by_name(wf_control).items()} == {
        "b": 1, "d": 1, "c": 1}


FORGET = {
    "Close": close_statement("s_1") + SYNC,
    "DEALLOCATE": query_message("DEALLOCATE S_1"),  # unquoted: folds to s_1, as the server
    "DEALLOCATE ALL": query_message("DEALLOCATE ALL"),
    "DISCARD ALL": query_message("DISCARD ALL"),
}


@pytest.mark.parametrize("forget", list(FORGET))
def test_a_forgotten_statement_is_no_longer_matched(wf_proxy, pg, wf_control, wf_table, forget):
    """After the statement is gone, a Bind of its name fails on the server (26000) and the
    fault, which would kill an INSERT's Execute, leaves the connection alone; a statement
    prepared again under that name with another query is judged by its new query."""
    wf_control.send('conn.onExecute(query="^INSERT").kill()')
    with open_session(wf_proxy.port) as sock:
        exchange(sock, parse("s_1", f"INSERT INTO {wf_table} (x) VALUES ($1)") + SYNC)
        assert error_code(exchange(sock, FORGET[forget])) is None
        assert error_code(exchange(sock, bind("s_1", "1") + execute() + SYNC)) == "26000"
        exchange(sock, parse("s_1", "SELECT $1::int") + SYNC)
        assert b"D" in exchange(sock, bind("s_1", "2") + execute() + SYNC)
        exchange(sock, parse("s_2", f"INSERT INTO {wf_table} (x) VALUES ($1)") + SYNC)
        sock.sendall(bind("s_2", "3") + execute() + SYNC)
        assert b"INSERT" not in read_to_eof(sock)  # killed: tracking still works
    assert count_and_sum(pg, wf_table) == (0, None)


def test_a_statement_prepared_before_any_fault_filtered_on_query_is_not_known(
        pg, wf_mode, wf_table):
    """As the README says: tracking starts once a fault in force filters on `query` (and
    stays on), so on a fresh proxy what a connection prepared before that is not known."""
    with fresh_proxy(pg.port, wf_mode) as fresh, open_session(fresh.port) as sock:
        exchange(sock, parse("early", f"INSERT INTO {wf_table} (x) VALUES ($1)") + SYNC)
        FaultProxy(fresh.fifo).send('conn.onExecute(query="^INSERT").kill()')
        assert b"INSERT 0 1" in exchange(sock, bind("early", "1") + execute() + SYNC)
        exchange(sock, parse("late", f"INSERT INTO {wf_table} (x) VALUES ($1)") + SYNC)
        sock.sendall(bind("late", "2") + execute() + SYNC)
        assert b"INSERT" not in read_to_eof(sock)
    assert count_and_sum(pg, wf_table) == (1, 1)
