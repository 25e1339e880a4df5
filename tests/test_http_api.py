"""`wirefault serve`'s native HTTP API through a real HTTP client (urllib), against a real
`wirefault serve` process relaying raw TCP to echo servers: every route, a fault added over
HTTP firing on real traffic, the events long-poll, metrics, errors, the token."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pgserver import free_port
from proxy_helpers import BIN, running_serve

WIREFAULT = str(BIN / "wirefault")


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(self.server.tag + data)  # type: ignore[attr-defined]


@contextlib.contextmanager
def echo_server(tag: bytes) -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    server.tag = tag  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def exchange(port: int, data: bytes) -> bytes:
    """Send `data`, the reply ('' when the proxy closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.settimeout(5)
        sock.sendall(data)
        try:
            return sock.recv(65536)
        except ConnectionResetError:
            return b""


@dataclass
class Api:
    base: str
    token: str | None = None

    def call(self, method: str, path: str, body=None, raw: bytes | None = None,
             token: str | None = None, timeout: float = 20) -> tuple[int, object]:
        data = raw if raw is not None else (json.dumps(body).encode()
                                            if body is not None else None)
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        token = token if token is not None else self.token
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, text = response.status, response.read().decode()
                kind = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
            kind = error.headers.get("Content-Type", "")
        if kind.startswith("application/json"):
            return status, json.loads(text)
        return status, text


@dataclass
class Served:
    process: subprocess.Popen
    ready: str
    api: Api
    ports: dict[str, int]


@contextlib.contextmanager
def serving(tmp_path: Path, *args: str, token: str | None = None) -> Iterator[Served]:
    with echo_server(b"1:") as one, echo_server(b"2:") as two:
        config = tmp_path / "proxies.yaml"
        config.write_text(f"proxies:\n  - {{name: echo, listen: 0, protocol: raw, "
                          f"upstream: '127.0.0.1:{one}'}}\n")
        with running_serve(config, *args) as serve:
            ports = {"one": one, "two": two, "echo": serve.port("echo")}
            yield Served(serve.process, serve.ready, Api(serve.api, token), ports)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    with serving(tmp_path_factory.mktemp("api")) as served:
        yield served


def test_the_ready_line_names_the_api(served):
    assert served.ready.startswith("ready echo=127.0.0.1:")
    assert served.ready.split()[-1].startswith("api=127.0.0.1:")
    assert exchange(served.ports["echo"], b"hi") == b"1:hi"


def test_proxies_are_created_listed_changed_and_deleted(served):
    api, ports = served.api, served.ports
    status, proxies = api.call("GET", "/api/proxies")
    assert status == 200 and [p["name"] for p in proxies] == ["echo"]
    assert proxies[0]["protocol"] == "raw" and proxies[0]["enabled"] is True

    # Port 0 beside another proxy on port 0: it gets a free port of its own, kept across
    # disable and enable.
    status, zero = api.call("POST", "/api/proxies", {
        "name": "zero", "listen": 0, "upstream": f"127.0.0.1:{ports['two']}",
        "protocol": "raw"})
    assert status == 201, zero
    zero_port = int(zero["listening"].rpartition(":")[2])
    assert zero_port not in (0, ports["echo"])
    assert exchange(zero_port, b"z") == b"2:z"
    assert exchange(ports["echo"], b"still") == b"1:still"
    assert api.call("PATCH", "/api/proxies/zero", {"enabled": False})[0] == 200
    status, zero = api.call("PATCH", "/api/proxies/zero", {"enabled": True})
    assert status == 200 and zero["listening"].endswith(f":{zero_port}")
    assert api.call("DELETE", "/api/proxies/zero")[0] == 204

    listen = free_port()
    status, created = api.call("POST", "/api/proxies", {
        "name": "added", "listen": f"127.0.0.1:{listen}", "upstream": f"127.0.0.1:{ports['one']}",
        "protocol": "raw", "seed": 3, "faults": ['faults.add("never").contains(b"zz").drop()']})
    assert status == 201, created
    port = int(created["listening"].rpartition(":")[2])
    assert port == listen and created["faults"] == 1 and created["seed"] == 3
    assert exchange(port, b"a") == b"1:a"
    status, got = api.call("GET", "/api/proxies/added")
    assert status == 200 and got["listening"] == created["listening"]

    status, changed = api.call("PATCH", "/api/proxies/added", {"enabled": False})
    assert status == 200 and changed["enabled"] is False and changed["listening"] is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), 5).close()
    status, changed = api.call("PATCH", "/api/proxies/added", {
        "enabled": True, "upstream": f"127.0.0.1:{ports['two']}"})
    assert status == 200 and changed["upstream"] == f"127.0.0.1:{ports['two']}"
    port = int(changed["listening"].rpartition(":")[2])
    assert exchange(port, b"b") == b"2:b"

    status, body = api.call("DELETE", "/api/proxies/added")
    assert (status, body) == (204, "")
    assert api.call("GET", "/api/proxies/added")[0] == 404
    assert [p["name"] for p in api.call("GET", "/api/proxies")[1]] == ["echo"]


