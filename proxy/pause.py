"""The proxy-wide pause behind `cancel(pid)`.

Citus's failure-testing script carries out `cancel(pid)` as SIGINT followed by a 100 ms sleep
in the proxy's only thread, so for those 100 ms nothing crosses the proxy on any connection,
and the expected outputs of Citus's suites depend on it (a coordinator's other connections
to the same worker are held too). wirefault does the same without ever blocking its loop:
every connection of the proxy stops reading and keeps what it already read in its backlog,
a connection that starts during the pause waits before it opens its upstream, and one timer
ends the pause. Then the connections are released one after the other in the order they
were held, the triggering one first (its held frame is the first to be forwarded); each
forwards its backlog in its original order.

The pause knows connections only through the small interface below, so it needs neither
mitmproxy nor sockets (the layer implements it; unit tests drive it with fakes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol


class Pausable(Protocol):
    def hold_for_pause(self) -> None:
        """Stop forwarding and reading until `release_from_pause`."""

    def release_from_pause(self) -> None:
        """Forward what was held, in order, and read again."""


def _call_later(delay: float, callback: Callable[[], None]) -> Any:
    return asyncio.get_running_loop().call_later(delay, callback)


class ProxyPause:
    """Every live connection of one proxy, and whether they are all paused."""

    def __init__(self, call_later: Callable[[float, Callable[[], None]], Any] = _call_later
                 ) -> None:
        self.call_later = call_later
        self.connections: dict[Pausable, None] = {}
        """Live connections in the order they started (a dict is an ordered set)."""
        self.active = False
        self._held: list[Pausable] = []

    def join(self, connection: Pausable) -> None:
        """A connection starts; during a pause it is held from the start."""
        self.connections[connection] = None
        if self.active:
            self._held.append(connection)
            connection.hold_for_pause()

    def leave(self, connection: Pausable) -> None:
        self.connections.pop(connection, None)

    def begin(self, seconds: float, trigger: Pausable) -> None:
        """Hold every connection for `seconds`, `trigger` first in the release order."""
        self.active = True
        self._held = [trigger, *(c for c in self.connections if c is not trigger)]
        for connection in self._held:
            connection.hold_for_pause()
        self.call_later(seconds, self._end)

    def _end(self) -> None:
        self.active = False
        held, self._held = self._held, []
        for connection in held:
            connection.release_from_pause()
            if self.active:
                # What it released began a new pause, which holds every connection again,
                # those not released yet included: they are released when that one ends.
                return
