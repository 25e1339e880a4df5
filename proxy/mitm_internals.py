"""The one place wirefault reaches into mitmproxy's internals: its connection handlers.

wirefault's executor (relay_io.py) writes, closes and resets a connection's sockets itself,
on both of the paths a connection may take, so it needs the asyncio transport of each side,
a way to hand an event to the layer on mitmproxy's path, and a way to end mitmproxy's
reader task of a side that is closed for good. The fast path (fast_relay.py) takes the same
transports over for an established connection. `check_compatible()` verifies that the
internals this relies on are still shaped as expected; a test calls it so an upgrade that
changes them fails loudly.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

LISTEN_BACKLOG = 4096
"""The listen backlog wirefault's listeners get (the kernel caps it at net.core.somaxconn),
as PostgreSQL's own (2 x max_connections) and Go's (somaxconn), which Toxiproxy gets."""


def check_compatible() -> None:
    """Raise RuntimeError if mitmproxy's internals differ from what this module needs."""
    from mitmproxy.addons.proxyserver import Proxyserver
    from mitmproxy.proxy.server import ConnectionHandler, ConnectionIO

    problems = []
    if "connections" not in Proxyserver.__annotations__:
        problems.append("Proxyserver.connections is gone")
    if "transports" not in ConnectionHandler.__annotations__:
        problems.append("ConnectionHandler.transports is gone")
    if "writer" not in getattr(ConnectionIO, "__annotations__", {}):
        problems.append("ConnectionIO.writer is gone")
    if "timeout_watchdog" not in ConnectionHandler.__annotations__:
        problems.append("ConnectionHandler.timeout_watchdog is gone")
    if not callable(getattr(ConnectionHandler, "server_event", None)):
        problems.append("ConnectionHandler.server_event is gone")
    if "handler" not in getattr(ConnectionIO, "__annotations__", {}):
        problems.append("ConnectionIO.handler is gone")
    from mitmproxy.proxy.server import TimeoutWatchdog

    if "timeout" not in TimeoutWatchdog.__annotations__:
        problems.append("TimeoutWatchdog.timeout is gone")
    from mitmproxy.proxy.mode_servers import ServerInstance

    if "last_exception" not in ServerInstance.__annotations__:
        problems.append("ServerInstance.last_exception is gone")
    from mitmproxy.proxy.mode_servers import AsyncioServerInstance

    if "_servers" not in AsyncioServerInstance.__annotations__:
        problems.append("AsyncioServerInstance._servers is gone")
    if "_update_task" not in Proxyserver.__dict__ and \
            "_update_task" not in Proxyserver.__annotations__:
        problems.append("Proxyserver._update_task is gone")
    problems += _layer_choice_problems()
    if problems:
        raise RuntimeError("mitmproxy internals changed: " + "; ".join(problems))


def take_over_transports(proxyserver: Any, client_id: str) -> dict[Any, Any] | None:
    """The asyncio transports of an established connection, for wirefault's fast path to
    read itself: by mitmproxy Connection, or None when the connection does not fit
    (unknown, not plain TCP, or not fully open). mitmproxy's reader tasks are left waiting;
    `MitmEdge.end_reader` ends each once its side is closed."""
    handler = proxyserver.connections.get(client_id)
    if handler is None:
        return None
    transports: dict[Any, Any] = {}
    for connection, io in handler.transports.items():
        transport = getattr(io.writer, "transport", None)
        if transport is None or not hasattr(transport, "set_protocol"):
            return None
        if connection.transport_protocol != "tcp" or transport.is_closing():
            return None
        transports[connection] = transport
    if len(transports) != 2:
        return None
    for io in handler.transports.values():
        _stop_flow_control(io.reader)
    return transports


def keep_paused(transport: Any) -> None:
    """Make a pause_reading() of ours stick on mitmproxy's path: the transport's stream
    reader would otherwise resume reading once its own buffer drains."""
    _stop_flow_control(getattr(transport.get_protocol(), "_stream_reader", None))


