"""The client over HTTP: `FaultProxy("http://HOST:PORT/proxies/NAME")` and the CLI's
`--api URL --proxy NAME`, against a real `wirefault serve` process whose raw proxy, in front
of an echo server, also has a FIFO: every method gives over HTTP what it gives over the FIFO,
a fault added over HTTP fires on real traffic, a dead URL and a token."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pgserver import free_port
from proxy_helpers import running_serve
from test_http_api import WIREFAULT, Api, echo_server, exchange

from wirefault.fifo_client import (
    CommandError,
    FaultProxy,
    ProxyUnavailable,
    WirefaultError,
    conn,
    transport,
)
from wirefault.fifo_client.http_transport import TOKEN_ENV, parse_proxy_url, proxy_url


@dataclass
class Served:
    process: subprocess.Popen
    api: str          # http://HOST:PORT
    fifo: Path
    port: int         # the echo proxy's listener
    token: str | None

    @property
    def url(self) -> str:
        return f"{self.api}/proxies/echo"

    def http(self, **kwargs) -> FaultProxy:
        return FaultProxy(self.url, timeout=kwargs.pop("timeout", 10),
                          token=kwargs.pop("token", self.token))

    def by_fifo(self) -> FaultProxy:
        return FaultProxy(str(self.fifo), timeout=10)


@contextlib.contextmanager
def serving(tmp_path: Path, token: str | None = None) -> Iterator[Served]:
    with echo_server(b"1:") as upstream:
        fifo = tmp_path / "echo.fifo"
        config = tmp_path / "proxies.yaml"
        config.write_text(f"proxies:\n  - {{name: echo, listen: 0, protocol: raw, "
                          f"upstream: '127.0.0.1:{upstream}', fifo: {fifo}}}\n")
        args = []
        if token is not None:
            (tmp_path / "token").write_text(token + "\n")
            args = ["--api-token-file", str(tmp_path / "token")]
        with running_serve(config, *args) as serve:
            yield Served(serve.process, serve.api, fifo, serve.port("echo"), token)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    with serving(tmp_path_factory.mktemp("http-client")) as served:
        yield served


@pytest.fixture(autouse=True)
def clean(served, monkeypatch) -> Iterator[None]:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv("WIREFAULT_FIFO", raising=False)
    served.by_fifo().allow()
    served.by_fifo().reset_traffic()
    yield


def both(served: Served) -> tuple[FaultProxy, FaultProxy]:
    return served.http(), served.by_fifo()


# -- the route ---------------------------------------------------------------------------


def raw_fifo_reply(fifo: Path, command: str) -> str:
    """The FIFO's reply bytes, decoded as the client decodes them (final newline kept)."""
    deadline = transport.Deadline(10)
    with transport.exclusive_lock(str(fifo), deadline):
        data = transport.exchange(str(fifo), (command + "\n").encode(), deadline)
    return data.decode("utf-8", "replace")


def test_the_route_answers_the_fifos_exact_reply_text(served):
    api = Api(served.api)
    commands = ["conn.onQury().kill()", "", "   ", "faults.list()", "nonsense(", "conn.allow()",
                'faults.remove("ghost")', 'faults.add("é").contains(b"x").drop()',
                'faults.add("a", seed=2).contains(b"\\xff").probability(0.5).drop()',
                "faults.list()", "proxy.ping()", "recorder.dump()", "faults.clear()",
                "faults.list()", "x" * (1024 * 1024)]
    for command in commands:
        status, body = api.call("POST", "/api/proxies/echo/commands", {"command": command})
        assert status == 200, (command[:40], body)
        assert body["reply"] == raw_fifo_reply(served.fifo, command), command[:40]
    assert exchange(served.port, b"\x00\xffrow") == b"1:\x00\xffrow"
    time.sleep(0.2)
    reply = Api(served.api).call("POST", "/api/proxies/echo/commands",
                                 {"command": "recorder.dump()"})[1]["reply"]
    assert reply.count("\n") == 2 and reply.endswith("\n")
    assert api.call("POST", "/api/proxies/echo/commands",
                    {"command": "conn.nope()"})[1]["reply"].startswith("column 6: ")


