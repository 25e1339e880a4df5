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
- A txn id already committed is a repeat only if its ranges end within what is committed;
  the same id with new data (a worker that restarted and counts from 1 again) gets a no
  vote rather than a "yes" that would commit nothing.
- Durability (against the process being killed at any instruction, SIGKILL included):
  * the output: Phase2 appends, flushes and fsyncs the data, and only then records it;
  * `<output>.state` (atomic replace after each commit): committed offsets, stream names,
    the output length and recent committed txn ids. On start the output is cut back to the
    recorded length (0 without a state file), so bytes written by a commit that was never
    recorded, nor confirmed, are dropped, and the worker sends them again;
  * `<output>.2pc` (atomic replace before each yes vote and after each Phase2): the
    prepared transactions with their data. A yes vote is a promise, so a restarted sink
    still lists them in ReplyUncommitted and honours a Phase2 for them (this worker aborts
    them; a txn that is both in the log and recorded as committed was committed).
  A restarted sink therefore resumes from exactly what it confirmed, and the worker's
  Notify learns that point.

`--ack-before-write` is a deliberately broken mode for tests: a write-behind buffer that
records and confirms a commit (TwoPCReply, Ack, the state file) before its data reaches the
file, and writes that data only at the next commit (or a clean exit). At every moment after
a commit there is confirmed data that exists only in memory, so a SIGKILL at any point of a
running stream loses acknowledged data: the restarted sink claims offsets its file does not
hold and appends the next data after a hole.
"""

from __future__ import annotations

import asyncio
import base64
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
    ack_before_write: bool = False
    """The broken write-behind mode (see the module docstring)."""


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
    restored_prepared: int = 0
    lost_on_start: int = 0
    """Bytes the state file claims but the output lacks (only the broken mode loses any)."""


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
        self.log_path = config.output.with_name(config.output.name + ".2pc")
        self.committed: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.committed_txns: OrderedDict[str, None] = OrderedDict()
        self.prepared: dict[str, dict[int, list[Chunk]]] = {}
        self.unwritten = b""
        """The broken mode's confirmed data not yet in the file."""
        self.output = self._open_output()
        self._restore_prepared()

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
        size = os.fstat(output.fileno()).st_size
        if size > length:
            output.truncate(length)  # written by a commit that was never recorded
        elif size < length:
            # Never pad: zeros would look like data. Only --ack-before-write gets here.
            self.stats.lost_on_start = length - size
            log.warning("sink: the output lacks %d committed bytes (%d of %d): data lost",
                        length - size, size, length)
        return output

    def _record_state(self) -> None:
        size = os.fstat(self.output.fileno()).st_size + len(self.unwritten)
        state = {"committed": self.committed, "names": self.names,
                 "txns": list(self.committed_txns), "output_length": size}
        _replace(self.state_path, json.dumps(state))

    def _restore_prepared(self) -> None:
        if not self.log_path.exists():
            return
        for txn_id, streams in json.loads(self.log_path.read_text()).items():
            if txn_id in self.committed_txns:
                continue  # committed and recorded; the crash came before the log caught up
            self.prepared[txn_id] = {
                int(sid): [(offset, base64.b64decode(data)) for offset, data in chunks]
                for sid, chunks in streams.items()}
        self.stats.restored_prepared = len(self.prepared)

    def _record_prepared(self) -> None:
        log_entries = {txn_id: {sid: [(offset, base64.b64encode(payload).decode())
                                      for offset, payload in chunks]
                                for sid, chunks in streams.items()}
                       for txn_id, streams in self.prepared.items()}
        _replace(self.log_path, json.dumps(log_entries))

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
        if txn_id in self.prepared:
            return True
        if txn_id in self.committed_txns:
            # A repeat, unless the ranges reach beyond what is committed: then the id was
            # reused for new data, and a yes would confirm a commit that writes nothing.
            repeat = all(where["end_por"] <= self.committed.get(where["stream_id"], 0)
                         for where in ranges)
            self.stats.votes_no += not repeat
            return repeat
        taken: dict[int, list[Chunk]] = {}
        for where in ranges:
            chunks = self._take(conn, where["stream_id"], where["start_por"], where["end_por"])
            if chunks is None:
                self.stats.votes_no += 1
                return False
            taken[where["stream_id"]] = chunks
        self.prepared[txn_id] = taken
        self._record_prepared()  # before the yes vote leaves
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
            if self.prepared.pop(txn_id, None) is not None:
                self._record_prepared()
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
        if self.config.ack_before_write:
            # The bug on purpose: the previous commit's data goes out now, this one's later.
            self._append(self.unwritten)
            self.unwritten = bytes(data)
        else:
            self._append(bytes(data))
        self.committed = committed
        self.committed_txns[txn_id] = None
        while len(self.committed_txns) > REMEMBERED_TXNS:
            self.committed_txns.popitem(last=False)
        self._record_state()
        self._record_prepared()
        self.stats.commits += 1
        self.stats.committed_bytes += len(data)
        return True

    def _append(self, data: bytes) -> None:
        self.output.write(data)
        self.output.flush()
        os.fsync(self.output.fileno())

    def close(self) -> None:
        self._append(self.unwritten)  # a clean exit loses nothing, even in the broken mode
        self.unwritten = b""
        self.output.close()


def _replace(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a crash leaves the old version or the new one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


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
    parser.add_argument("--ack-before-write", action="store_true",
                        help="BROKEN on purpose: confirm each commit before writing its data")
    args = parser.parse_args(argv)
    host, port = host_port(args.listen)
    config = SinkConfig(host, port, args.output, args.credits,
                        ack_before_write=args.ack_before_write)

    async def body(stop: asyncio.Event) -> tuple[int, dict[str, Any]]:
        return 0, asdict(await run_sink(config, stop))

    return run_main(args, body)


if __name__ == "__main__":
    sys.exit(main())
