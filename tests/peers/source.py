"""A connector source streaming the lines of a file on one stream.

    python -m peers.source --connect 127.0.0.1:7100 --file input.txt [--rate 500]

Protocol choices (Wallaroo connector protocol v3, the source side):

- One session per connection: Hello, then Ok gives the initial credits; Notify for the
  stream (carrying the last point of reference the worker acknowledged, 0 at first), then
  NotifyAck gives the point of reference to resume from, which wins over ours.
- A point of reference is a byte offset into the file and is exclusive: every line that
  starts before it is durable downstream. Each line is one Message whose message_id is the
  byte offset where the line starts and whose payload is the line's bytes (newline
  included), so a point of reference is always the message_id of the next line to send.
- Every frame sent after Ok (Notify, Message, EosMessage) spends one credit; Ack frames
  return credits and report acknowledged points of reference for our stream. With no
  credit left the source waits for an Ack.
- At end of file the source sends EosMessage(message_id=file size) and exits once an Ack
  (or a NotifyAck after a reconnect) reports the file size as acknowledged.
- Restart, Error, a closed or reset connection, a refused Notify or a silent worker all mean
  the same: close, wait a short backoff (20 ms doubling to 200 ms), reconnect and resume
  from the worker's NotifyAck.

Killed and restarted at any moment, the source resumes where the sink's committed output
ends: it keeps no record of its own (its first Notify says 0), and the worker's NotifyAck,
which is what the sink committed, tells it where to start. Starting over from 0 would be
harmless too, since the worker drops offsets below what it already forwarded and the sink
skips what it committed, but it never needs to.

`--rate` holds until SIGUSR1, or until the `--full-speed-file` exists (which a restarted
source also sees), and then the rest goes as fast as credits allow: a chaos test streams
slowly enough that the data outlasts its faults, then finishes without waiting.

`--ack-log FILE` (`-` for stdout) gets one line per event a progress check can watch:
`resume N` when a NotifyAck says where to start, `acked N` whenever acknowledgements move,
`done N` once the whole file is acknowledged. `--keep-running` stays up after that (until
SIGTERM), so a process supervisor does not take the finished source for a crashed one.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from peers.wire import (
    VERSION,
    Backoff,
    FrameStream,
    LinkLost,
    base_parser,
    host_port,
    log,
    run_main,
)

HANDSHAKE_TIMEOUT = 5.0
NOTIFY_TIMEOUT = 15.0
"""NotifyAck may wait for the worker to reach its sink."""
IDLE_TIMEOUT = 15.0
"""Longest wait for an Ack while out of credits or after EosMessage."""


@dataclass
class SourceConfig:
    host: str
    port: int
    path: Path
    stream_id: int = 1
    stream_name: str = "lines"
    rate: float = 0.0
    """Lines per second (0: as fast as credits allow)."""
    instance_name: str = "source-1"
    cookie: str = ""
    give_up_after: float | None = None
    """Seconds after which the source stops trying (None: never)."""
    full_speed_file: Path | None = None
    """Once this file exists, stop pacing (the restart-proof form of SIGUSR1)."""
    ack_log: TextIO | None = None


@dataclass
class SourceStats:
    connections: int = 0
    handshake_seconds: list[float] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)
    restarts: int = 0
    links_lost: dict[str, int] = field(default_factory=dict)
    messages_sent: int = 0
    finished: bool = False
    elapsed: float = 0.0

    def lost(self, reason: str) -> None:
        key = reason.split(":")[0]
        self.links_lost[key] = self.links_lost.get(key, 0) + 1


class Lines:
    """The file split into lines, addressed by byte offset."""

    def __init__(self, data: bytes) -> None:
        self.lines = data.splitlines(keepends=True)
        self.offsets: list[int] = []
        offset = 0
        for line in self.lines:
            self.offsets.append(offset)
            offset += len(line)
        self.size = offset

    def index_of(self, point_of_ref: int) -> int:
        """The index of the line starting at `point_of_ref` (len(lines) at end of file)."""
        if point_of_ref == self.size:
            return len(self.lines)
        index = bisect.bisect_left(self.offsets, point_of_ref)
        if index == len(self.offsets) or self.offsets[index] != point_of_ref:
            raise LinkLost(f"point of reference {point_of_ref} is not a line boundary")
        return index


class _Session:
    """One connection's streaming state, shared by its reader and writer."""

    def __init__(self, stream: FrameStream, credits: int, stream_id: int, acked: int,
                 on_ack: Callable[[int], None]) -> None:
        self.stream = stream
        self.credits = credits
        self.stream_id = stream_id
        self.acked = acked
        self.on_ack = on_ack
        self.lost: str | None = None
        self.changed = asyncio.Event()

    async def read_acks(self, stats: SourceStats) -> None:
        try:
            while True:
                frame = await self.stream.read()
                if frame is None:
                    raise LinkLost("closed by worker")
                if frame.type == "Ack":
                    self.credits += frame.fields["credits"]
                    for ack in frame.fields["acks"]:
                        if ack["stream_id"] == self.stream_id and \
                                ack["point_of_ref"] > self.acked:
                            self.acked = ack["point_of_ref"]
                            self.on_ack(self.acked)
                elif frame.type == "Restart":
                    stats.restarts += 1
                    raise LinkLost("restart requested")
                else:
                    raise LinkLost(f"unexpected {frame.render()}")
                self.changed.set()
        except LinkLost as exc:
            self.lost = str(exc)
            self.changed.set()

    async def wait_until(self, ready: Callable[[], bool]) -> None:
        """Wait until `ready()` holds; LinkLost when the link breaks or stays silent."""
        while not ready():
            if self.lost:
                raise LinkLost(self.lost)
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), IDLE_TIMEOUT)
            except TimeoutError:
                raise LinkLost("worker silent") from None
        if self.lost:
            raise LinkLost(self.lost)