def _stop_flow_control(reader: Any) -> None:
    """An asyncio StreamReader resumes its transport's reading when its buffer drains if it
    paused it itself (`_paused`): forget that it did, so it never resumes a transport that
    wirefault paused (or, after the fast path took the socket over, reads itself)."""
    if reader is not None and getattr(reader, "_paused", False):
        reader._paused = False


def widen_listen_backlogs(proxyserver: Any, backlog: int = LISTEN_BACKLOG) -> int:
    """Give every running TCP listener a backlog of `backlog`; how many it widened.

    mitmproxy listens with asyncio.start_server's default backlog, 100: a burst of more
    connections than that (a pool opening, a test suite starting its workers) overflows the
    accept queue, and the kernel drops the extra SYNs, which the clients resend 1 s, 3 s,
    7 s later: connecting through the proxy takes seconds where it took milliseconds
    directly. On Linux, listen() again on a listening socket just sets its backlog."""
    widened = 0
    for instance in proxyserver.servers:
        for server in getattr(instance, "_servers", ()):
            for listener in getattr(server, "sockets", None) or ():
                if listener.type != socket.SOCK_STREAM:
                    continue
                # a duplicate of the descriptor: the same socket, closed here on its own
                with socket.socket(listener.family, listener.type,
                                   fileno=socket.dup(listener.fileno())) as same:
                    same.listen(backlog)
                widened += 1
    return widened


def listen_failures(proxyserver: Any) -> list[tuple[str, OSError | Exception]]:
    """The listeners that failed to start: (mode description, the exception)."""
    return [(instance.mode.description, instance.last_exception)
            for instance in proxyserver.servers
            if not instance.is_running and instance.last_exception is not None]


def handler_count(proxyserver: Any) -> int:
    """mitmproxy's live connection handlers (one per client connection)."""
    return len(proxyserver.connections)


def close_client_left_open(proxyserver: Any, client_id: str) -> bool:
    """At the `client_disconnected` hook, close the client's socket if mitmproxy left it
    open; True when it did.

    mitmproxy closes a client's socket at the end of its reader task. When the upstream
    fails at once (socket() failing with EMFILE under an eager connection strategy), the
    failure cancels that task before it ever ran, so the socket stayed open forever: one
    file descriptor lost per such connection, until the proxy could accept nothing."""
    handler = proxyserver.connections.get(client_id)
    io = handler.transports.get(handler.client) if handler is not None else None
    transport = getattr(getattr(io, "writer", None), "transport", None)
    if transport is None or transport.is_closing():
        return False
    transport.close()
    return True


def opens_upstream_eagerly(proxyserver: Any, client_id: str) -> bool:
    """True when mitmproxy's reverse proxy layer opens this connection's upstream itself,
    as the client connects (connection strategy `eager`), before wirefault's layer runs;
    lazily, wirefault's layer opens it (and says so when it cannot)."""
    handler = proxyserver.connections.get(client_id)
    if handler is None:
        return False
    return getattr(handler.layer.context.options, "connection_strategy", None) == "eager"


def deliver_event(proxyserver: Any, client_id: str, event: Any) -> bool:
    """Feed `event` to the layer of a connection on mitmproxy's path, which carries out the
    commands the layer answers with. False when the connection is gone."""
    import asyncio

    handler = proxyserver.connections.get(client_id)
    if handler is None:
        return False
    # server_event is a coroutine only for its lock; with mitmproxy's eager task factory it
    # runs at once when the lock is free, so events keep the order they are delivered in.
    task = asyncio.ensure_future(handler.server_event(event))
    if not task.done():  # waiting for the lock: keep it alive until it ran
        _deliveries.add(task)
        task.add_done_callback(_deliveries.discard)
    return True


_deliveries: set[Any] = set()

ACCEPT_ERROR_EVERY = 10.0
"""Seconds between two log lines about failing accepts (the ones between are counted)."""


