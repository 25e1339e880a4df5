"""Toxiproxy 2.x's HTTP API on wirefault's proxy registry, so that Toxiproxy clients work.

`toxiproxy_routes(registry)` gives the tornado routes; `wirefault serve`'s HTTP server
appends them. The routes, JSON shapes, status codes and error bodies are Toxiproxy's:

    GET  /version                      {"version": "2.12.0"} and a newline, as Toxiproxy's
    POST /reset                        enable every proxy, remove every toxic; 204
    GET  /proxies                      {name: proxy}
    POST /proxies                      create: 201 proxy; 409 if the name is taken
    POST /populate                     [proxy, ...]: create or replace; 201 {"proxies": [...]}
    GET|POST|PATCH|DELETE /proxies/NAME  show; update upstream, enabled, listen; delete (204)
    GET|POST /proxies/NAME/toxics      [toxic, ...]; add one (200 toxic; 409 if it exists)
    GET|POST|PATCH|DELETE /proxies/NAME/toxics/TOXIC   show; update; remove (204)

A proxy is {name, listen, upstream, enabled, toxics, protocol}; `protocol` is ours: a proxy
created here is `raw` (Toxiproxy is byte-level) unless the body names another. A listen port
0 is given a free port at creation, so the address stays the same across disable/enable. A
toxic is {name, type, stream, toxicity, attributes}, mapped by `toxics.fault_command` onto one
named fault, `toxic:<name>`, of the proxy's engine; the listing is what was stored next to
that fault name (a toxic whose fault was removed by other means is no longer listed), its
attributes those of its type, 0 when not given, as Toxiproxy lists them. Errors are
{"error": message, "status": code}.

As in Toxiproxy (api.go, proxy.go, proxy_collection.go): changing a proxy's upstream or
listen address closes its live connections (Toxiproxy stops and restarts the proxy; this
only for proxies created through this API: the native API leaves them on the old upstream);
`/populate` checks every entry first (a missing name or upstream creates nothing: 400,
`"proxies": null`), then creates them in order, keeping an existing proxy with the same
listen and upstream as it is and replacing one that differs; a failure stops there and
answers its status with the error and the proxies done so far.
"""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from typing import Any

import tornado.web

from . import dsl
from .proxy_registry import Proxy, ProxyError, ProxyRegistry, ProxySpec
from .toxics import FAULT_PREFIX, STREAMS, ToxicError, attributes_of, fault_command

VERSION = "2.12.0"
"""The Toxiproxy version whose API this one follows."""
DEFAULT_PROTOCOL = "raw"

try:
    from .http_api import ApiHandler
except ImportError:  # the HTTP server is not there yet: the same interface, enough for us
    class ApiHandler(tornado.web.RequestHandler):  # type: ignore[no-redef]
        def write_json(self, obj: Any, status: int = 200) -> None:
            self.set_status(status)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(obj))


class ApiError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message, self.status = message, status


BAD_BODY = ("bad request body", 400)
MISSING = ("missing required field", 400)
PROXY_NOT_FOUND = ApiError("proxy not found", 404)
PROXY_EXISTS = ApiError("proxy already exists", 409)
INVALID_STREAM = ApiError("stream was invalid, can be either upstream or downstream", 400)
INVALID_TYPE = ApiError("invalid toxic type", 400)
TOXIC_EXISTS = ApiError("toxic already exists", 409)
TOXIC_NOT_FOUND = ApiError("toxic not found", 404)


def _joined(kind: tuple[str, int], detail: str) -> ApiError:
    return ApiError(f"{kind[0]}: {detail}", kind[1])


