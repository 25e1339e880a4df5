"""`wirefault serve`'s HTTP API (tornado, on the proxies' own event loop): JSON in and out.

    GET    /api/proxies                      every proxy, in order
    POST   /api/proxies                      {name, listen, upstream, protocol?, fifo?,
                                              enabled?, seed?, faults?}        -> 201
    GET    /api/proxies/NAME
    PATCH  /api/proxies/NAME                 {upstream?, enabled?}
    DELETE /api/proxies/NAME                                                  -> 204
    GET    /api/proxies/NAME/faults          [{name, command, matched, fired, added, state}]
    POST   /api/proxies/NAME/faults          {name, chain, seed?} or {command}  -> 201
    DELETE /api/proxies/NAME/faults                      (faults.clear())    -> 204
    DELETE /api/proxies/NAME/faults/FAULT                                     -> 204
    GET    /api/proxies/NAME/recorder        [{conn, source, message}] since the last
                                              dump or reset (a dump empties it, as over FIFO)
    DELETE /api/proxies/NAME/recorder        (recorder.reset())              -> 204
    POST   /api/proxies/NAME/commands        {command} -> 200 {"reply": TEXT}: any command,
                                              TEXT the exact reply its FIFO would give (an
                                              error line for a rejected command, still 200)
    GET    /api/events?after=N&timeout=S&proxy=P&fault=F
                                             {"events": [...], "last": N}: the events after
                                              N at once, else waits up to S seconds (max 300)
    GET    /metrics                          Prometheus text format

Errors are `{"error": "one line"}` (plus `"column": N` for a command's error) with 400, 404
for an unknown proxy, fault or route, 401 for a missing or wrong token; never a traceback.
Toxiproxy's routes (proxy/toxiproxy_api.py, when present) share the server, the token check
and the error handling: their handlers subclass `ApiHandler`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import tornado.web

from . import dsl
from .http_events import EventHub
from .proxy_registry import PROXY_NAME, Proxy, ProxyError, ProxyRegistry, ProxySpec

if TYPE_CHECKING:
    import tornado.httpserver

    from .command_channel import Reply

logger = logging.getLogger("wirefault")

MAX_POLL = 300.0
MAX_BODY_BYTES = 8 * 1024 * 1024
"""The largest request body taken: a command of MAX_COMMAND_BYTES (1 MiB) written as JSON
with every character escaped fits; a larger one is answered 400 before it is read."""
MAX_HEADER_BYTES = 64 * 1024
BODY_TIMEOUT = 60.0
"""Seconds a request's body may take to arrive."""
IDLE_TIMEOUT = 60.0
"""Seconds a connection may stay idle between requests, or take to send its headers
(tornado uses it for both): a slow-loris client is closed then."""
JSON_SLICE_ROWS = 1000
"""A dump's rows are turned into JSON this many at a time, the loop getting its turn
between slices."""
_COMMAND_ERROR = re.compile(r"column (\d+): (.*)", re.S)


class ApiError(tornado.web.HTTPError):
    """An error reply: raised by `ApiHandler.fail`, written by `ApiHandler.write_error`."""

    def __init__(self, status: int, message: str, column: int | None = None) -> None:
        super().__init__(status)
        self.message, self.column = message, column


