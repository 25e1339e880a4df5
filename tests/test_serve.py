"""`wirefault serve`: many proxies in one real process, each with its own faults, recorder,
status and FIFO, in front of a real PostgreSQL; and the registry's run-time changes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from pgserver import free_port
from proxy_helpers import BIN, read_line, stop_process

from wirefault.fifo_client import FaultProxy
from wirefault.proxy.proxy_registry import ProxyError, ProxyRegistry, ProxySpec

WIREFAULT = str(BIN / "wirefault")


@dataclass
class Served:
    process: subprocess.Popen
    ready: str
    ports: dict[str, int]
    fifos: dict[str, Path]
    ready_file: Path


@contextlib.contextmanager
def serving(pg, tmp_path: Path) -> Iterator[Served]:
    ports = {name: free_port() for name in ("pg1", "pg2", "raw", "down")}
    fifos = {name: tmp_path / f"{name}.fifo" for name in ("pg1", "pg2", "raw")}
    config = tmp_path / "proxies.yaml"
    config.write_text(f"""\
proxies:
  - name: pg1
    listen: 127.0.0.1:{ports['pg1']}
    upstream: 127.0.0.1:{pg.port}
    fifo: pg1.fifo
  - name: pg2
    listen: {ports['pg2']}
    upstream: 127.0.0.1:{pg.port}
    protocol: postgres
    fifo: {fifos['pg2']}
    seed: 5
    faults:
      - faults.add("never").onQuery(query="^NEVER").kill()
  - name: raw
    listen: {ports['raw']}
    upstream: 127.0.0.1:{pg.port}
    protocol: raw
    fifo: raw.fifo
  - name: down
    listen: {ports["down"]}
    upstream: 127.0.0.1:{pg.port}
    enabled: false
