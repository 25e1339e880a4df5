"""The recorder: every frame that crosses the proxy, in a bounded ring buffer.

Rendering a frame decodes its fields, which is costly, so small frames are kept as they are
and rendered only when dumped; large ones are rendered (and truncated) at once so the buffer
never pins large payloads.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from wirefault.protocols import Frame

DEFAULT_LIMIT = 100_000
KEEP_FRAME_BYTES = 2048
"""Frames up to this size are kept whole and rendered lazily."""
MAX_RENDERED_CHARS = 4096
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
    text = frame.render()
    if len(text) > MAX_RENDERED_CHARS:
        text = text[:MAX_RENDERED_CHARS] + f"...({len(frame.data)} bytes)"
    return text


@dataclass(frozen=True, slots=True)
class _Rendered:
    """A large frame, rendered when recorded so its payload is not kept."""

    from_client: bool
    text: str


@dataclass(slots=True)
class RecorderSlot:
    """A connection's numbering within the current recording epoch."""

    epoch: int = -1
    number: int = -1


class Recorder:
    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        client_label: str = "coordinator",
        server_label: str = "worker",
    ) -> None:
        self.limit = limit
        self.client_label = client_label
        self.server_label = server_label
        self._rows: deque[tuple[int, Frame | _Rendered]] = deque(maxlen=limit)
        self._count = 0
        """Frames recorded since the last dump or reset; those beyond `limit` were dropped."""
        self._epoch = 0
        self._next_number = 0

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, slot: RecorderSlot, frame: Frame) -> None:
        if slot.epoch != self._epoch:
            slot.epoch = self._epoch
            slot.number = self._next_number
            self._next_number += 1
        if frame.type in SKIPPED_TYPES:
            return
        self._count += 1
        if len(frame.data) <= KEEP_FRAME_BYTES:
            self._rows.append((slot.number, frame))
        else:
            self._rows.append((slot.number, _Rendered(frame.from_client, render_frame(frame))))

    def reset(self) -> None:
        """Forget everything and restart connection numbers at 0."""
        self._rows.clear()
        self._count = 0
        self._epoch += 1
        self._next_number = 0

    def dump(self) -> str:
        """COPY text rows `conn<TAB>source<TAB>message` since the last dump or reset, cleared."""
        lines = []
        dropped = self._count - len(self._rows)
        if dropped:
            lines.append(
                f"-1\trecorder\t{dropped} frames dropped (ring buffer limit {self.limit})"
            )
        for number, item in self._rows:
            source = self.client_label if item.from_client else self.server_label
            message = item.text if isinstance(item, _Rendered) else render_frame(item)
            lines.append(f"{number}\t{source}\t{copy_escape(message)}")
        self._rows.clear()
        self._count = 0
        return "\n".join(lines)