def test_a_fault_added_over_http_fires_and_the_events_poll_returns_it(served):
    api, port = served.api, served.ports["echo"]
    last = api.call("GET", "/api/events")[1]["last"]
    status, faults = api.call("POST", "/api/proxies/echo/faults",
                              {"name": "boom", "chain": 'contains(b"boom").kill()'})
    assert status == 201 and [f["name"] for f in faults] == ["boom"]
    assert faults[0]["state"] == "active" and faults[0]["fired"] == 0

    # A long-poll waiting before the traffic returns once the fault fires.
    polled: list = []
    poll = threading.Thread(target=lambda: polled.append(
        api.call("GET", f"/api/events?after={last}&timeout=20&fault=boom")))
    started = time.monotonic()
    poll.start()
    time.sleep(0.3)
    assert exchange(port, b"harmless") == b"1:harmless"
    assert exchange(port, b"boom") == b""  # killed
    poll.join(20)
    assert time.monotonic() - started < 10
    status, reply = polled[0]
    assert status == 200
    [event] = reply["events"]
    assert event["proxy"] == "echo" and event["fault"] == "boom"
    assert event["action"] == "kill" and event["sequence"] == last + 1
    assert {"time", "conn", "client", "frame"} <= set(event)

    # After it: nothing, at once with timeout=0, and after the timeout otherwise.
    started = time.monotonic()
    assert api.call("GET", f"/api/events?after={event['sequence']}")[1]["events"] == []
    assert api.call("GET", f"/api/events?after={event['sequence']}&timeout=0.5")[1][
        "events"] == []
    assert 0.4 < time.monotonic() - started < 5
    assert api.call("GET", f"/api/events?after={last}")[1]["events"] == [event]

    faults = api.call("GET", "/api/proxies/echo/faults")[1]
    assert faults[0]["fired"] == 1 and faults[0]["matched"] >= 1

    status, text = api.call("GET", "/metrics")
    assert status == 200
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE")
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples['wirefault_fault_fired_total{proxy="echo",fault="boom"}'] == 1
    assert samples['wirefault_faults_fired_total{proxy="echo"}'] >= 1
    assert samples['wirefault_connections_total{proxy="echo"}'] >= 2
    assert samples['wirefault_connections_open{proxy="echo"}'] >= 0

    # Remove it; then traffic passes.
    assert api.call("DELETE", "/api/proxies/echo/faults/boom")[0] == 204
    assert exchange(port, b"boom") == b"1:boom"
    status, error = api.call("DELETE", "/api/proxies/echo/faults/boom")
    assert status == 404 and "no fault named 'boom'" in error["error"]


def test_commands_clear_and_command_errors(served):
    api, port = served.api, served.ports["echo"]
    status, faults = api.call("POST", "/api/proxies/echo/faults",
                              {"command": 'faults.add("a").contains(b"x").drop()'})
    assert status == 201 and [f["name"] for f in faults] == ["a"]
    api.call("POST", "/api/proxies/echo/faults", {"name": "b", "chain": 'contains(b"y").drop()'})
    assert [f["name"] for f in api.call("GET", "/api/proxies/echo/faults")[1]] == ["a", "b"]
    assert api.call("DELETE", "/api/proxies/echo/faults")[0] == 204
    assert api.call("GET", "/api/proxies/echo/faults")[1] == []

    # conn.* replaces everything, as over the FIFO.
    status, faults = api.call("POST", "/api/proxies/echo/faults",
                              {"command": 'conn.contains(b"q").drop()'})
    assert status == 201 and [f["name"] for f in faults] == ["conn"]
    api.call("POST", "/api/proxies/echo/faults", {"command": "conn.allow()"})
    assert api.call("GET", "/api/proxies/echo/faults")[1] == []
    assert exchange(port, b"q") == b"1:q"

    # A command error: the language's message, its column (in the chain as given).
    status, error = api.call("POST", "/api/proxies/echo/faults",
                             {"name": "c", "chain": "contains(b'x').explode()"})
    assert status == 400 and set(error) == {"error", "column"}
    assert error["column"] == len("contains(b'x').") + 1, error
    status, error = api.call("POST", "/api/proxies/echo/faults", {"command": "conn.nope()"})
    assert status == 400 and isinstance(error["column"], int)
    status, error = api.call("POST", "/api/proxies/echo/faults", {"command": "recorder.dump()"})
    assert status == 400
    status, error = api.call("POST", "/api/proxies/echo/faults",
                             {"command": 'faults.remove("ghost")'})
    assert status == 404 and "no fault named 'ghost'" in error["error"]


