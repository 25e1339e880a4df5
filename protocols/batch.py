"""The frames of one read, kept compact until somebody needs them as `Frame` objects.

In bulk traffic (COPY, large results) a read holds dozens of small frames, and making a
`Frame` for each costs more than everything else the proxy does with them. A framer that can
walk a run of ordinary frames quickly returns it as a `FrameRun`: the read, the type byte
and end offset of each frame, and the direction's `TypeTable`. The rules engine skips a run
whose type bytes cannot match its first filter, the recorder stores it whole, and the layer
forwards it as one slice; `Frame` objects are made only for frames that are looked at.

A `FrameBatch` is what `Framer.feed_batch` returns: the read's frames in order, as a mix of
single `Frame`s and `FrameRun`s, and also a sequence of `Frame`s for everything else.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar, overload

from ._pg_scan import LITERAL_ANCHORED, LITERAL_FOLDED, texts_pass
from .base import Frame, MessageSpec

__all__ = ["LITERAL_ANCHORED", "LITERAL_FOLDED", "FrameBatch", "FrameRun", "Segment",
           "TypeTable", "any_of", "frames_of", "texts_pass"]


class TypeTable:
    """Per type byte, the one message a direction sends with it (None: not a plain type).

    `plain` is the same as 256 flag bytes, for native scanners; `codes(names)` the type bytes
    of the named messages, cached (the rules engine and the recorder ask per read). Tables
    live as long as the process (a protocol module makes one per direction), and `index`
    names one in `TypeTable.known`, so a recorded run refers to its table by a number."""

    __slots__ = ("_codes", "index", "plain", "specs")

    known: ClassVar[list[TypeTable]] = []

    def __init__(self, specs: Sequence[MessageSpec | None]) -> None:
        if len(specs) != 256:
            raise ValueError("a type table has one entry per byte value")
        self.specs: tuple[MessageSpec | None, ...] = tuple(specs)
        self.plain = bytes(1 if spec is not None else 0 for spec in self.specs)
        self._codes: dict[frozenset[str], bytes] = {}
        self.index = len(TypeTable.known)
        TypeTable.known.append(self)

    def __getitem__(self, type_byte: int) -> MessageSpec | None:
        return self.specs[type_byte]

    def codes(self, names: frozenset[str]) -> bytes:
        """The type bytes whose message is one of `names`."""
        found = self._codes.get(names)
        if found is None:
            found = bytes(i for i, spec in enumerate(self.specs)
                          if spec is not None and spec.name in names)
            self._codes[names] = found
        return found


def any_of(types: bytes, codes: bytes) -> bool:
    """Whether any of the type bytes `types` is one of `codes`."""
    if len(codes) == 1:
        return codes in types
    for code in codes:  # noqa: SIM110 (a loop beats any() on a generator here)
        if code in types:
            return True
    return False


class FrameRun:
    """Consecutive complete frames of one read, all of plain types (so no alias, no error).

    Frame `i` is `data[ends[i-1]:ends[i]]` (the first starts at `start`), its message
    `table[types[i]]`; `ends` holds native int64 offsets into `data`."""

    __slots__ = ("_frames", "count", "data", "ends", "from_client", "start", "stop", "table",
                 "types")

    def __init__(self, data: bytes, start: int, stop: int, types: bytes, ends: bytes,
                 table: TypeTable, from_client: bool) -> None:
        self.data = data
        self.start = start
        self.stop = stop
        self.types = types
        self.count = len(types)
        self.ends = ends
        self.table = table
        self.from_client = from_client
        self._frames: list[Frame] | None = None

    def __len__(self) -> int:
        return self.count

    def may_contain(self, codes: bytes) -> bool:
        """Whether any frame's type byte is one of `codes`."""
        return any_of(self.types, codes)

    def payload(self) -> bytes:
        """The run's bytes, as forwarded."""
        if self.start == 0 and self.stop == len(self.data):
            return self.data
        return self.data[self.start:self.stop]

    def frames(self) -> list[Frame]:
        """The run as `Frame`s (made once: the rules engine and the layer see the same)."""
        if self._frames is None:
            self._frames = frames_of(self.data, 0, self.start, self.types, self.ends,
                                     self.table, self.from_client)
        return self._frames

    def __repr__(self) -> str:
        direction = "C>S" if self.from_client else "S>C"
        return f"<FrameRun {direction} {len(self)} frames span=({self.start}, {self.stop})>"


def frames_of(blob: bytes, base: int, start: int, types: bytes, ends: bytes,
              table: TypeTable, from_client: bool) -> list[Frame]:
    """The `Frame`s of a run whose bytes from offset `base` of the read are `blob`."""
    specs = table.specs
    frames = []
    append = frames.append
    for type_byte, end in zip(types, memoryview(ends).cast("q").tolist(), strict=True):
        spec = specs[type_byte]
        append(Frame(spec.name, blob[start - base:end - base], (start, end),  # type: ignore[union-attr]
                     from_client, spec))
        start = end
    return frames


Segment = Frame | FrameRun


class FrameBatch(Sequence[Frame]):
    """The frames completed by one read, in order: `segments` for code that handles runs,
    and a sequence of `Frame`s (made on first use) for code that does not."""

    __slots__ = ("_frames", "segments")

    def __init__(self, segments: list[Segment] | None = None) -> None:
        self.segments: list[Segment] = [] if segments is None else segments
        self._frames: list[Frame] | None = None

    def frames(self) -> list[Frame]:
        if self._frames is None:
            frames: list[Frame] = []
            for segment in self.segments:
                if type(segment) is FrameRun:
                    frames += segment.frames()
                else:
                    frames.append(segment)  # type: ignore[arg-type]
            self._frames = frames
        return self._frames

    def payload(self) -> bytes:
        """All the frames' bytes, as forwarded."""
        segments = self.segments
        if len(segments) == 1:
            only = segments[0]
            return only.data if type(only) is Frame else only.payload()  # type: ignore[union-attr]
        return b"".join([s.data if type(s) is Frame else s.payload()  # type: ignore[union-attr]
                         for s in segments])

    def __len__(self) -> int:
        if self._frames is not None:
            return len(self._frames)
        segments = self.segments
        if len(segments) == 1:  # the usual read: one run, or one frame
            only = segments[0]
            return only.count if type(only) is FrameRun else 1  # type: ignore[union-attr]
        return sum(s.count if type(s) is FrameRun else 1 for s in self.segments)  # type: ignore[union-attr]

    def __bool__(self) -> bool:
        return bool(self.segments)

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames())

    @overload
    def __getitem__(self, index: int) -> Frame: ...

    @overload
    def __getitem__(self, index: slice) -> list[Frame]: ...

    def __getitem__(self, index: int | slice) -> Frame | list[Frame]:
        return self.frames()[index]

    def __repr__(self) -> str:
        return f"FrameBatch({self.segments!r})"
