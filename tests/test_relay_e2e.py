"""Relay correctness as users see it, in both launch modes: a real proxy process in front of
a real PostgreSQL (or a raw TCP peer), clients that write exactly what each defect needs.

Each test is the reproduction of a defect found on an earlier version: the reset that lost
the frames before its trigger, a connection stuck after its peer died while reads were
paused, mitmproxy handlers leaked by a client that half-closed early, unbounded memory
while a hold was on, and the idle timeout nobody asked for.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from fifo_helpers import wait_until
from pgserver import free_port
from pgwire import open_session, query_message, read_until_ready
from proxy_helpers import RunningProxy, peak_rss_kib, rss_kib, running_proxy

from wirefault.fifo_client import FaultProxy

LAUNCHES = {
    "runner": ("runner", []),
    "mitmdump-slow-path": ("mitmdump", ["--set", "fast_path=false"]),
}


@pytest.fixture(params=list(LAUNCHES))
def launch(request) -> tuple[str, list[str]]:
    return LAUNCHES[request.param]


@pytest.fixture
def table(pg) -> Iterator[str]:
    name = f"relay_{time.monotonic_ns()}"
    with pg.connect(autocommit=True) as c:
        c.execute(f"CREATE TABLE {name} (x int)")
    yield name
    with pg.connect(autocommit=True) as c:
        c.execute(f"DROP TABLE {name}")


def rows(pg, table: str) -> int:
    with pg.connect(autocommit=True) as c:
        return c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def status(proxy: RunningProxy) -> dict[str, int]:
    return FaultProxy(proxy.fifo).status()


# -- 1. reset() forwards the frames before its trigger ------------------------------------------


@pytest.mark.parametrize("action", ["kill", "reset"])
def test_frames_before_the_trigger_in_the_same_write_reach_the_server(pg, launch, table,
                                                                       action):
    kind, extra = launch
    with running_proxy(pg.port, kind=kind, extra_args=extra) as proxy:
        FaultProxy(proxy.fifo).send(f"conn.onQuery(query=\"TRIGGER\").{action}()")
        with open_session(proxy.port) as sock:
            sock.sendall(query_message(f"INSERT INTO {table} VALUES (1)")
                         + query_message("SELECT 'TRIGGER'"))
            with contextlib.suppress(ConnectionError):
                while sock.recv(65536):
                    pass
    assert rows(pg, table) == 1


def test_reset_still_sends_a_real_rst(pg, launch):
    kind, extra = launch
    with running_proxy(pg.port, kind=kind, extra_args=extra) as proxy:
        FaultProxy(proxy.fifo).send('conn.onQuery(query="^SELECT 1").reset()')
        with open_session(proxy.port) as sock:
            sock.sendall(query_message("SELECT 1"))
            with pytest.raises(ConnectionResetError):
                while sock.recv(65536):
                    pass


# -- 3. a peer that dies while its reads were paused --------------------------------------------


def backend_of(pg, marker: str) -> list[tuple[int, str, str | None]]:
    with pg.connect(autocommit=True) as c:
        return c.execute("SELECT pid, state, wait_event FROM pg_stat_activity WHERE query "
                         "LIKE %s AND pid <> pg_backend_pid()", (f"%{marker}%",)).fetchall()


def writing_blocked(pg, marker: str) -> bool:
    """The backend waits for its socket to take more of the result: every buffer between
    it and the client is full, so the proxy has stopped reading it."""
    return any(event == "ClientWrite" for _, _, event in backend_of(pg, marker))


@pytest.mark.parametrize("close", ["with unread data (RST)", "after draining (FIN)"])
def test_a_slow_reader_that_closes_frees_the_backend_and_the_connection(pg, launch, close):
    kind, extra = launch
    marker = f"slow_reader_{time.monotonic_ns()}"
    with running_proxy(pg.port, kind=kind, extra_args=extra) as proxy:
        sock = open_session(proxy.port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(query_message(
            f"SELECT repeat('x', 1000000), '{marker}' FROM generate_series(1, 200)"))
        received = 0
        while received < 1_000_000:  # read a little of the 200 MB, then stop reading
            received += len(sock.recv(65536))
        assert wait_until(lambda: writing_blocked(pg, marker), timeout=60), backend_of(pg, marker)
        if close.startswith("after draining"):
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while sock.recv(1 << 20):
                    pass
        sock.close()
        # The server's backend leaves its query and the proxy forgets the connection.
        assert wait_until(lambda: not backend_of(pg, marker), timeout=60), backend_of(pg, marker)
        assert wait_until(lambda: status(proxy)["handlers"] == 0, timeout=30), status(proxy)


# -- 4. a client that writes and half-closes before the upstream is up --------------------------


def test_clients_that_half_close_at_once_leave_no_handlers_behind(pg, launch):
    kind, extra = launch
    with running_proxy(pg.port, kind=kind, extra_args=extra) as proxy:
        before = status(proxy)
        for _ in range(100):  # printf x | nc 127.0.0.1 PORT
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
                sock.sendall(b"x")
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
        assert wait_until(lambda: status(proxy)["handlers"] == 0, timeout=30), status(proxy)
        after = status(proxy)
    assert after["connections"] == 0
    assert after["tasks"] <= before["tasks"] + 2, (before, after)


# -- 5. a server that speaks first --------------------------------------------------------------


@contextlib.contextmanager
def banner_server(banner: bytes) -> Iterator[int]:
    """A TCP server that greets every client at once, then echoes what it gets."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", free_port()))
    server.listen()

    def serve() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            with client:
                client.sendall(banner)
                while data := client.recv(65536):
                    client.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def test_a_server_that_speaks_first_is_heard_before_the_client_says_anything(launch):
    kind, extra = launch
    with banner_server(b"220 ready\r\n") as port, \
            running_proxy(port, kind=kind, protocol="raw", extra_args=extra) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        assert sock.recv(100) == b"220 ready\r\n"
        sock.sendall(b"HELO\r\n")
        assert sock.recv(100) == b"HELO\r\n"