class Source:
    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self.lines = Lines(config.path.read_bytes())
        self.acked = 0
        self.stats = SourceStats()

    async def run(self, stop: asyncio.Event | None = None) -> SourceStats:
        started = time.monotonic()
        backoff = Backoff()
        stop = stop or asyncio.Event()
        try:
            while not stop.is_set():
                if self._gave_up(started):
                    break
                try:
                    if await self._session_unless(stop, backoff):
                        self.stats.finished = True
                        self._note("done", self.lines.size)
                        break
                except LinkLost as exc:
                    log.info("source: link lost: %s", exc)
                    self.stats.lost(str(exc))
                await backoff.wait(stop)
        finally:
            self.stats.elapsed = round(time.monotonic() - started, 3)
        return self.stats

    def _note(self, event: str, point_of_ref: int) -> None:
        if self.config.ack_log:
            self.config.ack_log.write(f"{event} {point_of_ref}\n")
            self.config.ack_log.flush()

    def _gave_up(self, started: float) -> bool:
        limit = self.config.give_up_after
        return limit is not None and time.monotonic() - started > limit

    async def _session_unless(self, stop: asyncio.Event, backoff: Backoff) -> bool:
        """One session, abandoned (False) as soon as `stop` is set."""
        session = asyncio.create_task(self._session(backoff))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({session, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not session.done():
            session.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session
            return False
        return session.result()

    async def _session(self, backoff: Backoff) -> bool:
        """One connection; True once everything is acknowledged."""
        config = self.config
        connected = time.monotonic()
        stream = await FrameStream.connect(config.host, config.port)
        self.stats.connections += 1
        reader: asyncio.Task[None] | None = None
        try:
            stream.send("Hello", version=VERSION, cookie=config.cookie,
                        program_name="wirefault-peers-source",
                        instance_name=config.instance_name)
            ok = await stream.expect("Ok", "Error", timeout=HANDSHAKE_TIMEOUT)
            if ok.type == "Error":
                raise LinkLost(f"refused: {ok.fields['message']}")
            self.stats.handshake_seconds.append(round(time.monotonic() - connected, 3))
            stream.send("Notify", stream_id=config.stream_id, stream_name=config.stream_name,
                        point_of_ref=self.acked)
            start = await self._resume_point(stream)
            backoff.reset()
            if start == self.lines.size:
                return True
            session = _Session(stream, ok.fields["initial_credits"] - 1, config.stream_id,
                               start, lambda acked: self._note("acked", acked))
            reader = asyncio.create_task(session.read_acks(self.stats))
            try:
                await self._stream_lines(session, self.lines.index_of(start))
            finally:
                self.acked = max(self.acked, session.acked)
            return True
        finally:
            if reader:
                reader.cancel()
            stream.close()

    async def _resume_point(self, stream: FrameStream) -> int:
        reply = await stream.expect("NotifyAck", "Restart", "Error", timeout=NOTIFY_TIMEOUT)
        if reply.type == "Restart":
            self.stats.restarts += 1
            raise LinkLost("restart requested")
        if reply.type == "Error" or not reply.fields["success"]:
            raise LinkLost(f"notify refused: {reply.render()}")
        start = reply.fields["point_of_ref"]
        self.lines.index_of(start)  # must be a line boundary
        self.acked = start
        self.stats.resumed_from.append(start)
        self._note("resume", start)
        return start

    def full_speed(self) -> None:
        """Stop pacing: the remaining lines go as fast as credits allow."""
        self.config.rate = 0.0

    async def _stream_lines(self, session: _Session, first: int) -> None:
        lines = self.lines
        stream = session.stream
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        looked_at = 0.0
        for index in range(first, len(lines.lines)):
            await session.wait_until(lambda: session.credits > 0)
            if self.config.rate > 0 and self.config.full_speed_file and \
                    loop.time() - looked_at > 0.1:
                looked_at = loop.time()
                if self.config.full_speed_file.exists():
                    self.full_speed()
            if self.config.rate > 0:
                interval = 1.0 / self.config.rate
                # No catch-up burst after a stall: pace from now at most 50 ms back.
                next_at = max(next_at + interval, loop.time() - 0.05)
                delay = next_at - loop.time()
                if delay > 0.002:
                    await asyncio.sleep(delay)
            session.credits -= 1
            stream.send("Message", stream_id=session.stream_id,
                        message_id=lines.offsets[index], payload=lines.lines[index])
            self.stats.messages_sent += 1
            await stream.drain()
        await session.wait_until(lambda: session.credits > 0)
        session.credits -= 1
        stream.send("EosMessage", stream_id=session.stream_id, message_id=lines.size)
        await stream.drain()
        await session.wait_until(lambda: session.acked >= lines.size)


async def run_source(config: SourceConfig, stop: asyncio.Event | None = None) -> SourceStats:
    """Stream the file until the worker acknowledged all of it (or `stop` is set)."""
    return await Source(config).run(stop)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("python -m peers.source", "Stream a file's lines to a worker.")
    parser.add_argument("--connect", required=True, help="HOST:PORT of the worker")
    parser.add_argument("--file", required=True, type=Path)
    parser.add_argument("--stream-id", type=int, default=1)
    parser.add_argument("--stream-name", default="lines")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="lines per second until SIGUSR1 (0: no limit)")
    parser.add_argument("--instance-name", default="source-1")
    parser.add_argument("--give-up-after", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--full-speed-file", type=Path, metavar="FILE",
                        help="stop pacing once FILE exists")
    parser.add_argument("--ack-log", metavar="FILE",
                        help="append resume/acked/done lines here ('-': stdout)")
    parser.add_argument("--keep-running", action="store_true",
                        help="stay up after the whole file is acknowledged, until SIGTERM")
    args = parser.parse_args(argv)
    if args.stream_id < 1:
        parser.error("--stream-id must be >= 1 (stream 0 carries the two-phase commit)")
    host, port = host_port(args.connect)
    with contextlib.ExitStack() as closing:
        ack_log = None
        if args.ack_log == "-":
            ack_log = sys.stdout
        elif args.ack_log:
            ack_log = closing.enter_context(open(args.ack_log, "a"))
        config = SourceConfig(host, port, args.file, args.stream_id, args.stream_name,
                              args.rate, args.instance_name, give_up_after=args.give_up_after,
                              full_speed_file=args.full_speed_file, ack_log=ack_log)

        async def body(stop: asyncio.Event) -> tuple[int, dict[str, Any]]:
            source = Source(config)
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, source.full_speed)
            stats = await source.run(stop)
            if args.keep_running and stats.finished:
                await stop.wait()
            return (0 if stats.finished else 1), asdict(stats)

        return run_main(args, body)


if __name__ == "__main__":
    sys.exit(main())
