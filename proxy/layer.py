"""wirefault's relay: a sans-I/O mitmproxy layer that frames, decides and forwards.

Events in, commands out. Each read is framed with the connection's protocol; each frame is
recorded and judged by the faults in force; frames that pass are forwarded (the whole read
at once when nothing was held back), and a fault acts at the exact frame that triggered it.

Each direction is a `Lane` (lane.py). While a lane is free and unshaped a read goes straight
out; otherwise its frames wait in the lane's queue, in order, and leave when the lane is
free: a delay holds one lane (`RequestWakeup`), cancel(pid) pauses every connection of the
proxy (proxy/pause.py, whose timer wakes each held layer), hang() holds both lanes until
its fault is removed, throttle() paces a lane, slice() cuts a frame into pieces. A lane
keeps reading until its queue holds `BACKLOG_LIMIT` bytes, then stops reading its source
until the queue drains.

The layer only decides: every effect on the sockets is a command, carried out in the order
it is yielded by the connection's executor (relay_io.py), on mitmproxy's path and on the
fast path alike. Commands the executor does not know (opening the upstream, mitmproxy's
hooks) go to mitmproxy as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

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
from .faults import FORWARD, Decision, Verdict
from .faults.slice import Pieces, pieces_of
from .lane import Arrived, Closed, Held, Lane, Out
from .recorder import RecorderSlot
from .relay_io import EXECUTED, RelayIO, ResetConnections, SendCancelRequest, SetReading
from .rules import CONN_FAULT_NAME, Judgement
from .runtime import ProxyRuntime
from .whole_read import native_whole_reader, python_whole_read

logger = logging.getLogger("wirefault")

BACKLOG_LIMIT = 256 * 1024
"""Bytes a lane queues before it stops reading its source."""

_Commands = layer.CommandGenerator[None]


class WirefaultLayer(layer.Layer):
    def __init__(self, context: Context, runtime: ProxyRuntime) -> None:
        super().__init__(context)
        self.runtime = runtime
        session = runtime.protocol.new_session(runtime.max_frame)
        self._client_framer = session.client
        self._server_framer = session.server
        self._feed_whole_client = getattr(session.client, "feed_whole", None)
        self._feed_whole_server = getattr(session.server, "feed_whole", None)
        """The framers' `feed_whole`, where they have one (`relay_read`'s usual read)."""
        self.rule_state = runtime.new_rule_state(context.client.peername)
        self.agent = self.rule_state.agent
        self.slot = RecorderSlot()
        self.bytes_from_client = 0
        self.bytes_from_server = 0
        """Bytes read from each side (the metrics' traffic; frames are the rule state's)."""
        self.counted = False
        """Its traffic went into the proxy's totals (it finished)."""
        self.up = Lane.between(context.client, context.server, True)
        """Client to server."""
        self.down = Lane.between(context.server, context.client, False)
        self.timers: dict[commands.RequestWakeup, Callable[[], _Commands]] = {}
        """What each of this layer's wakeups does when it comes."""
        self.pause_token: commands.RequestWakeup | None = None
        """Set while the proxy-wide pause holds this connection; never yielded: the pause's
        timer delivers its Wakeup (`release_from_pause`)."""
        self.hung: set[int] = set()
        """The faults whose hang() holds both lanes (until they are removed)."""
        self.timeouts: dict[tuple[int, bool], tuple[str, commands.RequestWakeup | None]] = {}
        """drop(timeout_ms) faults that dropped frames here, by (fault id, from_client):
        the fault's name and the timer that closes the connection (None: never on time)."""
        self.slow_close: float | None = None
        self.close_held = False
        """slow_close already held the client's closing message (Terminate): the FIN
        behind it is not held a second time."""
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
        self._native_client = native_whole_reader(self, True)
        self._native_server = native_whole_reader(self, False)
        """The usual read in native code (`relay_read`), where it was built; they refer to
        this layer, so `_die` and `_finish` let them go."""

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
                line = upstream_failure_line(self.context.server.address,
                                             self.context.client.peername, err, time.monotonic())
                if line is not None:
                    yield commands.Log(line, logging.WARNING)
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
        for lane in (self.up, self.down):
            if lane.reading_stopped:
                self.io.set_reading(False, lane.source)

    def done(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from ()

    def _finish(self) -> None:
        self._handle_event = self.done  # type: ignore[method-assign]
        self.relaying = False
        self._native_client = self._native_server = None  # they refer to this layer
        if not self.counted:  # _close_all may come more than once
            self.counted = True
            self.runtime.pause.leave(self)
            self.runtime.traffic.add(self)

    # -- events from outside the connection: the proxy-wide pause, faults changing ----------

    def hold_for_pause(self) -> None:
        if self.pause_token is not None or self.dead:
            return
        self.pause_token = commands.RequestWakeup(0)
        self._update_lanes()

    def release_from_pause(self) -> None:
        token = self.pause_token
        if token is not None:
            self.timers[token] = self._pause_ended
            self._deliver(events.Wakeup(token))

    def faults_changed(self) -> None:
        """The faults in force changed: lift hangs whose fault is gone, and track what the
        faults now need to see."""
        engine = self.runtime.engine
        if self.agent is not None and engine.tracks_statements:
            self.agent.track_statements = True
        if self.hung and not all(engine.in_force(uid) for uid in self.hung):
            token = commands.RequestWakeup(0)
            self.timers[token] = self._hang_lifted
            self._deliver(events.Wakeup(token))
        if self.timeouts and not all(engine.in_force(uid) for uid, _ in self.timeouts):
            token = commands.RequestWakeup(0)
            self.timers[token] = self._timeouts_changed
            self._deliver(events.Wakeup(token))

    def shut_down(self) -> None:
        """Its proxy was disabled or removed: close both sides (Toxiproxy's "down")."""
        token = commands.RequestWakeup(0)
        self.timers[token] = self._close_everything
        self._deliver(events.Wakeup(token))

    def _deliver(self, event: events.Event) -> None:
        if self.io is not None:
            self.io.deliver(event)
        else:
            self.runtime.deliver_event(self.context.client.id, event)

    def _pause_ended(self) -> _Commands:
        self.pause_token = None
        self._update_lanes()
        if self.dead:
            return
        if self.start_pending:
            self.start_pending = False
            yield from self._open()
        yield from self._pump_both()

    def _hang_lifted(self) -> _Commands:
        self.hung = {uid for uid in self.hung if self.runtime.engine.in_force(uid)}
        self._update_lanes()
        yield from self._pump_both()

    # -- events ----------------------------------------------------------------------------

    def relay(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            yield from self._on_data(event.connection is self.context.client, event.data)
        elif isinstance(event, events.ConnectionClosed):
            if self.dead:
                yield from self._close_all()
                return
            lane = self.up if event.connection is self.context.client else self.down
            if lane.queue or lane.slow or self.slow_close is not None:
                lane.push_back([Closed(event.connection)])
                yield from self._pump(lane)
            else:
                yield from self._on_closed(event.connection)
        elif isinstance(event, events.Wakeup):
            action = self.timers.pop(event.command, None)  # type: ignore[arg-type]
            if action is not None:
                yield from action()
            elif event.command is self.grace:
                yield from self._close_all()
        elif isinstance(event, TcpMessageInjected):
            yield from self._on_data(event.message.from_client, event.message.content)

    def _timer(self, seconds: float, action: Callable[[], _Commands]
               ) -> commands.RequestWakeup:
        token = commands.RequestWakeup(seconds)
        self.timers[token] = action
        return token

    # -- data ------------------------------------------------------------------------------

    def _on_data(self, from_client: bool, data: bytes) -> layer.CommandGenerator[None]:
        if self.dead:
            return
        if self.flow:
            yield from self._fire_message_hook(from_client, data)
        out = self.relay_read(from_client, data)
        if type(out) is bytes:
            if out:
                yield commands.SendData(self._destination(from_client), out)
        else:
            yield from out  # type: ignore[misc]

    def relay_read(self, from_client: bool, data: bytes) -> bytes | list[commands.Command]:
        """The fast path's entry for one read: the bytes to forward to the other side when
        no frame triggers anything, else the commands to carry out."""
        native = self._native_client if from_client else self._native_server
        if native is not None:
            out = native(data)
            if out is not None:
                return out
        if self.dead or not self.relaying:
            return b""
        out = python_whole_read(self, from_client, data)
        if out is not None:
            return out
        return self._frame_and_judge(from_client, data)

    def _frame_and_judge(self, from_client: bool, data: bytes) -> bytes | list[commands.Command]:
        if from_client:
            framer, lane = self._client_framer, self.up
            self.bytes_from_client += len(data)
        else:
            framer, lane = self._server_framer, self.down
            self.bytes_from_server += len(data)
        carried = framer.buffered
        batch = framer.feed_batch(data)
        if lane.slow or lane.queue:
            return self._enqueue(lane, batch)
        agent = self.agent
        observe = agent is not None and (agent.watch_client if from_client
                                         else agent.watch_server)
        whole = data if carried == 0 and framer.buffered == 0 else None
        return self._judge(batch, lane, whole, observe)

    def _judge(self, batch: FrameBatch, lane: Lane, whole_read: bytes | None,
               observe: bool) -> bytes | list[commands.Command]:
        """Decide and record the frames of a read on a free lane (the agent seeing each
        first, with `observe`).

        Returns the bytes to forward when every frame passes (the read itself when it held
        whole frames only), else the commands for the frame that triggered a fault or that
        the agent rewrote (the frames after it wait in the lane, judged in turn)."""
        found = self.runtime.engine.first_fault(batch, self.rule_state, lane.from_client,
                                                observe)
        recorder = self.runtime.recorder
        if found is None:
            recorder.record_batch(self.slot, batch)
            if whole_read is not None:
                return whole_read
            return batch.payload() if batch else b""
        index, judgement = found
        frames = batch.frames()
        recorder.record_batch(self.slot, FrameBatch(frames[:index + 1]))
        out: list[commands.Command] = []
        if index:
            out.append(commands.SendData(lane.dest, b"".join([f.data for f in frames[:index]])))
        trigger = frames[index]
        if type(judgement) is bytes:  # the agent's bytes in its place; not judged yet
            decided = self.runtime.engine.decide(trigger, self.rule_state)
            out.extend(self._judge_observed(lane, trigger, judgement, decided, None))
        else:
            out.extend(self._act(lane, trigger, judgement, trigger.data))  # type: ignore[arg-type]
        if frames[index + 1:] and not self.dead:
            out.extend(self._enqueue(lane, frames[index + 1:]))
        return out

    def _enqueue(self, lane: Lane, frames: FrameBatch | list[Frame]) -> list[commands.Command]:
        """The frames wait in the lane behind what is there; past the limit, stop reading."""
        lane.push_back([Arrived(self.runtime.clock()), *frames])
        out = list(self._pump(lane))
        if lane.queued_bytes > BACKLOG_LIMIT and not lane.reading_stopped and not self.dead:
            lane.reading_stopped = True
            out.append(SetReading(False, lane.source))
        return out

    def _blocked(self, lane: Lane) -> bool:
        return bool(lane.hold or lane.busy or self.pause_token or self.hung)

    def _update_lanes(self) -> None:
        """A read takes the lane's queue while anything holds or shapes it."""
        everything = bool(self.pause_token or self.hung)
        # With slow_close on, client frames are judged one by one so a closing one is seen.
        closing = self.slow_close is not None and bool(self.runtime.protocol.closing_types)
        for lane in (self.up, self.down):
            lane.slow = everything or bool(lane.hold or lane.busy) or lane.shaped or (
                closing and lane.from_client)

    def _pump_both(self) -> _Commands:
        yield from self._pump(self.up)
        yield from self._pump(self.down)

    def _pump(self, lane: Lane) -> _Commands:
        """Send what waits in the lane, in order, until it is empty or held again."""
        queue = lane.queue
        while queue and not self.dead and not self._blocked(lane):
            item = queue[0]
            kind = type(item)
            if kind is Out:
                yield from self._send_out(lane)
            elif kind is Closed:
                if self.slow_close and not item.waited and not (  # type: ignore[union-attr]
                        self.close_held and item.connection is self.context.client):  # type: ignore[union-attr]
                    item.waited = True  # type: ignore[union-attr]
                    yield self._pace(lane, self.slow_close)
                    continue
                lane.pop()
                yield from self._on_closed(item.connection)  # type: ignore[union-attr]
            elif kind is Arrived:
                lane.pop()
                lane.arrived = item.at  # type: ignore[union-attr]
            elif kind is Held:
                lane.pop()
                yield from self._finish_frame(lane, item.frame, item.judgement,  # type: ignore[union-attr]
                                              item.data)  # type: ignore[union-attr]
            else:
                lane.pop()
                yield from self._judge_frame(lane, item)  # type: ignore[arg-type]
        if lane.reading_stopped and lane.queued_bytes <= BACKLOG_LIMIT // 2 and not self.dead:
            lane.reading_stopped = False
            yield SetReading(True, lane.source)

    def _judge_frame(self, lane: Lane, frame: Frame) -> _Commands:
        """One frame from the queue: the agent sees it, the faults judge it."""
        data = frame.data
        agent = self.agent
        if agent is not None and (agent.watch_client if frame.from_client
                                  else agent.watch_server):
            replacement = agent.observe(frame)
            if replacement is not None:
                data = replacement
        judgement = self.runtime.engine.judge_one(frame, self.rule_state)
        self.runtime.recorder.record(self.slot, frame)
        yield from self._judge_observed(lane, frame, data, judgement, lane.arrived)

    def _judge_observed(self, lane: Lane, frame: Frame, data: bytes,
                        judgement: Judgement | Decision, arrived: float | None
                        ) -> _Commands:
        """Send `data` (the frame's bytes, or what the agent put in their place) or act on
        the judgement (a hold counting from `arrived`; None: now)."""
        if judgement is FORWARD:
            if data and not (yield from self._hold_close(lane, frame, data)):
                yield from self._emit(lane, data)
        else:
            yield from self._act(lane, frame, judgement, data,  # type: ignore[arg-type]
                                 arrived)

    # -- acting on a frame -------------------------------------------------------------------

    def _act(self, lane: Lane, frame: Frame, judgement: Judgement, data: bytes,
             arrived: float | None = None) -> layer.CommandGenerator[None]:
        """The faults acted on `frame`: shape the lane, wait the holds, then end it. A hold
        counts from the frame's arrival (`arrived`, for a frame from the queue; else now)."""
        for name, action in judgement.fired:
            if name != CONN_FAULT_NAME:  # conn's rows stay as Citus's expected outputs show them
                self.runtime.recorder.mark(self.slot, frame.from_client, f"fault {name}: {action}")
        for decision in judgement.shaping:
            verdict = decision.verdict
            if verdict is Verdict.THROTTLE:
                lane.rate = decision.value
                lane.next_free = max(lane.next_free, self.runtime.clock())
            elif verdict is Verdict.LIMIT:
                lane.limit = decision.value if lane.limit is None else min(lane.limit,
                                                                            decision.value)
            elif verdict is Verdict.SLOW_CLOSE:
                self.slow_close = decision.value
            elif verdict is Verdict.CANCEL_BACKEND:
                yield from self._cancel_backend(decision.delay)
        self._update_lanes()
        if judgement.pause or judgement.hold:
            lane.push_front([Held(frame, judgement.after_holds(), data)])
            if judgement.hold:
                hold = judgement.hold
                if arrived is not None:
                    hold = max(0.0, arrived + hold - self.runtime.clock())
                lane.hold = self._timer(hold, lambda: self._hold_ended(lane))
                yield lane.hold
            if judgement.pause:
                self.runtime.pause.begin(judgement.pause, self)
            self._update_lanes()
            return
        yield from self._finish_frame(lane, frame, judgement, data)

    def _hold_ended(self, lane: Lane) -> _Commands:
        lane.hold = None
        self._update_lanes()
        yield from self._pump(lane)

    def _finish_frame(self, lane: Lane, frame: Frame, judgement: Judgement, data: bytes
                      ) -> _Commands:
        """What ends the frame, once its holds are over."""
        end = judgement.end
        verdict = end.verdict
        if verdict is Verdict.FORWARD or verdict is Verdict.PASS:
            pieces = None
            for decision in judgement.shaping:
                if decision.verdict is Verdict.SLICE:
                    pieces = decision.value
            if (yield from self._hold_close(lane, frame, data)):
                return
            for _ in range(1 + judgement.copies):
                yield from self._emit(lane, data, pieces)
        elif verdict is Verdict.DROP:
            if end.value is not None:  # drop(timeout_ms): Toxiproxy's timeout
                name = judgement.fired[-1][0]  # the fault that ended the walk
                yield from self._timing_out(lane, judgement.end_fault, name, end.value)
        elif verdict is Verdict.KILL:
            yield from self._kill(lane.dest)
        elif verdict is Verdict.RESET:
            if end.value:  # reset(after_ms): this lane stops here, both are reset later
                lane.hold = self._timer(end.value, self._reset_later)
                self._update_lanes()
                yield lane.hold
            else:
                yield from self._reset()
        elif verdict is Verdict.ERROR:
            yield from self._error(lane, frame, end.value)
        elif verdict is Verdict.HANG:
            lane.push_front([Held(frame, Judgement(), data)])
            self.hung.add(judgement.end_fault)
            self._update_lanes()
            if end.value is not None:
                uid = judgement.end_fault
                yield self._timer(end.value, lambda: self._hang_timed_out(uid))

    def _hold_close(self, lane: Lane, frame: Frame, data: bytes
                    ) -> layer.CommandGenerator[bool]:
        """slow_close is on and `frame` begins the client's close: it goes out slow_close
        later, as the close itself would. True when held."""
        if not (self.slow_close and frame.from_client
                and frame.type in self.runtime.protocol.closing_types):
            return False
        self.close_held = True
        lane.push_front([Out(data)])
        yield self._pace(lane, self.slow_close)
        return True

    def _timing_out(self, lane: Lane, uid: int, name: str, seconds: float) -> _Commands:
        """A frame dropped by drop(timeout_ms): the countdown to the close starts again."""
        key = (uid, lane.from_client)
        token = self._timer(seconds, lambda: self._timed_out(key, token)) if seconds else None
        old = self.timeouts.get(key, ("", None))[1]
        if old is not None:
            self.timers.pop(old, None)
        self.timeouts[key] = (name, token)
        if token is not None:
            yield token

    def _timed_out(self, key: tuple[int, bool], token: commands.RequestWakeup) -> _Commands:
        if self.timeouts.get(key, ("", None))[1] is token and not self.dead:
            yield from self._close_everything()

    def _timeouts_changed(self) -> _Commands:
        """A drop(timeout_ms) fault that acted here is gone: removed, the connection is
        closed (Toxiproxy's timeout Cleanup); replaced by one of that name (a toxic updated),
        the countdown starts again with its timeout."""
        engine = self.runtime.engine
        for key, (name, token) in list(self.timeouts.items()):
            if self.dead or engine.in_force(key[0]):
                continue
            del self.timeouts[key]
            if token is not None:
                self.timers.pop(token, None)
            new = next((f for f in engine.faults if f.name == name), None)
            seconds = getattr(new.fault, "timeout", None) if new is not None else None
            if seconds is None:
                yield from self._close_everything()
                return
            yield from self._timing_out(self.up if key[1] else self.down, new.uid, name,
                                        seconds)

    def _reset_later(self) -> _Commands:
        if not self.dead:
            yield from self._reset()

    def _hang_timed_out(self, uid: int) -> _Commands:
        """hang(ms) ran out: close, unless that fault's hang was lifted meanwhile (another
        fault's hang may hold the connection now, and it has no such timer)."""
        if uid in self.hung and not self.dead:
            yield from self._close_everything()

    def _emit(self, lane: Lane, data: bytes, pieces: tuple[Pieces, float, bool] | None = None
              ) -> _Commands:
        """Send `data` on the lane now, or as its shaping allows (ahead of what waits)."""
        if pieces is None and not lane.shaped:
            yield commands.SendData(lane.dest, data)
            return
        if pieces is None:
            lane.push_front([Out(data)])
        else:
            lane.push_front([Out(chunk, gap) for chunk, gap in pieces_of(data, pieces)])
        yield from self._send_out(lane)

    def _send_out(self, lane: Lane) -> _Commands:
        """Send the `Out` pieces at the front of the lane while its pacing allows."""
        queue = lane.queue
        while queue and type(queue[0]) is Out and not self.dead and not self._blocked(lane):
            gap = queue[0].gap  # type: ignore[union-attr]
            taken = lane.take_piece(self.runtime.clock())
            if type(taken) is float:
                yield self._pace(lane, taken)
                return
            piece, whole = taken  # type: ignore[misc]
            if lane.limit is not None:
                if len(piece) >= lane.limit:
                    piece, lane.limit = piece[:lane.limit], 0
                    if piece:
                        yield commands.SendData(lane.dest, piece)
                    yield from self._close_everything()
                    return
                lane.limit -= len(piece)
            yield commands.SendData(lane.dest, piece)
            if whole and gap:
                yield self._pace(lane, gap)
                return

    def _pace(self, lane: Lane, seconds: float) -> commands.RequestWakeup:
        lane.busy = self._timer(seconds, lambda: self._paced(lane))
        self._update_lanes()
        return lane.busy

    def _paced(self, lane: Lane) -> _Commands:
        lane.busy = None
        self._update_lanes()
        yield from self._pump(lane)

    def _destination(self, from_client: bool) -> Connection:
        return self.context.server if from_client else self.context.client

    def _fire_message_hook(self, from_client: bool, data: bytes) -> layer.CommandGenerator[None]:
        assert self.flow is not None
        self.flow.messages.append(tcp.TCPMessage(from_client, data))
        yield TcpMessageHook(self.flow)
        excess = len(self.flow.messages) - self.runtime.max_flow_messages
        if excess > 0:
            del self.flow.messages[:excess]

    # -- faults that end the connection or answer for the server ------------------------------

    def _error(self, lane: Lane, frame: Frame, parameters: tuple) -> _Commands:
        agent = self.agent
        if agent is None:  # the parser refuses error() where no agent can answer
            yield from self._kill(lane.dest)
            return
        plan = agent.error_plan(frame, *parameters)
        if plan.to_server:
            yield from self._emit(self.up, plan.to_server)
        if plan.to_client:
            yield commands.SendData(self.context.client, plan.to_client)
        if plan.close:
            yield from self._close_everything()
        self._update_lanes()

    def _cancel_backend(self, delay: float) -> _Commands:
        request = self.agent.cancel_request() if self.agent is not None else None
        if request is None:
            logger.warning("wirefault: cancel(): client %s has no server session to cancel "
                           "yet (no BackendKeyData seen)", self.rule_state.client)
            return
        yield SendCancelRequest(request, delay)

    def _kill(self, dest: Connection) -> layer.CommandGenerator[None]:
        """FIN to the side the frame was going to; the other side follows when it closes."""
        self._die()
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
        self._die()
        yield ResetConnections()
        yield from self._close_all()

    def _close_everything(self) -> _Commands:
        """Close both sides with a FIN, after what was written to them."""
        self._die()
        yield from self._close_all()

    def _die(self) -> None:
        self.dead = True
        self._native_client = self._native_server = None
        self.up.clear()
        self.down.clear()

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


OUT_OF_FDS_EVERY = 10.0
"""Seconds between two lines about upstreams not opened for want of file descriptors."""
_out_of_fds = {"next": 0.0, "missed": 0}


def upstream_failure_line(address: tuple | None, client: tuple | None, err: object,
                          now: float) -> str | None:
    """The line that says an upstream could not be opened (the layer's lazy opening and the
    addon's eager one say it alike); None when it is not to be logged. One line per
    connection, except for the process being out of file descriptors (a burst past
    `ulimit -n` fails every attempt alike): then one line per OUT_OF_FDS_EVERY seconds."""
    line = (f"wirefault: cannot connect to upstream {_address(address)} for client "
            f"{_address(client)}: {err}")
    if "Too many open files" not in str(err):
        return line
    if now < _out_of_fds["next"]:
        _out_of_fds["missed"] += 1
        return None
    missed = _out_of_fds["missed"]
    _out_of_fds.update(next=now + OUT_OF_FDS_EVERY, missed=0)
    return line + (f" ({missed} more since the last line)" if missed else "") + \
        f" (this line comes at most every {OUT_OF_FDS_EVERY:g} s)"
