"""The proxies one process runs, by name: each its own runtime, listener and FIFO.

`wirefault proxy` (and the mitmdump script) is the case of one proxy built from mitmproxy's
options: the registry's `default`, which serves every connection no named proxy claims.
`wirefault serve` adds named proxies; each is one entry of mitmproxy's `mode` option,
`reverse:tcp://UPSTREAM@HOST:PORT`, so each gets its own listener, and a connection's
listener (`client.proxy_mode`) says whose runtime relays it. That choice is made once per
connection, in the addon's `next_layer`; the per-read path never sees the registry.

The methods that change the set at run time (`add_proxy`, `remove_proxy`, `set_enabled`,
`set_upstream`) are coroutines run on the proxy's event loop: they change the `mode` option
and wait for mitmproxy to start or stop the listeners, and raise `ProxyError` (one line) when
a listener or a FIFO cannot be opened, leaving the proxy as it was (or, for a listener that
failed to restart, disabled).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .command_channel import CommandChannel
    from .runtime import ProxyRuntime

logger = logging.getLogger("wirefault")

PROXY_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class ProxyError(Exception):
    """A proxy that cannot be added or changed; `str()` is one line."""


@dataclass(frozen=True)
class ProxySpec:
    """One proxy as configured: what the config file (or, later, the API) says."""

    name: str
    listen: tuple[str, int]
    upstream: tuple[str, int]
    protocol: str = "postgres"
    fifo: str | None = None
    enabled: bool = True
    faults: tuple[str, ...] = ()
    """Initial commands, `conn.*` or `faults.add(...)`, in order."""
    seed: int | None = None
    """Seed of the proxy's randomness; None: the process's `--seed`."""

    @property
    def mode(self) -> str:
        """This proxy's entry in mitmproxy's `mode` option."""
        (up_host, up_port), (host, port) = self.upstream, self.listen
        return f"reverse:tcp://{_host(up_host)}:{up_port}@{host}:{port}"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(eq=False)
class Proxy:
    spec: ProxySpec
    runtime: ProxyRuntime
    channel: CommandChannel | None = None
    specs: set[str] = field(default_factory=set)
    """Every mode entry this proxy listened under (its connections may still carry an older
    one after `set_upstream`)."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def mode(self) -> str | None:
        """The mode entry it listens under, None while disabled."""
        return self.spec.mode if self.spec.enabled else None