def test_the_route_refuses_a_bad_body_and_an_unknown_proxy(served):
    api = Api(served.api)
    assert api.call("POST", "/api/proxies/echo/commands", raw=b"{")[0] == 400
    status, error = api.call("POST", "/api/proxies/echo/commands", {"command": 7})
    assert status == 400 and "command: expected a string" in error["error"]
    status, error = api.call("POST", "/api/proxies/echo/commands", {"cmd": "x"})
    assert status == 400 and "unknown key 'cmd'" in error["error"]
    status, error = api.call("POST", "/api/proxies/ghost/commands", {"command": "proxy.ping()"})
    assert status == 404 and error["error"].startswith("no proxy named 'ghost'")


# -- FaultProxy over HTTP == FaultProxy over the FIFO ------------------------------------


def test_urls_in_both_shapes_and_the_helpers():
    assert parse_proxy_url("http://127.0.0.1:8474/proxies/pg") == ("http://127.0.0.1:8474", "pg")
    assert parse_proxy_url("https://h/prefix/api/proxies/a.b-c/") == ("https://h/prefix", "a.b-c")
    assert proxy_url("http://h:1/api/", "pg") == "http://h:1/proxies/pg"
    for bad in ("http://h:1", "http://h:1/proxies/", "http://h:1/proxies/a/b"):
        with pytest.raises(ValueError):
            parse_proxy_url(bad)
    with pytest.raises(ValueError):
        FaultProxy("http://h:1/nothing")
    with pytest.raises(ValueError):
        FaultProxy("/tmp/x.fifo", token="t")
    proxy = FaultProxy("http://h:1/proxies/pg", token="secret")
    assert proxy.url == "http://h:1/proxies/pg" and "secret" not in repr(proxy)
    assert FaultProxy("/tmp/x.fifo").url is None


def test_the_api_url_shape_works_too(served):
    proxy = FaultProxy(f"{served.api}/api/proxies/echo", timeout=5)
    proxy.wait_ready()
    assert proxy.send("conn.allow()") == ""


def test_send_accepted_and_rejected_alike(served):
    http, fifo = both(served)
    assert http.send(conn.contains(b"never").drop()) == fifo.send(conn.allow()) == ""
    errors = []
    for client in (http, fifo):
        with pytest.raises(CommandError) as info:
            client.send("conn.onQury().kill()")
        errors.append((type(info.value), info.value.message, info.value.command))
    assert errors[0] == errors[1]
    assert errors[0][1].startswith("column 6: ")
    assert http.send("recorder.dump()") == fifo.send("recorder.dump()") == ""
    assert http.send("faults.list()") == fifo.send("faults.list()") == ""


def test_faults_status_dump_and_removal_alike(served):
    http, fifo = both(served)
    http.add_fault("slow", 'contains(b"zz").delay(1)')
    fifo.add_fault("spare", conn.contains(b"qq").drop(), seed=3)
    assert http.faults() == fifo.faults()
    assert [f.name for f in http.faults()] == ["slow", "spare"]
    over_http, over_fifo = http.status(), fifo.status()
    assert list(over_http) == list(over_fifo)
    assert {k: v for k, v in over_http.items() if k != "tasks"} == \
        {k: v for k, v in over_fifo.items() if k != "tasks"}
    assert over_http["faults"] == 2

    errors = []
    for client in (http, fifo):
        with pytest.raises(CommandError) as info:
            client.remove_fault("ghost")
        errors.append(info.value.message)
    assert errors[0] == errors[1] and "no fault named 'ghost'" in errors[0]
    http.remove_fault("slow")
    assert [f.name for f in fifo.faults()] == ["spare"]
    http.clear_faults()
    assert fifo.faults() == http.faults() == []

    dumps = []
    for client in (http, fifo):
        client.reset_traffic()
        assert exchange(served.port, b"hi\tthere\n") == b"1:hi\tthere\n"
        time.sleep(0.2)
        dumps.append(client.dump())
    assert dumps[0] == dumps[1] and dumps[0], dumps
    assert {row.conn for row in dumps[0]} == {0}