# -- 7. holds are bounded: reading stops while held ---------------------------------------------


@contextlib.contextmanager
def counting_sink() -> Iterator[tuple[int, list[int]]]:
    """A TCP server that counts what it receives: (port, [bytes so far])."""
    server = socket.socket()
    server.bind(("127.0.0.1", free_port()))
    server.listen()
    received = [0]

    def count(client: socket.socket) -> None:
        with client, contextlib.suppress(OSError):
            while data := client.recv(1 << 20):
                received[0] += len(data)

    def serve() -> None:  # every connection: a proxy's port probe opens an upstream too
        with contextlib.suppress(OSError):
            while True:
                client, _ = server.accept()
                threading.Thread(target=count, args=(client,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1], received
    finally:
        server.close()


def test_what_arrives_during_a_hold_waits_in_the_sender_not_in_the_proxy(launch):
    kind, extra = launch
    total = 200 * 1024 * 1024
    # A small recorder: what is measured is the hold, not the recorder's own bound.
    small = ["--recorder-limit", "64"] if kind == "runner" else ["--set", "recorder_limit=64"]
    with counting_sink() as (port, received), \
            running_proxy(port, kind=kind, protocol="raw", extra_args=extra + small) as proxy:
        FaultProxy(proxy.fifo).send("conn.connect_delay(3000)")
        baseline = rss_kib(proxy.process.pid)
        sent = [0]

        def send_all() -> None:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as sock:
                chunk = b"y" * (1 << 20)
                while sent[0] < total:
                    sock.sendall(chunk)
                    sent[0] += len(chunk)

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        assert wait_until(lambda: received[0] == total, timeout=120), (received, sent)
        sender.join(30)
        peak = peak_rss_kib(proxy.process.pid)
    assert peak - baseline < 96 * 1024, (baseline, peak)  # not the 200 MiB it was sent


# -- 9. no idle timeout unless asked for --------------------------------------------------------

SHORT_WATCHDOG = (
    "import sys, mitmproxy.proxy.server as s; s.TCP_TIMEOUT = 1\n"
    "from wirefault.proxy.runner import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_an_idle_connection_outlives_mitmproxys_watchdog(pg, tmp_path):
    """mitmproxy closes connections idle for 600 s; with its watchdog cut to 1 s here, a
    query that keeps the connection silent for 3 s must still get its answer."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", SHORT_WATCHDOG, "--listen", f"127.0.0.1:{port}",
         "--upstream", f"127.0.0.1:{pg.port}"], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().startswith("ready ")
        with psycopg.connect(pg.dsn(port), autocommit=True) as c:
            assert c.execute("SELECT pg_sleep(3), 'alive'").fetchone() == ("", "alive")
            assert c.execute("SELECT 1").fetchone() == (1,)
    finally:
        process.terminate()
        process.wait(10)


def test_idle_timeout_closes_a_silent_connection_and_says_so(pg, launch):
    kind, extra = launch
    option = ["--idle-timeout", "1"] if kind == "runner" else ["--set", "idle_timeout=1"]
    with running_proxy(pg.port, kind=kind, extra_args=extra + option) as proxy:
        with psycopg.connect(pg.dsn(proxy.port), autocommit=True) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
            with pytest.raises(psycopg.OperationalError):
                c.execute("SELECT pg_sleep(5)")
        assert wait_until(lambda: "after 1 s without traffic (--idle-timeout)" in proxy.log(),
                          timeout=10), proxy.log()


def test_idle_timeout_spares_a_busy_connection(pg):
    with running_proxy(pg.port, extra_args=["--idle-timeout", "1"]) as proxy, \
            psycopg.connect(pg.dsn(proxy.port), autocommit=True) as c:
        for _ in range(30):  # 3 s of traffic, never 1 s of silence
            c.execute("SELECT pg_sleep(0.1)")
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_session_helpers_read_until_ready(pg):
    with open_session(pg.port) as sock:
        sock.sendall(query_message("SELECT 1"))
        assert read_until_ready(sock).endswith(b"Z\x00\x00\x00\x05I")


def test_status_counts_every_firing_since_the_proxy_started(pg):
    with running_proxy(pg.port) as proxy:
        control = FaultProxy(proxy.fifo)
        control.send('conn.onQuery(query="^SELECT 2").kill()')
        with psycopg.connect(pg.dsn(proxy.port), autocommit=True) as c:
            c.execute("SELECT 1")
        assert control.status()["fired"] == 0
        for _ in range(2):
            with psycopg.connect(pg.dsn(proxy.port), autocommit=True) as c, \
                    pytest.raises(psycopg.OperationalError):
                c.execute("SELECT 2")
        assert control.status()["fired"] == 2
        assert control.status()["faults"] == 1
        control.send("conn.allow()")  # what fired stays counted; nothing is in force
        assert control.status()["fired"] == 2
        assert control.status()["faults"] == 0