class ApiHandler(tornado.web.RequestHandler):
    """Base of every API handler (native and Toxiproxy's): the token check (`prepare`),
    JSON replies (`write_json`), error replies (`fail`), the request's JSON (`json_body`).

    The registry is `self.registry` (from the application's settings unless a subclass's
    `initialize` sets it)."""

    _registry: ProxyRegistry | None = None

    @property
    def registry(self) -> ProxyRegistry:
        if self._registry is not None:
            return self._registry
        return self.application.settings["wirefault_registry"]

    @registry.setter
    def registry(self, registry: ProxyRegistry) -> None:
        self._registry = registry

    @property
    def events(self) -> EventHub:
        return self.application.settings["wirefault_events"]

    def prepare(self) -> None:
        token = self.application.settings.get("wirefault_token")
        if token is not None:
            refused = self._token_refusal(token)
            if refused is not None:
                # One line for whoever watches the log; never the token nor what was sent
                # in its place (a near miss would give most of it away).
                logger.warning("wirefault: API %s %s from %s refused (401): %s",
                               self.request.method, self.request.path,
                               self.request.remote_ip, refused)
                self.set_header("WWW-Authenticate", 'Bearer realm="wirefault"')
                self.fail(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        self.events.hook()

    def _token_refusal(self, token: str) -> str | None:
        """None when the request carries `token`; else why not, in words safe to log."""
        header = self.request.headers.get("Authorization")
        if header is None:
            return "no Authorization header"
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            return "Authorization is not a bearer token"
        # compare_digest: the time taken must not tell how much of the token was right
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                                   token.encode("utf-8")):
            return "wrong bearer token"
        return None

    def on_finish(self) -> None:
        self.events.hook()  # a proxy this request added fires into the log from now on

    def write_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        if status == 204:
            self.finish()
            return
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj) + "\n")

    def fail(self, status: int, message: str, column: int | None = None) -> NoReturn:
        """Reply `{"error": message[, "column": column]}` with `status`; raises (the handler
        method ends here)."""
        raise ApiError(status, message, column)

    def json_body(self) -> Any:
        """The request's body as JSON (an empty body: {}); 400 when it is not JSON."""
        body = self.request.body
        if not body.strip():
            return {}
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            self.fail(400, f"bad JSON body: {exc}")
        except RecursionError:  # json's decoder recurses once per level of nesting
            self.fail(400, "bad JSON body: nested too deeply")

    def json_object(self, allowed: tuple[str, ...]) -> dict[str, Any]:
        body = self.json_body()
        if not isinstance(body, dict):
            self.fail(400, f"expected a JSON object, got {type(body).__name__}")
        unknown = [key for key in body if key not in allowed]
        if unknown:
            self.fail(400, f"unknown key {unknown[0]!r} (expected {', '.join(allowed)})")
        return body

    def proxy(self, name: str) -> Proxy:
        try:
            return self.registry.get(name)
        except ProxyError as exc:
            self.fail(404, str(exc))

    # -- the one place errors are written --------------------------------------------------

    def log_exception(self, typ, value, tb) -> None:  # type: ignore[no-untyped-def]
        if isinstance(value, tornado.web.HTTPError):
            return  # a client's error: its reply says it
        logger.error("wirefault: API %s %s: %s: %s", self.request.method, self.request.path,
                     typ.__name__ if typ else "error", value)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            self._write_error_body(status_code, exc.message, exc.column)
            return
        if isinstance(exc, tornado.web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        elif isinstance(exc, tornado.web.HTTPError) or exc is None:
            message = self._reason
        else:
            message = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0]
        self._write_error_body(status_code, message, None)

    def _write_error_body(self, status: int, message: str, column: int | None) -> None:
        self.clear()
        if status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="wirefault"')
        self.set_status(status)
        body: dict[str, Any] = {"error": message.splitlines()[0] if message else ""}
        if column is not None:
            body["column"] = column
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body) + "\n")

    # -- commands, answered as over a FIFO ------------------------------------------------

    def command(self, proxy: Proxy, text: str, status: int = 400) -> str:
        """The addon's reply to one command for `proxy` (what its FIFO would answer); an
        error line becomes `fail(status, message, column)`."""
        reply = self._reply_to()(proxy, text)
        if not isinstance(reply, str):  # only a dump's reply is deferred (command_async)
            raise TypeError(f"the reply to {text!r} is deferred; use command_async")
        return self._checked(reply, status)

    async def command_async(self, proxy: Proxy, text: str, status: int = 400) -> str:
        """`command`, for a command whose reply may be deferred (a large dump)."""
        reply = self._reply_to()(proxy, text)
        if not isinstance(reply, str):
            reply = await reply
        return self._checked(reply, status)

    def _reply_to(self) -> Callable[[Proxy, str], Reply]:
        reply_to = self.registry._reply
        assert reply_to is not None, "registry not bound"
        return reply_to

    def _checked(self, reply: str, status: int) -> str:
        if reply and reply != "\n":
            error = _COMMAND_ERROR.fullmatch(reply.strip())
            if error and "\n" not in reply.strip():
                self.fail(status, error.group(2), int(error.group(1)))
        return reply


