"""The SQL helpers driving the real proxy from inside the real PostgreSQL server."""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fifo_helpers import POSTGRES_USER, postgres_ids
from proxy_helpers import RunningProxy, running_proxy, running_proxy_for_server_side_copy

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


@pytest.fixture(scope="module")
def proxy(pg) -> Iterator[RunningProxy]:
    with running_proxy_for_server_side_copy(pg.port) as running:
        yield running


@pytest.fixture
def db(pg, proxy) -> Iterator[psycopg.Connection]:
    with pg.connect(autocommit=True) as conn:
        for name in ("citus_helpers.sql", "wirefault.sql"):
            conn.execute((SQL_DIR / name).read_text())
        conn.execute("SELECT set_config('citus.mitmfifo', %s, false)", (proxy.fifo,))
        conn.execute("SELECT set_config('wirefault.fifo', %s, false)", (proxy.fifo,))
        conn.execute("SELECT citus.mitmproxy('conn.allow()')")
        conn.execute("SELECT citus.clear_network_traffic()")
        yield conn
        conn.execute("SELECT citus.mitmproxy('conn.allow()')")


def test_citus_mitmproxy_arms_a_fault_that_another_connection_hits(db, pg, proxy):
    rows = db.execute(
        """SELECT * FROM citus.mitmproxy('conn.onQuery(query="^SELECT 1$").kill()')"""
    ).fetchall()
    assert rows == [("",)]
    with (pg.connect(port=proxy.port, autocommit=True) as victim,
          pytest.raises(psycopg.OperationalError)):
        victim.execute("SELECT 1")
    assert db.execute("SELECT * FROM citus.mitmproxy('conn.allow()')").fetchall() == [("",)]
    with pg.connect(port=proxy.port) as fine:
        assert fine.execute("SELECT 1").fetchone() == (1,)


def test_citus_mitmproxy_returns_the_error_row_of_a_bad_command(db):
    (row,) = db.execute("SELECT * FROM citus.mitmproxy('conn.onQury().kill()')").fetchall()
    assert row[0].startswith("column 6: unknown message type 'Qury'")


def test_citus_dump_and_clear_network_traffic(db, pg, proxy):
    with pg.connect(port=proxy.port, autocommit=True) as c:
        c.execute("SELECT 'dumped'")
    rows = db.execute("SELECT * FROM citus.dump_network_traffic()").fetchall()
    assert (0, "coordinator", "Query(query=SELECT 'dumped')") in rows
    assert all(isinstance(conn, int) for conn, _, _ in rows)
    with pg.connect(port=proxy.port, autocommit=True) as c:
        c.execute("SELECT 'cleared'")
    db.execute("SELECT citus.clear_network_traffic()")
    assert db.execute("SELECT * FROM citus.dump_network_traffic()").fetchall() == []


def test_wirefault_command_raises_on_a_bad_command_and_arms_a_good_one(db, pg, proxy):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="Qury"):
        db.execute("SELECT wirefault.command('conn.onQury().kill()')")
    db.execute("""SELECT wirefault.command('conn.onQuery(query="^SELECT 2$").kill()')""")
    with (pg.connect(port=proxy.port, autocommit=True) as victim,
          pytest.raises(psycopg.OperationalError)):
        victim.execute("SELECT 2")
    db.execute("SELECT wirefault.clear_traffic()")
    with pg.connect(port=proxy.port, autocommit=True) as c:
        c.execute("SELECT 'via wirefault.traffic'")
    rows = db.execute("SELECT message FROM wirefault.traffic() WHERE conn = 0").fetchall()
    assert ("Query(query=SELECT 'via wirefault.traffic')",) in rows


# -- a FIFO the proxy creates for the server's account ----------------------------------------


def server_session(pg, fifo: str) -> psycopg.Connection:
    conn = pg.connect(autocommit=True)
    for name in ("citus_helpers.sql", "wirefault.sql"):
        conn.execute((SQL_DIR / name).read_text())
    conn.execute("SELECT set_config('citus.mitmfifo', %s, false)", (fifo,))
    conn.execute("SELECT set_config('wirefault.fifo', %s, false)", (fifo,))
    return conn