def test_the_fault_context_manager_and_wait_ready_alike(served):
    http, fifo = both(served)
    http.wait_ready()
    fifo.wait_ready()
    with http.fault(conn.contains(b"x").drop()):
        assert len(fifo.faults()) == 1
    assert fifo.faults() == []
    fifo.add_fault("other", 'contains(b"o").drop()')
    with http.fault('contains(b"y").drop()', name="mine"):
        assert [f.name for f in fifo.faults()] == ["other", "mine"]
    assert [f.name for f in http.faults()] == ["other"]


def test_a_fault_added_over_http_fires_on_real_traffic(served):
    http = served.http()
    assert exchange(served.port, b"boom") == b"1:boom"
    http.add_fault("boom", 'contains(b"boom").kill()')
    assert exchange(served.port, b"boom") == b""
    assert exchange(served.port, b"calm") == b"1:calm"
    (fault,) = http.faults()
    assert (fault.name, fault.fired) == ("boom", 1)
    assert http.status()["fired"] >= 1
    http.remove_fault("boom")
    assert exchange(served.port, b"boom") == b"1:boom"


def test_wait_ready_waits_for_a_proxy_the_api_creates(served, tmp_path):
    later = FaultProxy(f"{served.api}/proxies/later", timeout=10)
    api = Api(served.api)

    created = []

    def create() -> None:
        time.sleep(0.5)
        created.append(api.call("POST", "/api/proxies", {
            "name": "later", "listen": free_port(), "protocol": "raw", "upstream": "127.0.0.1:9"}))

    thread = threading.Thread(target=create)
    started = time.monotonic()
    thread.start()
    try:
        later.wait_ready()
        waited = time.monotonic() - started
        thread.join(20)  # the creating call may return just after the proxy answers
        assert created[0][0] == 201, created
        assert 0.4 < waited < 8
        assert later.faults() == []
    finally:
        thread.join()
        api.call("DELETE", "/api/proxies/later")