def rate_limit_accept_errors(loop: Any, every: float = ACCEPT_ERROR_EVERY) -> None:
    """Log a failing accept (EMFILE: out of file descriptors) in one line, then at most one
    line per `every` seconds with how many more failed, in place of mitmproxy's traceback
    for each: asyncio's accept loop reports every failed accept() of a burst (up to 100 per
    wake-up, about 10,000 lines for 1,000 connections past `ulimit -n`). Call it once
    mitmproxy's master runs (its exception handler is installed then)."""
    import logging

    logger = logging.getLogger("wirefault")
    previous = loop.get_exception_handler()
    state = {"next": 0.0, "missed": 0}

    def handle(loop: Any, context: dict) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = loop.time()
        if now < state["next"]:
            state["missed"] += 1
            return
        more = f" ({state['missed']} more since the last line)" if state["missed"] else ""
        logger.warning("wirefault: cannot accept connections: %s%s; they wait in the listen "
                       "queue (this line comes at most every %g s)", context.get("exception"),
                       more, every)
        state["next"], state["missed"] = now + every, 0

    loop.set_exception_handler(handle)


def is_raw_tcp_reverse_start(nextlayer: Any, bare_is_tcp: bool) -> bool:
    """True when this is the first layer decision of a TCP connection under a reverse proxy
    that relays raw TCP: `reverse:tcp://...`, or a target without a scheme
    (`reverse:HOST:PORT`, which mitmproxy reads as https) when `bare_is_tcp`.

    It holds whether or not mitmproxy's own chooser already decided (it runs first in the
    runner), and whatever the client sent first, a TLS ClientHello included."""
    from mitmproxy.proxy.mode_specs import ReverseMode

    client = nextlayer.context.client
    spec = client.proxy_mode
    if client.transport_protocol != "tcp" or not isinstance(spec, ReverseMode):
        return False
    raw_tcp = spec.scheme == "tcp" or (bare_is_tcp and "://" not in spec.data)
    return raw_tcp and _reverse_proxy_index(nextlayer) is not None


def discard_layer_choice(nextlayer: Any) -> None:
    """Forget the layers a chooser set for this first decision under a reverse proxy, before
    they saw any event. Building them had two effects, undone here: each joined the
    context's layer stack, and a TLS layer marked its connection as TLS (`conn.tls`; at a
    reverse proxy's start neither side is yet)."""
    index = _reverse_proxy_index(nextlayer)
    if nextlayer.layer is None or index is None:
        return
    context = nextlayer.context
    del context.layers[index + 1:]
    context.client.tls = context.server.tls = False
    nextlayer.layer = None


def _reverse_proxy_index(nextlayer: Any) -> int | None:
    """Where the reverse proxy layer whose first decision `nextlayer` is sits in the layer
    stack (anything after it was built by a chooser for this decision); None if none."""
    from mitmproxy.proxy.layers import modes

    for index, layer in enumerate(nextlayer.context.layers):
        if isinstance(layer, modes.ReverseProxy) and \
                getattr(layer, "child_layer", None) is nextlayer:
            return index
    return None


def _layer_choice_problems() -> list[str]:
    """What `is_raw_tcp_reverse_start` and `discard_layer_choice` rely on, if it moved."""
    from mitmproxy.connection import Connection
    from mitmproxy.proxy.context import Context
    from mitmproxy.proxy.layers import modes
    from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

    problems = []
    if "child_layer" not in modes.DestinationKnown.__annotations__ or \
            not issubclass(modes.ReverseProxy, modes.DestinationKnown):
        problems.append("ReverseProxy.child_layer is gone")
    if "scheme" not in ReverseMode.__annotations__ or "data" not in ProxyMode.__annotations__:
        problems.append("ReverseMode.scheme or ProxyMode.data is gone")
    if "tls" not in Connection.__annotations__:
        problems.append("Connection.tls is gone")
    if "layers" not in Context.__annotations__:
        problems.append("Context.layers is gone")
    return problems


_NEVER = 10**9
"""Seconds: an idle timeout no connection reaches (about 31 years)."""


async def _nothing() -> None:
    return None