def test_fifo_group_and_mode_offer_the_proxys_own_fifo_to_the_server(pg):
    if postgres_ids() is None:
        pytest.skip("needs root and a postgres account (the proxy and the server differ)")
    postgres_gid = pwd.getpwnam(POSTGRES_USER).pw_gid
    # running_proxy's directory is searchable by all; the proxy (root) creates the FIFO
    with running_proxy(pg.port, extra_args=["--fifo-group", POSTGRES_USER,
                                            "--fifo-mode", "0660"]) as proxy:
        info = os.stat(proxy.fifo)
        assert stat.S_ISFIFO(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
        assert (info.st_uid, info.st_gid) == (0, postgres_gid)
        with server_session(pg, proxy.fifo) as db:
            assert db.execute("SELECT * FROM citus.mitmproxy('conn.allow()')").fetchall() == [
                ("",)]
            assert db.execute("SELECT wirefault.command('conn.allow()')").fetchone() == ("",)
        assert proxy.stop() == 0
        assert not os.path.lexists(proxy.fifo)  # the proxy made it, the proxy removed it


def test_without_them_the_server_cannot_open_the_proxys_fifo(pg):
    if postgres_ids() is None:
        pytest.skip("needs root and a postgres account (the proxy and the server differ)")
    with running_proxy(pg.port) as proxy, server_session(pg, proxy.fifo) as db:
        assert stat.S_IMODE(os.stat(proxy.fifo).st_mode) == 0o600
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="Permission denied"):
            db.execute("SELECT * FROM citus.mitmproxy('conn.allow()')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege,
                           match="wirefault: permission denied"):
            db.execute("SELECT wirefault.command('conn.allow()')")


# -- named faults ------------------------------------------------------------------------------


def test_wirefault_fault_helpers_against_the_real_proxy(db, pg, proxy):
    db.execute("""SELECT wirefault.add_fault('kill-2', 'onQuery(query="^SELECT 2$").kill()')""")
    db.execute("SELECT wirefault.add_fault('kill-3', %s)",
               ('conn.onQuery(query="^SELECT 3$").kill()',))
    for query in ("SELECT 2", "SELECT 3"):  # both in force at once
        with (pg.connect(port=proxy.port, autocommit=True) as victim,
              pytest.raises(psycopg.OperationalError)):
            victim.execute(query)
    with pg.connect(port=proxy.port, autocommit=True) as fine:
        assert fine.execute("SELECT 4").fetchone() == (4,)
    rows = db.execute("SELECT name, matched, fired, state, command, "
                      "added BETWEEN now() - interval '1 minute' AND clock_timestamp() "
                      "FROM wirefault.faults()").fetchall()
    assert rows == [
        ("kill-2", 1, 1, "active", 'faults.add("kill-2").onQuery(query="^SELECT 2$").kill()', True),
        ("kill-3", 1, 1, "active", 'faults.add("kill-3").onQuery(query="^SELECT 3$").kill()', True),
    ]
    (status,), = db.execute("SELECT wirefault.command('proxy.status()')").fetchall()
    assert "faults=2" in status.split() and status.startswith("connections=")
    db.execute("SELECT wirefault.remove_fault('kill-2')")
    with pg.connect(port=proxy.port, autocommit=True) as fine:
        assert fine.execute("SELECT 2").fetchone() == (2,)
    assert db.execute("SELECT name FROM wirefault.faults()").fetchall() == [("kill-3",)]
    with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
        db.execute("SELECT wirefault.remove_fault('kill-2')")
    assert info.value.diag.message_primary.startswith("wirefault: column ")
    assert "no fault named 'kill-2'" in info.value.diag.message_primary
    db.execute("SELECT wirefault.clear_faults()")
    assert db.execute("SELECT count(*) FROM wirefault.faults()").fetchone() == (0,)
    with pg.connect(port=proxy.port, autocommit=True) as fine:
        assert fine.execute("SELECT 3").fetchone() == (3,)


def test_wirefault_add_fault_raises_the_proxys_error(db):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
        db.execute("SELECT wirefault.add_fault('bad', 'onQuery().error(code=''nope'')')")
    assert info.value.diag.message_primary.startswith("wirefault: column ")
    assert "SQLSTATE" in info.value.diag.message_primary
    assert db.execute("SELECT count(*) FROM wirefault.faults()").fetchone() == (0,)


def test_a_spent_fault_stays_listed(db, pg, proxy):
    db.execute("SELECT wirefault.add_fault('once', %s)",
               ('onQuery(query="^SELECT 5$").once().kill()',))
    with (pg.connect(port=proxy.port, autocommit=True) as victim,
          pytest.raises(psycopg.OperationalError)):
        victim.execute("SELECT 5")
    with pg.connect(port=proxy.port, autocommit=True) as fine:
        assert fine.execute("SELECT 5").fetchone() == (5,)
    assert db.execute("SELECT name, fired, state FROM wirefault.faults()").fetchall() == [
        ("once", 1, "spent")]
