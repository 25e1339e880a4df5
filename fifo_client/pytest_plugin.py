"""The pytest plugin (the `pytest11` entry point `wirefault`): fixtures for a user's suite.

    def test_commit_fails(wirefault_proxy):
        proxy = wirefault_proxy(upstream="127.0.0.1:5432", protocol="postgres")
        with proxy.fault('onQuery(query="^COMMIT").kill()') as name:
            ...  # connect with proxy.dsn_for(DSN); the COMMIT's connection is killed
            proxy.wait_fired(name, timeout=10)

- `wirefault` (session scope): one `wirefault serve` process with an empty config and its
  HTTP API on a port the kernel picks (`--api 127.0.0.1:0`), in a temporary directory of its
  own; its address is read from `--ready-file`. At the end of the session it is stopped
  with SIGTERM (SIGKILL after 10 s) and the directory is removed.
- `wirefault_proxy` (function scope): a factory; each call creates a proxy on a free port
  through the API and returns a `WirefaultProxy`. Every proxy a test created is deleted when
  the test ends, its faults with it, so no fault outlives its test.

Under pytest-xdist each worker has its own session, so its own server, directory and ports:
nothing is shared between workers. Only fixtures: no hook acts on a test that uses none.

The API is driven with urllib (no third-party client). Importing this module needs neither
pytest nor mitmproxy: without pytest it defines the classes and no fixture.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from .errors import CommandError, WirefaultError

try:
    import pytest
except ImportError:  # installed without pytest: nothing to register
    pytest = None  # type: ignore[assignment]

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 30.0
_POLL_SLICE = 60.0  # one long-poll request waits at most this long (the server's cap: 300)
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# A proxy that directs every request through $http_proxy would never reach 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class WirefaultApiError(WirefaultError):
    """The server answered a request with an error (`status`, its one-line `message`)."""

    def __init__(self, method: str, path: str, status: int, message: str) -> None:
        super().__init__(f"wirefault API {method} {path}: {status}: {message}")
        self.status, self.message = status, message


class WirefaultServer:
    """A running `wirefault serve` (the `wirefault` fixture): its API and process."""

    def __init__(self, process: subprocess.Popen, directory: str, api_host: str,
                 api_port: int, ready: str) -> None:
        self.process, self.directory = process, directory
        self.api_host, self.api_port, self.ready = api_host, api_port, ready
        self.api_url = f"http://{api_host}:{api_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def request(self, method: str, path: str, body: Any = None,
                timeout: float = HTTP_TIMEOUT) -> tuple[int, Any]:
        """One API call: (status, the reply's JSON or None when it has no body)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        req = urllib.request.Request(self.api_url + path, data=data, method=method,
                                     headers=headers)
        try:
            with _OPENER.open(req, timeout=timeout) as reply:
                status, raw = reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except OSError as exc:
            state = ("it exited with status " + str(self.process.returncode)
                     if self.process.poll() is not None else "it is running")
            raise WirefaultError(f"wirefault API {method} {path}: no answer from "
                                 f"{self.api_url} ({state}): {exc}") from exc
        try:
            payload = json.loads(raw) if raw.strip() else None
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        return status, payload

    def call(self, method: str, path: str, body: Any = None,
             timeout: float = HTTP_TIMEOUT) -> Any:
        """`request`, raising `WirefaultApiError` for any status of 400 or more."""
        status, payload = self.request(method, path, body, timeout)
        if status >= 400:
            message = payload.get("error", "") if isinstance(payload, dict) else str(payload)
            raise WirefaultApiError(method, path, status, message)
        return payload

    def proxies(self) -> list[dict[str, Any]]:
        return self.call("GET", "/api/proxies")

    def last_event(self) -> int:
        """The sequence number of the newest event (0 before any)."""
        return self.call("GET", "/api/events")["last"]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; then remove the directory."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


