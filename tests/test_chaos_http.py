"""`wirefault chaos` naming its proxies by API URL: one scenario against two `wirefault serve`
processes at once, on two loopback addresses (127.0.0.2 and 127.0.0.3), each with a
must-fire kill that traffic through that host's proxy makes fire."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_helpers import running_serve
from test_chaos_must_fire import chaos_cli
from test_chaos_runner import write
from test_http_api import echo_server

from wirefault.fifo_client import FaultProxy, chaos


@contextlib.contextmanager
def serve_on(tmp_path: Path, host: str, upstream: int) -> Iterator[tuple[str, int]]:
    """`wirefault serve` with its API and one raw proxy `echo` on `host`: (API URL of the
    proxy, its port)."""
    config = tmp_path / f"{host}.yaml"
    config.write_text(f"proxies:\n  - {{name: echo, listen: '{host}:0', protocol: raw, "
                      f"upstream: '127.0.0.1:{upstream}'}}\n")
    with running_serve(config, "--api", f"{host}:0") as serve:
        words = serve.words
        assert words["api"].startswith(f"{host}:") and words["echo"].startswith(f"{host}:")
        yield f"{serve.api}/proxies/echo", serve.port("echo")


def ping(host: str, port: int) -> None:
    with contextlib.suppress(OSError), socket.create_connection((host, port), 1) as sock:
        sock.settimeout(1)
        sock.sendall(b"ping")
        sock.recv(16)


@pytest.mark.timeout(60)
def test_one_scenario_drives_two_serve_processes_by_api_url(tmp_path: Path) -> None:
    with echo_server(b"") as upstream, \
            serve_on(tmp_path, "127.0.0.2", upstream) as (url_a, port_a), \
            serve_on(tmp_path, "127.0.0.3", upstream) as (url_b, port_b):
        path = write(tmp_path, f"""\
seed: 1
duration: 2
proxies:
  a: {{api: '{url_a}', protocol: raw}}
  b: {{api: '{url_b}'}}
faults:
  - {{name: cut-a, proxy: a, command: conn.onData().kill(), start_after: 0.2, armed: 0.5,
     must_fire: 20}}
  - {{name: cut-b, proxy: b, command: conn.onData().kill(), start_after: 0.4, armed: 0.5,
     must_fire: 20}}
""")
        stop = threading.Event()

        def traffic() -> None:  # both hosts, all along the run
            while not stop.wait(0.05):
                ping("127.0.0.2", port_a)
                ping("127.0.0.3", port_b)

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        try:
            with chaos_cli(path, "--json") as process:
                assert process.stdout is not None and process.stderr is not None
                events = [json.loads(line) for line in process.stdout]
                status, err = process.wait(), process.stderr.read()
        finally:
            stop.set()
            sender.join()
        assert (status, err) == (chaos.EXIT_PASS, ""), events
        fired = {event["fault"]: event["frames"] for event in events
                 if event["event"] == "fired"}
        assert set(fired) == {"cut-a", "cut-b"} and min(fired.values()) >= 1, events
        summary = events[-1]
        assert (summary["fired"], summary["errors"]) == ({"a": 1, "b": 1}, [])
        # each host saw its own fault only, and was set back to allow() at the end
        for url, fault in ((url_a, "cut-a:1"), (url_b, "cut-b:1")):
            rows = [row.message for row in FaultProxy(url).dump()]
            assert f"Data(data=ping) [fault {fault}: kill]" in rows, rows
            assert not any(("cut-b" if fault == "cut-a:1" else "cut-a") in r for r in rows)
            assert FaultProxy(url).faults() == []
