"""wirefault's relay: a sans-I/O mitmproxy layer that frames, decides and forwards.

Events in, commands out. Each read is framed with the connection's protocol; each frame is
recorded and judged by the rule in force; frames that pass are forwarded (the whole read at
once when nothing was held back), and a fault acts at the exact frame that triggered it.
A hold (connect_delay) pauses this connection alone with a `RequestWakeup`; cancel pauses
every connection of the proxy (proxy/pause.py), whose timer wakes each held layer. While a
connection is held it keeps reading until its backlog holds `BACKLOG_LIMIT` bytes, then
stops reading until the hold ends.

The layer only decides: every effect on the sockets is a command, carried out in the order
it is yielded by the connection's executor (relay_io.py), on mitmproxy's path and on the
fast path alike. Commands the executor does not know (opening the upstream, mitmproxy's
hooks) go to mitmproxy as usual.
"""

from __future__ import annotations

import logging
from collections import deque

from mitmproxy import tcp
from mitmproxy.connection import Connection, ConnectionState
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tcp import (
    TcpEndHook,
    TcpMessageHook,
    TcpMessageInjected,
    TcpStartHook,
)

from wirefault.protocols import Frame, FrameBatch

from .fast_relay import FastRelay
from .faults import ConnectionState as RuleState
from .faults import Decision, Verdict
from .recorder import RecorderSlot
from .relay_io import EXECUTED, RelayIO, ResetConnections, SetReading
from .runtime import ProxyRuntime


class _Closed:
    """A half-close that arrived while frames were held; replayed in order."""

    __slots__ = ("connection",)

    def __init__(self, connection: Connection) -> None:
        self.connection = connection


BACKLOG_LIMIT = 256 * 1024
"""Bytes a held connection reads ahead into its backlog before it stops reading."""