def _address(text: Any, field: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT or :PORT (all interfaces) as (host, port)."""
    if not isinstance(text, str):
        raise _joined(BAD_BODY, f"{field} must be a string HOST:PORT")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise _joined(BAD_BODY, f"{field} {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _text(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ToxiproxyState:
    """The registry, and each proxy's toxics by name: their JSON beside their fault name."""

    def __init__(self, registry: ProxyRegistry) -> None:
        self.registry = registry
        self.toxics: dict[str, dict[str, dict[str, Any]]] = {}
        self.created: set[str] = set()
        """The proxies created through this API: they follow Toxiproxy's rules."""

    # -- proxies ---------------------------------------------------------------------------

    def proxy(self, name: str) -> Proxy:
        proxy = self.registry.proxies.get(name)
        if proxy is None:
            raise PROXY_NOT_FOUND
        return proxy

    def proxy_json(self, proxy: Proxy) -> dict[str, Any]:
        spec = proxy.spec
        return {"name": spec.name, "listen": _text(spec.listen),
                "upstream": _text(spec.upstream), "enabled": spec.enabled,
                "toxics": self.toxic_list(proxy), "protocol": spec.protocol}

    def spec_from(self, body: dict[str, Any]) -> ProxySpec:
        for field in ("name", "upstream"):
            if not body.get(field):
                raise _joined(MISSING, field)
        name, upstream = body["name"], _address(body["upstream"], "upstream")
        if not isinstance(name, str):
            raise _joined(BAD_BODY, "name must be a string")
        listen = _address(body.get("listen") or "127.0.0.1:0", "listen")
        protocol = body.get("protocol") or DEFAULT_PROTOCOL
        enabled = body.get("enabled", True)
        if not isinstance(enabled, bool):
            raise _joined(BAD_BODY, "enabled must be true or false")
        from wirefault import protocols

        try:
            protocols.get(protocol)
        except Exception as exc:
            raise _joined(BAD_BODY, f"protocol: {exc}") from None
        return ProxySpec(name, listen, upstream, protocol, enabled=enabled)

    async def create(self, spec: ProxySpec) -> Proxy:
        if spec.name in self.registry.proxies:
            raise PROXY_EXISTS
        if spec.listen[1] == 0:
            spec = replace(spec, listen=(spec.listen[0], _free_port(spec.listen[0] or "")))
        try:
            proxy = await self.registry.add_proxy(spec)
        except ProxyError as exc:
            raise ApiError(str(exc), 500) from None
        self.toxics[spec.name] = {}
        self.created.add(spec.name)
        return proxy

    async def delete(self, name: str) -> None:
        self.proxy(name)
        try:
            await self.registry.remove_proxy(name)
        except ProxyError as exc:
            raise ApiError(str(exc), 500) from None
        self.toxics.pop(name, None)
        self.created.discard(name)

    async def update(self, proxy: Proxy, body: dict[str, Any]) -> Proxy:
        name, spec = proxy.name, proxy.spec
        try:
            if "listen" in body and _address(body["listen"], "listen") != spec.listen:
                kept = self.toxic_list(proxy)
                listen = _address(body["listen"], "listen")
                await self.delete(name)
                new = replace(spec, listen=listen, enabled=body.get("enabled", spec.enabled))
                proxy = await self.create(new)
                for toxic in kept:
                    self.install(proxy, toxic)
                return proxy
            if "upstream" in body:
                upstream = _address(body["upstream"], "upstream")
                moved = upstream != spec.upstream
                proxy = await self.registry.set_upstream(name, upstream)
                if moved and name in self.created:  # Toxiproxy restarts the proxy
                    proxy.runtime.close_connections()
            if "enabled" in body:
                if not isinstance(body["enabled"], bool):
                    raise _joined(BAD_BODY, "enabled must be true or false")
                proxy = await self.registry.set_enabled(name, body["enabled"])
        except ProxyError as exc:
            raise ApiError(str(exc), 500) from None
        return proxy

    async def reset(self) -> None:
        for proxy in list(self.registry.proxies.values()):
            try:
                await self.registry.set_enabled(proxy.name, True)
            except ProxyError as exc:
                raise ApiError(str(exc), 500) from None
            for toxic in list(self.toxics.get(proxy.name, {})):
                proxy.runtime.engine.remove(FAULT_PREFIX + toxic)
            self.toxics[proxy.name] = {}
            proxy.runtime.faults_changed()

    # -- toxics ----------------------------------------------------------------------------

    def stored(self, proxy: Proxy) -> dict[str, dict[str, Any]]:
        """The proxy's toxics whose fault is still in force, by name."""
        table = self.toxics.setdefault(proxy.name, {})
        names = set(proxy.runtime.engine.names())
        for gone in [toxic for toxic in table if FAULT_PREFIX + toxic not in names]:
            del table[gone]
        return table

    def toxic_list(self, proxy: Proxy) -> list[dict[str, Any]]:
        return list(self.stored(proxy).values())

    def toxic(self, proxy: Proxy, name: str) -> dict[str, Any]:
        toxic = self.stored(proxy).get(name)
        if toxic is None:
            raise TOXIC_NOT_FOUND
        return toxic

    @staticmethod
    def toxic_from(body: dict[str, Any]) -> dict[str, Any]:
        kind = body.get("type")
        if not isinstance(kind, str) or not kind:
            raise INVALID_TYPE
        stream = body.get("stream") or "downstream"
        if stream not in STREAMS:
            raise INVALID_STREAM
        name = body.get("name") or f"{kind}_{stream}"
        toxicity = body.get("toxicity", 1.0)
        if (not isinstance(name, str) or isinstance(toxicity, bool)
                or not isinstance(toxicity, int | float) or not 0 <= toxicity <= 1):
            raise _joined(BAD_BODY, "name must be a string, toxicity a number from 0 to 1")
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise _joined(BAD_BODY, "attributes must be an object")
        try:
            attributes = attributes_of(kind, attributes)
        except ToxicError as exc:
            raise (INVALID_TYPE if str(exc) == INVALID_TYPE.message
                   else _joined(BAD_BODY, str(exc))) from None
        return {"name": name, "type": kind, "stream": stream, "toxicity": float(toxicity),
                "attributes": attributes}

    def install(self, proxy: Proxy, toxic: dict[str, Any]) -> dict[str, Any]:
        """Arm the toxic's fault (in place of the one of that name) and store its JSON."""
        try:
            command = fault_command(toxic)
            proxy.runtime.engine.set_rule_text(command)
        except ToxicError as exc:
            raise (INVALID_TYPE if str(exc) == INVALID_TYPE.message
                   else _joined(BAD_BODY, str(exc))) from None
        except dsl.CommandError as exc:
            raise _joined(BAD_BODY, f"toxic {toxic['name']}: {exc}") from None
        proxy.runtime.faults_changed()
        self.stored(proxy)[toxic["name"]] = toxic
        return toxic

    def add_toxic(self, proxy: Proxy, body: dict[str, Any]) -> dict[str, Any]:
        toxic = self.toxic_from(body)
        if toxic["name"] in self.stored(proxy):
            raise TOXIC_EXISTS
        return self.install(proxy, toxic)

    def update_toxic(self, proxy: Proxy, name: str, body: dict[str, Any]) -> dict[str, Any]:
        old = self.toxic(proxy, name)
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise _joined(BAD_BODY, "attributes must be an object")
        merged = {**old, "toxicity": body.get("toxicity", old["toxicity"]),
                  "attributes": {**old["attributes"], **attributes}, "name": name}
        return self.install(proxy, self.toxic_from(merged))

    def remove_toxic(self, proxy: Proxy, name: str) -> None:
        self.toxic(proxy, name)
        proxy.runtime.engine.remove(FAULT_PREFIX + name)
        proxy.runtime.faults_changed()
        del self.stored(proxy)[name]


class _Handler(ApiHandler):
    def initialize(self, toxiproxy: ToxiproxyState, **kwargs: Any) -> None:
        super().initialize(**kwargs)
        self.api = toxiproxy

    def error(self, exc: ApiError) -> None:
        self.write_json({"error": exc.message, "status": exc.status}, status=exc.status)

    def body(self, kind: type = dict) -> Any:
        try:
            data = json.loads(self.request.body or (b"{}" if kind is dict else b"[]"))
        except ValueError as exc:
            raise _joined(BAD_BODY, str(exc)) from None
        except RecursionError:  # json's decoder recurses once per level of nesting
            raise _joined(BAD_BODY, "nested too deeply") from None
        if not isinstance(data, kind):
            raise _joined(BAD_BODY, f"expected a JSON {'object' if kind is dict else 'array'}")
        return data

    def no_content(self) -> None:
        self.set_status(204)
        self.finish()

    async def run(self, action: Any, *args: Any) -> None:
        try:
            await action(*args)
        except ApiError as exc:
            self.error(exc)


class VersionHandler(_Handler):
    def get(self) -> None:
        # Toxiproxy 2.7+ (api.go, Version): JSON, with its own content type and a newline.
        self.set_header("Content-Type", "application/json;charset=utf-8")
        self.finish(f'{{"version": "{VERSION}"}}\n')


class ResetHandler(_Handler):
    async def post(self) -> None:
        async def reset() -> None:
            await self.api.reset()
            self.no_content()
        await self.run(reset)


class ProxiesHandler(_Handler):
    def get(self) -> None:
        self.write_json({proxy.name: self.api.proxy_json(proxy)
                         for proxy in self.api.registry.proxies.values()})

    async def post(self) -> None:
        async def create() -> None:
            proxy = await self.api.create(self.api.spec_from(self.body()))
            self.write_json(self.api.proxy_json(proxy), status=201)
        await self.run(create)


class PopulateHandler(_Handler):
    async def post(self) -> None:
        done: list[Proxy] | None = None
        try:
            data = self.body(list)
            specs = []
            for number, item in enumerate(data, 1):  # every entry is checked first
                item = item if isinstance(item, dict) else {}
                for field in ("name", "upstream"):
                    if not item.get(field):
                        raise _joined(MISSING, f"{field} at proxy {number}")
                specs.append(self.api.spec_from(item))
            done = []
            for spec in specs:
                existing = self.api.registry.proxies.get(spec.name)
                if existing is not None:
                    old = existing.spec
                    if (old.upstream, old.listen, old.protocol) == (
                            spec.upstream, spec.listen, spec.protocol):
                        done.append(existing)  # kept as it is, as Toxiproxy's AddOrReplace
                        continue
                    await self.api.delete(spec.name)
                done.append(await self.api.create(spec))
        except ApiError as exc:
            shown = None if done is None else [self.api.proxy_json(p) for p in done]
            self.write_json({"error": exc.message, "status": exc.status, "proxies": shown},
                            status=exc.status)
            return
        self.write_json({"proxies": [self.api.proxy_json(p) for p in done]}, status=201)


class ProxyHandler(_Handler):
    async def get(self, name: str) -> None:
        async def show() -> None:
            self.write_json(self.api.proxy_json(self.api.proxy(name)))
        await self.run(show)

    async def post(self, name: str) -> None:
        async def update() -> None:
            proxy = self.api.proxy(name)
            proxy = await self.api.update(proxy, self.body())
            self.write_json(self.api.proxy_json(proxy))
        await self.run(update)

    patch = post

    async def delete(self, name: str) -> None:
        async def delete() -> None:
            await self.api.delete(name)
            self.no_content()
        await self.run(delete)


class ToxicsHandler(_Handler):
    async def get(self, name: str) -> None:
        async def index() -> None:
            self.write_json(self.api.toxic_list(self.api.proxy(name)))
        await self.run(index)

    async def post(self, name: str) -> None:
        async def create() -> None:
            proxy = self.api.proxy(name)
            self.write_json(self.api.add_toxic(proxy, self.body()))
        await self.run(create)


class ToxicHandler(_Handler):
    async def get(self, name: str, toxic: str) -> None:
        async def show() -> None:
            self.write_json(self.api.toxic(self.api.proxy(name), toxic))
        await self.run(show)

    async def post(self, name: str, toxic: str) -> None:
        async def update() -> None:
            proxy = self.api.proxy(name)
            self.write_json(self.api.update_toxic(proxy, toxic, self.body()))
        await self.run(update)

    patch = post

    async def delete(self, name: str, toxic: str) -> None:
        async def remove() -> None:
            self.api.remove_toxic(self.api.proxy(name), toxic)
            self.no_content()
        await self.run(remove)


def toxiproxy_routes(registry: ProxyRegistry) -> list[tuple[str, type, dict]]:
    """The Toxiproxy API's tornado routes over `registry`."""
    state = {"toxiproxy": ToxiproxyState(registry)}
    name = r"([^/]+)"
    return [
        (r"/version", VersionHandler, state),
        (r"/reset", ResetHandler, state),
        (r"/proxies", ProxiesHandler, state),
        (r"/populate", PopulateHandler, state),
        (rf"/proxies/{name}", ProxyHandler, state),
        (rf"/proxies/{name}/toxics", ToxicsHandler, state),
        (rf"/proxies/{name}/toxics/{name}", ToxicHandler, state),
    ]