class NotFound(ApiHandler):
    def prepare(self) -> None:
        super().prepare()
        self.fail(404, f"no such route: {self.request.method} {self.request.path}")


# -- proxies ---------------------------------------------------------------------------------


def proxy_json(proxy: Proxy) -> dict[str, Any]:
    spec, runtime = proxy.spec, proxy.runtime
    return {
        "name": spec.name,
        "listen": _address(spec.listen),
        "listening": _listening(proxy),
        "upstream": _address(spec.upstream),
        "protocol": spec.protocol,
        "enabled": spec.enabled,
        "fifo": spec.fifo,
        "seed": spec.seed,
        "connections": len(runtime.pause.connections),
        "faults": len(runtime.engine.faults),
        "fired": runtime.engine.fired_total,
    }


def _address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listening(proxy: Proxy) -> str | None:
    """The address its listener is bound to (the port chosen for port 0), None when it
    does not listen."""
    if proxy.mode is None:
        return None
    from mitmproxy import ctx

    from . import mitm_internals

    master = getattr(ctx, "master", None)
    if master is None:
        return None
    states = mitm_internals.listener_states(master.addons.get("proxyserver"))
    addresses, _ = states.get(proxy.mode, ((), None))
    return _address(addresses[0][:2]) if addresses else None


def _parse_address(handler: ApiHandler, key: str, value: Any, listen: bool) -> tuple[str, int]:
    import argparse

    from .runner import _host_port

    if listen and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    shape = "[HOST:]PORT" if listen else "HOST:PORT"
    if not isinstance(value, str) or not value.strip() or (not listen and ":" not in value):
        handler.fail(400, f"{key}: expected {shape}, got {value!r}")
    try:
        host, port = _host_port(value.strip(), "127.0.0.1" if listen else "")
    except argparse.ArgumentTypeError as exc:
        handler.fail(400, f"{key}: {exc}")
    if not host or (not listen and port == 0):
        handler.fail(400, f"{key}: expected {shape}, got {value!r}")
    return host, port


PROXY_KEYS = ("name", "listen", "upstream", "protocol", "fifo", "enabled", "seed", "faults")