class WirefaultLayer(layer.Layer):
    def __init__(self, context: Context, runtime: ProxyRuntime) -> None:
        super().__init__(context)
        self.runtime = runtime
        session = runtime.protocol.new_session(runtime.max_frame)
        self._client_framer = session.client
        self._server_framer = session.server
        self.rule_state = RuleState()
        self.slot = RecorderSlot()
        self.backlog: deque[Frame | _Closed] = deque()
        self.held_frame: Frame | None = None
        """The frame that triggered a hold: forwarded unjudged when the hold ends."""
        self.hold: commands.RequestWakeup | None = None
        """This connection's own hold (connect_delay), woken by its own timer."""
        self.pause_token: commands.RequestWakeup | None = None
        """Set while the proxy-wide pause holds this connection; never yielded: the pause's
        timer delivers its Wakeup (`release_from_pause`)."""
        self.blocked = False
        """Either hold is on: frames go to the backlog."""
        self.backlog_bytes = 0
        self.reading_stopped = False
        """The backlog reached BACKLOG_LIMIT: reading waits for the hold to end."""
        self.start_pending = False
        """The connection started during a pause: it opens its upstream when released."""
        self.grace: commands.RequestWakeup | None = None
        self.dead = False
        self.relaying = False
        self.fast_relay: FastRelay | None = None
        self.io: RelayIO | None = None
        """The executor of this connection's commands; None when driven without sockets
        (the sans-I/O tests), and then the commands are yielded to the caller."""
        self.flow = (
            tcp.TCPFlow(context.client, context.server, True) if runtime.make_flows else None
        )

    # -- lifecycle -------------------------------------------------------------------------

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        """mitmproxy's entry point: what the executor carries out does not leave the layer."""
        io = self.io
        for command in super().handle_event(event):
            if io is not None and isinstance(command, EXECUTED):
                io.run(command)
            else:
                yield command

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        return self.start(event)

    def start(self, event: events.Event) -> layer.CommandGenerator[None]:
        assert isinstance(event, events.Start)
        self._handle_event = self.relay  # type: ignore[method-assign]
        self.relaying = True
        self.io = self.runtime.new_io(self)
        self.runtime.pause.join(self)
        if self.pause_token:  # a pause is on: not into the relay until it ends
            self.start_pending = True
            return
        yield from self._open()

    def _open(self) -> layer.CommandGenerator[None]:
        if self.flow:
            yield TcpStartHook(self.flow)
        if self.context.server.timestamp_start is None:
            err = yield commands.OpenConnection(self.context.server)
            if err:
                address = self.context.server.address
                yield commands.Log(
                    f"wirefault: cannot connect to upstream {_address(address)} for client "
                    f"{_address(self.context.client.peername)}: {err}", logging.WARNING)
                if self.flow:
                    self.flow.error = tcp.flow.Error(str(err))  # type: ignore[attr-defined]
                yield commands.CloseConnection(self.context.client)
                self._finish()
                return
        if self.runtime.fast_path and not self.flow:
            self._take_fast_path()

    def _take_fast_path(self) -> None:
        edge = self.runtime.edge
        transports = edge.take_over(self.context.client.id) if edge and self.io else None
        if transports is None:
            return
        assert self.io is not None
        self.fast_relay = FastRelay(
            self.handle_event, self.relay_read, self.context.client, transports, self.io)
        self.fast_relay.start()
        if self.reading_stopped:
            self.io.set_reading(False)

    def done(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from ()

    def _finish(self) -> None:
        self._handle_event = self.done  # type: ignore[method-assign]
        self.relaying = False
        self.runtime.pause.leave(self)

    # -- the proxy-wide pause (proxy/pause.py) -----------------------------------------------

    def hold_for_pause(self) -> None:
        if self.pause_token is not None or self.dead:
            return
        self.pause_token = commands.RequestWakeup(0)
        self.blocked = True

    def release_from_pause(self) -> None:
        token = self.pause_token
        if token is None:
            return
        event = events.Wakeup(token)
        if self.io is not None:
            self.io.deliver(event)
        else:
            self.runtime.deliver_event(self.context.client.id, event)

    def relay(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            yield from self._on_data(event.connection is self.context.client, event.data)
        elif isinstance(event, events.ConnectionClosed):
            if self.dead:
                yield from self._close_all()
            elif self.blocked or self.backlog:
                self.backlog.append(_Closed(event.connection))
            else:
                yield from self._on_closed(event.connection)
        elif isinstance(event, events.Wakeup):
            if event.command is self.hold:
                self.hold = None
                yield from self._unblocked()
            elif event.command is self.pause_token:
                self.pause_token = None
                yield from self._unblocked()
            elif event.command is self.grace:
                yield from self._close_all()
        elif isinstance(event, TcpMessageInjected):
            yield from self._on_data(event.message.from_client, event.message.content)

    # -- data ------------------------------------------------------------------------------

    def _on_data(self, from_client: bool, data: bytes) -> layer.CommandGenerator[None]:
        if self.dead:
            return
        if self.flow:
            yield from self._fire_message_hook(from_client, data)
        out = self._frame_and_judge(from_client, data)
        if type(out) is bytes:
            if out:
                yield commands.SendData(self._destination(from_client), out)
        else:
            yield from out  # type: ignore[misc]

    def relay_read(self, from_client: bool, data: bytes) -> bytes | list[commands.Command]:
        """The fast path's entry for one read: the bytes to forward to the other side when
        no frame triggers anything, else the commands to carry out."""
        if self.dead or not self.relaying:
            return b""
        return self._frame_and_judge(from_client, data)

    def _frame_and_judge(self, from_client: bool, data: bytes) -> bytes | list[commands.Command]:
        framer = self._client_framer if from_client else self._server_framer
        carried = framer.buffered
        batch = framer.feed_batch(data)
        if self.blocked or self.backlog:
            return self._hold_back(batch, len(data))
        whole = data if carried == 0 and framer.buffered == 0 else None
        return self._judge(batch, from_client, whole)

    def _hold_back(self, batch: FrameBatch, size: int) -> list[commands.Command]:
        """A read while held: into the backlog; past the limit, stop reading."""
        self.backlog.extend(batch)
        self.backlog_bytes += size
        if self.backlog_bytes > BACKLOG_LIMIT and not self.reading_stopped:
            self.reading_stopped = True
            return [SetReading(False)]
        return []

    def _judge(
        self, batch: FrameBatch, from_client: bool, whole_read: bytes | None
    ) -> bytes | list[commands.Command]:
        """Decide and record the frames of one direction.

        Returns the bytes to forward when every frame passes (the read itself when it held
        whole frames only), else the commands for the frame that triggered a fault."""
        found = self.runtime.engine.first_fault(batch, self.rule_state, from_client)
        recorder = self.runtime.recorder
        if found is None:
            recorder.record_batch(self.slot, batch)
            if whole_read is not None:
                return whole_read
            return batch.payload() if batch else b""
        index, decision = found
        frames = batch.frames()
        recorder.record_batch(self.slot, FrameBatch(frames[:index + 1]))
        return self._act(decision, frames, index, self._destination(from_client))

    def _act(
        self, decision: Decision, frames: list[Frame], index: int, dest: Connection
    ) -> list[commands.Command]:
        """Frame `index` triggered a fault: forward those before it, then act."""
        out: list[commands.Command] = []
        if index:
            out.append(commands.SendData(dest, b"".join([f.data for f in frames[:index]])))
        verdict = decision.verdict
        if verdict is Verdict.FORWARD:  # a Decision equal to FORWARD but not the singleton
            out.append(commands.SendData(dest, frames[index].data))
            out.extend(self._as_commands(
                self._judge(FrameBatch(frames[index + 1:]), frames[index].from_client, None),
                dest))
        elif verdict is Verdict.HOLD or verdict is Verdict.PAUSE_PROXY:
            self.held_frame = frames[index]
            self.backlog.extendleft(reversed(frames[index + 1:]))
            self.blocked = True
            if verdict is Verdict.HOLD:
                self.hold = commands.RequestWakeup(decision.delay)
                out.append(self.hold)
            else:
                self.runtime.pause.begin(decision.delay, self)
        elif verdict is Verdict.KILL:
            out.extend(self._kill(dest))
        else:
            out.extend(self._reset())
        return out

    def _unblocked(self) -> layer.CommandGenerator[None]:
        """A hold ended: once neither is left, start or carry on where the connection was."""
        if self.hold or self.pause_token or self.dead:
            return
        self.blocked = False
        self.backlog_bytes = 0
        if self.reading_stopped:
            self.reading_stopped = False
            yield SetReading(True)
        if self.start_pending:
            self.start_pending = False
            yield from self._open()
        yield from self._release()

    def _release(self) -> layer.CommandGenerator[None]:
        """Forward the held frame as it is, then judge the backlog until a new hold."""
        held, self.held_frame = self.held_frame, None
        if held is not None:
            yield commands.SendData(self._destination(held.from_client), held.data)
        while self.backlog and not self.blocked and not self.dead:
            item = self.backlog.popleft()
            if isinstance(item, _Closed):
                yield from self._on_closed(item.connection)
            else:
                yield from self._as_commands(
                    self._judge(FrameBatch([item]), item.from_client, None),
                    self._destination(item.from_client))

    @staticmethod
    def _as_commands(
        out: bytes | list[commands.Command], dest: Connection
    ) -> list[commands.Command]:
        if type(out) is bytes:
            return [commands.SendData(dest, out)] if out else []
        return out  # type: ignore[return-value]

    def _destination(self, from_client: bool) -> Connection:
        return self.context.server if from_client else self.context.client

    def _fire_message_hook(self, from_client: bool, data: bytes) -> layer.CommandGenerator[None]:
        assert self.flow is not None
        self.flow.messages.append(tcp.TCPMessage(from_client, data))
        yield TcpMessageHook(self.flow)
        excess = len(self.flow.messages) - self.runtime.max_flow_messages
        if excess > 0:
            del self.flow.messages[:excess]

    # -- faults ----------------------------------------------------------------------------

    def _kill(self, dest: Connection) -> layer.CommandGenerator[None]:
        """FIN to the side the frame was going to; the other side follows when it closes."""
        self.dead = True
        self.backlog.clear()
        self.held_frame = None
        other = self.context.client if dest is self.context.server else self.context.server
        # We learn that dest closed only while it can still read; else nothing is left to wait for.
        will_hear_close = bool(dest.state & ConnectionState.CAN_READ)
        yield commands.CloseTcpConnection(dest, half_close=True)
        if not will_hear_close or other.state is ConnectionState.CLOSED:
            yield from self._close_all()
        else:
            self.grace = commands.RequestWakeup(self.runtime.kill_grace)
            yield self.grace

    def _reset(self) -> layer.CommandGenerator[None]:
        """RST both sides, after the frames before the trigger (the executor sees to it)."""
        self.dead = True
        self.backlog.clear()
        self.held_frame = None
        yield ResetConnections()
        yield from self._close_all()

    def _close_all(self) -> layer.CommandGenerator[None]:
        self._finish()
        for connection in (self.context.server, self.context.client):
            if connection.state is not ConnectionState.CLOSED:
                yield commands.CloseConnection(connection)
        if self.flow:
            yield TcpEndHook(self.flow)
            self.flow.live = False

    def _on_closed(self, connection: Connection) -> layer.CommandGenerator[None]:
        """A side closed: half-close the other, or finish when neither can read (as TCPLayer)."""
        client, server = self.context.client, self.context.server
        if not ((client.state & ConnectionState.CAN_READ) or
                (server.state & ConnectionState.CAN_READ)):
            yield from self._close_all()
        else:
            other = server if connection is client else client
            yield commands.CloseTcpConnection(other, half_close=True)


def _address(address: tuple | None) -> str:
    return f"{address[0]}:{address[1]}" if address else "?"
