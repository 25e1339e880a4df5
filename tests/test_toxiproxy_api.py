"""Toxiproxy's API on `wirefault serve`, driven by the real `toxiproxy-python` client: proxies
created, listed, disabled and enabled, each toxic added and removed, reset; the toxics'
behaviour asserted on the wire."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pgserver import free_port
from test_serve import _echo_server, _exchange, _refused

toxiproxy = pytest.importorskip("toxiproxy")
from toxiproxy.api import APIConsumer  # noqa: E402
from toxiproxy.exceptions import NotFound, ProxyExists  # noqa: E402


async def _read_all(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    data = b""
    while chunk := await asyncio.wait_for(reader.read(65536), timeout):
        data += chunk
    return data


async def _scenario(tmp_path: Path, pg) -> None:
    import tornado.httpserver
    import tornado.web
    from mitmproxy import ctx

    from wirefault.proxy import serve
    from wirefault.proxy.proxy_registry import ProxyRegistry
    from wirefault.proxy.toxiproxy_api import toxiproxy_routes

    echo = await _echo_server(b"")
    echo_port = echo.sockets[0].getsockname()[1]
    config = tmp_path / "proxies.yaml"
    config.write_text("proxies: []\n")
    registry = ProxyRegistry()
    args = serve.build_parser().parse_args(["--config", str(config), "--api", "none"])
    server = asyncio.ensure_future(serve.serve(args, registry))
    while not registry.running:
        assert not server.done(), server.result()
        await asyncio.sleep(0.01)
    try:  # the API server of `wirefault serve`, which appends the Toxiproxy routes
        from wirefault.proxy.http_api import ApiServer
    except ImportError:
        api_port = free_port()
        http = tornado.httpserver.HTTPServer(
            tornado.web.Application(toxiproxy_routes(registry)))
        http.listen(api_port, "127.0.0.1")

        async def stop() -> None:
            http.stop()
    else:
        api = ApiServer(registry, "127.0.0.1", 0)
        api.start()
        api_port = api.address[1]

        stop = api.stop
    client = toxiproxy.Toxiproxy()
    client.update_api_consumer("127.0.0.1", api_port)
    base = f"http://127.0.0.1:{api_port}"

    def call(fn, *args, **kwargs):
        return asyncio.to_thread(fn, *args, **kwargs)

    try:
        assert (await call(client.version)) == b'{"version": "2.12.0"}\n'

        # Create (listen port 0: a free one is chosen and kept), list.
        proxy = await call(client.create, upstream=f"127.0.0.1:{echo_port}", name="echo")
        port = int(proxy.listen.rsplit(":", 1)[1])
        assert port and proxy.enabled is True
        assert list(await call(client.proxies)) == ["echo"]
        assert await _exchange(port, b"hello") == b"hello"
        assert registry.get("echo").spec.protocol == "raw"
        with pytest.raises(ProxyExists):
            await call(client.create, upstream="127.0.0.1:1", name="echo")

        # Toxiproxy's error bodies and codes.
        reply = await call(requests.post, f"{base}/proxies",
                           json={"name": "echo", "upstream": "127.0.0.1:1"})
        assert (reply.status_code, reply.json()) == (
            409, {"error": "proxy already exists", "status": 409})
        reply = await call(requests.post, f"{base}/proxies", json={"name": "x"})
        assert reply.json() == {"error": "missing required field: upstream", "status": 400}
        reply = await call(requests.get, f"{base}/proxies/nope")
        assert reply.json() == {"error": "proxy not found", "status": 404}
        reply = await call(requests.post, f"{base}/proxies/echo/toxics", json={"type": "x"})
        assert reply.json() == {"error": "invalid toxic type", "status": 400}
        reply = await call(requests.post, f"{base}/proxies/echo/toxics",
                           json={"type": "latency", "stream": "sideways"})
        assert reply.status_code == 400 and reply.json()["error"].startswith("stream was inv")
        reply = await call(requests.get, f"{base}/proxies/echo/toxics/nope")
        assert reply.json() == {"error": "toxic not found", "status": 404}
        with pytest.raises(NotFound):
            await call(proxy.destroy_toxic, "nope")

        # Disable: refused; enable: relays again, on the same port.
        await call(proxy.disable)
        assert await _refused(port)
        assert (await call(client.get_proxy, "echo")).enabled is False
        await call(proxy.enable)
        assert await _exchange(port, b"again") == b"again"

        # latency adds at least the latency; removed, it is gone.
        await call(proxy.add_toxic, type="latency", attributes={"latency": 300})
        toxics = await call(proxy.toxics)
        assert list(toxics) == ["latency_downstream"]
        assert toxics["latency_downstream"].attributes == {"latency": 300, "jitter": 0}
        assert [f.name for f in registry.get("echo").runtime.engine.faults] == [
            "toxic:latency_downstream"]
        started = time.monotonic()
        assert await _exchange(port, b"slow") == b"slow"
        assert time.monotonic() - started >= 0.3
        await call(proxy.destroy_toxic, "latency_downstream")
        started = time.monotonic()
        assert await _exchange(port, b"fast") == b"fast"
        assert time.monotonic() - started < 0.25
        assert await call(proxy.toxics) == {}

        # limit_data closes after the bytes.
        await call(proxy.add_toxic, type="limit_data", name="limit", attributes={"bytes": 5})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"0123456789")
        assert await _read_all(reader) == b"01234"
        writer.close()
        await call(proxy.destroy_toxic, "limit")

        # timeout 0 drops the stream; removing the toxic closes the connection (Toxiproxy's
        # Cleanup: what was dropped is gone); timeout N closes N ms later.
        await call(proxy.add_toxic, type="timeout", name="hang", attributes={"timeout": 0})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"held")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(65536), 0.5)
        await call(proxy.destroy_toxic, "hang")
        assert await _read_all(reader) == b""
        writer.close()
        await call(proxy.add_toxic, type="timeout", name="close", attributes={"timeout": 300})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"gone")
        started = time.monotonic()
        assert await _read_all(reader) == b""
        assert time.monotonic() - started >= 0.25
        writer.close()
        await call(proxy.destroy_toxic, "close")

        # A wirefault toxic: a chain of the command language.
        await call(proxy.add_toxic, type="wirefault", name="kill-x", stream="upstream",
                   attributes={"command": 'conn.contains(b"x").kill()'})
        assert await _exchange(port, b"fine") == b"fine"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"xxx")
        assert await _read_all(reader) == b""
        writer.close()
        await call(proxy.destroy_toxic, "kill-x")

        # Every type adds, lists and removes; update merges attributes.
        kinds = {"latency": {"latency": 1, "jitter": 0}, "bandwidth": {"rate": 100},
                 "slow_close": {"delay": 10}, "timeout": {"timeout": 100},
                 "reset_peer": {"timeout": 0},
                 "slicer": {"average_size": 4, "size_variation": 1, "delay": 100},
                 "limit_data": {"bytes": 100}}
        for kind, attributes in kinds.items():
            await call(proxy.add_toxic, type=kind, stream="upstream", toxicity=0.5,
                       attributes=attributes)
        toxics = await call(proxy.toxics)
        assert sorted(toxics) == sorted(f"{kind}_upstream" for kind in kinds)
        assert all(t.toxicity == 0.5 and t.stream == "upstream" for t in toxics.values())
        reply = await call(requests.patch, f"{base}/proxies/echo/toxics/latency_upstream",
                           json={"attributes": {"latency": 7}, "toxicity": 1})
        assert reply.json()["attributes"] == {"latency": 7, "jitter": 0}
        for kind in list(kinds)[:3]:
            await call(proxy.destroy_toxic, f"{kind}_upstream")
        assert len(await call(proxy.toxics)) == len(kinds) - 3

        # reset: every proxy enabled, every toxic gone.
        await call(proxy.disable)
        await call(client.reset)
        assert (await call(client.get_proxy, "echo")).enabled is True
        assert await call(proxy.toxics) == {}
        assert registry.get("echo").runtime.engine.faults == []
        assert await _exchange(port, b"clean") == b"clean"

        # populate (Toxiproxy's endpoint; the Python client populates through create),
        # in front of PostgreSQL, raw.
        reply = await call(requests.post, f"{base}/populate", json=[
            {"name": "pg", "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{pg.port}"}])
        assert reply.status_code == 201
        (created,) = reply.json()["proxies"]
        assert (created["name"], created["enabled"], created["toxics"]) == ("pg", True, [])
        pg_port = int(created["listen"].rsplit(":", 1)[1])
        pg_proxy = await call(client.get_proxy, "pg")
        await call(pg_proxy.add_toxic, type="latency", attributes={"latency": 200})

        def query() -> float:
            import psycopg

            with psycopg.connect(pg.dsn(pg_port), autocommit=True) as conn:
                started = time.monotonic()
                assert conn.execute("SELECT 1").fetchall() == [(1,)]
                return time.monotonic() - started

        assert await call(query) >= 0.2
        await call(pg_proxy.destroy)
        assert await _refused(pg_port)
        await call(client.destroy_all)
        assert await call(client.proxies) == {}
        assert await _refused(port)
    finally:
        await stop()
        ctx.master.shutdown()
        assert await asyncio.wait_for(server, 20) == 0
        echo.close()


def test_a_toxiproxy_client_drives_wirefault_serve(tmp_path, pg):
    asyncio.run(_scenario(tmp_path, pg))
    assert APIConsumer.port != 8474


# -- each toxic on the wire, against a `wirefault serve` process -----------------------------

SEED = 5


class _Upstream(socketserver.BaseRequestHandler):
    """Echoes, records what it reads; `SEND n` answers n bytes in one write, `CLOSE` answers
    b"bye" and closes."""

    def handle(self) -> None:
        sock = self.request
        while data := _recv(sock):
            self.server.received.append(data)  # type: ignore[attr-defined]
            if data.startswith(b"SEND "):
                size = int(data.split()[1])
                sock.sendall(bytes(i % 251 for i in range(size)))
            elif data == b"CLOSE":
                sock.sendall(b"bye")
                break
            else:
                sock.sendall(data)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


@contextlib.contextmanager
def _upstream() -> Iterator[socketserver.ThreadingTCPServer]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A `wirefault serve` process (no proxies), its API, an upstream, a Toxiproxy client."""
    from proxy_helpers import running_serve

    with running_serve(None, "--seed", str(SEED)) as serve:
        host, _, port = serve.words["api"].rpartition(":")
        client = toxiproxy.Toxiproxy()
        client.update_api_consumer(host, int(port))
        with _upstream() as upstream:
            yield client, serve.api, upstream