""")
    ready_file = tmp_path / "ready"
    process = subprocess.Popen(
        [WIREFAULT, "serve", "--config", str(config), "--ready-file", str(ready_file),
         "--api", "none"],  # no HTTP API: tests run in parallel (tests/test_http_api.py)
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        start_new_session=True)
    try:
        ready = read_line(process.stdout).strip()
        assert ready, process.stderr.read() if process.poll() is not None else "no ready line"
        yield Served(process, ready, ports, fifos, ready_file)
    finally:
        stop_process(process)


def query(pg, port: int, sql: str):
    with psycopg.connect(pg.dsn(port), autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def test_three_proxies_each_with_its_own_faults_recorder_and_status(pg, tmp_path):
    with serving(pg, tmp_path) as served:
        ports = served.ports
        assert served.ready == (f"ready pg1=127.0.0.1:{ports['pg1']} "
                                f"pg2=127.0.0.1:{ports['pg2']} raw=127.0.0.1:{ports['raw']}")
        assert served.ready_file.read_text() == served.ready + "\n"
        pg1, pg2, raw = (FaultProxy(str(served.fifos[name]), timeout=10)
                         for name in ("pg1", "pg2", "raw"))

        # Each relays.
        for name in ("pg1", "pg2", "raw"):
            assert query(pg, ports[name], f"SELECT '{name}'") == [(name,)]

        # The initial fault is pg2's alone.
        assert [f.name for f in pg2.faults()] == ["never"]
        assert pg1.faults() == [] and raw.faults() == []

        # A fault armed through pg1's FIFO affects pg1 only.
        pg1.add_fault("boom", 'onQuery(query="boom").kill()')
        with pytest.raises(psycopg.OperationalError):
            query(pg, ports["pg1"], "SELECT 'boom'")
        assert query(pg, ports["pg2"], "SELECT 'boom'") == [("boom",)]
        assert query(pg, ports["raw"], "SELECT 'boom'") == [("boom",)]
        status1, status2, status_raw = pg1.status(), pg2.status(), raw.status()
        assert (status1["fired"], status1["faults"]) == (1, 1)
        assert (status2["fired"], status2["faults"]) == (0, 1)
        assert (status_raw["fired"], status_raw["faults"]) == (0, 0)

        # Each recorder saw its own traffic only.
        text1 = " ".join(row.message for row in pg1.dump())
        text2 = " ".join(row.message for row in pg2.dump())
        assert "SELECT 'pg1'" in text1 and "SELECT 'pg2'" not in text1
        assert "SELECT 'pg2'" in text2 and "SELECT 'pg1'" not in text2
        assert raw.dump()  # raw frames: opaque bytes, recorded on raw's recorder

        # A disabled proxy does not listen.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", ports["down"]), 5).close()

        # SIGTERM: exit 0, the FIFOs it created and the ready file are gone.
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(20) == 0
        assert not any(path.exists() for path in served.fifos.values())
        assert not served.ready_file.exists()


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([WIREFAULT, "serve", "--api", "none", *args], capture_output=True,
                          text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_a_config_error_exits_2_with_file_line_and_column(tmp_path):
    config = tmp_path / "proxies.yaml"
    config.write_text("proxies:\n  - name: a\n    listen: 9\n    upstream: h:1\n"
                      "    colour: red\n")
    result = run_serve("--config", str(config))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"wirefault serve: {config}:5:5: proxies[0].colour: unknown key (expected name, "
        "listen, upstream, protocol, fifo, enabled, faults, seed)"]


def test_a_port_in_use_exits_2_naming_the_proxy(tmp_path):
    busy, free = free_port(), free_port()
    config = tmp_path / "proxies.yaml"
    config.write_text(f"proxies:\n"
                      f"  - {{name: fine, listen: {free}, upstream: '127.0.0.1:1', fifo: f.fifo}}\n"
                      f"  - {{name: taken, listen: {busy}, upstream: '127.0.0.1:1'}}\n")
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        result = run_serve("--config", str(config))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"wirefault serve: --config {config}: proxy taken: listen 127.0.0.1:{busy}: address "
        "already in use: another process is listening there"]
    assert not (tmp_path / "f.fifo").exists()


def test_an_unusable_fifo_exits_2_naming_the_proxy(tmp_path):
    (tmp_path / "plain").write_text("")
    config = tmp_path / "proxies.yaml"
    config.write_text(f"proxies:\n  - {{name: p, listen: {free_port()}, "
                      "upstream: '127.0.0.1:1', fifo: plain}\n")
    result = run_serve("--config", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"wirefault serve: --config {config}: proxy p: fifo {tmp_path / 'plain'}: exists and "
        "is a regular file, not a FIFO"]


# -- the registry at run time (in process: the HTTP API will drive these) --------------------


async def _echo_server(tag: bytes) -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(tag + data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def _exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    return reply


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def _registry_scenario(tmp_path: Path) -> None:
    from mitmproxy import ctx

    from wirefault.proxy import serve

    one, two = await _echo_server(b"1:"), await _echo_server(b"2:")
    port_one, port_two = (s.sockets[0].getsockname()[1] for s in (one, two))
    first, added = free_port(), free_port()
    config = tmp_path / "proxies.yaml"
    config.write_text(f"proxies:\n  - {{name: first, listen: {first}, protocol: raw, "
                      f"upstream: '127.0.0.1:{port_one}'}}\n")
    registry = ProxyRegistry()
    args = serve.build_parser().parse_args(["--config", str(config), "--api", "none"])
    server = asyncio.ensure_future(serve.serve(args, registry))
    while not registry.running:  # set by the addon's `running` hook, listeners up
        assert not server.done(), server.result()
        await asyncio.sleep(0.01)
    try:
        assert await _exchange(first, b"a") == b"1:a"

        proxy = await registry.add_proxy(ProxySpec(
            "added", ("127.0.0.1", added), ("127.0.0.1", port_one), "raw",
            fifo=str(tmp_path / "added.fifo"),
            faults=('conn.contains(b"drop-me").drop()',)))
        assert await _exchange(added, b"b") == b"1:b"
        assert (tmp_path / "added.fifo").exists()
        assert proxy.runtime is not registry.get("first").runtime
        assert registry.get("first").runtime.engine.rule_text != proxy.runtime.engine.rule_text

        with pytest.raises(ProxyError, match="exists already"):
            await registry.add_proxy(ProxySpec("added", ("127.0.0.1", 1), ("h", 1)))
        with pytest.raises(ProxyError, match="proxy first listens there already"):
            await registry.add_proxy(ProxySpec("other", ("127.0.0.1", first), ("h", 1)))

        reader, writer = await asyncio.open_connection("127.0.0.1", added)
        writer.write(b"live")
        assert await asyncio.wait_for(reader.read(65536), 10) == b"1:live"
        await registry.set_enabled("added", False)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # down: closed, not hung
        writer.close()
        assert await _refused(added)
        assert await _exchange(first, b"c") == b"1:c"  # the others keep listening
        await registry.set_enabled("added", True)
        assert await _exchange(added, b"d") == b"1:d"

        await registry.set_upstream("added", ("127.0.0.1", port_two))
        assert await _exchange(added, b"e") == b"2:e"
        assert await _exchange(first, b"f") == b"1:f"

        await registry.remove_proxy("added")
        assert await _refused(added)
        assert not (tmp_path / "added.fifo").exists()
        with pytest.raises(ProxyError, match="no proxy named 'added'"):
            await registry.set_enabled("added", True)

        # A listener that cannot start: the proxy is not added, nothing changes.
        with socket.socket() as holder:
            busy = free_port()
            holder.bind(("127.0.0.1", busy))
            holder.listen()
            with pytest.raises(ProxyError, match=f"proxy late: listen 127.0.0.1:{busy}: "
                                                 "address already in use"):
                await registry.add_proxy(ProxySpec("late", ("127.0.0.1", busy),
                                                   ("127.0.0.1", port_one), "raw"))
        assert list(registry.proxies) == ["first"]
        assert await _exchange(first, b"g") == b"1:g"
    finally:
        ctx.master.shutdown()
        assert await asyncio.wait_for(server, 20) == 0
        one.close()
        two.close()


def test_the_registry_adds_disables_repoints_and_removes_proxies_at_run_time(tmp_path):
    asyncio.run(_registry_scenario(tmp_path))
