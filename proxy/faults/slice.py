"""slice(size, delay_ms=0): the frame is written in pieces of `size` bytes, delay_ms apart."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import ConnectionState, Decision, SharedState, Verdict


class Slice:
    name: ClassVar[str] = "slice"

    def __init__(self, size: int, delay_ms: float) -> None:
        self.decision = Decision(Verdict.SLICE, value=(size, delay_ms / 1000.0))

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        return self.decision