class ProxiesHandler(ApiHandler):
    def get(self) -> None:
        self.write_json([proxy_json(p) for p in self.registry.proxies.values()])

    async def post(self) -> None:
        from wirefault import protocols

        body = self.json_object(PROXY_KEYS)
        for key in ("name", "listen", "upstream"):
            if key not in body:
                self.fail(400, f"missing required key {key!r}")
        name = body["name"]
        if not isinstance(name, str) or not PROXY_NAME.fullmatch(name):
            self.fail(400, f"name: proxy names use letters, digits, '_', '.', '-': {name!r}")
        if name in self.registry.proxies:
            self.fail(409, f"a proxy named {name!r} exists already")
        protocol = body.get("protocol", "postgres")
        if protocol not in protocols.names():
            self.fail(400, f"protocol: expected one of {', '.join(protocols.names())}, "
                           f"got {protocol!r}")
        fifo, enabled, seed = body.get("fifo"), body.get("enabled", True), body.get("seed")
        faults = body.get("faults", [])
        if fifo is not None and (not isinstance(fifo, str) or not fifo):
            self.fail(400, f"fifo: expected a path, got {fifo!r}")
        if not isinstance(enabled, bool):
            self.fail(400, f"enabled: expected true or false, got {enabled!r}")
        if seed is not None and (type(seed) is not int or seed < 0):
            self.fail(400, f"seed: expected an integer >= 0, got {seed!r}")
        if not isinstance(faults, list) or not all(isinstance(f, str) for f in faults):
            self.fail(400, "faults: expected a list of commands")
        for index, text in enumerate(faults):
            try:
                parsed = dsl.parse(text, protocol)
            except dsl.CommandError as exc:
                self.fail(400, f"faults[{index}]: {exc.message}", exc.column)
            if not (isinstance(parsed, dsl.Rule) or
                    (isinstance(parsed, dsl.FaultCommand) and parsed.op == "add")):
                self.fail(400, f"faults[{index}]: expected a conn.* or faults.add(...) command")
        spec = ProxySpec(name=name, listen=_parse_address(self, "listen", body["listen"], True),
                         upstream=_parse_address(self, "upstream", body["upstream"], False),
                         protocol=protocol, fifo=fifo, enabled=enabled, faults=tuple(faults),
                         seed=seed)
        try:
            proxy = await self.registry.add_proxy(spec)
        except ProxyError as exc:
            self.fail(400, str(exc))
        except Exception as exc:  # mitmproxy refused the listeners (OptionsError)
            if name in self.registry.proxies:  # the registry forgets only on ProxyError
                with contextlib.suppress(Exception):
                    await self.registry.remove_proxy(name)
            self.fail(400, f"proxy {name}: {exc}".splitlines()[0])
        self.set_header("Location", f"/api/proxies/{name}")
        self.write_json(proxy_json(proxy), 201)


class ProxyHandler(ApiHandler):
    def get(self, name: str) -> None:
        self.write_json(proxy_json(self.proxy(name)))

    async def patch(self, name: str) -> None:
        self.proxy(name)
        body = self.json_object(("upstream", "enabled"))
        enabled = body.get("enabled")
        if enabled is not None and not isinstance(enabled, bool):
            self.fail(400, f"enabled: expected true or false, got {enabled!r}")
        upstream = (_parse_address(self, "upstream", body["upstream"], False)
                    if "upstream" in body else None)
        try:
            if upstream is not None:
                await self.registry.set_upstream(name, upstream)
            if enabled is not None:
                await self.registry.set_enabled(name, enabled)
        except ProxyError as exc:
            self.fail(404 if name not in self.registry.proxies else 400, str(exc))
        self.write_json(proxy_json(self.proxy(name)))

    async def delete(self, name: str) -> None:
        self.proxy(name)
        try:
            await self.registry.remove_proxy(name)
        except ProxyError as exc:
            self.fail(404, str(exc))
        self.write_json(None, 204)


# -- faults ----------------------------------------------------------------------------------


def faults_json(proxy: Proxy) -> list[dict[str, Any]]:
    rows = []
    for f in proxy.runtime.engine.faults:
        added = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(f.added))
        rows.append({"name": f.name, "command": f.text, "matched": f.shared.matched,
                     "fired": f.shared.fired,
                     "added": f"{added}.{int((f.added % 1) * 1000):03d}Z",
                     "state": "spent" if f.spent else "active"})
    return rows


