"""The one place wirefault reaches into mitmproxy's internals: its sockets.

mitmproxy's public API can close a connection (FIN) but not abort it. To send an RST we find
the connection handler the proxyserver addon keeps per client, take the asyncio transports it
holds for each side, set SO_LINGER to zero and abort them. The fast path (fast_relay.py)
takes the same transports over for an established connection. `check_compatible()` verifies that
the internals this relies on are still shaped as expected; a test calls it so an upgrade that
changes them fails loudly.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_LINGER_ZERO = struct.pack("ii", 1, 0)


def check_compatible() -> None:
    """Raise RuntimeError if mitmproxy's internals differ from what abort_with_rst needs."""
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
    from mitmproxy.proxy.mode_servers import ServerInstance

    if "last_exception" not in ServerInstance.__annotations__:
        problems.append("ServerInstance.last_exception is gone")
    if problems:
        raise RuntimeError("mitmproxy internals changed: " + "; ".join(problems))


def abort_with_rst(proxyserver: Any, client_id: str) -> bool:
    """Abort both sockets of the connection whose client has `client_id`, with an RST.

    Returns False when the connection is unknown (already gone)."""
    handler = proxyserver.connections.get(client_id)
    if handler is None:
        return False
    for io in list(handler.transports.values()):
        writer = io.writer
        if writer is None:
            continue
        sock = writer.get_extra_info("socket")
        try:
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError as exc:
            logger.debug("SO_LINGER failed: %s", exc)
        transport = getattr(writer, "transport", None)
        if transport is not None:
            transport.abort()
        else:
            writer.close()
    return True


def take_over_transports(
    proxyserver: Any, client_id: str
) -> tuple[dict[Any, Any], Callable[[], None], Callable[[], None]] | None:
    """Hand the asyncio transports of an established connection to wirefault's fast path.

    Returns (transports by mitmproxy Connection, on_activity, release) or None when the
    connection does not fit (unknown, not plain TCP, or not fully open). `release()` must be
    called once both sides are closed: it ends mitmproxy's own reader tasks so that mitmproxy
    cleans up the connection as usual.
    """
    handler = proxyserver.connections.get(client_id)
    if handler is None:
        return None
    transports: dict[Any, Any] = {}
    originals: list[Any] = []
    for connection, io in handler.transports.items():
        writer = io.writer
        transport = getattr(writer, "transport", None)
        if transport is None or not hasattr(transport, "set_protocol"):
            return None
        if connection.transport_protocol != "tcp" or transport.is_closing():
            return None
        transports[connection] = transport
        originals.append(transport.get_protocol())
    if len(transports) != 2:
        return None
    watchdog = handler.timeout_watchdog

    def release() -> None:
        # mitmproxy's reader tasks still wait on their stream readers: end them.
        for protocol in originals:
            with contextlib.suppress(Exception):
                protocol.eof_received()

    return transports, watchdog.register_activity, release


def listen_failures(proxyserver: Any) -> list[tuple[str, OSError | Exception]]:
    """The listeners that failed to start: (mode description, the exception)."""
    return [(instance.mode.description, instance.last_exception)
            for instance in proxyserver.servers
            if not instance.is_running and instance.last_exception is not None]


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


def set_reading(proxyserver: Any, client_id: str, reading: bool) -> None:
    """Pause or resume reading both sockets of a connection on mitmproxy's path."""
    handler = proxyserver.connections.get(client_id)
    if handler is None:
        return
    for io in list(handler.transports.values()):
        transport = getattr(io.writer, "transport", None)
        if transport is None or transport.is_closing():
            continue
        with contextlib.suppress(Exception):  # a socket closing under us: nothing to pause
            if reading:
                transport.resume_reading()
            else:
                transport.pause_reading()


def is_reverse_proxy_start(context: Any) -> bool:
    """True when a TCP connection's next layer is the first one under mitmproxy's reverse
    proxy mode layer (where mitmproxy would choose TLS or TCP from the mode's scheme)."""
    from mitmproxy.proxy.layers import modes

    return (context.client.transport_protocol == "tcp" and bool(context.layers)
            and isinstance(context.layers[-1], modes.ReverseProxy))
