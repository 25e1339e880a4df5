"""The recorder: every frame that crosses the proxy, in a bounded ring buffer.

Rendering a frame decodes its fields, which is costly, so a small frame is kept as a flat
tuple (connection number, direction, type name, bytes) and rendered only when dumped; a
large one, or one without a message spec, is rendered (and truncated) at once so the buffer
never pins large payloads. A run of small frames from one read (`FrameRun`) is kept as one
row: its bytes with the type byte and end of each frame, split into frames only when dumped.
Rows are flat tuples of strings, bytes and numbers, which Python's garbage collector stops
tracking, so a full ring costs nothing per collection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from wirefault.protocols import Frame, FrameBatch, FrameRun, MessageSpec, TypeTable
from wirefault.protocols.base import render_payload
from wirefault.protocols.batch import frames_of

DEFAULT_LIMIT = 100_000
DEFAULT_CLIENT_LABEL = "coordinator"
DEFAULT_SERVER_LABEL = "worker"
KEEP_FRAME_BYTES = 2048
"""Frames up to this size are kept whole and rendered lazily."""
MAX_RENDERED_CHARS = 4096
MAX_RENDERED_BYTES = 256
"""Bytes fields of large frames (payloads) are shown up to this many bytes."""
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
    """The frame's readable form, each field cut to the recorder's limits."""
    return frame.render(MAX_RENDERED_CHARS, MAX_RENDERED_BYTES)


@dataclass(slots=True)
class RecorderSlot:
    """A connection's numbering within the current recording epoch."""

    epoch: int = -1
    number: int = -1


Row = tuple[int, bool, object, object]
"""(connection number, from_client, key, payload), by key:
- a type name: payload is the frame's bytes, or for a large frame of a payload message
  (`MessageSpec.payload_offset`) the start of its payload and the payload's size;
- None: payload is the frame already rendered;
- an int: a run; the key is its `TypeTable.index` and payload is
  (bytes, their offset in the read, start of the first frame, types, ends) (see `FrameRun`).
"""


class Recorder:
    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        client_label: str = DEFAULT_CLIENT_LABEL,
        server_label: str = DEFAULT_SERVER_LABEL,
        messages: Mapping[str, MessageSpec] | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError("the recorder keeps at least one frame")
        self.limit = limit
        self.messages = messages or {}
        self.client_label = client_label
        self.server_label = server_label
        self._chunk_frames = max(limit // 8, 64)
        """Rows are kept in chunks of about this many frames; the oldest chunk is dropped
        whole once the others hold `limit` frames, so forgetting costs nothing per row."""
        self._chunks: deque[tuple[list[Row], int]] = deque()
        """Full chunks, oldest first, with their frame counts."""
        self._rows: list[Row] = []
        """The chunk being filled."""
        self._rows_frames = 0
        self._held = 0
        """Frames in every chunk: `limit` to `limit` + a chunk once full; a dump shows the
        newest `limit` of them."""
        self._count = 0
        """Frames recorded since the last dump or reset; those beyond `limit` were dropped."""
        self._epoch = 0
        self._next_number = 0
        self._payload_specs: dict[str, MessageSpec] = {}

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
                if not self._add_run(number, segment):
                    self._add_run_frames(number, segment)
            else:
                self._add_frame(number, segment)  # type: ignore[arg-type]
        if self._rows_frames >= self._chunk_frames:
            self._close_chunk()

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
        elif spec is not None and spec.payload_offset is not None:
            # rendering keeps only the start of the payload: keep that and the size
            first = start + spec.payload_offset
            self._payload_specs[type_name] = spec
            self._rows.append((number, from_client, type_name,
                               (data[first:first + MAX_RENDERED_BYTES], end - first)))
        else:
            if frame is None:
                frame = Frame(type_name, data[start:end], (start, end), from_client, spec)
            self._rows.append((number, from_client, None, render_frame(frame)))

    def _add_run(self, number: int, run: FrameRun) -> bool:
        """Keeps `run` as one row; False when its frames must be kept one by one (large
        frames, or a type the recorder leaves out)."""
        count = run.count
        start = run.start
        size = run.stop - start
        if size > count * KEEP_FRAME_BYTES:
            return False
        table = run.table
        skipped = table.codes(SKIPPED_TYPES)  # cached by the table
        if skipped and run.may_contain(skipped):
            return False
        data = run.data
        if len(data) > 2 * size:  # don't pin the rest of a large read
            blob, base = data[start:run.stop], start
        else:
            blob, base = data, 0
        self._rows.append((number, run.from_client, table.index,
                           (blob, base, start, run.types, run.ends)))
        self._count += count
        self._rows_frames += count
        return True

    def _close_chunk(self) -> None:
        self._chunks.append((self._rows, self._rows_frames))
        self._held += self._rows_frames
        self._rows, self._rows_frames = [], 0
        chunks = self._chunks
        while self._held - chunks[0][1] >= self.limit:
            self._held -= chunks.popleft()[1]

    def reset(self) -> None:
        """Forget everything and restart connection numbers at 0."""
        self._clear()
        self._epoch += 1
        self._next_number = 0

    def _clear(self) -> None:
        self._chunks.clear()
        self._rows = []
        self._held = self._rows_frames = self._count = 0

    def dump(self) -> str:
        """COPY text rows `conn<TAB>source<TAB>message` since the last dump or reset, cleared."""
        lines = []
        dropped = self._count - len(self)
        if dropped:
            lines.append(
                f"-1\trecorder\t{dropped} frames dropped (ring buffer limit {self.limit})"
            )
        for number, from_client, message in self._messages():
            source = self.client_label if from_client else self.server_label
            lines.append(f"{number}\t{source}\t{copy_escape(message)}")
        self._clear()
        return "\n".join(lines)

    def _messages(self) -> Iterator[tuple[int, bool, str]]:
        """The newest `limit` frames, rendered, oldest first."""
        skip = self._held + self._rows_frames - self.limit  # frames past the limit
        for rows in [*(chunk for chunk, _ in self._chunks), self._rows]:
            for number, from_client, key, payload in rows:
                if type(key) is int:
                    frames = frames_of(*payload, TypeTable.known[key],  # type: ignore[misc]
                                       from_client)
                    if skip > 0:
                        skip -= len(frames)
                        if skip >= 0:
                            continue
                        frames = frames[skip:]
                    for frame in frames:
                        yield number, from_client, render_frame(frame)
                    continue
                if skip > 0:
                    skip -= 1
                    continue
                if key is None:
                    yield number, from_client, payload  # type: ignore[misc]
                elif type(payload) is tuple:
                    head, size = payload
                    yield number, from_client, render_payload(
                        self._payload_specs[key], head, size,  # type: ignore[index]
                        MAX_RENDERED_CHARS, MAX_RENDERED_BYTES)
                else:
                    data: bytes = payload  # type: ignore[assignment]
                    frame = Frame(key, data, (0, len(data)), from_client,  # type: ignore[arg-type]
                                  self.messages.get(key))  # type: ignore[arg-type]
                    yield number, from_client, render_frame(frame)