class FaultsHandler(ApiHandler):
    def get(self, name: str) -> None:
        self.write_json(faults_json(self.proxy(name)))

    def post(self, name: str) -> None:
        proxy = self.proxy(name)
        body = self.json_object(("name", "chain", "seed", "command"))
        if "command" in body:
            if set(body) != {"command"}:
                self.fail(400, "give either command or name and chain, not both")
            text, offset = body["command"], 0
            if not isinstance(text, str):
                self.fail(400, f"command: expected a string, got {text!r}")
        else:
            fault, chain, seed = body.get("name"), body.get("chain"), body.get("seed")
            if not isinstance(fault, str) or not fault:
                self.fail(400, f"name: expected a fault name, got {fault!r}")
            if not isinstance(chain, str) or not chain.strip():
                self.fail(400, f"chain: expected a chain such as 'onQuery().kill()', "
                               f"got {chain!r}")
            if seed is not None and (type(seed) is not int or seed < 0):
                self.fail(400, f"seed: expected an integer >= 0, got {seed!r}")
            chain = chain.strip()
            chain = chain.removeprefix("conn.").lstrip(".")
            head = f"faults.add({json.dumps(fault)}"
            head += f", seed={seed})." if seed is not None else ")."
            text, offset = head + chain, len(head)
        try:
            parsed = proxy.runtime.engine.parse(text)
        except dsl.CommandError as exc:
            column = exc.column - offset if exc.column > offset else exc.column
            self.fail(400, exc.message, column)
        if not isinstance(parsed, dsl.Rule | dsl.FaultCommand):
            self.fail(400, "expected a conn.* or faults.* command (the recorder has its own "
                           "route)", 1)
        self.command(proxy, text, 404 if getattr(parsed, "op", None) == "remove" else 400)
        self.write_json(faults_json(proxy), 201)

    def delete(self, name: str) -> None:
        self.command(self.proxy(name), "faults.clear()")
        self.write_json(None, 204)


class FaultHandler(ApiHandler):
    def get(self, name: str, fault: str) -> None:
        for row in faults_json(self.proxy(name)):
            if row["name"] == fault:
                self.write_json(row)
                return
        self._no_fault(name, fault)

    def delete(self, name: str, fault: str) -> None:
        proxy = self.proxy(name)
        if fault not in proxy.runtime.engine.names():
            self._no_fault(name, fault)
        proxy.runtime.engine.remove(fault)
        proxy.runtime.faults_changed()
        logger.info("wirefault: proxy %s: fault %s removed (API)", name, fault)
        self.write_json(None, 204)

    def _no_fault(self, name: str, fault: str) -> NoReturn:
        in_force = ", ".join(self.proxy(name).runtime.engine.names()) or "none"
        self.fail(404, f"proxy {name}: no fault named {fault!r}; faults in force: {in_force}")


# -- recorder, events, metrics ---------------------------------------------------------------


class RecorderHandler(ApiHandler):
    async def get(self, name: str) -> None:
        from wirefault.fifo_client.client import parse_dump

        reply = await self.command_async(self.proxy(name), "recorder.dump()")
        lines = reply.rstrip("\n").split("\n") if reply.rstrip("\n") else []
        if len(lines) <= JSON_SLICE_ROWS:
            rows = parse_dump("\n".join(lines))
            self.write_json([{"conn": r.conn, "source": r.source, "message": r.message}
                             for r in rows])
            return
        # A large dump is turned into JSON a slice of rows at a time, giving the loop its
        # turn between slices (the same text as json.dumps of the whole list).
        parts = []
        for start in range(0, len(lines), JSON_SLICE_ROWS):
            rows = parse_dump("\n".join(lines[start:start + JSON_SLICE_ROWS]))
            parts.append(json.dumps([{"conn": r.conn, "source": r.source,
                                      "message": r.message} for r in rows])[1:-1])
            await asyncio.sleep(0)
        self.set_header("Content-Type", "application/json")
        self.finish("[" + ", ".join(parts) + "]\n")

    def delete(self, name: str) -> None:
        self.command(self.proxy(name), "recorder.reset()")
        self.write_json(None, 204)


