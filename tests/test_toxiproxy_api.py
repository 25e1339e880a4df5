"""Toxiproxy's API on `wirefault serve`, driven by the real `toxiproxy-python` client: proxies
created, listed, disabled and enabled, each toxic added and removed, reset; the toxics'
behaviour asserted on the wire."""

from __future__ import annotations

import argparse
import asyncio
import time
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
    args = argparse.Namespace(config=str(config), seed=0, ready_file=None)
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
        assert (await call(client.version)) == b"2.12.0"

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
        assert toxics["latency_downstream"].attributes == {"latency": 300}
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

        # timeout 0 hangs; timeout N closes N ms later.
        await call(proxy.add_toxic, type="timeout", name="hang", attributes={"timeout": 0})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"held")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(65536), 0.5)
        await call(proxy.destroy_toxic, "hang")  # what was held goes
        assert await asyncio.wait_for(reader.read(65536), 10) == b"held"
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
