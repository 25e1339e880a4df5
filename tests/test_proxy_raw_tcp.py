"""Raw TCP through the proxy: half-closes, large transfers, a peer that resets."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from proxy_helpers import running_proxy

from wirefault.fifo_client import FaultProxy


class EchoServer:
    """Echoes everything back; closes its side once the client half-closed and all is sent."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            data = bytearray()
            try:
                while chunk := conn.recv(65536):
                    data += chunk
                    conn.sendall(chunk)
            except OSError:
                pass
            self.received.append(bytes(data))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture(scope="module", params=[[], ["--no-fast-path"]], ids=["fast-path", "slow-path"])
def proxy(request, echo):
    with running_proxy(echo.port, protocol="raw", extra_args=request.param) as running:
        yield running


def exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        received = bytearray()
        while chunk := s.recv(65536):
            received += chunk
        sender.join()
        return bytes(received)


def test_half_close_lets_the_reply_finish(proxy):
    FaultProxy(proxy.fifo).allow()
    assert exchange(proxy.port, b"hello, then FIN") == b"hello, then FIN"


def test_twenty_megabytes_round_trip_intact(proxy):
    FaultProxy(proxy.fifo).allow()
    payload = bytes(range(256)) * (20 * 4096)
    assert exchange(proxy.port, payload) == payload


def test_contains_kill_on_raw_bytes_stops_the_stream(proxy, echo):
    control = FaultProxy(proxy.fifo)
    control.send('conn.contains(b"POISON").kill()')
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            s.sendall(b"fine")
            assert s.recv(100) == b"fine"
            s.sendall(b"xxPOISONxx")
            assert s.recv(100) == b""  # killed: the echo server never saw it
    finally:
        control.allow()
    assert all(b"POISON" not in data for data in echo.received)


def test_max_frame_turns_an_oversized_frame_into_a_protocol_error(pg):
    """--max-frame: a frame over the limit is a ProtocolError, then opaque passthrough."""
    with running_proxy(pg.port, extra_args=["--max-frame", "64"]) as small:
        control = FaultProxy(small.fifo)
        with pg.connect(port=small.port, autocommit=True) as conn:
            long_query = "SELECT '" + "x" * 200 + "'"
            assert conn.execute(long_query).fetchone() == ("x" * 200,)  # still relayed
        rows = [r.message for r in control.dump()]
        assert any(m.startswith("ProtocolError(") for m in rows), rows
        assert any(m.startswith("Opaque(") for m in rows), rows