class ProxyRegistry:
    """The proxies by name. The addon binds it (`bind`): how a runtime is built, how a
    command is answered, how a FIFO is opened, and how the listeners are applied."""

    def __init__(self) -> None:
        self.proxies: dict[str, Proxy] = {}
        self.default: Proxy | None = None
        """The one proxy of `wirefault proxy`: mitmproxy's options describe it."""
        self._by_mode: dict[str, Proxy] = {}
        self._lock = asyncio.Lock()
        self.running = False
        """Listeners and FIFOs are live: changes are applied at once."""
        self._make_runtime: Callable[[ProxySpec], ProxyRuntime] | None = None
        self._reply: Callable[[Proxy, str], str] | None = None
        self._open_channel: Callable[[Proxy], CommandChannel | None] | None = None
        self._apply: Callable[[list[str]], Awaitable[dict[str, Any]]] | None = None

    def bind(self, make_runtime: Callable[[ProxySpec], ProxyRuntime],
             reply: Callable[[Proxy, str], str],
             open_channel: Callable[[Proxy], CommandChannel | None],
             apply: Callable[[list[str]], Awaitable[dict[str, Any]]]) -> None:
        self._make_runtime, self._reply = make_runtime, reply
        self._open_channel, self._apply = open_channel, apply

    # -- lookups ---------------------------------------------------------------------------

    def runtime_for(self, mode: Any) -> ProxyRuntime | None:
        """The runtime of the proxy whose listener accepted a connection in `mode` (its
        `client.proxy_mode`); the default proxy's when no named one listens there."""
        proxy = self._by_mode.get(getattr(mode, "full_spec", None))  # type: ignore[arg-type]
        if proxy is None:
            proxy = self.default
        return proxy.runtime if proxy is not None else None

    def proxy_for_mode(self, full_spec: str) -> Proxy | None:
        return self._by_mode.get(full_spec)

    def get(self, name: str) -> Proxy:
        try:
            return self.proxies[name]
        except KeyError:
            known = ", ".join(self.proxies) or "none"
            raise ProxyError(f"no proxy named {name!r}; proxies: {known}") from None

    def modes(self) -> list[str]:
        """mitmproxy's `mode` option: one entry per enabled proxy, in order."""
        return [proxy.mode for proxy in self.proxies.values() if proxy.mode is not None]

    def set_default(self, runtime: ProxyRuntime) -> Proxy:
        if self.default is None:
            self.default = Proxy(ProxySpec("default", ("", 0), ("", 0)), runtime)
        else:
            self.default.runtime = runtime
        return self.default

    # -- building (before the listeners run, and under the run-time methods) -------------

    def insert(self, spec: ProxySpec) -> Proxy:
        """Add a proxy to the set without applying it: its runtime, with its initial faults.
        Before the master runs, this is the config's first state."""
        assert self._make_runtime is not None and self._reply is not None, "not bound"
        self._check_new(spec)
        if spec.listen[1] == 0:
            spec = replace(spec, listen=(spec.listen[0], self._free_port(spec)))
        proxy = Proxy(spec, self._make_runtime(spec))
        for command in spec.faults:
            reply = self._reply(proxy, command)
            if reply != "\n":
                raise ProxyError(f"proxy {spec.name}: fault {command!r}: {reply.strip()}")
        self.proxies[spec.name] = proxy
        self._index(proxy)
        return proxy

    def _check_new(self, spec: ProxySpec) -> None:
        if not PROXY_NAME.fullmatch(spec.name):
            raise ProxyError(f"proxy names use letters, digits, '_', '.', '-': {spec.name!r}")
        if spec.name in self.proxies:
            raise ProxyError(f"a proxy named {spec.name!r} exists already")
        self._check_listen(spec)

    def _check_listen(self, spec: ProxySpec) -> None:
        if spec.listen[1] == 0:
            return
        for other in self.proxies.values():
            if other.name != spec.name and other.spec.listen == spec.listen:
                host, port = spec.listen
                raise ProxyError(f"proxy {spec.name}: listen {host}:{port}: proxy "
                                 f"{other.name} listens there already")

    @staticmethod
    def _free_port(spec: ProxySpec) -> int:
        from .ports import free_port

        try:
            return free_port(spec.listen[0] or "0.0.0.0")
        except OSError as exc:
            raise ProxyError(f"proxy {spec.name}: listen {spec.listen[0]}:0: "
                             f"{exc.strerror or exc}") from None

    def _index(self, proxy: Proxy) -> None:
        if proxy.mode is not None:
            proxy.specs.add(proxy.mode)
            self._by_mode[proxy.mode] = proxy

    def open_channels(self) -> list[str]:
        """Open every proxy's FIFO (at start); the problems, one line each."""
        problems = []
        for proxy in self.proxies.values():
            try:
                self._start_channel(proxy)
            except ProxyError as exc:
                problems.append(str(exc))
        return problems

    def _start_channel(self, proxy: Proxy) -> None:
        assert self._open_channel is not None
        if proxy.spec.fifo and proxy.channel is None:
            proxy.channel = self._open_channel(proxy)

    def close_channels(self) -> None:
        for proxy in self.proxies.values():
            _close(proxy)

    # -- run-time changes ------------------------------------------------------------------

    async def add_proxy(self, spec: ProxySpec) -> Proxy:
        async with self._lock:
            proxy = self.insert(spec)
            try:
                if self.running:
                    self._start_channel(proxy)
                await self._apply_listeners(proxy)
            except ProxyError:
                self._forget(proxy)
                await self._apply_listeners(None)
                raise
            logger.info("wirefault: proxy %s added", spec.name)
            return proxy

    async def remove_proxy(self, name: str) -> None:
        async with self._lock:
            proxy = self.get(name)
            self._forget(proxy)
            await self._apply_listeners(None)
            proxy.runtime.close_connections()
            logger.info("wirefault: proxy %s removed", name)

    async def set_enabled(self, name: str, enabled: bool) -> Proxy:
        """A disabled proxy does not listen (connections are refused) and its live
        connections are closed (Toxiproxy's "down"); its FIFO, faults and recorder stay."""
        async with self._lock:
            proxy = self.get(name)
            if proxy.spec.enabled != enabled:
                await self._change(proxy, replace(proxy.spec, enabled=enabled))
                if not enabled:
                    proxy.runtime.close_connections()
            return proxy

    async def set_upstream(self, name: str, upstream: tuple[str, int]) -> Proxy:
        """New connections go to `upstream`; the live ones keep theirs. The listener is
        restarted on the same address."""
        async with self._lock:
            proxy = self.get(name)
            if proxy.spec.upstream != upstream:
                await self._change(proxy, replace(proxy.spec, upstream=upstream))
            return proxy

    async def _change(self, proxy: Proxy, spec: ProxySpec) -> None:
        proxy.spec = spec
        self._index(proxy)
        try:
            await self._apply_listeners(proxy)
        except ProxyError:
            proxy.spec = replace(spec, enabled=False)
            await self._apply_listeners(None)
            raise

    def _forget(self, proxy: Proxy) -> None:
        _close(proxy)
        self.proxies.pop(proxy.name, None)
        for spec in proxy.specs:
            if self._by_mode.get(spec) is proxy:
                del self._by_mode[spec]

    async def _apply_listeners(self, changed: Proxy | None) -> None:
        """Make mitmproxy's listeners those of `modes()`; raise ProxyError if `changed`'s
        did not start. Nothing to do before the master runs (its start applies them)."""
        if not self.running or self._apply is None:
            return
        states = await self._apply(self.modes())
        if changed is None or changed.mode is None:
            return
        addresses, failure = states.get(changed.mode, ((), None))
        if not addresses:
            host, port = changed.spec.listen
            reason = listen_problem(failure, port) if failure else "the listener did not start"
            raise ProxyError(f"proxy {changed.name}: listen {host}:{port}: {reason}")


def _close(proxy: Proxy) -> None:
    if proxy.channel is not None:
        proxy.channel.close()
        proxy.channel = None


def listen_problem(failure: BaseException, port: int) -> str:
    """One line for a listener that failed to start, as `wirefault proxy` words it."""
    import errno

    from .ports import explain_address_in_use

    cause = getattr(failure, "__cause__", None) or failure
    if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
        return f"address already in use: {explain_address_in_use(port)}"
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else cause
    return f"cannot listen: {reason}"