class MitmEdge:
    """What wirefault's executor (relay_io.py) needs from mitmproxy, for one proxy."""

    def __init__(self, proxyserver: Callable[[], Any]) -> None:
        self._proxyserver = proxyserver

    def _handler(self, client_id: str) -> Any:
        return self._proxyserver().connections.get(client_id)

    def transport_of(self, client_id: str, connection: Any) -> Any:
        """The asyncio transport of one side, None before it is open or after it is gone."""
        handler = self._handler(client_id)
        io = handler.transports.get(connection) if handler is not None else None
        return getattr(io.writer, "transport", None) if io is not None else None

    def deliver(self, client_id: str, event: Any) -> None:
        deliver_event(self._proxyserver(), client_id, event)

    def end_reader(self, client_id: str, connection: Any) -> None:
        """A side is closed for good: end mitmproxy's reader task for it, which would wait
        for a cancellation (after an EOF) or for data that never comes (on the fast path),
        so that mitmproxy cleans the connection up at once."""
        handler = self._handler(client_id)
        io = handler.transports.get(connection) if handler is not None else None
        task = io.handler if io is not None else None
        if task is not None and not task.done():
            task.cancel("closed by wirefault")

    def disable_idle_timeout(self, client_id: str) -> None:
        """Stop mitmproxy's 600 s inactivity watchdog for this connection: a fault proxy
        adds no timeout nobody asked for (wirefault has its own, --idle-timeout)."""
        handler = self._handler(client_id)
        if handler is not None:
            watchdog = handler.timeout_watchdog
            # Its watch loop may be asleep already: whenever it wakes, it finds nothing to do.
            watchdog.callback = _nothing
            watchdog.timeout = _NEVER

    def take_over(self, client_id: str) -> dict[Any, Any] | None:
        return take_over_transports(self._proxyserver(), client_id)


# -- many proxies in one master (`wirefault serve`) ------------------------------------------
#
# Each proxy is one mode entry, `reverse:tcp://UPSTREAM@HOST:PORT`: mitmproxy's Proxyserver
# runs one listener (ServerInstance) per entry, keyed by the parsed spec, and tags every
# connection with its spec (`client.proxy_mode`). Changing the `mode` option while running
# starts the new entries and stops the removed ones (Proxyserver.configure -> Servers.update,
# a task); the others keep their listener.


def listener_states(proxyserver: Any) -> dict[str, tuple[tuple[Any, ...], Exception | None]]:
    """Every listener by its mode entry (`full_spec`): (its listen addresses, empty unless it
    runs; the exception it failed with, or None)."""
    return {instance.mode.full_spec: (tuple(instance.listen_addrs) if instance.is_running
                                      else (), instance.last_exception)
            for instance in proxyserver.servers}


async def listeners_updated(proxyserver: Any) -> None:
    """Wait until the listener update that a change of the `mode` option started is done
    (mitmproxy runs it as a task, `Proxyserver._update_task`)."""
    task = getattr(proxyserver, "_update_task", None)
    if task is not None and not task.done():
        await task


def handlers_of(proxyserver: Any, specs: set[str] | frozenset[str]) -> int:
    """mitmproxy's live connection handlers whose listener's mode entry is one of `specs`."""
    return sum(1 for handler in proxyserver.connections.values()
               if getattr(handler.client.proxy_mode, "full_spec", None) in specs)


class _StrategyOptions:
    """A connection's view of the options with its own `connection_strategy`."""

    def __init__(self, options: Any, strategy: str) -> None:
        object.__setattr__(self, "_options", options)
        object.__setattr__(self, "connection_strategy", strategy)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._options, name)


def set_connection_strategy(proxyserver: Any, client_id: str, strategy: str) -> bool:
    """Give one connection its own `connection_strategy` (an option mitmproxy has once per
    process): called from the `client_connected` hook, before its top layer starts; the
    layers read it from their context, which each child layer shares. False when the
    connection is unknown."""
    handler = proxyserver.connections.get(client_id)
    if handler is None:
        return False
    context = handler.layer.context
    if getattr(context.options, "connection_strategy", None) != strategy:
        base = getattr(context.options, "_options", context.options)
        context.options = _StrategyOptions(base, strategy)
    return True
