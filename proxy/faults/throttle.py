"""throttle(bytes_per_second): from this frame on, its direction carries at most that rate."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import ConnectionState, Decision, SharedState, Verdict


class Throttle:
    name: ClassVar[str] = "throttle"

    def __init__(self, bytes_per_second: int) -> None:
        self.decision = Decision(Verdict.THROTTLE, value=float(bytes_per_second))

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        return self.decision
