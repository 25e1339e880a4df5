"""fromClient() / fromServer(), times(n) / once(), end to end.

A direction filter decides which copy of the same bytes a fault sees: the client's INSERT
(killed, the row never written) or the server's answer to it (killed after the server
committed). times(n) counts firings on the whole proxy, across connections: after n the
fault is spent, stays listed, and traffic flows.
"""

from __future__ import annotations

import threading

import psycopg
import pytest
from fault_e2e_shaping import (
    count_and_sum,
    faults_by_name,
    through,
)

from wirefault.fifo_client import CommandError

pytest_plugins = ["fault_e2e_shaping"]


@pytest.mark.parametrize(("side", "rows"), [("fromClient", 0), ("fromServer", 1)])
def test_the_direction_decides_which_copy_of_the_bytes_is_killed(
        wf_proxy, pg, wf_control, wf_table, side, rows):
    """The marker travels both ways (in the INSERT and in the row RETURNING gives back)."""
    wf_control.send(f'faults.add("d").{side}().contains(b"dir-marker").kill()')
    with through(wf_proxy, pg) as conn, pytest.raises(psycopg.OperationalError):
        conn.execute(f"INSERT INTO {wf_table} VALUES (1, 'dir-marker') RETURNING payload")
    assert count_and_sum(pg, wf_table)[0] == rows
    rendered = [r for r in wf_control.dump() if r.message.endswith("[fault d: kill]")]
    assert [r.source for r in rendered] == ["coordinator" if rows == 0 else "worker"]


def test_both_directions_are_seen_without_a_direction_filter(wf_proxy, pg, wf_control, wf_table):
    wf_control.send('faults.add("d").contains(b"dir-marker").error("40001")')
    with through(wf_proxy, pg) as conn, pytest.raises(psycopg.errors.SerializationFailure):
        conn.execute(f"INSERT INTO {wf_table} VALUES (1, 'dir-marker') RETURNING payload")
    assert count_and_sum(pg, wf_table)[0] == 0  # the client's copy came first


def test_times_fires_n_times_across_connections_then_is_spent(wf_proxy, pg, wf_control):
    wf_control.send('faults.add("n").onQuery(query="^SELECT .hit.").times(3).error("40001")')
    failed = []
    for connection in range(2):
        with through(wf_proxy, pg) as conn:
            for index in range(3):
                try:
                    assert conn.execute("SELECT 'hit'").fetchone() == ("hit",)
                except psycopg.errors.SerializationFailure:
                    failed.append((connection, index))
    assert failed == [(0, 0), (0, 1), (0, 2)]
    (fault,) = wf_control.faults()
    assert (fault.name, fault.fired, fault.state) == ("n", 3, "spent")
    assert wf_control.status()["faults"] == 1  # listed still
    with through(wf_proxy, pg) as conn:  # and traffic flows
        assert conn.execute("SELECT 'hit'").fetchone() == ("hit",)
    assert faults_by_name(wf_control)["n"][1:] == (3, "spent")


def test_times_counts_across_concurrent_connections(wf_proxy, pg, wf_control):
    wf_control.send('faults.add("n").onQuery(query="^SELECT .race.").times(3).error("40001")')
    failures: list[int] = []
    connections = [through(wf_proxy, pg) for _ in range(8)]

    def run(conn: psycopg.Connection) -> None:
        for _ in range(5):
            try:
                conn.execute("SELECT 'race'")
            except psycopg.errors.SerializationFailure:
                failures.append(1)

    threads = [threading.Thread(target=run, args=(conn,)) for conn in connections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for conn in connections:
        conn.close()
    assert len(failures) == 3
    assert faults_by_name(wf_control)["n"][1:] == (3, "spent")


def test_once_kills_one_connection_and_spares_the_next(wf_proxy, pg, wf_control):
    wf_control.send('faults.add("o").onQuery(query="^SELECT .once.").once().kill()')
    with through(wf_proxy, pg) as first, pytest.raises(psycopg.OperationalError):
        first.execute("SELECT 'once'")
    with through(wf_proxy, pg) as second:
        assert second.execute("SELECT 'once'").fetchone() == ("once",)
        assert second.execute("SELECT 'once'").fetchone() == ("once",)
    assert faults_by_name(wf_control)["o"][1:] == (1, "spent")


def test_a_spent_fault_replaced_by_name_is_active_again(wf_proxy, pg, wf_control):
    wf_control.send('faults.add("o").onQuery(query="^SELECT .once.").once().error("40001")')
    with through(wf_proxy, pg) as conn:
        with pytest.raises(psycopg.errors.SerializationFailure):
            conn.execute("SELECT 'once'")
        conn.execute("SELECT 'once'")
        assert faults_by_name(wf_control)["o"][1:] == (1, "spent")
        wf_control.send('faults.add("o").onQuery(query="^SELECT .once.").once().error("40001")')
        assert faults_by_name(wf_control)["o"] == (0, 0, "active")
        with pytest.raises(psycopg.errors.SerializationFailure):
            conn.execute("SELECT 'once'")


@pytest.mark.parametrize("bad", ["times(0)", "times(-1)", "times(1.5)"])
def test_times_below_one_is_refused(wf_control, bad):
    with pytest.raises(CommandError):
        wf_control.send(f'faults.add("n").onQuery().{bad}.kill()')
    assert wf_control.faults() == []