def test_the_recorder_dumps_rows_and_resets(served):
    api, port = served.api, served.ports["echo"]
    assert api.call("DELETE", "/api/proxies/echo/recorder")[0] == 204
    assert api.call("GET", "/api/proxies/echo/recorder") == (200, [])
    assert exchange(port, b"recorded") == b"1:recorded"
    status, rows = api.call("GET", "/api/proxies/echo/recorder")
    assert status == 200 and rows
    assert set(rows[0]) == {"conn", "source", "message"}
    assert any("recorded" in row["message"] for row in rows), rows
    assert exchange(port, b"again") == b"1:again"
    assert api.call("DELETE", "/api/proxies/echo/recorder")[0] == 204
    assert api.call("GET", "/api/proxies/echo/recorder") == (200, [])


def test_errors_are_json_with_400_and_404(served):
    api = served.api
    for method, path in [("GET", "/api/proxies/ghost"), ("PATCH", "/api/proxies/ghost"),
                         ("DELETE", "/api/proxies/ghost"), ("GET", "/api/proxies/ghost/faults"),
                         ("POST", "/api/proxies/ghost/faults"),
                         ("DELETE", "/api/proxies/ghost/faults"),
                         ("DELETE", "/api/proxies/ghost/faults/x"),
                         ("GET", "/api/proxies/ghost/recorder"),
                         ("DELETE", "/api/proxies/ghost/recorder"),
                         ("GET", "/api/events?proxy=ghost"), ("GET", "/api/nowhere")]:
        body = {} if method in ("POST", "PATCH") else None
        status, error = api.call(method, path, body)
        assert status == 404 and set(error) == {"error"}, (method, path, error)
    assert "no proxy named 'ghost'" in api.call("GET", "/api/proxies/ghost")[1]["error"]

    status, error = api.call("POST", "/api/proxies", raw=b"{not json")
    assert status == 400 and error["error"].startswith("bad JSON body")
    status, error = api.call("POST", "/api/proxies/echo/faults", raw=b"[1,")
    assert status == 400 and error["error"].startswith("bad JSON body")
    assert api.call("POST", "/api/proxies", [1])[0] == 400
    status, error = api.call("POST", "/api/proxies", {"name": "x", "listen": 0})
    assert status == 400 and "upstream" in error["error"]
    status, error = api.call("POST", "/api/proxies", {"name": "x", "listen": 0,
                                                      "upstream": "h:1", "colour": "red"})
    assert status == 400 and "colour" in error["error"]
    status, error = api.call("POST", "/api/proxies", {"name": "echo", "listen": 0,
                                                      "upstream": "h:1"})
    assert status == 409 and "exists already" in error["error"]
    status, error = api.call("POST", "/api/proxies", {
        "name": "bad", "listen": 0, "upstream": "h:1", "protocol": "raw",
        "faults": ["conn.explode()"]})
    assert status == 400 and error["error"].startswith("faults[0]:") and "column" in error
    assert api.call("PATCH", "/api/proxies/echo", {"enabled": "yes"})[0] == 400
    assert api.call("PATCH", "/api/proxies/echo", {"listen": 1})[0] == 400
    assert api.call("GET", "/api/events?after=x")[0] == 400
    assert [p["name"] for p in api.call("GET", "/api/proxies")[1]] == ["echo"]


def test_a_token_is_required_on_every_route(tmp_path):
    (tmp_path / "token").write_text("s3cret-token\n")
    with serving(tmp_path, "--api-token-file", str(tmp_path / "token")) as served:
        api = served.api
        for path in ("/api/proxies", "/metrics", "/api/events", "/api/nowhere"):
            status, error = api.call("GET", path)
            assert status == 401 and "token" in error["error"], path
        assert api.call("GET", "/api/proxies", token="wrong")[0] == 401
        assert api.call("GET", "/api/proxies", token="s3cret-token")[0] == 200
        assert api.call("GET", "/metrics", token="s3cret-token")[0] == 200
        assert api.call("GET", "/api/nowhere", token="s3cret-token")[0] == 404


