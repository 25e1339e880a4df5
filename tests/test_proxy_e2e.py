"""The proxy as users see it: a real proxy process, real PostgreSQL, real psycopg clients."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from fifo_helpers import wait_until
from pgwire import query_message, startup_message
from proxy_helpers import running_proxy

from wirefault.fifo_client import CommandError, FaultProxy

LAUNCHES = {
    # the runner with the fast path (the default), mitmdump with every read through mitmproxy
    "runner": ("runner", []),
    "mitmdump-slow-path": ("mitmdump", ["--set", "fast_path=false"]),
}


@pytest.fixture(scope="module", params=list(LAUNCHES))
def proxy(request, pg):
    """One proxy per launch mode, shared by this module's tests; rule reset after each."""
    kind, extra = LAUNCHES[request.param]
    with running_proxy(pg.port, kind=kind, extra_args=extra) as running:
        yield running


@pytest.fixture
def control(proxy):
    client = FaultProxy(proxy.fifo, timeout=10)
    client.allow()
    client.reset_traffic()
    yield client
    client.allow()


@pytest.fixture
def table(pg):
    name = f"t_{os.getpid()}_{time.monotonic_ns()}"
    with pg.connect(autocommit=True) as c:
        c.execute(f"CREATE TABLE {name} (v int)")
    yield name
    with pg.connect(autocommit=True) as c:
        c.execute(f"DROP TABLE {name}")


def through(proxy, pg, **kwargs) -> psycopg.Connection:
    return pg.connect(port=proxy.port, **kwargs)


def test_queries_pass_through(proxy, pg, control):
    with through(proxy, pg) as c:
        assert c.execute("SELECT 40 + 2").fetchone() == (42,)


def test_kill_on_commit_fails_the_client_and_the_server_never_commits(proxy, pg, control, table):
    control.send('conn.onQuery(query="^COMMIT").kill()')
    conn = through(proxy, pg)
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    with pytest.raises(psycopg.OperationalError):
        conn.commit()
    conn.close()
    with pg.connect() as direct:
        assert direct.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)


def test_kill_on_a_server_message(proxy, pg, control, table):
    control.send('conn.onCommandComplete(command="^INSERT").kill()')
    with through(proxy, pg, autocommit=True) as conn, pytest.raises(psycopg.OperationalError):
        conn.execute(f"INSERT INTO {table} VALUES (1)")


def test_reset_gives_the_client_econnreset(proxy, control):
    control.send("conn.reset()")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(startup_message())
        with pytest.raises(ConnectionResetError):
            while s.recv(4096):
                pass


def test_cancel_interrupts_the_signalled_backend(proxy, pg, control):
    victim = pg.connect(autocommit=True)
    victim_pid = victim.info.backend_pid
    outcome: dict[str, BaseException | None] = {}

    def sleep_in_victim() -> None:
        try:
            victim.execute("SELECT pg_sleep(10)")
            outcome["error"] = None
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=sleep_in_victim)
    worker.start()
    with pg.connect(autocommit=True) as watcher:
        assert wait_until(lambda: watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND query LIKE '%%pg_sleep%%'",
            (victim_pid,)).fetchone() == (1,), timeout=30)
    control.send(f'conn.onQuery(query="^SELECT .cancel-me.").cancel({victim_pid})')
    started = time.monotonic()
    with through(proxy, pg, autocommit=True) as c:
        assert c.execute("SELECT 'cancel-me'").fetchone() == ("cancel-me",)  # still forwarded
    assert time.monotonic() - started >= 0.1  # held about 100 ms
    worker.join(10)
    assert isinstance(outcome["error"], psycopg.errors.QueryCanceled)
    victim.close()


