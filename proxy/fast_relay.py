"""The fast path: read an established connection's sockets straight from asyncio transports.

mitmproxy's connection handler costs tens of microseconds per read (a stream reader, a task
switch, locks, a write-drain pass over every socket, the layer stack). Once a connection is
established and nothing needs mitmproxy's hooks, wirefault moves both sockets' protocols to
this module: the transports call it back on each read, it feeds the same sans-I/O layer, and
hands what the layer answers to the connection's executor (relay_io.py), the same one that
carries out the layer's commands on mitmproxy's path. Only the reading moves; how a
connection writes, closes, resets, holds and pauses is the executor's, whichever path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from mitmproxy.connection import Connection, ConnectionState
from mitmproxy.proxy import commands, events

from .relay_io import RelayIO

logger = logging.getLogger(__name__)


_OPEN = ConnectionState.OPEN
_CAN_READ = ConnectionState.CAN_READ
_CAN_WRITE = ConnectionState.CAN_WRITE
_CLOSED = ConnectionState.CLOSED


class _Side(asyncio.Protocol):
    """One socket's protocol while the fast path reads it.

    A read is relayed here, not through a dict keyed by mitmproxy's `Connection` (whose hash
    is Python code) nor with `Flag` arithmetic on its state (an enum call), both of which
    cost as much per read as the rest of the relay."""

    __slots__ = ("connection", "from_client", "io", "peer", "relay", "transport")

    def __init__(self, relay: FastRelay, connection: Connection,
                 transport: asyncio.Transport, from_client: bool) -> None:
        self.relay = relay
        self.io = relay.io
        self.connection = connection
        self.transport = transport
        self.from_client = from_client
        self.peer: _Side = self

    def data_received(self, data: bytes) -> None:
        self.io.active = True
        out = self.relay.relay_read(self.from_client, data)
        if type(out) is bytes:
            peer = self.peer
            state = peer.connection.state
            if out and (state is _OPEN or state & _CAN_WRITE):
                peer.transport.write(out)
        else:
            self.io.run_all(out)  # type: ignore[arg-type]

    def eof_received(self) -> bool:
        self.relay.side_ended(self.connection, lost=False)
        return True  # keep the transport open: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.side_ended(self.connection, lost=True)

    def pause_writing(self) -> None:
        self.io.writing_paused(self.connection)

    def resume_writing(self) -> None:
        self.io.writing_resumed(self.connection)


class FastRelay:
    """Reads both transports of one connection until both sides are closed.

    `handle_event(event)` is the layer's event entry point (its commands are carried out by
    the executor as they are yielded); `relay_read(from_client, data)` its shortcut for
    reads (the bytes to forward, or commands for the executor).
    """

    def __init__(
        self,
        handle_event: Callable[[events.Event], Iterable[commands.Command]],
        relay_read: Callable[[bool, bytes], bytes | list[commands.Command]],
        client: Connection,
        transports: dict[Connection, asyncio.Transport],
        io: RelayIO,
    ) -> None:
        self.handle_event = handle_event
        self.relay_read = relay_read
        self.io = io
        self.transports = transports
        self.sides = [_Side(self, conn, t, conn is client) for conn, t in transports.items()]
        first, second = self.sides
        first.peer, second.peer = second, first

    def start(self) -> None:
        """Read the sockets from now on; the executor finds them here, and events for the
        layer (timers, a pause ending) are delivered here."""
        self.io.transport_of = self.transports.get
        self.io.deliver = self.deliver
        for side in self.sides:
            side.transport.set_protocol(side)
            if side.connection.state & _CAN_READ and not side.transport.is_reading():
                side.transport.resume_reading()

    def deliver(self, event: events.Event) -> None:
        if self.io.finished:
            return
        for command in self.handle_event(event):
            logger.error("fast path: unexpected command %r", command)

    def side_ended(self, connection: Connection, lost: bool) -> None:
        """End of file (`lost` False) or the socket gone: tell the layer once it can read no
        more, and the executor that a lost side can take no writes."""
        was_readable = bool(connection.state & _CAN_READ)
        if lost:
            self.io.lost(connection)
        else:
            connection.state &= ~_CAN_READ
        if was_readable:
            self.deliver(events.ConnectionClosed(connection))
        if not lost and connection.state is _CLOSED and not self.io.closed(connection):
            # Its writing ended before (a half-close passed on) and now its reading: CLOSED
            # for the layer, which closes only what is not, so close the socket here (on
            # mitmproxy's path its reader task does): else one descriptor per connection
            # whose upstream closed first stayed open for good.
            self.io.run(commands.CloseConnection(connection))
