"""The recorder: every frame that crosses the proxy, in a bounded ring buffer.

Rendering a frame decodes its fields, which is costly, so a small frame is kept as a flat
tuple (connection number, direction, type name, bytes) and rendered only when dumped; a
large one, or one without a message spec, is rendered (and truncated) at once so the buffer
never pins large payloads. Flat tuples of strings and bytes are not tracked by Python's
garbage collector, so a full ring costs nothing per collection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from wirefault.protocols import Frame, MessageSpec

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


class Recorder:
    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        client_label: str = DEFAULT_CLIENT_LABEL,
        server_label: str = DEFAULT_SERVER_LABEL,
        messages: Mapping[str, MessageSpec] | None = None,
    ) -> None:
        self.limit = limit
        self.messages = messages or {}
        self.client_label = client_label
        self.server_label = server_label
        # (number, from_client, type name or None when `payload` is already rendered, payload)
        self._rows: deque[tuple[int, bool, str | None, bytes | str]] = deque(maxlen=limit)
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
        if frame.spec is not None and len(frame.data) <= KEEP_FRAME_BYTES:
            self._rows.append((slot.number, frame.from_client, frame.type, frame.data))
        else:
            self._rows.append((slot.number, frame.from_client, None, render_frame(frame)))

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
        for number, from_client, type_name, payload in self._rows:
            source = self.client_label if from_client else self.server_label
            if type_name is None:
                message = payload
            else:
                data = payload
                frame = Frame(type_name, data, (0, len(data)), from_client,  # type: ignore[arg-type]
                              self.messages.get(type_name))
                message = render_frame(frame)
            lines.append(f"{number}\t{source}\t{copy_escape(message)}")  # type: ignore[arg-type]
        self._rows.clear()
        self._count = 0
        return "\n".join(lines)
