"""A Wallaroo worker stand-in: accepts connector sources and forwards their streams, unchanged,
to a connector sink under two-phase commit.

    python -m peers.worker --listen 127.0.0.1:0 --sink 127.0.0.1:7200

Protocol choices (Wallaroo connector protocol v3; the worker is the server towards sources
and the client towards its sink):

- Towards sources: Hello -> Ok(initial_credits). Notify -> NotifyAck(point_of_ref = what
  the sink has COMMITTED for that stream), sent only once the sink link is up and has
  answered our own Notify for the stream. A stream held by another live connection is
  refused (success=0), as the spec asks. Every frame a source sends after Ok costs it one
  credit; the worker returns the credit in an Ack once it handled the frame, and every
  Ack also reports each stream's committed point of reference when it moved. So a source
  is only ever told "durable" about what the sink committed.
- Towards the sink (stream ids pass through unchanged; points of reference are byte
  offsets, exclusive, as in the source): Hello -> Ok(credits); ListUncommitted ->
  ReplyUncommitted, and every transaction it lists is aborted (TwoPCPhase2 commit=0,
  confirmed by TwoPCReply), because this worker never keeps a commit decision across sink
  connections: only a TwoPCReply(commit=1) to our own Phase2 counts as committed. Notify
  -> NotifyAck tells the durable point of reference of the stream. Each frame we send
  spends one of the sink's credits; the sink's Acks return them.
- Messages are forwarded in order. After a source reconnects it resends from the committed
  point, which may be behind what this sink connection already carries: those duplicates
  are dropped, so the sink sees each offset once per connection.
- Every `--checkpoint` seconds with new data: TwoPCPhase1(txn, ranges = [(stream,
  committed, forwarded)]) -> TwoPCReply vote; then TwoPCPhase2(commit=1) -> TwoPCReply.
  No data Message is sent between Phase1 and Phase2 (the spec forbids it). A no vote, a
  Phase2 not confirmed, a Restart/Error, a timeout or a lost link all end the sink
  connection: the worker then sends Restart to every source and closes them (what was
  forwarded but not committed is gone with the sink connection, so sources must resend
  from the committed point), reconnects to the sink with backoff and starts over.

The worker keeps nothing on disk: killed and restarted, it learns every stream's committed
point again from the sink (NotifyAck) and aborts whatever the sink still holds prepared.
Its transaction ids carry a token drawn at start, so a restarted worker never reuses the id
of a transaction the sink committed for its previous incarnation.

Exactly-once in the sink's committed output follows: data reaches the output only through a
committed Phase2, each range starts at the sink's committed offset (the sink skips what it
already has), and sources replay from the committed offset after any failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from peers.wire import (
    VERSION,
    Backoff,
    FrameStream,
    LinkLost,
    announce,
    base_parser,
    host_port,
    log,
    run_main,
)
from wirefault.protocols import Frame

HANDSHAKE_TIMEOUT = 5.0
REPLY_TIMEOUT = 5.0
ACK_INTERVAL = 0.05


@dataclass
class WorkerConfig:
    listen_host: str
    listen_port: int
    sink_host: str
    sink_port: int
    credits: int = 200
    """Initial credits granted to each source."""
    checkpoint: float = 0.1
    """Seconds between two-phase commits."""
    instance_name: str = "worker-1"
    cookie: str = ""


@dataclass
class WorkerStats:
    source_connections: int = 0
    sink_connections: int = 0
    sink_failures: dict[str, int] = field(default_factory=dict)
    commits: int = 0
    aborted_uncommitted: int = 0
    duplicates_dropped: int = 0
    notifies_refused: int = 0

    def failed(self, reason: str) -> None:
        key = reason.split(":")[0]
        self.sink_failures[key] = self.sink_failures.get(key, 0) + 1


@dataclass(eq=False)
class SourceConn:
    stream: FrameStream
    number: int
    alive: bool = True
    credits_owed: int = 0
    streams: set[int] = field(default_factory=set)
    acked: dict[int, int] = field(default_factory=dict)


@dataclass
class StreamState:
    name: str
    committed: int = 0
    """Everything before this offset is committed at the sink."""
    forwarded: int = 0
    """Everything before this offset went to the sink on the current sink connection."""
    announced: bool = False
    """Notified to the sink on the current sink connection."""
    owner: SourceConn | None = None


@dataclass
class _Notify:
    conn: SourceConn
    stream_id: int
    reply: asyncio.Future[int]


@dataclass
class _Data:
    conn: SourceConn
    stream_id: int
    message_id: int
    payload: bytes


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.stats = WorkerStats()
        self.streams: dict[int, StreamState] = {}
        self.sources: set[SourceConn] = set()
        self.inbox: asyncio.Queue[_Notify | _Data] = asyncio.Queue()
        self.sink: FrameStream | None = None
        self.sink_credits = 0
        self.credit_arrived = asyncio.Event()
        self.replies: asyncio.Queue[Frame] = asyncio.Queue()
        self.sink_lost: asyncio.Future[str] | None = None
        self.txn_numbers = itertools.count(1)
        self.incarnation = secrets.token_hex(4)
        self.conn_numbers = itertools.count(1)

    async def run(self, stop: asyncio.Event) -> WorkerStats:
        server = await asyncio.start_server(self.serve_source, self.config.listen_host,
                                            self.config.listen_port)
        announce("worker", server)
        tasks = [asyncio.create_task(self._sink_link(stop)), asyncio.create_task(self._acker())]
        try:
            await stop.wait()
        finally:
            server.close()
            for task in tasks:
                task.cancel()
            for conn in list(self.sources):
                conn.stream.close()
            if self.sink:
                self.sink.close()
        return self.stats

    # -- sources ---------------------------------------------------------------------------

    async def serve_source(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        conn = SourceConn(FrameStream(reader, writer, client=False), next(self.conn_numbers))
        self.sources.add(conn)
        self.stats.source_connections += 1
        try:
            await self._handshake_source(conn)
            while conn.alive:
                frame = await conn.stream.read()
                if frame is None:
                    break
                await self._on_source_frame(conn, frame)
        except LinkLost as exc:
            log.info("worker: source %d: %s", conn.number, exc)
        finally:
            self._forget(conn)

    async def _handshake_source(self, conn: SourceConn) -> None:
        hello = await conn.stream.expect("Hello", timeout=HANDSHAKE_TIMEOUT)
        fields = hello.fields
        if fields["version"] != VERSION or fields["cookie"] != self.config.cookie:
            conn.stream.send("Error", message="unsupported version or wrong cookie")
            raise LinkLost("refused handshake")
        conn.stream.send("Ok", initial_credits=self.config.credits)

    async def _on_source_frame(self, conn: SourceConn, frame: Frame) -> None:
        fields = frame.fields
        if frame.type == "Notify":
            await self._on_notify(conn, fields["stream_id"], fields["stream_name"])
        elif frame.type == "Message" and fields["stream_id"] in conn.streams:
            self.inbox.put_nowait(_Data(conn, fields["stream_id"], fields["message_id"],
                                        fields["payload"]))
        elif frame.type == "EosMessage" and fields["stream_id"] in conn.streams:
            conn.credits_owed += 1
        else:
            conn.stream.send("Error", message=f"unexpected {frame.type}")
            raise LinkLost(f"unexpected {frame.render()}")

    async def _on_notify(self, conn: SourceConn, stream_id: int, name: str) -> None:
        state = self.streams.setdefault(stream_id, StreamState(name))
        conn.credits_owed += 1
        if state.owner is not None and state.owner is not conn and state.owner.alive:
            self.stats.notifies_refused += 1
            conn.stream.send("NotifyAck", success=0, stream_id=stream_id, point_of_ref=0)
            return
        state.owner = conn
        reply: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.inbox.put_nowait(_Notify(conn, stream_id, reply))
        point_of_ref = await reply
        conn.streams.add(stream_id)
        conn.acked[stream_id] = point_of_ref
        conn.stream.send("NotifyAck", success=1, stream_id=stream_id, point_of_ref=point_of_ref)

    def _forget(self, conn: SourceConn) -> None:
        conn.alive = False
        self.sources.discard(conn)
        for state in self.streams.values():
            if state.owner is conn:
                state.owner = None
        conn.stream.close()

    def _restart_sources(self) -> None:
        """The sink lost uncommitted data: every source must resend from the committed point."""
        for conn in list(self.sources):
            with contextlib.suppress(LinkLost):
                conn.stream.send("Restart", address=None)
            self._forget(conn)

    async def _acker(self) -> None:
        while True:
            await asyncio.sleep(ACK_INTERVAL)
            self._send_acks()

    def _send_acks(self) -> None:
        for conn in list(self.sources):
            acks = []
            for stream_id in conn.streams:
                state = self.streams[stream_id]
                if state.owner is conn and conn.acked.get(stream_id) != state.committed:
                    acks.append((stream_id, state.committed))
                    conn.acked[stream_id] = state.committed
            if conn.credits_owed or acks:
                with contextlib.suppress(LinkLost):
                    conn.stream.send("Ack", credits=conn.credits_owed, acks=acks)
                conn.credits_owed = 0

    # -- the sink link ---------------------------------------------------------------------

    async def _sink_link(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            try:
                await self._sink_session(backoff)
            except LinkLost as exc:
                log.info("worker: sink link: %s", exc)
                self.stats.failed(str(exc))
            self._after_sink_failure()
            await backoff.wait(stop)

    def _after_sink_failure(self) -> None:
        if self.sink:
            self.sink.close()
            self.sink = None
        for state in self.streams.values():
            state.announced = False
            state.forwarded = state.committed
        self._restart_sources()
        while not self.inbox.empty():
            item = self.inbox.get_nowait()
            if isinstance(item, _Notify) and not item.reply.done():
                item.reply.set_exception(LinkLost("sink link lost"))
        while not self.replies.empty():
            self.replies.get_nowait()

    async def _sink_session(self, backoff: Backoff) -> None:
        config = self.config
        self.sink = sink = await FrameStream.connect(config.sink_host, config.sink_port)
        self.stats.sink_connections += 1
        self.sink_lost = asyncio.get_running_loop().create_future()
        sink.send("Hello", version=VERSION, cookie=config.cookie,
                  program_name="wirefault-peers-worker", instance_name=config.instance_name)
        ok = await sink.expect("Ok", timeout=HANDSHAKE_TIMEOUT)
        self.sink_credits = ok.fields["initial_credits"]
        reader = asyncio.create_task(self._read_sink(sink, self.sink_lost))
        try:
            await self._abort_uncommitted()
            backoff.reset()
            await self._pump()
        finally:
            reader.cancel()

    async def _read_sink(self, sink: FrameStream, lost: asyncio.Future[str]) -> None:
        try:
            while True:
                frame = await sink.read()
                if frame is None:
                    raise LinkLost("sink closed")
                if frame.type == "Ack":
                    self.sink_credits += frame.fields["credits"]
                    self.credit_arrived.set()
                elif frame.type in ("NotifyAck", "TwoPCReply", "ReplyUncommitted"):
                    self.replies.put_nowait(frame)
                else:
                    raise LinkLost(f"sink sent {frame.render()}")
        except LinkLost as exc:
            if not lost.done():
                lost.set_result(str(exc))

    async def _guarded(self, awaitable: Any, timeout: float | None) -> Any:
        """Await `awaitable` unless the sink link breaks first (LinkLost) or time runs out
        (None when `timeout` is given and passes)."""
        assert self.sink_lost is not None
        task = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({task, self.sink_lost}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        if self.sink_lost in done:
            raise LinkLost(self.sink_lost.result())
        return None

    async def _send_to_sink(self, name: str, **fields: Any) -> None:
        while self.sink_credits <= 0:
            self.credit_arrived.clear()
            if await self._guarded(self.credit_arrived.wait(), REPLY_TIMEOUT) is None:
                raise LinkLost("sink granted no credit")
        self.sink_credits -= 1
        assert self.sink is not None
        self.sink.send(name, **fields)
        await self._guarded(self.sink.drain(), REPLY_TIMEOUT)

    async def _reply(self, kind: str, txn_id: str | None = None) -> Frame:
        frame = await self._guarded(self.replies.get(), REPLY_TIMEOUT)
        if frame is None:
            raise LinkLost(f"timeout: no {kind} from the sink")
        if frame.type != kind or (txn_id is not None and frame.fields["txn_id"] != txn_id):
            raise LinkLost(f"expected {kind} {txn_id or ''}, got {frame.render()}")
        return frame

    async def _abort_uncommitted(self) -> None:
        rtag = next(self.txn_numbers)
        await self._send_to_sink("ListUncommitted", rtag=rtag)
        listing = await self._reply("ReplyUncommitted")
        if listing.fields["rtag"] != rtag:
            raise LinkLost(f"ReplyUncommitted for rtag {listing.fields['rtag']}, not {rtag}")
        for txn_id in listing.fields["txn_ids"]:
            await self._send_to_sink("TwoPCPhase2", txn_id=txn_id, commit=0)
            await self._reply("TwoPCReply", txn_id)
            self.stats.aborted_uncommitted += 1

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        next_checkpoint = loop.time() + self.config.checkpoint
        while True:
            item = await self._guarded(self.inbox.get(),
                                       max(0.0, next_checkpoint - loop.time()))
            if isinstance(item, _Notify):
                await self._announce(item)
            elif isinstance(item, _Data):
                await self._forward(item)
            if loop.time() >= next_checkpoint:
                await self._checkpoint()
                next_checkpoint = loop.time() + self.config.checkpoint

    async def _announce(self, item: _Notify) -> None:
        if not item.conn.alive or item.reply.done():
            return
        state = self.streams[item.stream_id]
        if not state.announced:
            await self._send_to_sink("Notify", stream_id=item.stream_id, stream_name=state.name,
                                     point_of_ref=state.committed)
            reply = await self._reply("NotifyAck")
            if not reply.fields["success"] or reply.fields["stream_id"] != item.stream_id:
                raise LinkLost(f"sink refused the stream: {reply.render()}")
            state.committed = state.forwarded = reply.fields["point_of_ref"]
            state.announced = True
        item.reply.set_result(state.committed)

    async def _forward(self, item: _Data) -> None:
        conn = item.conn
        state = self.streams[item.stream_id]
        if state.owner is not conn or not conn.alive:
            return  # a stale connection's leftovers
        if item.message_id < state.forwarded:
            self.stats.duplicates_dropped += 1
        elif item.message_id > state.forwarded:
            log.info("worker: gap in stream %d at %d", item.stream_id, state.forwarded)
            with contextlib.suppress(LinkLost):
                conn.stream.send("Restart", address=None)
            self._forget(conn)
            return
        else:
            await self._send_to_sink("Message", stream_id=item.stream_id,
                                     message_id=item.message_id, payload=item.payload)
            state.forwarded += len(item.payload)
        conn.credits_owed += 1

    async def _checkpoint(self) -> None:
        ranges = [(stream_id, state.committed, state.forwarded)
                  for stream_id, state in self.streams.items()
                  if state.announced and state.forwarded > state.committed]
        if not ranges:
            return
        txn_id = f"{self.config.instance_name}-{self.incarnation}-{next(self.txn_numbers)}"
        await self._send_to_sink("TwoPCPhase1", txn_id=txn_id, ranges=ranges)
        vote = await self._reply("TwoPCReply", txn_id)
        if not vote.fields["commit"]:
            await self._send_to_sink("TwoPCPhase2", txn_id=txn_id, commit=0)
            raise LinkLost(f"sink voted abort on {txn_id}")
        await self._send_to_sink("TwoPCPhase2", txn_id=txn_id, commit=1)
        done = await self._reply("TwoPCReply", txn_id)
        if not done.fields["commit"]:
            raise LinkLost(f"sink did not commit {txn_id}")
        for stream_id, _, end in ranges:
            self.streams[stream_id].committed = end
        self.stats.commits += 1
        self._send_acks()


async def run_worker(config: WorkerConfig, stop: asyncio.Event) -> WorkerStats:
    """Serve sources and drive the sink until `stop` is set."""
    return await Worker(config).run(stop)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("python -m peers.worker",
                         "Forward connector sources to a connector sink under 2PC.")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT for sources")
    parser.add_argument("--sink", required=True, help="HOST:PORT of the connector sink")
    parser.add_argument("--credits", type=int, default=200)
    parser.add_argument("--checkpoint", type=float, default=0.1, metavar="SECONDS")
    parser.add_argument("--instance-name", default="worker-1")
    args = parser.parse_args(argv)
    listen_host, listen_port = host_port(args.listen)
    sink_host, sink_port = host_port(args.sink)
    config = WorkerConfig(listen_host, listen_port, sink_host, sink_port, args.credits,
                          args.checkpoint, args.instance_name)

    async def body(stop: asyncio.Event) -> tuple[int, dict[str, Any]]:
        return 0, asdict(await run_worker(config, stop))

    return run_main(args, body)


if __name__ == "__main__":
    sys.exit(main())
