"""where(user=, database=, application_name=, client=), end to end: only the connections
whose StartupMessage parameters (or address, HOST:PORT) match are affected. The Citus
motivation: fail the application's connections and leave the maintenance daemon's alone,
or the other way round."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

import psycopg
import pytest
from fault_e2e_shaping import (
    faults_by_name,
    read_to_eof,
)
from pgserver import free_port
from pgwire import query_message, read_until_ready, startup_message

from wirefault.fifo_client import CommandError

pytest_plugins = ["fault_e2e_shaping"]

KILL = '.onQuery(query="^SELECT .w.").kill()'


def survives(proxy, pg, **params: str) -> bool:
    """Whether `SELECT 'w'` gets its answer on a connection with these parameters."""
    params.setdefault("user", pg.user)
    params.setdefault("dbname", pg.dbname)
    with psycopg.connect(host="127.0.0.1", port=proxy.port, autocommit=True,
                         connect_timeout=10, **params) as conn:
        try:
            return conn.execute("SELECT 'w'").fetchone() == ("w",)
        except psycopg.OperationalError:
            return False


@pytest.fixture(scope="module")
def other_role_and_database(pg) -> Iterator[tuple[str, str]]:
    suffix = f"{os.getpid()}_{time.monotonic_ns()}"
    role, database = f"wf_role_{suffix}", f"wf_db_{suffix}"
    with pg.connect(autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN")
        c.execute(f"CREATE DATABASE {database}")
    yield role, database
    with pg.connect(autocommit=True) as c:
        c.execute(f"DROP DATABASE {database} WITH (FORCE)")
        c.execute(f"DROP ROLE {role}")


def test_application_name_picks_the_connections(wf_proxy, pg, wf_control):
    wf_control.send(f'faults.add("w").where(application_name="^citus_maintenance"){KILL}')
    assert not survives(wf_proxy, pg, application_name="citus_maintenance_daemon")
    assert survives(wf_proxy, pg, application_name="app")
    assert survives(wf_proxy, pg)  # no application_name at all: no match
    assert faults_by_name(wf_control)["w"][1] == 1


def test_user_and_database(wf_proxy, pg, wf_control, other_role_and_database):
    role, database = other_role_and_database
    wf_control.send(f'faults.add("u").where(user="^{role}$"){KILL}')
    assert not survives(wf_proxy, pg, user=role)
    assert survives(wf_proxy, pg)
    wf_control.send(f'faults.add("u").where(database="^{database}$"){KILL}')
    assert not survives(wf_proxy, pg, dbname=database)
    assert survives(wf_proxy, pg, user=role)


def test_several_keys_must_all_match(wf_proxy, pg, wf_control, other_role_and_database):
    role, _ = other_role_and_database
    wf_control.send(f'faults.add("w").where(user="^{role}$", application_name="^maint"){KILL}')
    assert survives(wf_proxy, pg, user=role, application_name="app")
    assert survives(wf_proxy, pg, application_name="maint")
    assert not survives(wf_proxy, pg, user=role, application_name="maint")


def test_where_reads_the_startup_parameters_not_a_later_set(wf_proxy, pg, wf_control):
    """A SET after the startup changes nothing; a fault added while a matching connection
    is open still finds it."""
    with psycopg.connect(pg.dsn(wf_proxy.port), autocommit=True,
                         application_name="maint") as matching, \
            psycopg.connect(pg.dsn(wf_proxy.port), autocommit=True,
                            application_name="app") as other:
        other.execute("SET application_name = 'maint'")
        wf_control.send(f'faults.add("w").where(application_name="^maint$"){KILL}')
        assert other.execute("SELECT 'w'").fetchone() == ("w",)
        with pytest.raises(psycopg.OperationalError):
            matching.execute("SELECT 'w'")


@contextlib.contextmanager
def session_from(port: int, source_port: int | None = None) -> Iterator[socket.socket]:
    """A raw session to the proxy from 127.0.0.1:source_port (any when None)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30,
                                    source_address=("127.0.0.1", source_port or 0))
    with sock:
        sock.sendall(startup_message())
        read_until_ready(sock)
        yield sock


def answered(sock: socket.socket) -> bool:
    sock.sendall(query_message("SELECT 'w'"))
    try:
        return b"w" in read_until_ready(sock)
    except ConnectionError:
        return False


def test_client_address_picks_one_connection(wf_proxy, wf_control):
    chosen = free_port()
    wf_control.send(f'faults.add("c").where(client=":{chosen}$"){KILL}')
    with session_from(wf_proxy.port, chosen) as picked, session_from(wf_proxy.port) as other:
        assert answered(other)
        assert not answered(picked)
        assert read_to_eof(picked) == b""
        assert answered(other)
    wf_control.send(f'faults.add("c").where(client="^127\\\\.0\\\\.0\\\\.1:[0-9]+$"){KILL}')
    with session_from(wf_proxy.port) as any_client:
        assert not answered(any_client)
    wf_control.send(f'faults.add("c").where(client="^10\\\\."){KILL}')
    with session_from(wf_proxy.port) as any_client:
        assert answered(any_client)


@pytest.mark.parametrize("bad", ["where()", 'where(host="x")', 'where(user="(")'])
def test_bad_where_is_refused(wf_control, bad):
    with pytest.raises(CommandError):
        wf_control.send(f'faults.add("w").{bad}.kill()')
    assert wf_control.faults() == []