def test_cancel_delivers_sigint_to_a_process(proxy, pg, control, tmp_path):
    marker = tmp_path / "got-sigint"
    script = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGINT, lambda *a: (open({str(marker)!r}, 'w').close(), "
        "sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"  # its SIGINT handler is in place
        control.send(f'conn.onQuery(query="^SELECT 7").cancel({child.pid})')
        with through(proxy, pg, autocommit=True) as c:
            c.execute("SELECT 7")
        assert child.wait(timeout=5) == 0
        assert marker.exists()
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)


def test_connect_delay_delays_new_connections_only(proxy, pg, control):
    with through(proxy, pg, autocommit=True) as open_conn:
        control.send("conn.connect_delay(500)")
        result: dict[str, float] = {}

        def connect() -> None:
            started = time.monotonic()
            with through(proxy, pg) as c:
                c.execute("SELECT 1")
            result["elapsed"] = time.monotonic() - started

        thread = threading.Thread(target=connect)
        thread.start()
        time.sleep(0.05)
        started = time.monotonic()
        for _ in range(5):
            open_conn.execute("SELECT 1")
        assert time.monotonic() - started < 0.3  # the open connection keeps flowing
        thread.join(10)
        assert result["elapsed"] >= 0.5


def test_killall_kills_open_and_new_connections_until_allow(proxy, pg, control):
    bystander = through(proxy, pg, autocommit=True)
    bystander.execute("SELECT 1")
    control.send('conn.onQuery(query="killall-now").killall()')
    with through(proxy, pg, autocommit=True) as trigger, pytest.raises(psycopg.OperationalError):
        trigger.execute("SELECT 'killall-now'")
    with pytest.raises(psycopg.OperationalError):
        bystander.execute("SELECT 1")
    bystander.close()
    with pytest.raises(psycopg.OperationalError):
        through(proxy, pg).close()
    control.allow()
    with through(proxy, pg) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_after_counts_exactly(proxy, pg, control):
    control.send('conn.onQuery(query="^SELECT .counted.").after(2).kill()')
    with through(proxy, pg, autocommit=True) as c:
        c.execute("SELECT 'counted'")
        c.execute("SELECT 'not this one'")
        c.execute("SELECT 'counted'")
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT 'counted'")


def test_a_frame_split_across_reads_still_triggers(proxy, control):
    control.send('conn.onQuery(query="^SELECT .split.").kill()')
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(startup_message())
        greeting = b""
        while not greeting.endswith(b"Z\x00\x00\x00\x05I"):
            greeting += s.recv(4096)
        for byte in query_message("SELECT 'split'"):
            s.sendall(bytes([byte]))
            time.sleep(0.005)
        assert s.recv(4096) == b""  # killed: EOF, no reply
    rows = [r.message for r in control.dump()]
    assert "Query(query=SELECT 'split')" in rows


def test_recorder_dump_shows_both_directions(proxy, pg, control):
    with through(proxy, pg, autocommit=True) as c:
        c.execute("SELECT 'recorded'")
    rows = control.dump()
    assert any(r.source == "coordinator" and r.message == "Query(query=SELECT 'recorded')"
               for r in rows)
    assert any(r.source == "worker" and r.message == "CommandComplete(command=SELECT 1)"
               for r in rows)
    assert {r.conn for r in rows} == {0}
    assert control.dump() == []  # a dump clears what it returned


def test_bad_command_gets_its_error_and_the_rule_stays(proxy, pg, control):
    control.send('conn.onQuery(query="^SELECT .doomed.").kill()')
    with pytest.raises(CommandError) as err:
        control.send("conn.onQury().kill()")
    assert "Qury" in str(err.value) and "column" in str(err.value)
    with through(proxy, pg, autocommit=True) as c, pytest.raises(psycopg.OperationalError):
        c.execute("SELECT 'doomed'")


