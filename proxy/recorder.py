"""The recorder: every frame that crosses the proxy, in a bounded ring buffer.

Nothing is rendered while frames are recorded: rendering decodes fields and turns binary
values into text, which costs per byte, and a dump may never ask for it. A small frame is
kept as a flat tuple (connection number, direction, type name, bytes) and rendered only when
dumped. A large one is kept as a bounded copy of its fields instead (`cut_fields`: every
value, nested ones included, already cut to what a dump shows), so the buffer never pins a
large payload; a large frame of a payload message (CopyData) is cut without being decoded. A
run of small frames from one read (`FrameRun`) is kept as one row: its bytes with the type
byte and end of each frame, split into frames only when dumped. Rows are tuples of strings,
bytes and numbers, which Python's garbage collector stops tracking, so a full ring costs
nothing per collection.

The ring is bounded twice: by frames (`limit`) and by an estimate of the bytes its rows hold
(`max_bytes`); the oldest rows go first when either is reached.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from operator import itemgetter

from wirefault.protocols import Frame, FrameBatch, FrameRun, MessageSpec, TypeTable
from wirefault.protocols.base import Limits, cut_fields, cut_payload, render_cut
from wirefault.protocols.batch import any_of

DEFAULT_LIMIT = 100_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""The ring's default bound in bytes: the default `limit` of frames of a few hundred bytes
(pgbench traffic, COPY rows) fits well within it; rows of kilobytes reach it first."""
DEFAULT_CLIENT_LABEL = "coordinator"
DEFAULT_SERVER_LABEL = "worker"
KEEP_FRAME_BYTES = 2048
"""Frames up to this size are kept whole and rendered lazily."""
MAX_RENDERED_CHARS = 4096
"""A text value is shown up to this many characters."""
MAX_RENDERED_BYTES = 256
"""A bytes value is shown up to this many bytes."""
MAX_RENDERED_ITEMS = 100
"""A list or map is shown up to this many items."""
LIMITS = Limits(chars=MAX_RENDERED_CHARS, bytes=MAX_RENDERED_BYTES, items=MAX_RENDERED_ITEMS)
ROW_BYTES = 115
"""What a row holds besides its payload's content, counted towards `max_bytes`: its tuple,
its slot in the chunk, the payload's object header."""
RUN_BYTES = 150
"""What a run's row holds besides that: its key tuple and the objects of its types and
ends."""
FRAME_BYTES = 9
"""What a frame of a run holds besides its bytes: its type byte and its int64 end."""
MOST_BYTES_PER_FRAME = 2 * KEEP_FRAME_BYTES + FRAME_BYTES + ROW_BYTES + RUN_BYTES
"""The most a frame kept whole, or a frame of a run (which keeps at most twice its frames'
bytes, see `_add_run`), holds: a chunk of `_chunk_frames` of them stays within
`_chunk_bytes` without counting them one by one."""
CACHED_FRAME_BYTES = 512
"""A dump remembers the text of frames up to this size (see `_CachedRender`)..."""
RENDER_CACHE_ENTRIES = 8192
"""... this many at most: at most ~8 MB however the traffic looks."""
_PAYLOAD = itemgetter(3)
_MARK = "\0mark"
"""The key of a row that marks the frame row before it: a fault acted on that frame."""
SLICE_SECONDS = 0.002
"""`render_in_slices` gives the event loop its turn this often: other connections wait at
most about this long for a dump being rendered."""
SLICE_CHECK = 32
"""Lines rendered between two looks at the clock."""
SKIPPED_TYPES = frozenset({"Terminate"})
"""Left out: they arrive at unpredictable times and make dumps flaky."""


def copy_escape(text: str) -> str:
    """Escape a value for PostgreSQL's COPY text format."""
    return (
        text.replace("\\", "\\\\")
        .replace("\t", "\\t")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
    )


def render_frame(frame: Frame) -> str:
    """The frame's readable form, each value cut to the recorder's limits."""
    return frame.render(LIMITS)


