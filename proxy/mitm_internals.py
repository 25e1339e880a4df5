"""The one place wirefault reaches into mitmproxy's internals: sockets, for a real RST.

mitmproxy's public API can close a connection (FIN) but not abort it. To send an RST we find
the connection handler the proxyserver addon keeps per client, take the asyncio transports it
holds for each side, set SO_LINGER to zero and abort them. `check_compatible()` verifies that
the internals this relies on are still shaped as expected; a test calls it so an upgrade that
changes them fails loudly.
"""

from __future__ import annotations

import logging
import socket
import struct
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
