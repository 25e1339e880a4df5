"""limit(bytes), end to end: from the frame the fault fires on (its first byte included),
exactly that many more bytes pass in that direction, then the connection is closed."""

from __future__ import annotations

import contextlib
import socket
import threading

import psycopg
import pytest
from fault_e2e_shaping import (
    faults_by_name,
    fresh_proxy,
    read_to_eof,
    split_messages,
    through,
    wait_for,
)
from pgwire import open_session, query_message, read_until_ready

from wirefault.fifo_client import FaultProxy

pytest_plugins = ["fault_e2e_shaping"]

QUERY = "SELECT g, repeat('v', 50) FROM generate_series(1, 100) g"


def direct_reply(pg) -> bytes:
    """The server's own reply to QUERY (nothing in it depends on the session)."""
    with open_session(pg.port) as sock:
        sock.sendall(query_message(QUERY))
        return read_until_ready(sock)


@pytest.mark.parametrize("budget", [0, 7, 1000])
@pytest.mark.parametrize("once", [False, True], ids=["every-row", "once"])
def test_exactly_the_budget_passes_after_the_trigger_then_eof(wf_proxy, pg, wf_control,
                                                              budget, once):
    """Firing on every DataRow (each firing can only lower what is left) or once: the same."""
    times = ".once()" if once else ""
    wf_control.send(f'faults.add("l").fromServer().onDataRow(){times}.limit({budget})')
    expected = direct_reply(pg)
    first_row = expected.index(next(m for m in split_messages(expected) if m[:1] == b"D"))
    with open_session(wf_proxy.port) as sock:
        sock.settimeout(30)
        sock.sendall(query_message(QUERY))
        got = read_to_eof(sock)
    assert got == expected[:first_row + budget], (len(got), first_row, budget)
    _, fired, state = faults_by_name(wf_control)["l"]
    assert fired >= 1 and state == ("spent" if once else "active")


def test_a_client_sees_its_connection_closed_and_the_next_one_works(wf_proxy, pg, wf_control):
    wf_control.send('faults.add("l").fromServer().onDataRow().once().limit(100)')
    with through(wf_proxy, pg) as conn, pytest.raises(psycopg.OperationalError):
        conn.execute(QUERY).fetchall()
    with through(wf_proxy, pg) as conn:  # spent: the next connection is whole again
        assert len(conn.execute(QUERY).fetchall()) == 100


class CountingServer:
    """A TCP server that counts what each client sends until EOF (the proxy's start-up
    probes connect too, and a raw proxy opens its upstream at once: they count 0)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.counts: list[int] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                self.accepted += 1
                threading.Thread(target=self._count, args=(conn,), daemon=True).start()

    def _count(self, conn: socket.socket) -> None:
        total = 0
        with conn, contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                total += len(chunk)
        self.counts.append(total)

    def all_closed(self) -> bool:
        return len(self.counts) == self.accepted


def test_client_to_server_the_upstream_gets_exactly_the_budget(wf_mode):
    """On a raw proxy the server side can count: 10,000 bytes sent, 1234 arrive."""
    server = CountingServer()
    try:
        with fresh_proxy(server.port, wf_mode, protocol="raw") as raw:
            FaultProxy(raw.fifo).send('faults.add("l").fromClient().limit(1234)')
            with socket.create_connection(("127.0.0.1", raw.port), timeout=30) as sock:
                with contextlib.suppress(OSError):  # the proxy may close before all is sent
                    for _ in range(10):
                        sock.sendall(b"x" * 1000)
                assert read_to_eof(sock) == b""  # closed by the proxy
            # the upstream side may not even be accepted yet when the client sees its EOF
            wait_for(lambda: server.all_closed() and any(server.counts), 30,
                     "the upstream connection to end")
            counts = sorted(server.counts)
    finally:
        server.listener.close()
    assert counts[-1] == 1234 and not any(counts[:-1]), counts