class WirefaultProxy:
    """One proxy of a `WirefaultServer` (what `wirefault_proxy(...)` returns)."""

    def __init__(self, server: WirefaultServer, name: str, host: str, port: int,
                 upstream: str, protocol: str) -> None:
        self.server, self.name, self.host, self.port = server, name, host, port
        self.upstream, self.protocol = upstream, protocol
        self._marks: dict[str, int] = {}  # fault name -> events before it counted
        self._fault_count = 0

    def __repr__(self) -> str:
        return (f"WirefaultProxy(name={self.name!r}, listen={self.host}:{self.port}, "
                f"upstream={self.upstream!r}, protocol={self.protocol!r})")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _path(self, tail: str = "") -> str:
        return f"/api/proxies/{urllib.parse.quote(self.name, safe='')}{tail}"

    def dsn_for(self, dsn: str) -> str:
        """The same libpq connection string (URI or key=value), pointed at this proxy."""
        if re.match(r"postgres(?:ql)?://", dsn):
            parts = urllib.parse.urlsplit(dsn)
            userinfo, _, _ = parts.netloc.rpartition("@")
            netloc = (userinfo + "@" if userinfo else "") + f"{self.host}:{self.port}"
            query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query,
                                                               keep_blank_values=True)
                     if k not in ("host", "port", "hostaddr")]
            return urllib.parse.urlunsplit(parts._replace(
                netloc=netloc, query=urllib.parse.urlencode(query)))
        from psycopg.conninfo import conninfo_to_dict

        params = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if k != "hostaddr"}
        params["host"], params["port"] = self.host, str(self.port)  # in place when given
        return " ".join(f"{key}={_conninfo_value(value)}" for key, value in params.items())

    def add(self, name: str, chain: Any, seed: int | None = None) -> dict[str, Any]:
        """Add the fault `name` (a chain: text such as 'onQuery().kill()', or a builder);
        one of that name is replaced. Returns its row (as in `faults()`)."""
        text = _chain_text(chain)
        mark = self.server.last_event()
        body: dict[str, Any] = {"name": name, "chain": text}
        if seed is not None:
            body["seed"] = seed
        status, payload = self.server.request("POST", self._path("/faults"), body)
        if status >= 400:
            error = payload if isinstance(payload, dict) else {"error": str(payload)}
            if "column" in error:
                raise CommandError(f"column {error['column']}: {error['error']}", text)
            raise WirefaultApiError("POST", self._path("/faults"), status,
                                    error.get("error", ""))
        self._marks[name] = mark
        return next(row for row in payload if row["name"] == name)

    def remove(self, name: str) -> None:
        """Remove the fault `name`; `WirefaultApiError` (404) when there is none."""
        self.server.call("DELETE", self._path(f"/faults/{urllib.parse.quote(name, safe='')}"))

    def clear(self) -> None:
        """Remove every fault of this proxy."""
        self.server.call("DELETE", self._path("/faults"))

    def faults(self) -> list[dict[str, Any]]:
        """[{name, command, matched, fired, added, state}], in added order."""
        return self.server.call("GET", self._path("/faults"))

    def dump(self) -> list[dict[str, Any]]:
        """The recorded frames since the last dump: [{conn, source, message}]."""
        return self.server.call("GET", self._path("/recorder"))

    def reset(self) -> None:
        """Empty the recorder."""
        self.server.call("DELETE", self._path("/recorder"))

    @contextlib.contextmanager
    def fault(self, chain: Any, name: str | None = None,
              seed: int | None = None) -> Iterator[str]:
        """Add `chain` as a named fault (`name`, or fault-1, fault-2, ...) for the block,
        which gets the name; remove it on exit, even when the block raises."""
        if name is None:
            self._fault_count += 1
            name = f"fault-{self._fault_count}"
        self.add(name, chain, seed)
        try:
            yield name
        finally:
            with contextlib.suppress(WirefaultApiError):  # already removed or cleared
                self.remove(name)

    def wait_fired(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until the fault `name` fires and return that event ({sequence, proxy, time,
        fault, conn, client, frame, action}). Firings count from when this object added
        the fault; each call returns the next one not yet returned. TimeoutError after
        `timeout` seconds."""
        after = self._marks.get(name, 0)
        deadline = time.monotonic() + timeout
        query = {"proxy": self.name, "fault": name}
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            wait = min(remaining, _POLL_SLICE)
            path = "/api/events?" + urllib.parse.urlencode(
                {**query, "after": after, "timeout": f"{wait:.3f}"})
            events = self.server.call("GET", path, timeout=wait + HTTP_TIMEOUT)["events"]
            if events:
                self._marks[name] = events[0]["sequence"]
                return events[0]
            if time.monotonic() >= deadline:
                break
        in_force = ", ".join(f"{f['name']} (matched {f['matched']}, fired {f['fired']})"
                             for f in self.faults()) or "none"
        raise TimeoutError(f"wirefault: fault {name!r} of proxy {self.name} did not fire "
                           f"within {timeout:g} s; faults in force: {in_force}")

    def delete(self) -> None:
        """Delete this proxy (the fixture does it at the end of the test)."""
        status, payload = self.server.request("DELETE", self._path())
        if status >= 400 and status != 404:
            message = payload.get("error", "") if isinstance(payload, dict) else str(payload)
            raise WirefaultApiError("DELETE", self._path(), status, message)


def _conninfo_value(value: str) -> str:
    """A key=value connection string's value, quoted as libpq reads it back."""
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _chain_text(chain: Any) -> str:
    """A chain as text: a builder `Command` gives its `.chain` (the steps after conn. or
    faults.add(...)), anything else its str()."""
    text = getattr(chain, "chain", None)
    return text if isinstance(text, str) else str(chain)


def _ephemeral_low() -> int:
    with contextlib.suppress(OSError, ValueError), \
            open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        return int(f.read().split()[0])
    return 32768


def _candidate_port(host: str) -> int:
    """A port free now, below the kernel's ephemeral range (an outgoing connection can hold
    a port of that range for a minute after a listener closes: proxy/ports.py)."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10_000, max(low, 10_001))
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no luck below the range: any port
        s.bind((host, 0))
        return s.getsockname()[1]


def _upstream_text(upstream: Any) -> str:
    if isinstance(upstream, tuple):
        host, port = upstream
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(upstream, int):
        return f"127.0.0.1:{upstream}"
    return str(upstream)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the pytest process dies (Linux), so a
    killed test run leaves no server behind."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_server(timeout: float = START_TIMEOUT) -> WirefaultServer:
    """Start `wirefault serve` (empty config, API on a port the kernel picks) in a new
    temporary directory and wait for its ready line."""
    directory = tempfile.mkdtemp(prefix="wirefault-pytest-")
    config = os.path.join(directory, "proxies.yaml")
    ready_file = os.path.join(directory, "ready")
    with open(config, "w") as f:
        f.write("proxies: []\n")
    stderr = open(os.path.join(directory, "stderr"), "wb")  # noqa: SIM115 (the child's)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "wirefault.fifo_client.cli", "serve", "--config", config,
             "--api", "127.0.0.1:0", "--ready-file", ready_file],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            cwd=directory, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    except BaseException:
        stderr.close()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    stderr.close()
    try:
        # The ready line is the first line on stdout (also in `ready_file`); an exit before
        # it closes stdout. Wait for either, not by polling.
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline().decode(errors="replace").strip() if readable else ""
        if not line.startswith("ready "):
            if process.poll() is None and not readable:
                raise RuntimeError(f"wirefault serve wrote no ready line within {timeout:g} s")
            process.wait(timeout=10)
            with open(os.path.join(directory, "stderr"), errors="replace") as f:
                said = f.read().strip().splitlines()
            raise RuntimeError(f"wirefault serve exited with status {process.returncode} "
                               f"before it was ready: {said[-1] if said else '(no output)'}")
        words = dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)
        host, _, port = words["api"].rpartition(":")
        return WirefaultServer(process, directory, host.strip("[]"), int(port), line)
    except BaseException:
        WirefaultServer(process, directory, "", 0, "").stop()
        raise


class ProxyFactory:
    """`wirefault_proxy`: call it to create a proxy; `close()` deletes every one it made."""

    def __init__(self, server: WirefaultServer, prefix: str) -> None:
        self.server, self.prefix = server, prefix
        self.created: list[WirefaultProxy] = []

    def __call__(self, upstream: Any, protocol: str = "postgres", name: str | None = None,
                 host: str = "127.0.0.1") -> WirefaultProxy:
        upstream_text = _upstream_text(upstream)
        if name is None:
            name = f"{self.prefix}-{next(_PROXY_NUMBERS)}"
        for attempt in range(20):
            port = _candidate_port(host)
            status, payload = self.server.request("POST", "/api/proxies", {
                "name": name, "listen": f"{host}:{port}", "upstream": upstream_text,
                "protocol": protocol})
            if status == 201:
                proxy = WirefaultProxy(self.server, name, host, port, upstream_text, protocol)
                self.created.append(proxy)
                return proxy
            message = payload.get("error", "") if isinstance(payload, dict) else str(payload)
            if status == 400 and "in use" in message and attempt < 19:
                continue  # another process took the port in between: another one
            raise WirefaultApiError("POST", "/api/proxies", status, message)
        raise AssertionError("unreachable")

    def close(self) -> None:
        problems = []
        for proxy in reversed(self.created):
            try:
                proxy.delete()
            except WirefaultError as exc:
                problems.append(str(exc))
        self.created.clear()
        if problems:
            raise WirefaultError("; ".join(problems))


_PROXY_NUMBERS = itertools.count(1)  # proxy names are unique for the server's lifetime


def _prefix(test_name: str) -> str:
    return _NAME_UNSAFE.sub("_", test_name).strip("_.-")[:48] or "proxy"


if pytest is not None:

    @pytest.fixture(scope="session")
    def wirefault() -> Iterator[WirefaultServer]:
        """A `wirefault serve` process for the session (per xdist worker): `.api_url`,
        `.pid`, `.call(method, path, body)`, `.proxies()`."""
        server = start_server()
        try:
            yield server
        finally:
            server.stop()

    @pytest.fixture
    def wirefault_proxy(wirefault: WirefaultServer,
                        request: pytest.FixtureRequest) -> Iterator[Callable[...,
                                                                             WirefaultProxy]]:
        """A factory: `wirefault_proxy(upstream="127.0.0.1:5432", protocol="postgres")`
        creates a proxy on a free port; every one is deleted when the test ends."""
        factory = ProxyFactory(wirefault, _prefix(request.node.name))
        try:
            yield factory
        finally:
            if wirefault.process.poll() is None:
                factory.close()
