"""A connector sink that appends to its output file only what two-phase commit commits.

    python -m peers.sink --listen 127.0.0.1:0 --output out.txt

Protocol choices (Wallaroo connector protocol v3, sink section; the worker is the client):

- Hello -> Ok(initial_credits, credit_list = each known stream's committed point of
  reference). Notify -> NotifyAck(success=1, point_of_ref = committed offset of the
  stream): the worker resumes from there. Points of reference are byte offsets, exclusive.
- Data Messages (stream id > 0) carry message_id = the byte offset of their payload in the
  stream; they wait in a per-connection pending list, which must run contiguously from
  the offset given in NotifyAck. A break in contiguity spoils the stream for the rest of
  the connection: the next Phase1 covering it gets a no vote.
- ListUncommitted -> ReplyUncommitted(txn ids prepared and not yet resolved, on any
  connection). Prepared transactions outlive the connection that prepared them.
- TwoPCPhase1(txn, ranges): the vote is yes when, for every (stream, start, end), the
  pending data covers [start, end) exactly and `start` is not beyond the committed offset
  (no hole). The covered data moves into the prepared transaction. A txn already
  committed or prepared gets yes again (idempotent). Reply: TwoPCReply(txn, commit=vote).
- TwoPCPhase2(txn, commit=1): append the prepared data beyond the committed offset (bytes
  already committed are skipped, so overlapping ranges never write twice), flush, fsync,
  then record the new offsets and the txn id; TwoPCReply(txn, 1). A txn committed before
  is confirmed again without writing (idempotent). An unknown txn gets TwoPCReply(txn, 0).
  TwoPCPhase2(commit=0) drops the txn and is confirmed with TwoPCReply(txn, 0).
- Credits: each frame after Ok costs the worker one; after handling each read the sink
  sends Ack(credits = frames handled, acks = committed offsets).
- Durability: committed offsets, the output length and recent committed txn ids go to
  `<output>.state` (atomic replace) after each commit; on start the output is truncated to
  the recorded length (0 without a state file), so a crash between writing data and
  recording it cannot duplicate.
  Prepared (uncommitted) transactions live in memory only: after a sink crash they are
  simply gone, and the worker replays them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from peers.wire import (
    VERSION,
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
REMEMBERED_TXNS = 10_000

Chunk = tuple[int, bytes]


@dataclass
class SinkConfig:
    listen_host: str
    listen_port: int
    output: Path
    credits: int = 500
    cookie: str = ""


@dataclass
class SinkStats:
    connections: int = 0
    commits: int = 0
    commits_repeated: int = 0
    aborts: int = 0
    votes_no: int = 0
    skipped_bytes: int = 0
    uncommitted_listed: int = 0
    committed_bytes: int = 0


@dataclass
class _Connection:
    next_offset: dict[int, int] = field(default_factory=dict)
    pending: dict[int, list[Chunk]] = field(default_factory=dict)
    broken: set[int] = field(default_factory=set)


class Sink:
    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self.stats = SinkStats()
        self.state_path = config.output.with_name(config.output.name + ".state")
        self.committed: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.committed_txns: OrderedDict[str, None] = OrderedDict()
        self.prepared: dict[str, dict[int, list[Chunk]]] = {}
        self.output = self._open_output()

    # -- durable state ---------------------------------------------------------------------

    def _open_output(self) -> BinaryIO:
        length = 0
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            self.committed = {int(k): v for k, v in state["committed"].items()}
            self.names = {int(k): v for k, v in state["names"].items()}
            self.committed_txns = OrderedDict.fromkeys(state["txns"])
            length = state["output_length"]
        output = open(self.config.output, "ab")  # noqa: SIM115 - open for the sink's lifetime
        output.truncate(length)
        return output

    def _record_state(self) -> None:
        state = {"committed": self.committed, "names": self.names,
                 "txns": list(self.committed_txns),
                 "output_length": os.fstat(self.output.fileno()).st_size}
        temporary = self.state_path.with_name(self.state_path.name + ".tmp")
        temporary.write_text(json.dumps(state))
        os.replace(temporary, self.state_path)

    # -- connections -----------------------------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FrameStream(reader, writer, client=False)
        self.stats.connections += 1
        conn = _Connection()
        try:
            hello = await stream.expect("Hello", timeout=HANDSHAKE_TIMEOUT)
            if hello.fields["version"] != VERSION or hello.fields["cookie"] != self.config.cookie:
                stream.send("Error", message="unsupported version or wrong cookie")
                return
            credit_list = [(sid, self.names.get(sid, ""), por)
                           for sid, por in self.committed.items()]
            stream.send("Ok", initial_credits=self.config.credits, credit_list=credit_list)
            while True:
                batch = await stream.read_batch()
                if not batch:
                    break
                for frame in batch:
                    self._handle(stream, conn, frame)
                stream.send("Ack", credits=len(batch), acks=list(self.committed.items()))
                await stream.drain()
        except LinkLost as exc:
            log.info("sink: %s", exc)
        finally:
            stream.close()

    def _handle(self, stream: FrameStream, conn: _Connection, frame: Frame) -> None:
        fields = frame.fields
        kind = frame.type
        if kind == "Notify":
            sid = fields["stream_id"]
            self.names[sid] = fields["stream_name"]
            start = self.committed.get(sid, 0)
            conn.next_offset[sid], conn.pending[sid] = start, []
            conn.broken.discard(sid)
            stream.send("NotifyAck", success=1, stream_id=sid, point_of_ref=start)
        elif kind == "Message" and fields["stream_id"] in conn.next_offset:
            self._on_data(conn, fields["stream_id"], fields["message_id"], fields["payload"])
        elif kind == "ListUncommitted":
            self.stats.uncommitted_listed += len(self.prepared)
            stream.send("ReplyUncommitted", rtag=fields["rtag"], txn_ids=sorted(self.prepared))
        elif kind == "TwoPCPhase1":
            vote = self._prepare(conn, fields["txn_id"], fields["ranges"])
            stream.send("TwoPCReply", txn_id=fields["txn_id"], commit=int(vote))
        elif kind == "TwoPCPhase2":
            done = self._finish(fields["txn_id"], bool(fields["commit"]))
            stream.send("TwoPCReply", txn_id=fields["txn_id"], commit=int(done))
        elif kind != "EosMessage":
            stream.send("Error", message=f"unexpected {kind}")
            raise LinkLost(f"unexpected {frame.render()}")

    def _on_data(self, conn: _Connection, sid: int, offset: int | None, payload: bytes) -> None:
        if offset != conn.next_offset[sid]:
            conn.broken.add(sid)
            return
        conn.pending[sid].append((offset, payload))
        conn.next_offset[sid] = offset + len(payload)

    # -- two-phase commit ------------------------------------------------------------------

    def _prepare(self, conn: _Connection, txn_id: str, ranges: list[dict[str, int]]) -> bool:
        if txn_id in self.committed_txns or txn_id in self.prepared:
            return True
        taken: dict[int, list[Chunk]] = {}
        for where in ranges:
            chunks = self._take(conn, where["stream_id"], where["start_por"], where["end_por"])
            if chunks is None:
                self.stats.votes_no += 1
                return False
            taken[where["stream_id"]] = chunks
        self.prepared[txn_id] = taken
        return True

    def _take(self, conn: _Connection, sid: int, start: int, end: int) -> list[Chunk] | None:
        """The pending chunks covering exactly [start, end), removed; None if impossible."""
        if sid in conn.broken or sid not in conn.pending or start > self.committed.get(sid, 0):
            return None
        pending = conn.pending[sid]
        chunks = [chunk for chunk in pending if start <= chunk[0] < end]
        position = start
        for offset, payload in chunks:
            if offset != position:
                return None
            position += len(payload)
        if position != end:
            return None
        conn.pending[sid] = [chunk for chunk in pending if chunk[0] >= end]
        return chunks

    def _finish(self, txn_id: str, commit: bool) -> bool:
        if not commit:
            self.prepared.pop(txn_id, None)
            self.stats.aborts += 1
            return False
        if txn_id in self.committed_txns:
            self.stats.commits_repeated += 1
            return True
        taken = self.prepared.pop(txn_id, None)
        if taken is None:
            return False
        data = bytearray()
        committed = dict(self.committed)
        for sid, chunks in taken.items():
            position = committed.get(sid, 0)
            for offset, payload in chunks:
                if offset + len(payload) <= position:
                    self.stats.skipped_bytes += len(payload)
                    continue
                if offset != position:
                    return False  # a hole or a chunk straddling the committed offset
                data += payload
                position += len(payload)
            committed[sid] = position
        self._append(bytes(data))
        self.committed = committed
        self.committed_txns[txn_id] = None
        while len(self.committed_txns) > REMEMBERED_TXNS:
            self.committed_txns.popitem(last=False)
        self._record_state()
        self.stats.commits += 1
        self.stats.committed_bytes += len(data)
        return True

    def _append(self, data: bytes) -> None:
        self.output.write(data)
        self.output.flush()
        os.fsync(self.output.fileno())

    def close(self) -> None:
        self.output.close()


async def run_sink(config: SinkConfig, stop: asyncio.Event) -> SinkStats:
    """Serve the worker until `stop` is set."""
    sink = Sink(config)
    server = await asyncio.start_server(sink.serve, config.listen_host, config.listen_port)
    announce("sink", server)
    try:
        await stop.wait()
    finally:
        server.close()
        sink.close()
    return sink.stats


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("python -m peers.sink", "A connector sink committing to a file.")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT for the worker")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--credits", type=int, default=500)
    args = parser.parse_args(argv)
    host, port = host_port(args.listen)
    config = SinkConfig(host, port, args.output, args.credits)

    async def body(stop: asyncio.Event) -> tuple[int, dict[str, Any]]:
        return 0, asdict(await run_sink(config, stop))

    return run_main(args, body)


if __name__ == "__main__":
    sys.exit(main())