class CommandsHandler(ApiHandler):
    """Any command of the language, answered with the exact text the proxy's FIFO would
    reply (the same function, the same trimming, the same handling of a failing handler and
    of a reply UTF-8 cannot encode): `{"reply": TEXT}`, 200 even for a rejected command, so
    a client parses one reply whichever transport carried it. 400 only for a body that is
    no `{"command": "..."}`, 404 for an unknown proxy."""

    async def post(self, name: str) -> None:
        from .command_channel import MAX_COMMAND_BYTES, _one_line

        proxy = self.proxy(name)
        body = self.json_object(("command",))
        command = body.get("command")
        if not isinstance(command, str):
            self.fail(400, f"command: expected a string, got {command!r}")
        # The FIFO counts the command's bytes with the client's final newline.
        if len(command.encode("utf-8", "surrogatepass")) + 1 > MAX_COMMAND_BYTES:
            reply = f"command longer than {MAX_COMMAND_BYTES} bytes\n"
        else:
            text = command.strip()
            try:
                reply = self._reply_to()(proxy, text)
                if not isinstance(reply, str) and inspect.isawaitable(reply):
                    reply = await reply  # a large dump, rendered a slice at a time
            except Exception as exc:  # as CommandChannel._run_handler words it
                logger.exception("wirefault: proxy %s: command %r failed", name, text)
                reply = f"internal error: {type(exc).__name__}: {_one_line(str(exc))}\n"
            if not isinstance(reply, str):
                reply = f"internal error: handler returned {type(reply).__name__}\n"
        # What the FIFO's bytes decode to (CommandChannel._encode, then the client's decode).
        reply = reply.encode("utf-8", "backslashreplace").decode("utf-8", "replace")
        self.write_json({"reply": reply})


class EventsHandler(ApiHandler):
    async def get(self) -> None:
        after = self._number("after", 0, int)
        timeout = min(self._number("timeout", 0.0, float), MAX_POLL)
        proxy = self.get_query_argument("proxy", None)
        fault = self.get_query_argument("fault", None)
        if proxy is not None:
            self.proxy(proxy)
        events = await self.events.wait(after, timeout, proxy, fault)
        stream = getattr(self.request.connection, "stream", None)
        if stream is not None and stream.closed():
            return  # the client went away (or the server stops)
        self.write_json({"events": [e.as_json() for e in events], "last": self.events.last})

    def _number(self, key: str, default: Any, kind: type) -> Any:
        text = self.get_query_argument(key, None)
        if text is None:
            return default
        try:
            value = kind(text)
        except ValueError:
            self.fail(400, f"{key}: not a number: {text!r}")
        if not 0 <= value < float("inf"):
            self.fail(400, f"{key}: must be >= 0: {text!r}")
        return value


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


METRICS = (
    ("wirefault_proxy_enabled", "gauge", "1 when the proxy listens"),
    ("wirefault_connections_open", "gauge", "Connections open now"),
    ("wirefault_connections_total", "counter", "Connections accepted since start"),
    ("wirefault_bytes_total", "counter",
     "Bytes read from each side (direction: from_client, from_server)"),
    ("wirefault_frames_total", "counter",
     "Protocol frames read from each side (direction: from_client, from_server)"),
    ("wirefault_faults_fired_total", "counter", "Times any fault of the proxy acted"),
    ("wirefault_fault_matched_total", "counter", "Frames a fault's chain matched"),
    ("wirefault_fault_fired_total", "counter", "Times a fault acted"),
)