def run_serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    config = tmp_path / "proxies.yaml"
    config.write_text(f"proxies:\n  - {{name: p, listen: {free_port()}, protocol: raw, "
                      "upstream: '127.0.0.1:9'}\n")
    return subprocess.run([WIREFAULT, "serve", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_a_non_loopback_api_without_a_token_exits_2(tmp_path):
    result = run_serve(tmp_path, "--api", "0.0.0.0:0")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "wirefault serve: --api 0.0.0.0:0: an address other than loopback needs "
        "--api-token-file (a bearer token every request must carry)"]
    (tmp_path / "empty").write_text("\n")
    result = run_serve(tmp_path, "--api", "0.0.0.0:0", "--api-token-file",
                       str(tmp_path / "empty"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"wirefault serve: --api-token-file {tmp_path / 'empty'}: expected one token "
        "(no spaces), got an empty file"]


def test_an_api_port_in_use_exits_2_with_one_line(tmp_path):
    busy = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        result = run_serve(tmp_path, "--api", f"127.0.0.1:{busy}")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"wirefault serve: --api 127.0.0.1:{busy}: address already in use: another process "
        "is listening there"]


def test_api_none_means_no_api(tmp_path):
    config = tmp_path / "proxies.yaml"
    config.write_text("proxies: []\n")
    with running_serve(config, "--api", "none") as serve:  # the last --api wins
        assert serve.ready == "ready"


def test_metrics_count_bytes_and_frames_each_way(served):
    """A proxy of its own, so other tests' traffic does not count: what was sent and echoed
    shows up exactly, for finished connections and for a live one."""
    api, ports = served.api, served.ports
    status, created = api.call("POST", "/api/proxies", {
        "name": "counted", "listen": 0, "upstream": f"127.0.0.1:{ports['one']}",
        "protocol": "raw"})
    assert status == 201, created
    port = int(created["listening"].rpartition(":")[2])
    try:
        assert exchange(port, b"hello") == b"1:hello"  # 5 bytes up, 7 down
        with socket.create_connection(("127.0.0.1", port), 5) as live:
            live.settimeout(5)
            live.sendall(b"abc")
            assert live.recv(100) == b"1:abc"  # the proxy read both by now
            samples = _metrics(api)
            way = 'proxy="counted",direction="from_{}"'
            assert samples[f"wirefault_bytes_total{{{way.format('client')}}}"] == 8
            assert samples[f"wirefault_bytes_total{{{way.format('server')}}}"] == 12
            # raw frames are reads: at least one per read, never more than bytes.
            assert 2 <= samples[f"wirefault_frames_total{{{way.format('client')}}}"] <= 8
            assert 2 <= samples[f"wirefault_frames_total{{{way.format('server')}}}"] <= 12
            assert samples['wirefault_connections_open{proxy="counted"}'] >= 1
            assert samples['wirefault_connections_total{proxy="counted"}'] == 2
    finally:
        assert api.call("DELETE", "/api/proxies/counted")[0] == 204


def _metrics(api: Api) -> dict[str, float]:
    status, text = api.call("GET", "/metrics")
    assert status == 200
    samples = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_serve_without_a_config_starts_empty_and_takes_the_proxy_options(tmp_path):
    """No --config: no proxy until the API adds one; the shared proxy options
    (`--idle-timeout` here) apply to proxies the API adds."""
    with running_serve(None, "--idle-timeout", "0.3") as serve:
        assert serve.ready.startswith("ready api=127.0.0.1:"), serve.ready
        api = Api(serve.api)
        assert api.call("GET", "/api/proxies") == (200, [])
        with echo_server(b"e:") as upstream:
            status, created = api.call("POST", "/api/proxies", {
                "name": "idle", "listen": 0, "upstream": f"127.0.0.1:{upstream}",
                "protocol": "raw"})
            assert status == 201, created
            port = int(created["listening"].rpartition(":")[2])
            with socket.create_connection(("127.0.0.1", port), 5) as sock:
                sock.settimeout(20)
                sock.sendall(b"x")
                assert sock.recv(10) == b"e:x"
                started = time.monotonic()
                assert sock.recv(10) == b""  # closed by the proxy, idle
                assert time.monotonic() - started >= 0.25


def test_a_bad_proxy_option_exits_2_with_one_line():
    result = subprocess.run([WIREFAULT, "serve", "--api", "none", "--kill-grace", "soon"],
                            capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "--kill-grace" in result.stderr
