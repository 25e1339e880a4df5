"""slice(size, delay_ms=0, variation=None): the frame is written in pieces, delay_ms apart.

Without `variation`, pieces of exactly `size` bytes (the last one what is left). With it,
Toxiproxy's slicer (toxics/slicer.go): the frame is halved, again and again, until a piece is
at most `size + variation` bytes, each cut moved by a draw in [-variation, variation); the
draws are seeded (the fault's seed, the connection, the direction, the frame), so a replayed
run cuts the same; and, as Toxiproxy, delay_ms follows the last piece too (what comes next
in that direction waits for it)."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import ConnectionState, Decision, SharedState, Verdict, chance, frame_number

Pieces = int | tuple[int, ...]
"""A fixed piece size, or the lengths of the pieces, in order."""


def toxiproxy_pieces(total: int, average: int, variation: int, draw) -> tuple[int, ...]:
    """The lengths Toxiproxy's `SlicerToxic.chunk(0, total)` cuts, `draw(k)` in [0, 1)
    standing for its k-th `rand.Intn`. Iterative, left to right, as its recursion emits."""
    lengths: list[int] = []
    stack = [(0, total)]
    k = 0
    while stack:
        start, end = stack.pop()
        size = end - start
        if size - average <= variation or size < 2:
            if size:
                lengths.append(size)
            continue
        mid = start + size // 2
        if variation > 0:
            mid += min(int(draw(k) * 2 * variation), 2 * variation - 1) - variation
            k += 1
        mid = min(max(mid, start + 1), end - 1)  # Toxiproxy would cut an empty piece (or panic)
        stack.append((mid, end))
        stack.append((start, mid))
    return tuple(lengths)


def pieces_of(data: bytes, value: tuple[Pieces, float, bool]) -> list[tuple[bytes, float]]:
    """A SLICE decision's `value` applied to `data`: each piece, and the seconds that pass
    after it."""
    pieces, gap, trailing = value
    chunks = cut(data, pieces)
    last = gap if trailing else 0.0
    return [(chunk, gap) for chunk in chunks[:-1]] + [(chunks[-1], last)]


def cut(data: bytes, pieces: Pieces) -> list[bytes]:
    """`data` cut as `pieces` says (lengths that do not cover it: the rest is one more piece;
    a frame rewritten by the protocol's agent may be longer than the one measured)."""
    if type(pieces) is int:
        return [data[i:i + pieces] for i in range(0, len(data), pieces)] or [data]
    out, at = [], 0
    for length in pieces:  # type: ignore[union-attr]
        if at >= len(data):
            break
        out.append(data[at:at + length])
        at += length
    if at < len(data):
        out.append(data[at:])
    return out or [data]


class Slice:
    name: ClassVar[str] = "slice"

    def __init__(self, size: int, delay_ms: float, variation: int | None = None) -> None:
        self.size = size
        self.gap = delay_ms / 1000.0
        self.variation = variation
        self.decision = Decision(Verdict.SLICE, value=(size, self.gap, False))

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        if self.variation is None:
            return self.decision
        number = frame_number(frame, conn)

        def draw(k: int) -> float:
            return chance(shared.seed, shared.name, "slice", conn.number, frame.from_client,
                          number, k)

        lengths = toxiproxy_pieces(len(frame.data), self.size, self.variation, draw)
        return Decision(Verdict.SLICE, value=(lengths, self.gap, True))