class MetricsHandler(ApiHandler):
    def get(self) -> None:
        samples: dict[str, list[str]] = {name: [] for name, _, _ in METRICS}
        for proxy in self.registry.proxies.values():
            label = f'proxy="{_label(proxy.name)}"'
            engine = proxy.runtime.engine
            samples["wirefault_proxy_enabled"].append(f"{{{label}}} {int(proxy.spec.enabled)}")
            samples["wirefault_connections_open"].append(
                f"{{{label}}} {len(proxy.runtime.pause.connections)}")
            samples["wirefault_connections_total"].append(
                f"{{{label}}} {proxy.runtime.connections_total}")
            traffic = proxy.runtime.traffic_now()
            for direction, bytes_read, frames in (
                    ("from_client", traffic.bytes_from_client, traffic.frames_from_client),
                    ("from_server", traffic.bytes_from_server, traffic.frames_from_server)):
                way = f'{label},direction="{direction}"'
                samples["wirefault_bytes_total"].append(f"{{{way}}} {bytes_read}")
                samples["wirefault_frames_total"].append(f"{{{way}}} {frames}")
            samples["wirefault_faults_fired_total"].append(f"{{{label}}} {engine.fired_total}")
            for f in engine.faults:
                fault = f'{label},fault="{_label(f.name)}"'
                samples["wirefault_fault_matched_total"].append(
                    f"{{{fault}}} {f.shared.matched}")
                samples["wirefault_fault_fired_total"].append(f"{{{fault}}} {f.shared.fired}")
        lines = []
        for name, kind, help_text in METRICS:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{sample}" for sample in samples[name]]
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish("\n".join(lines) + "\n")


# -- the application -------------------------------------------------------------------------

_NAME = r"([^/]+)"


def native_routes() -> list[tuple[str, type, dict]]:
    return [
        (r"/api/proxies/?", ProxiesHandler, {}),
        (rf"/api/proxies/{_NAME}", ProxyHandler, {}),
        (rf"/api/proxies/{_NAME}/faults/?", FaultsHandler, {}),
        (rf"/api/proxies/{_NAME}/faults/{_NAME}", FaultHandler, {}),
        (rf"/api/proxies/{_NAME}/recorder/?", RecorderHandler, {}),
        (rf"/api/proxies/{_NAME}/commands/?", CommandsHandler, {}),
        (r"/api/events/?", EventsHandler, {}),
        (r"/metrics", MetricsHandler, {}),
    ]


def make_app(registry: ProxyRegistry, token: str | None = None) -> tornado.web.Application:
    routes = native_routes()
    try:
        from wirefault.proxy.toxiproxy_api import toxiproxy_routes
    except ImportError:
        pass
    else:
        routes += toxiproxy_routes(registry)
    events = EventHub(registry)
    events.hook()
    return tornado.web.Application(
        routes, default_handler_class=NotFound, wirefault_registry=registry,
        wirefault_token=token, wirefault_events=events, compress_response=False)


class ApiServer:
    """The API's listening server: `start` binds (OSError when it cannot), `stop` closes."""

    def __init__(self, registry: ProxyRegistry, host: str, port: int,
                 token: str | None = None) -> None:
        self.app = make_app(registry, token)
        self.host, self.port = host, port
        self.server: tornado.httpserver.HTTPServer | None = None
        self.address: tuple[str, int] | None = None

    def start(self) -> None:
        import socket

        import tornado.httpserver
        import tornado.netutil

        sockets = tornado.netutil.bind_sockets(
            self.port, self.host, family=socket.AF_UNSPEC if self.host else socket.AF_INET)
        # tornado's defaults let one client hold the server: a body up to 100 MiB buffered
        # per request, and no time limit on a body that never comes or a header sent a byte
        # at a time (an hour's idle timeout); these bound what a request may cost
        self.server = tornado.httpserver.HTTPServer(
            self.app, max_body_size=MAX_BODY_BYTES, max_header_size=MAX_HEADER_BYTES,
            body_timeout=BODY_TIMEOUT, idle_connection_timeout=IDLE_TIMEOUT)
        self.server.add_sockets(sockets)
        host, port = sockets[0].getsockname()[:2]
        self.address = (host, port)

    async def stop(self) -> None:
        import asyncio
        import contextlib

        self.app.settings["wirefault_events"].close()
        if self.server is None:
            return
        self.server.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.close_all_connections(), 5)
        self.server = None

    @property
    def ready_word(self) -> str:
        assert self.address is not None
        return f"api={_address(self.address)}"