def open_fifo_writer(path: str, timeout: float = 5.0) -> int:
    """Open for writing once the proxy listens (it closes the FIFO while it replies)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_dead_fifo_writer_and_reader_do_not_stop_the_proxy(proxy, pg, control):
    # a writer that opens and closes without writing
    os.close(open_fifo_writer(proxy.fifo))
    # a writer whose reply is never read
    fd = open_fifo_writer(proxy.fifo)
    os.write(fd, b"conn.allow()\n")
    os.close(fd)
    with through(proxy, pg, autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)  # traffic flows meanwhile
    started = time.monotonic()
    FaultProxy(proxy.fifo, timeout=30).send('conn.onQuery(query="^SELECT .after-dead.").kill()')
    assert time.monotonic() - started < 25
    with through(proxy, pg, autocommit=True) as c, pytest.raises(psycopg.OperationalError):
        c.execute("SELECT 'after-dead'")


def test_flows_option_keeps_faults_working(pg, table):
    """--flows creates mitmproxy flows and fires tcp_* hooks; faults still act per frame."""
    rule = 'conn.onQuery(query="^COMMIT").kill()'
    with running_proxy(pg.port, rule=rule, extra_args=["--flows"]) as flows_proxy:
        conn = pg.connect(port=flows_proxy.port)
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(psycopg.OperationalError):
            conn.commit()
        conn.close()
        FaultProxy(flows_proxy.fifo).allow()
        with pg.connect(port=flows_proxy.port) as c:
            c.execute(f"INSERT INTO {table} VALUES (2)")
    with pg.connect() as direct:
        assert direct.execute(f"SELECT array_agg(v) FROM {table}").fetchone() == ([2],)


def test_a_malformed_frame_breaks_nothing_else(proxy, pg, control):
    with through(proxy, pg, autocommit=True) as bystander:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(b"\x00\x00\x00\x02garbage that is no startup message")
            s.settimeout(5)
            with contextlib.suppress(OSError):
                while s.recv(4096):
                    pass
        assert bystander.execute("SELECT 'still fine'").fetchone() == ("still fine",)
    rows = [r.message for r in control.dump()]
    assert any(m.startswith("ProtocolError(") for m in rows), rows


def test_bulk_copy_out_and_in_arrive_intact(proxy, pg, control, table):
    query = "COPY (SELECT g, md5(g::text) FROM generate_series(1, 200000) g) TO STDOUT"

    def copy_out(conn: psycopg.Connection) -> bytes:
        with conn.cursor().copy(query) as copy:
            return b"".join(bytes(block) for block in copy)

    with pg.connect() as direct, through(proxy, pg) as proxied:
        expected = copy_out(direct)
        assert len(expected) > 6_000_000
        assert copy_out(proxied) == expected
        with proxied.cursor().copy(f"COPY {table} (v) FROM STDIN") as copy:
            for line in expected.splitlines():
                copy.write(line.split(b"\t")[0] + b"\n")
        proxied.commit()
        assert direct.execute(f"SELECT count(*), sum(v) FROM {table}").fetchone() == (
            200000, 200000 * 200001 // 2)


def test_a_fault_deep_in_a_bulk_copy_fires_at_its_exact_frame(proxy, pg, control):
    """In bulk traffic most frames are never looked at one by one (runs are skipped when the
    rule's first filter cannot match): the one that matches must still be found exactly."""
    control.send('conn.onCopyData(data="^150000\\t").kill()')
    query = "COPY (SELECT g, md5(g::text) FROM generate_series(1, 200000) g) TO STDOUT"
    received: list[bytes] = []
    with (through(proxy, pg) as proxied, pytest.raises(psycopg.OperationalError),
          proxied.cursor().copy(query) as copy):
        for block in copy:
            received += bytes(block).splitlines()
    assert len(received) == 149_999
    assert [int(row.split(b"\t")[0]) for row in received[-2:]] == [149_998, 149_999]
    rows = control.dump()
    assert rows[0].source == "recorder" and "frames dropped" in rows[0].message
    assert rows[-1].message.startswith("CopyData(data=150000\t"), rows[-1]
    assert rows[-2].message.startswith("CopyData(data=149999\t"), rows[-2]
    assert len(rows) == 1 + 100_000  # the default ring: the last 100,000 frames