@dataclass(slots=True)
class RecorderSlot:
    """A connection's numbering within the current recording epoch."""

    epoch: int = -1
    number: int = -1


Row = tuple[int, bool, object, object]
"""(connection number, from_client, key, payload), by key:
- a type name: payload is the frame's bytes, or for a large frame a tuple, the bounded copy
  of its fields (`cut_fields`);
- None: payload is the frame already rendered (a frame without fields: `Opaque(length=N)`,
  `ProtocolError(error=...)`);
- a tuple: a run; the key is (its `TypeTable.index`, the offset of payload in the read,
  start of the first frame, types, ends) (see `FrameRun`) and payload is the bytes.
The payload is what a row holds (save for a cut copy's values), so the bytes of a chunk are
the lengths of its payloads, counted once when it is closed.
"""


class Recorder:
    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        client_label: str = DEFAULT_CLIENT_LABEL,
        server_label: str = DEFAULT_SERVER_LABEL,
        messages: Mapping[str, MessageSpec] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if limit < 1:
            raise ValueError("the recorder keeps at least one frame")
        self.limit = limit
        self.max_bytes = max_bytes
        self.messages = messages or {}
        self.client_label = client_label
        self.server_label = server_label
        self._chunks: deque[tuple[list[Row], int]] = deque()
        """Full chunks, oldest first, with their frame counts."""
        self._chunk_sizes: deque[int] = deque()
        """The bytes of each of `_chunks`."""
        self._rows: list[Row] = []
        """The chunk being filled."""
        self._rows_frames = 0
        self._rows_extra = 0
        """What the chunk's runs and cut copies hold beyond their payload's length, added as
        they come; the rest of a chunk's bytes, the lengths of its rows' payloads, is
        counted once when it is closed, so a frame kept whole costs no counting."""
        self._held = 0
        """Frames in every chunk: `limit` to `limit` + a chunk once full; a dump shows the
        newest `limit` of them."""
        self._held_bytes = 0
        """Bytes of every chunk: under `max_bytes` + a chunk once full."""
        self._count = 0
        """Frames recorded since the last dump or reset; those not shown were dropped."""
        self._bytes_dropped = False
        """Whether `max_bytes` dropped rows since the last dump or reset."""
        self._epoch = 0
        self._next_number = 0

    @property
    def max_bytes(self) -> int:
        """The bound in bytes: once full chunks hold this many, the oldest go."""
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("the recorder keeps at least one byte")
        self._max_bytes = max_bytes
        self._chunk_bytes = max(max_bytes // 16, 1)
        """A chunk is closed once its frames may hold this many bytes (by `_chunk_frames`)
        or its cut copies do: so it holds an eighth of `max_bytes` at most, plus a row."""
        self._chunk_frames = max(min(max(self.limit // 8, 64),
                                     self._chunk_bytes // MOST_BYTES_PER_FRAME), 1)
        """Rows are kept in chunks of up to this many frames; the oldest chunk is dropped
        whole once the others reach a bound, so forgetting costs nothing per row."""

    def __len__(self) -> int:
        return min(self._held + self._rows_frames, self.limit)

    def _number(self, slot: RecorderSlot) -> int:
        if slot.epoch != self._epoch:
            slot.epoch = self._epoch
            slot.number = self._next_number
            self._next_number += 1
        return slot.number

    def record(self, slot: RecorderSlot, frame: Frame) -> None:
        self._add_frame(self._number(slot), frame)
        if self._rows_frames >= self._chunk_frames:
            self._close_chunk()

    def record_batch(self, slot: RecorderSlot, batch: FrameBatch) -> None:
        """Records a read's frames; runs of small frames as one row each."""
        number = slot.number if slot.epoch == self._epoch else self._number(slot)
        for segment in batch.segments:
            if type(segment) is FrameRun:
                if not self._add_run(number, segment.from_client, segment.data, segment.start,
                                     segment.stop, segment.types, segment.ends, segment.table):
                    self._add_run_frames(number, segment)
            else:
                self._add_frame(number, segment)  # type: ignore[arg-type]
        if self._rows_frames >= self._chunk_frames:
            self._close_chunk()

    def record_whole(self, slot: RecorderSlot, from_client: bool, data: bytes, types: bytes,
                     ends: bytes, table: TypeTable) -> None:
        """`record_batch` for a read `feed_whole` framed (whole frames of plain types only):
        the same rows, with no batch made (a run when several frames, else the frame)."""
        number = slot.number if slot.epoch == self._epoch else self._number(slot)
        if len(types) > 1:
            if not self._add_run(number, from_client, data, 0, len(data), types, ends, table):
                self._add_run_frames(number, FrameRun(data, 0, len(data), types, ends, table,
                                                      from_client))
        else:
            spec: MessageSpec = table.specs[types[0]]  # type: ignore[assignment]
            self._add(number, from_client, spec.name, spec, data, 0, len(data))
        if self._rows_frames >= self._chunk_frames:
            self._close_chunk()

    def mark(self, slot: RecorderSlot, from_client: bool, label: str) -> None:
        """Marks the frame last recorded for `slot` (a fault acted on it): its dump row ends
        with ` [label]`. Not a frame: marks count towards no limit of frames."""
        if slot.epoch == self._epoch:
            self._rows.append((slot.number, from_client, _MARK, label))

    def _add_frame(self, number: int, frame: Frame) -> None:
        self._add(number, frame.from_client, frame.type, frame.spec, frame.data, 0,
                  len(frame.data), frame)

    def _add_run_frames(self, number: int, run: FrameRun) -> None:
        """A run's frames one row each, without making a `Frame` for those kept raw."""
        specs = run.table.specs
        data, start, from_client = run.data, run.start, run.from_client
        for type_byte, end in zip(run.types, memoryview(run.ends).cast("q").tolist(),
                                  strict=True):
            spec: MessageSpec = specs[type_byte]  # type: ignore[assignment]
            self._add(number, from_client, spec.name, spec, data, start, end)
            start = end

    def _add(self, number: int, from_client: bool, type_name: str, spec: MessageSpec | None,
             data: bytes, start: int, end: int, frame: Frame | None = None) -> None:
        """Records the frame `data[start:end]` (`frame`, when one was made)."""
        if type_name in SKIPPED_TYPES:
            return
        self._count += 1
        self._rows_frames += 1
        if spec is not None and end - start <= KEEP_FRAME_BYTES:
            whole = data if start == 0 and end == len(data) else data[start:end]
            self._rows.append((number, from_client, type_name, whole))
            return
        if spec is None:  # no fields (Opaque, ProtocolError): rendering it costs nothing
            assert frame is not None  # such frames are never part of a run
            self._rows.append((number, from_client, None, render_frame(frame)))
            return
        if spec.payload_offset is not None:
            # a dump shows only the start of the payload: cut that, without decoding
            first = start + spec.payload_offset
            cut, size = cut_payload(spec, data[first:first + MAX_RENDERED_BYTES], end - first,
                                    LIMITS)
        else:
            if frame is None:
                frame = Frame(type_name, data[start:end], (start, end), from_client, spec)
            cut, size = cut_fields(frame.fields_once(), LIMITS)
        self._rows.append((number, from_client, type_name, cut))
        self._rows_extra += size
        if self._rows_extra >= self._chunk_bytes:  # a cut copy holds more than a frame may
            self._close_chunk()

    def _add_run(self, number: int, from_client: bool, data: bytes, start: int, stop: int,
                 types: bytes, ends: bytes, table: TypeTable) -> bool:
        """Keeps the run `data[start:stop]` (a `FrameRun`'s parts) as one row; False when
        its frames must be kept one by one (large frames, or a type the recorder leaves
        out)."""
        count = len(types)
        size = stop - start
        if size > count * KEEP_FRAME_BYTES:
            return False
        skipped = table.codes(SKIPPED_TYPES)  # cached by the table
        if skipped and any_of(types, skipped):
            return False
        if len(data) > 2 * size:  # don't pin the rest of a large read
            blob, base = data[start:stop], start
        else:
            blob, base = data, 0
        self._rows.append((number, from_client, (table.index, base, start, types, ends), blob))
        self._count += count
        self._rows_frames += count
        self._rows_extra += RUN_BYTES
        return True

    def _close_chunk(self) -> None:
        rows = self._rows
        size = (self._rows_extra + sum(map(len, map(_PAYLOAD, rows))) + ROW_BYTES * len(rows)
                + FRAME_BYTES * self._rows_frames)  # as if every frame were in a run
        self._chunks.append((rows, self._rows_frames))
        self._chunk_sizes.append(size)
        self._held += self._rows_frames
        self._held_bytes += size
        self._rows, self._rows_frames, self._rows_extra = [], 0, 0
        chunks, sizes = self._chunks, self._chunk_sizes
        while True:  # drop the oldest chunk while the others still reach a bound
            frames, size = chunks[0][1], sizes[0]
            if self._held_bytes - size >= self._max_bytes:
                self._bytes_dropped = True
            elif self._held - frames < self.limit:
                return
            chunks.popleft()
            sizes.popleft()
            self._held -= frames
            self._held_bytes -= size

    def reset(self) -> None:
        """Forget everything and restart connection numbers at 0."""
        self._clear()
        self._epoch += 1
        self._next_number = 0

    def _clear(self) -> None:
        self._chunks.clear()
        self._chunk_sizes.clear()
        self._rows = []
        self._held = self._rows_frames = self._count = 0
        self._held_bytes = self._rows_extra = 0
        self._bytes_dropped = False

    def dump(self) -> str:
        """COPY text rows `conn<TAB>source<TAB>message` since the last dump or reset, cleared."""
        return self.snapshot().render()

    def snapshot(self) -> DumpSnapshot:
        """What `dump` shows, taken now and cleared from the recorder; rendered later.

        Costs a reference per chunk: rows are never changed once added and `_clear` starts
        new chunks, so the snapshot's rows stay as they are while the recorder goes on."""
        dropped = self._count - len(self)
        header = None
        if dropped:
            bound = f"{self.limit} frames or {self._max_bytes} bytes" if self._bytes_dropped \
                else str(self.limit)
            header = f"-1\trecorder\t{dropped} frames dropped (ring buffer limit {bound})"
        snapshot = DumpSnapshot(
            header, [*(chunk for chunk, _ in self._chunks), self._rows],
            self._held + self._rows_frames - self.limit, len(self), self.messages,
            self.client_label, self.server_label)
        self._clear()
        return snapshot


@dataclass(slots=True)
class DumpSnapshot:
    """The rows of one dump, rendered by `render` (at once) or `render_in_slices` (a slice
    at a time, so a large dump never holds the event loop for long)."""

    header: str | None
    """The line counting dropped frames, if any were."""
    chunks: list[list[Row]]
    skip: int
    """Frames past the limit, oldest first, not shown."""
    frames: int
    """Frames shown."""
    messages: Mapping[str, MessageSpec]
    client_label: str
    server_label: str

    def render(self, end: str = "") -> str:
        """The rows, one a line, `end` after the last (none without rows)."""
        lines = list(self.lines())
        if not lines:
            return ""
        lines[-1] += end
        return "\n".join(lines)

    async def render_in_slices(self, slice_seconds: float = SLICE_SECONDS, end: str = "") -> str:
        """`render(end)`'s text, giving the event loop its turn every `slice_seconds`.

        `end` is joined in, not added after: a dump's text can be tens of megabytes, and
        every copy of it counts in the proxy's peak memory."""
        lines: list[str] = []
        clock = time.perf_counter
        deadline = clock() + slice_seconds
        for line in self.lines():
            lines.append(line)
            if len(lines) % SLICE_CHECK == 0 and clock() >= deadline:
                await asyncio.sleep(0)
                deadline = clock() + slice_seconds
        if not lines:
            return ""
        if end:
            lines[-1] += end
        return "\n".join(lines)

    def lines(self) -> Iterator[str]:
        if self.header is not None:
            yield self.header
        client_label, server_label = self.client_label, self.server_label
        for number, from_client, message in self._messages():
            source = client_label if from_client else server_label
            yield f"{number}\t{source}\t{copy_escape(message)}"

    def _messages(self) -> Iterator[tuple[int, bool, str]]:
        """The newest `limit` frames, rendered, oldest first, each with its marks."""
        previous: tuple[int, bool, str] | None = None
        for number, from_client, message, is_mark in self._rendered():
            if is_mark:
                if previous is not None and previous[0] == number:
                    previous = (number, previous[1], f"{previous[2]} [{message}]")
                continue
            if previous is not None:
                yield previous
            previous = (number, from_client, message)
        if previous is not None:
            yield previous

    def _rendered(self) -> Iterator[tuple[int, bool, str, bool]]:
        skip = self.skip
        marked_frame_shown = False
        render = _CachedRender(self.messages)
        for rows in self.chunks:
            for number, from_client, key, payload in rows:
                if key is _MARK:
                    if marked_frame_shown:
                        yield number, from_client, payload, True  # type: ignore[misc]
                    continue
                marked_frame_shown = skip <= 0 or (type(key) is tuple and skip < len(key[3]))
                if type(key) is tuple:
                    index, base, start, types, ends = key
                    count = len(types)  # type: ignore[arg-type]
                    if skip >= count:
                        skip -= count
                        continue
                    for text in render.run(payload, base, start, types, ends,  # type: ignore[arg-type]
                                           TypeTable.known[index], from_client, max(skip, 0)):
                        yield number, from_client, text, False
                    skip = min(skip, 0)
                    continue
                if skip > 0:
                    skip -= 1
                    continue
                if key is None:
                    yield number, from_client, payload, False  # type: ignore[misc]
                elif type(payload) is tuple:
                    yield number, from_client, render_cut(key, payload), False  # type: ignore[arg-type]
                else:
                    yield number, from_client, render.one(key, payload, from_client), False  # type: ignore[arg-type]


class _CachedRender:
    """Renders the frames of one dump, remembering the text of small frames by type and
    bytes: traffic repeats itself (the same queries, ReadyForQuery, CommandComplete), and a
    rendering is a pure function of the two, so each distinct small frame is decoded once."""

    __slots__ = ("cache", "messages")

    def __init__(self, messages: Mapping[str, MessageSpec]) -> None:
        self.messages = messages
        self.cache: dict[tuple[str, bytes], str] = {}

    def one(self, type_name: str, data: bytes, from_client: bool) -> str:
        return self._text(type_name, data, from_client, self.messages.get(type_name))

    def run(self, blob: bytes, base: int, start: int, types: bytes, ends: bytes,
            table: TypeTable, from_client: bool, skip: int) -> Iterator[str]:
        """The texts of a run's frames (see `frames_of`), the first `skip` left out."""
        specs = table.specs
        text = self._text
        for type_byte, end in zip(types, memoryview(ends).cast("q").tolist(), strict=True):
            if skip:
                skip -= 1
            else:
                spec = specs[type_byte]
                yield text(spec.name, blob[start - base:end - base], from_client, spec)  # type: ignore[union-attr]
            start = end

    def _text(self, type_name: str, data: bytes, from_client: bool,
              spec: MessageSpec | None) -> str:
        if len(data) > CACHED_FRAME_BYTES:
            return render_frame(Frame(type_name, data, (0, len(data)), from_client, spec))
        key = (type_name, data)
        cache = self.cache
        text = cache.get(key)
        if text is None:
            text = render_frame(Frame(type_name, data, (0, len(data)), from_client, spec))
            if len(cache) >= RENDER_CACHE_ENTRIES:
                cache.clear()
            cache[key] = text
        return text
