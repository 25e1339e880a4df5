"""The fast path: drive an established connection's layer straight from asyncio transports.

mitmproxy's connection handler costs tens of microseconds per read (a stream reader, a task
switch, locks, a write-drain pass over every socket, the layer stack). Once a connection is
established and nothing needs mitmproxy's hooks, wirefault moves both sockets to this driver:
the transports call it back on each read, it feeds the same sans-I/O layer, and executes the
commands the layer yields itself. The layer's logic is unchanged; only the I/O edge moves.
Back-pressure is the relay's usual one: when one side's write buffer is full, stop reading
the other side until it drains.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from mitmproxy.connection import Connection, ConnectionState
from mitmproxy.proxy import commands, events

logger = logging.getLogger(__name__)


_OPEN = ConnectionState.OPEN
_CAN_WRITE = ConnectionState.CAN_WRITE


class _Side(asyncio.Protocol):
    """One socket's protocol while the fast path owns it.

    A read is relayed here, not through a dict keyed by mitmproxy's `Connection` (whose hash
    is Python code) nor with `Flag` arithmetic on its state (an enum call), both of which
    cost as much per read as the rest of the relay."""

    __slots__ = ("connection", "from_client", "peer", "relay", "transport")

    def __init__(self, relay: FastRelay, connection: Connection,
                 transport: asyncio.Transport, from_client: bool) -> None:
        self.relay = relay
        self.connection = connection
        self.transport = transport
        self.from_client = from_client
        self.peer: _Side = self

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        relay.on_activity()
        out = relay.relay_read(self.from_client, data)
        if type(out) is bytes:
            peer = self.peer
            state = peer.connection.state
            if out and (state is _OPEN or state & _CAN_WRITE):
                peer.transport.write(out)
        else:
            relay.execute(out)  # type: ignore[arg-type]

    def eof_received(self) -> bool:
        self.relay.eof_received(self.connection)
        return True  # keep the transport open: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.connection_lost(self.connection)

    def pause_writing(self) -> None:
        self.relay.pause_reading_toward(self.connection)

    def resume_writing(self) -> None:
        self.relay.resume_reading_toward(self.connection)


class FastRelay:
    """Owns both transports of one connection until both sides are closed.

    `handle_event(event)` is the layer's event entry point (returns its commands);
    `relay_read(from_client, data)` its shortcut for reads (the bytes to forward, or commands);
    `on_activity` keeps mitmproxy's idle watchdog informed; `on_finished` hands the
    connection back to mitmproxy for its own cleanup once both sides are closed.
    """

    def __init__(
        self,
        handle_event: Callable[[events.Event], Iterable[commands.Command]],
        relay_read: Callable[[bool, bytes], bytes | list[commands.Command]],
        client: Connection,
        transports: dict[Connection, asyncio.Transport],
        on_activity: Callable[[], None],
        on_finished: Callable[[], None],
    ) -> None:
        self.handle_event = handle_event
        self.relay_read = relay_read
        self.client = client
        self.transports = transports
        self.on_activity = on_activity
        self.on_finished = on_finished
        self.finished = False
        self.sides = {conn: _Side(self, conn, t, conn is client)
                      for conn, t in transports.items()}
        first, second = self.sides.values()
        first.peer, second.peer = second, first
        self._timers: set[asyncio.TimerHandle] = set()
        self._held = False
        """A hold stopped reading both sides (see `set_reading`)."""
        self._backpressured: set[Connection] = set()
        """Sides not read because their peer's write buffer is full."""

    def start(self) -> None:
        for side in self.sides.values():
            side.transport.set_protocol(side)
            if not side.transport.is_reading():
                side.transport.resume_reading()

    def set_reading(self, reading: bool) -> None:
        """Stop reading both sides for a hold, or read again those back-pressure allows."""
        self._held = not reading
        for connection, transport in self.transports.items():
            if transport.is_closing():
                continue
            if not reading:
                transport.pause_reading()
            elif connection not in self._backpressured:
                transport.resume_reading()

    def deliver(self, event: events.Event) -> None:
        """Feed an event from outside the transports (a pause ending) and carry it out."""
        if not self.finished:
            self.execute(self.handle_event(event))

    # -- transport callbacks ----------------------------------------------------------------

    def eof_received(self, connection: Connection) -> None:
        connection.state &= ~ConnectionState.CAN_READ
        self.execute(self.handle_event(events.ConnectionClosed(connection)))
        self._check_finished()

    def connection_lost(self, connection: Connection) -> None:
        was_readable = bool(connection.state & ConnectionState.CAN_READ)
        connection.state = ConnectionState.CLOSED
        if was_readable:
            self.execute(self.handle_event(events.ConnectionClosed(connection)))
        self._check_finished()

    def pause_reading_toward(self, connection: Connection) -> None:
        for other, transport in self.transports.items():
            if other is not connection and not transport.is_closing():
                self._backpressured.add(other)
                transport.pause_reading()

    def resume_reading_toward(self, connection: Connection) -> None:
        for other, transport in self.transports.items():
            if other is not connection and not transport.is_closing():
                self._backpressured.discard(other)
                if not self._held:
                    transport.resume_reading()

    # -- commands ---------------------------------------------------------------------------

    def execute(self, cmds: Iterable[commands.Command]) -> None:
        for command in cmds:
            if type(command) is commands.SendData:
                transport = self.transports.get(command.connection)
                if (transport is not None and not transport.is_closing()
                        and command.connection.state & ConnectionState.CAN_WRITE):
                    transport.write(command.data)
            elif isinstance(command, commands.CloseTcpConnection) and command.half_close:
                self._half_close(command.connection)
            elif isinstance(command, commands.CloseConnection):
                self._close(command.connection)
            elif isinstance(command, commands.RequestWakeup):
                self._wake_later(command)
            elif isinstance(command, commands.Log):
                logger.log(command.level, command.message)
            else:
                logger.error("fast path: unexpected command %r", command)
        self._check_finished()

    def _half_close(self, connection: Connection) -> None:
        if not connection.state & ConnectionState.CAN_WRITE:
            return
        transport = self.transports[connection]
        try:
            if not transport.is_closing() and transport.can_write_eof():
                transport.write_eof()
        except OSError:
            connection.state = ConnectionState.CLOSED
        else:
            connection.state &= ~ConnectionState.CAN_WRITE
        if connection.state is ConnectionState.CLOSED:
            transport.close()

    def _close(self, connection: Connection) -> None:
        connection.state = ConnectionState.CLOSED
        transport = self.transports[connection]
        if not transport.is_closing():
            transport.close()

    def _wake_later(self, request: commands.RequestWakeup) -> None:
        def wake() -> None:
            self._timers.discard(handle)
            if not self.finished:
                self.execute(self.handle_event(events.Wakeup(request)))

        handle = asyncio.get_running_loop().call_later(request.delay, wake)
        self._timers.add(handle)

    def _check_finished(self) -> None:
        if self.finished:
            return
        if all(conn.state is ConnectionState.CLOSED for conn in self.transports):
            self.finished = True
            for handle in self._timers:
                handle.cancel()
            self._timers.clear()
            self.on_finished()