def test_a_dead_url_is_proxy_unavailable_within_the_timeout(served):
    with contextlib.closing(__import__("socket").socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/proxies/echo"  # bound, not listening
    for call in (lambda p: p.send("conn.allow()"), lambda p: p.faults(), lambda p: p.wait_ready()):
        proxy = FaultProxy(dead, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(ProxyUnavailable) as info:
            call(proxy)
        assert time.monotonic() - started < 2
        assert str(info.value) == f"no proxy answered at {dead} within 0.5 s (connection refused)"
        assert info.value.fifo_path == dead
    with pytest.raises(ProxyUnavailable, match="no proxy named 'ghost'; proxies: echo"):
        FaultProxy(f"{served.api}/proxies/ghost", timeout=0.3).status()


def test_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with serving(tmp_path, token="s3cret") as served:
        assert served.http().send("conn.allow()") == ""
        with pytest.raises(WirefaultError, match=r"refused the request \(HTTP 401\)") as info:
            served.http(token="wrong").faults()
        assert not isinstance(info.value, (ProxyUnavailable, CommandError))
        with pytest.raises(WirefaultError, match="HTTP 401"):
            FaultProxy(served.url, timeout=5).faults()
        monkeypatch.setenv(TOKEN_ENV, "s3cret")
        assert FaultProxy(served.url, timeout=5).faults() == []
        result = cli(served, "faults", "list", "--json", "--api", served.api, "--proxy", "echo")
        assert (result.returncode, result.stdout) == (0, "[]\n")
        monkeypatch.delenv(TOKEN_ENV)
        result = cli(served, "status", "--api", served.url)
        assert result.returncode == 2 and "HTTP 401" in result.stderr


# -- the CLI -----------------------------------------------------------------------------


def cli(served: Served, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WIREFAULT_FIFO"}
    return subprocess.run([WIREFAULT, *argv], capture_output=True, text=True, input=stdin,
                          env=env, timeout=30)


@pytest.mark.parametrize("how", ["api+proxy", "url"])
def test_the_cli_drives_the_proxy_over_http(served, how):
    target = (["--api", served.api, "--proxy", "echo"] if how == "api+proxy"
              else ["--api", served.url])
    fifo = ["--fifo", str(served.fifo)]

    def over_api(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return cli(served, *argv, *target, "--timeout", "5", stdin=stdin)

    assert over_api("wait-ready").returncode == 0
    assert (over_api("send", 'conn.contains(b"never").drop()').returncode,) == (0,)
    result = over_api("send", "conn.onQury().kill()")
    by_fifo = cli(served, "send", *fifo, "conn.onQury().kill()")
    assert (result.returncode, result.stdout, result.stderr) == \
        (by_fifo.returncode, by_fifo.stdout, by_fifo.stderr)
    assert result.returncode == 1 and result.stderr.startswith("wirefault send: column 6: ")
    assert over_api("send", "-", stdin="conn.allow()\n").returncode == 0
    assert over_api("faults", "add", "slow", 'contains(b"zz").delay(1)').returncode == 0
    assert over_api("faults", "add", "flaky", "-", "--seed", "7",
                     stdin='contains(b"qq").probability(0.5).drop()').returncode == 0
    listed = json.loads(over_api("faults", "list", "--json").stdout)
    assert [f["name"] for f in listed] == ["slow", "flaky"]
    assert listed == json.loads(cli(served, "faults", "list", "--json", *fifo).stdout)
    table = over_api("faults", "list").stdout
    assert table == cli(served, "faults", "list", *fifo).stdout and "slow" in table
    status = json.loads(over_api("status", "--json").stdout)
    assert status["status"]["faults"] == 2 and len(status["faults"]) == 2
    assert over_api("status").stdout.startswith("connections=")
    result = over_api("faults", "remove", "ghost")
    by_fifo = cli(served, "faults", "remove", *fifo, "ghost")
    assert (result.returncode, result.stderr) == (1, by_fifo.stderr)
    assert over_api("faults", "remove", "slow").returncode == 0
    assert over_api("faults", "clear").returncode == 0
    assert over_api("faults", "list").stdout == ""

    assert over_api("reset").returncode == 0
    assert exchange(served.port, b"ping") == b"1:ping"
    time.sleep(0.2)
    rows = json.loads(over_api("dump", "--format", "json").stdout)
    assert [(r["conn"], r["source"]) for r in rows][:1] == [(0, "coordinator")]
    assert over_api("dump", "--format", "copy").stdout == ""  # a dump empties the recorder
    assert over_api("allow").returncode == 0


def test_the_cli_with_a_dead_api_exits_2_quickly(served):
    started = time.monotonic()
    result = cli(served, "status", "--api", "http://127.0.0.1:1", "--proxy", "pg",
                 "--timeout", "0.5")
    assert time.monotonic() - started < 10
    assert result.returncode == 2
    assert result.stderr == ("wirefault status: no proxy answered at "
                             "http://127.0.0.1:1/proxies/pg within 0.5 s (connection refused)\n")


@pytest.mark.parametrize("argv, problem", [
    (["--api", "http://h:1"], "--api http://h:1: which proxy? give --proxy NAME or a URL "
                              "ending in /proxies/NAME"),
    (["--proxy", "pg"], "--proxy NAME needs --api URL"),
    (["--api", "http://h:1/proxies/a", "--proxy", "b"],
     "--api http://h:1/proxies/a names proxy 'a', --proxy 'b'"),
    (["--api", "http://h:1/proxies/a", "--fifo", "/tmp/x"],
     "give --fifo PATH or --api URL, not both"),
])
def test_the_cli_refuses_incomplete_targets_with_exit_2(served, argv, problem):
    result = cli(served, "faults", "clear", *argv)
    assert (result.returncode, result.stderr) == (2, f"wirefault faults clear: {problem}\n")


def test_api_wins_over_the_fifo_in_the_environment(served):
    env = dict(os.environ, WIREFAULT_FIFO="/nonexistent/x.fifo")
    result = subprocess.run([WIREFAULT, "allow", "--api", served.url, "--timeout", "5"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert (result.returncode, result.stderr) == (0, "")
