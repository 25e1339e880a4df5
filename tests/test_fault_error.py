"""error(code="XX000", message=None, severity="ERROR") end to end: the client gets the
error it names, exactly as if the server had raised it.

Real PostgreSQL, real proxies in both launch modes (fault_e2e.py), psycopg and raw sockets.
The server itself fails on a stand-in for the triggering message (protocols/_pg_agent.py),
so what it does next (a failed transaction block, the extended protocol skipping to Sync)
is the server's own behaviour, which these tests check from the client's side.
"""

from __future__ import annotations

import psycopg
import pytest
from fault_e2e import Harness, command_tags, error_fields, first_columns, read_replies
from pgwire import query_message
from psycopg import errors
from psycopg.pq import TransactionStatus

pytest_plugins = ["fault_e2e"]


def test_a_serialization_failure_in_autocommit(e2e: Harness):
    conn = e2e.connect(autocommit=True)
    e2e.control.send(f'faults.add("retry").onQuery(query="INSERT INTO {e2e.table}")'
                     '.error("40001")')
    with pytest.raises(errors.SerializationFailure) as caught:
        conn.execute(f"INSERT INTO {e2e.table} VALUES (1)")
    assert caught.value.sqlstate == "40001"
    assert caught.value.diag.severity == "ERROR"
    assert e2e.values() == []  # the server never ran the INSERT
    assert conn.execute("SELECT 'still here'").fetchone() == ("still here",)
    assert conn.info.transaction_status == TransactionStatus.IDLE
    assert e2e.fault("retry").fired == 1


def test_an_error_in_a_transaction_block_fails_the_block(e2e: Harness):
    conn = e2e.connect()  # not autocommit: psycopg opens a transaction block
    e2e.control.send('faults.add("second").onQuery(query="VALUES \\\\(2\\\\)")'
                     '.error("40001")')
    conn.execute(f"INSERT INTO {e2e.table} VALUES (1)")
    with pytest.raises(errors.SerializationFailure):
        conn.execute(f"INSERT INTO {e2e.table} VALUES (2)")
    assert conn.info.transaction_status == TransactionStatus.INERROR
    with pytest.raises(errors.InFailedSqlTransaction) as caught:
        conn.execute("SELECT 1")
    assert caught.value.sqlstate == "25P02"
    conn.commit()  # the server answers COMMIT with ROLLBACK
    assert e2e.values() == []  # neither row: the block was rolled back
    conn.execute(f"INSERT INTO {e2e.table} VALUES (3)")
    conn.commit()
    assert e2e.values() == [3]


def test_an_error_on_a_prepared_statement(e2e: Harness):
    """The extended protocol on a named prepared statement: the second Execute of it fails,
    the third runs, and the connection stays usable."""
    conn = e2e.connect(autocommit=True)
    e2e.control.send(f'faults.add("prepared").onExecute(query="^INSERT INTO {e2e.table}")'
                     '.after(1).times(1).error("40001")')
    insert = f"INSERT INTO {e2e.table} VALUES (%s)"
    conn.execute(insert, (1,), prepare=True)
    with pytest.raises(errors.SerializationFailure):
        conn.execute(insert, (2,), prepare=True)
    conn.execute(insert, (3,), prepare=True)
    assert e2e.values() == [1, 3]
    assert conn.execute("SELECT %s::int", (4,)).fetchone() == (4,)
    assert e2e.fault("prepared").state == "spent"


def test_an_error_on_a_parameterised_statement_in_a_transaction(e2e: Harness):
    conn = e2e.connect()
    e2e.control.send(f'faults.add("bind").onBind(query="^INSERT INTO {e2e.table}")'
                     '.error("40P01")')
    with pytest.raises(errors.DeadlockDetected):
        conn.execute(f"INSERT INTO {e2e.table} VALUES (%s)", (1,))
    with pytest.raises(errors.InFailedSqlTransaction):
        conn.execute("SELECT %s::int", (2,))
    conn.rollback()
    e2e.control.send('faults.remove("bind")')
    conn.execute(f"INSERT INTO {e2e.table} VALUES (%s)", (5,))
    conn.commit()
    assert e2e.values() == [5]


def test_a_custom_message_and_the_default_code(e2e: Harness):
    conn = e2e.connect(autocommit=True)
    e2e.control.send('faults.add("words").onQuery(query="WORDS")'
                     '.error(message="the disk is a lie")')
    with pytest.raises(errors.InternalError) as caught:
        conn.execute("SELECT 'WORDS'")
    assert caught.value.sqlstate == "XX000"
    assert caught.value.diag.message_primary == "the disk is a lie"
    assert "the disk is a lie" in str(caught.value)
    assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("severity", ["FATAL", "PANIC"])
def test_a_fatal_error_closes_the_connection(e2e: Harness, severity: str):
    conn = e2e.connect(autocommit=True)
    e2e.control.send(f'faults.add("fatal").onQuery(query="INSERT INTO {e2e.table}")'
                     f'.error("57P01", message="wirefault: going away", severity="{severity}")')
    with pytest.raises(errors.AdminShutdown) as caught:
        conn.execute(f"INSERT INTO {e2e.table} VALUES (1)")
    assert caught.value.diag.severity == severity
    assert "wirefault: going away" in str(caught.value)
    assert conn.closed
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    assert e2e.values() == []


def test_only_the_injected_error_is_rewritten(e2e: Harness):
    """A pipeline in one write: a real error (division by zero), then the faulted query,
    then a good one. The client sees the server's own error, then the injected one, then
    the result, each followed by its ReadyForQuery."""
    sock = e2e.session()
    e2e.control.send('faults.add("mine").onQuery(query="MINE").error("40001")')
    sock.sendall(query_message("SELECT 1/0") + query_message("SELECT 'MINE'")
                 + query_message("SELECT 'ok'"))
    replies = read_replies(sock, 3)
    assert [(e["C"], e["S"]) for e in error_fields(replies)] == [("22012", "ERROR"),
                                                                ("40001", "ERROR")]
    assert error_fields(replies)[1]["M"] == "wirefault: injected error 40001"
    assert first_columns(replies) == ["ok"] and command_tags(replies) == ["SELECT 1"]
    assert [body for kind, body in replies if kind == "Z"] == [b"I"] * 3


def test_an_error_on_a_server_frame_closes_the_connection(e2e: Harness):
    """The server's reply is replaced by the error, and the connection closes (nothing can
    tell the server what the client was told); the statement itself did run."""
    conn = e2e.connect(autocommit=True)
    e2e.control.send('faults.add("reply").fromServer().onCommandComplete(command="^INSERT")'
                     '.error("40001")')
    with pytest.raises(errors.SerializationFailure):
        conn.execute(f"INSERT INTO {e2e.table} VALUES (1)")
    assert conn.closed
    assert e2e.values() == [1]
