"""The one implementation of what a relayed connection does to its sockets.

The layer (layer.py) decides, as a pure function of events, and yields commands; this class
carries them out on the connection's two asyncio transports, in the order they were
yielded, on either path a connection may take: the fast path (fast_relay.py reads the
sockets itself) and mitmproxy's path (mitmproxy's handler reads them and calls the layer).
Writing, half-closing, closing, resetting with RST, timers, pausing reads for a hold and
for back-pressure, and the idle timeout all live here, so both paths behave alike.

What it needs from its owner: how to find a connection's transport (mitmproxy opens the
server side after the layer starts), how to hand an event back to the layer (a timer
firing, a pause ending), and what to do once a side is closed for good (end mitmproxy's
reader task of that side, so mitmproxy cleans the connection up at once).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios
from collections.abc import Callable, Iterable

from mitmproxy.connection import Connection, ConnectionState
from mitmproxy.proxy import commands, events

from .mitm_internals import keep_paused

logger = logging.getLogger("wirefault")

_CLOSED = ConnectionState.CLOSED
_CAN_READ = ConnectionState.CAN_READ
_CAN_WRITE = ConnectionState.CAN_WRITE
_LINGER_ZERO = struct.pack("ii", 1, 0)
FLUSH_POLL_SECONDS = 0.001
"""How often a reset looks whether the data before it has left (it waits for that)."""
IDLE_CHECKS = 4
"""An idle timeout is checked this many times per period: a connection is closed after
between 1 and 1 + 1/IDLE_CHECKS periods without a read."""


class ResetConnections(commands.Command):
    """Abort both sides with a TCP RST, once the data yielded before it has left."""

    def __repr__(self) -> str:
        return "ResetConnections()"


class SetReading(commands.Command):
    """Stop (False) or resume (True) reading one side (both when `connection` is None):
    the back-pressure of frames waiting in the layer."""

    def __init__(self, reading: bool, connection: Connection | None = None) -> None:
        self.reading = reading
        self.connection = connection

    def __repr__(self) -> str:
        side = "" if self.connection is None else f", {self.connection.id[:8]}"
        return f"SetReading({self.reading}{side})"


class SendCancelRequest(commands.Command):
    """`delay` seconds from now, open a connection of the proxy's own to the upstream and
    send `payload` on it (PostgreSQL's CancelRequest), then close it."""

    def __init__(self, payload: bytes, delay: float) -> None:
        self.payload = payload
        self.delay = delay

    def __repr__(self) -> str:
        return f"SendCancelRequest({len(self.payload)} bytes, after {self.delay:g} s)"


EXECUTED = (commands.SendData, commands.CloseTcpConnection, commands.CloseConnection,
            commands.RequestWakeup, commands.Log, ResetConnections, SetReading,
            SendCancelRequest)
"""The commands RelayIO carries out; a layer's other commands go to mitmproxy."""

TransportOf = Callable[[Connection], "asyncio.Transport | None"]


class RelayIO:
    def __init__(
        self,
        client: Connection,
        server: Connection,
        transport_of: TransportOf,
        deliver: Callable[[events.Event], None],
        on_side_closed: Callable[[Connection], None],
        reset_grace: float = 2.0,
        idle_timeout: float | None = None,
    ) -> None:
        self.client = client
        self.server = server
        self.transport_of = transport_of
        self.deliver = deliver
        self.on_side_closed = on_side_closed
        self.reset_grace = reset_grace
        self.finished = False
        self.active = True
        """Set by every read; the idle timer clears it (cheaper than a clock per read)."""
        self._held: set[Connection] = set()
        """Sides not read because frames from them wait in the layer."""
        self._backpressured: set[Connection] = set()
        """Sides not read because the other side's write buffer is full."""
        self._timers: set[asyncio.TimerHandle] = set()
        self._released: set[Connection] = set()
        self._idle_checks = 0
        self._idle_timeout = idle_timeout
        if idle_timeout:
            self._later(idle_timeout / IDLE_CHECKS, self._check_idle)

    # -- carrying out commands ---------------------------------------------------------------

    def run(self, command: commands.Command) -> None:
        kind = type(command)
        if kind is commands.SendData:
            self._send(command.connection, command.data)  # type: ignore[attr-defined]
        elif kind is commands.CloseTcpConnection and command.half_close:  # type: ignore
            self._half_close(command.connection)  # type: ignore[attr-defined]
        elif kind is commands.CloseConnection or kind is commands.CloseTcpConnection:
            self._close(command.connection)  # type: ignore[attr-defined]
        elif kind is commands.RequestWakeup:
            self._wake_later(command)  # type: ignore[arg-type]
        elif kind is commands.Log:
            logger.log(command.level, command.message)  # type: ignore[attr-defined]
        elif kind is ResetConnections:
            # Closed for the layer at once (nothing more is written, no FIN follows); the
            # sockets are aborted once what was written before has left.
            self.client.state = self.server.state = _CLOSED
            self._reset_when_flushed(asyncio.get_running_loop().time() + self.reset_grace)
        elif kind is SetReading:
            self.set_reading(command.reading, command.connection)  # type: ignore[attr-defined]
        elif kind is SendCancelRequest:
            self._later(command.delay, lambda: self._cancel_upstream(command.payload))  # type: ignore[attr-defined]
        else:
            raise TypeError(f"RelayIO cannot carry out {command!r}")
        self._check_finished()

    def run_all(self, cmds: Iterable[commands.Command]) -> None:
        for command in cmds:
            self.run(command)

    def _send(self, connection: Connection, data: bytes) -> None:
        if not connection.state & _CAN_WRITE:
            return  # that side is closed for writing: nothing can reach it any more
        transport = self.transport_of(connection)
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _half_close(self, connection: Connection) -> None:
        if not connection.state & _CAN_WRITE:
            return
        transport = self.transport_of(connection)
        try:
            if transport is not None and not transport.is_closing() and \
                    transport.can_write_eof():
                transport.write_eof()
        except OSError:
            connection.state = _CLOSED
        else:
            connection.state &= ~_CAN_WRITE
        if connection.state is _CLOSED:
            self._close(connection)
        else:
            self._writes_ended(connection)

    def _close(self, connection: Connection) -> None:
        connection.state = _CLOSED
        transport = self.transport_of(connection)
        if transport is not None and not transport.is_closing():
            transport.close()  # asyncio sends what is buffered first
        self._writes_ended(connection)
        self._release(connection)

    def _reset_when_flushed(self, deadline: float) -> None:
        """RST both sides, but only once what was written before has left this host (or the
        grace period is over), so the frames before the trigger arrive as with kill()."""
        loop = asyncio.get_running_loop()
        waiting = any(_unsent_bytes(t) for t in self._transports())
        if waiting and loop.time() < deadline:
            # Not `_later`: the connection counts as finished already, and its timers go.
            loop.call_later(FLUSH_POLL_SECONDS, self._reset_when_flushed, deadline)
            return
        for connection in (self.server, self.client):
            transport = self.transport_of(connection)
            if transport is not None and not transport.is_closing():
                sock = transport.get_extra_info("socket")
                with contextlib.suppress(OSError):
                    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                transport.abort()
            self._release(connection)
        self._check_finished()

    def closed(self, connection: Connection) -> bool:
        """True once this side was closed here (or its socket lost): nothing left to do."""
        return connection in self._released

    def lost(self, connection: Connection) -> None:
        """The socket of `connection` is gone (its transport told us)."""
        connection.state = _CLOSED
        self._writes_ended(connection)
        self._release(connection)
        self._check_finished()

    # -- reading: holds and back-pressure ---------------------------------------------------

    def set_reading(self, reading: bool, connection: Connection | None = None) -> None:
        """Stop reading a side (both when None) whose frames wait in the layer, or read it
        again if back-pressure allows."""
        for side in (self.client, self.server) if connection is None else (connection,):
            if reading:
                self._held.discard(side)
            else:
                self._held.add(side)
            if side.state & _CAN_READ and side not in self._backpressured:
                self._switch_reading(side, reading)

    def writing_paused(self, full: Connection) -> None:
        """`full`'s write buffer is over its high-water mark: stop reading its peer."""
        peer = self.server if full is self.client else self.client
        self._backpressured.add(peer)
        self._switch_reading(peer, False)

    def writing_resumed(self, drained: Connection) -> None:
        peer = self.server if drained is self.client else self.client
        self._lift_backpressure(peer)

    def _writes_ended(self, connection: Connection) -> None:
        """Nothing will be written to `connection` any more, so its full buffer no longer
        holds its peer back: read the peer again (what it sends is dropped), or a peer that
        waits for us to read would never see the close."""
        peer = self.server if connection is self.client else self.client
        self._lift_backpressure(peer)

    def _lift_backpressure(self, connection: Connection) -> None:
        if connection in self._backpressured:
            self._backpressured.discard(connection)
            if connection not in self._held:
                self._switch_reading(connection, True)

    def _switch_reading(self, connection: Connection, reading: bool) -> None:
        transport = self.transport_of(connection)
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(RuntimeError):  # uvloop: a transport being torn down
            if reading:
                transport.resume_reading()
            else:
                transport.pause_reading()
                keep_paused(transport)

    # -- the proxy's own connections ---------------------------------------------------------

    def _cancel_upstream(self, payload: bytes) -> None:
        address = self.server.peername or self.server.address
        if address is None:
            logger.warning("wirefault: cancel(): the upstream's address is not known")
            return
        task = asyncio.ensure_future(_send_and_close(address[0], address[1], payload))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    # -- timers ------------------------------------------------------------------------------

    def _wake_later(self, request: commands.RequestWakeup) -> None:
        self._later(request.delay, lambda: self.deliver(events.Wakeup(request)))

    def _later(self, delay: float, callback: Callable[[], None]) -> None:
        def fire() -> None:
            self._timers.discard(handle)
            if not self.finished:
                callback()

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    def _check_idle(self) -> None:
        assert self._idle_timeout
        if self.active:
            self.active = False
            self._idle_checks = 0
        else:
            self._idle_checks += 1
        if self._idle_checks < IDLE_CHECKS:
            self._later(self._idle_timeout / IDLE_CHECKS, self._check_idle)
            return
        logger.warning("wirefault: closing the connection of client %s after %g s without "
                       "traffic (--idle-timeout)", _address(self.client.peername),
                       self._idle_timeout)
        for connection in (self.server, self.client):
            if connection.state is not _CLOSED:
                self._close(connection)
        self._check_finished()

    # -- the end -----------------------------------------------------------------------------

    def _release(self, connection: Connection) -> None:
        if connection not in self._released:
            self._released.add(connection)
            self.on_side_closed(connection)

    def _transports(self) -> list[asyncio.Transport]:
        found = (self.transport_of(c) for c in (self.client, self.server))
        return [t for t in found if t is not None and not t.is_closing()]

    def _check_finished(self) -> None:
        if self.finished:
            return
        if self.client.state is _CLOSED and self.server.state is _CLOSED:
            self.finished = True
            for handle in self._timers:
                handle.cancel()
            self._timers.clear()


_BACKGROUND: set[asyncio.Future] = set()
"""Cancel requests under way (a task nobody references may be collected mid-flight)."""
CANCEL_TIMEOUT = 10.0


async def _send_and_close(host: str, port: int, payload: bytes) -> None:
    """Send one cancel request; the server closes the connection once it has read it."""
    writer = None
    try:
        async with asyncio.timeout(CANCEL_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(payload)
            await writer.drain()
            await reader.read()  # the server answers nothing and closes
    except (OSError, TimeoutError) as exc:
        logger.warning("wirefault: cancel(): cannot send the cancel request to %s:%s: %s",
                       host, port, exc)
    finally:
        if writer is not None:
            writer.close()


def _unsent_bytes(transport: asyncio.Transport) -> int:
    """Bytes written to the transport that have not left: its buffer and the socket's."""
    pending = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        count = array.array("i", [0])
        with contextlib.suppress(OSError, ValueError):
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, count)
            pending += count[0]
    return pending


def _address(address: tuple | None) -> str:
    return f"{address[0]}:{address[1]}" if address else "?"