def _proxy(served, name: str):
    client, _, upstream = served
    proxy = client.create(upstream=f"127.0.0.1:{upstream.server_address[1]}", name=name)
    return proxy, int(proxy.listen.rsplit(":", 1)[1])


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), 5)
    sock.settimeout(20)
    return sock


def _read_until(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    data, reads = b"", []
    while len(data) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        reads.append(len(chunk))
    return data, reads


def _wait_received(upstream, data: bytes, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if data in b"".join(upstream.received):
            return True
        time.sleep(0.01)
    return False


def _payload(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def test_the_version_is_toxiproxys_json(served):
    _, base, _ = served
    reply = requests.get(f"{base}/version")
    assert reply.content == b'{"version": "2.12.0"}\n'
    assert reply.headers["Content-Type"] == "application/json;charset=utf-8"


def test_bandwidth_bounds_the_rate_in_kilobytes_of_1000(served):
    proxy, port = _proxy(served, "bw")
    proxy.add_toxic(type="bandwidth", attributes={"rate": 100})  # 100 000 bytes a second
    size = 200_000
    with _connect(port) as sock:
        started = time.monotonic()
        sock.sendall(b"SEND %d" % size)
        data, _ = _read_until(sock, size)
        took = time.monotonic() - started
    assert data == _payload(size)
    assert took >= size / 100_000 * 0.8, took
    assert took < 30
    proxy.destroy()


def test_slow_close_holds_the_close_of_its_stream(served):
    proxy, port = _proxy(served, "sc")
    proxy.add_toxic(type="slow_close", attributes={"delay": 500})
    with _connect(port) as sock:
        sock.sendall(b"CLOSE")
        assert _read_until(sock, 3)[0] == b"bye"  # the server has closed by now
        seen = time.monotonic()
        assert sock.recv(65536) == b""
        assert time.monotonic() - seen >= 0.4
    proxy.destroy()


def test_slicer_cuts_as_toxiproxy_with_the_seeded_variation(served):
    from wirefault.proxy import faults
    from wirefault.proxy.faults.slice import Slice

    proxy, port = _proxy(served, "sl")
    proxy.add_toxic(type="slicer", attributes={"average_size": 100, "size_variation": 40,
                                               "delay": 20_000})
    size = 2000
    with _connect(port) as sock:
        started = time.monotonic()
        sock.sendall(b"SEND %d" % size)
        data, reads = _read_until(sock, size)
        took = time.monotonic() - started
    assert data == _payload(size)  # in order, intact
    # The cuts Toxiproxy's algorithm makes with this seed, on the first server frame of the
    # proxy's first connection: every read ends at one of them (reads may join pieces).
    frame = type("F", (), {"data": data, "from_client": False})()
    lengths, _, _ = Slice(100, 20, variation=40).decide(
        frame, faults.ConnectionState(number=1, server_frames_seen=1),
        faults.SharedState(name="toxic:slicer_downstream", seed=SEED)).value
    assert len(set(lengths)) > 3 and all(n <= 140 for n in lengths)
    cuts = {sum(lengths[:i + 1]) for i in range(len(lengths))}
    ends = {sum(reads[:i + 1]) for i in range(len(reads))}
    assert ends <= cuts, (reads, lengths)
    assert len(reads) >= 5, reads
    assert took >= (len(lengths) - 1) * 0.02 * 0.8
    proxy.destroy()


def test_reset_peer_resets_timeout_ms_after_the_streams_first_data(served):
    _, _, upstream = served
    proxy, port = _proxy(served, "rp")
    proxy.add_toxic(type="reset_peer", attributes={"timeout": 400})
    with _connect(port) as sock:
        started = time.monotonic()
        sock.sendall(b"first")  # echoed: the downstream's first data, swallowed
        assert _wait_received(upstream, b"first")
        sock.sendall(b"upward")  # the other direction still flows meanwhile
        assert _wait_received(upstream, b"upward")
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass
        assert time.monotonic() - started >= 0.4 * 0.9
    proxy.destroy()


def test_timeout_drops_its_stream_only_and_closes_after_the_timeout(served):
    _, _, upstream = served
    proxy, port = _proxy(served, "to")
    proxy.add_toxic(type="timeout", attributes={"timeout": 500})
    with _connect(port) as sock:
        started = time.monotonic()
        sock.sendall(b"ping")
        assert _wait_received(upstream, b"ping")  # upstream flows; the echo is dropped
        sock.sendall(b"pong")
        assert _wait_received(upstream, b"pong")
        assert sock.recv(65536) == b""  # closed, nothing of the stream delivered
        assert time.monotonic() - started >= 0.5 * 0.9
    proxy.destroy()


def test_limit_data_passes_exactly_the_bytes_then_closes(served):
    proxy, port = _proxy(served, "ld")
    proxy.add_toxic(type="limit_data", attributes={"bytes": 1000})
    with _connect(port) as sock:
        sock.sendall(b"SEND 5000")
        data, _ = _read_until(sock, 5000)
        assert data == _payload(1000)
    proxy.destroy()


def test_a_new_upstream_closes_the_live_connections(served):
    _, base, _ = served
    proxy, port = _proxy(served, "up")
    with _upstream() as other, _connect(port) as sock:
        sock.sendall(b"hello")
        assert _read_until(sock, 5)[0] == b"hello"
        reply = requests.post(f"{base}/proxies/up",
                              json={"upstream": f"127.0.0.1:{other.server_address[1]}"})
        assert reply.status_code == 200
        with contextlib.suppress(ConnectionResetError):  # Toxiproxy restarts the proxy
            assert sock.recv(65536) == b""
        with _connect(port) as again:
            again.sendall(b"there")
            assert _read_until(again, 5)[0] == b"there"
        assert _wait_received(other, b"there")
    proxy.destroy()


def test_populate_checks_every_entry_first_then_stops_at_a_failure(served):
    client, base, upstream = served
    target = f"127.0.0.1:{upstream.server_address[1]}"
    reply = requests.post(f"{base}/populate", json=[
        {"name": "p1", "upstream": target}, {"name": "p2"}])
    assert (reply.status_code, reply.json()) == (400, {
        "error": "missing required field: upstream at proxy 2", "status": 400,
        "proxies": None})
    assert "p1" not in client.proxies()
    taken = free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", taken))
    blocker.listen()
    try:
        reply = requests.post(f"{base}/populate", json=[
            {"name": "p1", "upstream": target, "listen": "127.0.0.1:0"},
            {"name": "p2", "upstream": target, "listen": f"127.0.0.1:{taken}"},
            {"name": "p3", "upstream": target}])
    finally:
        blocker.close()
    body = reply.json()
    assert reply.status_code >= 400 and body["status"] == reply.status_code
    assert [p["name"] for p in body["proxies"]] == ["p1"]
    assert sorted(n for n in client.proxies() if n.startswith("p")) == ["p1"]
    # The same listen and upstream again: kept as it is (its toxics too).
    listen = body["proxies"][0]["listen"]
    client.get_proxy("p1").add_toxic(type="latency", attributes={"latency": 1})
    reply = requests.post(f"{base}/populate", json=[
        {"name": "p1", "upstream": target, "listen": listen}])
    assert reply.status_code == 201
    assert reply.json()["proxies"][0]["toxics"][0]["name"] == "latency_downstream"
    client.get_proxy("p1").destroy()


def test_a_body_nested_too_deeply_is_a_400_not_a_500(served):
    _, base, _ = served
    for body in (b'{"a":' * 5000, b"[" * 100000):
        reply = requests.post(f"{base}/proxies", data=body)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"] == "bad request body: nested too deeply"
    reply = requests.post(f"{base}/populate", data=b"[" * 100000)
    assert reply.status_code == 400 and "nested too deeply" in reply.json()["error"]
