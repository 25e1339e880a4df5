"""duplicate(n=1): the frame is forwarded n + 1 times."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import ConnectionState, Decision, SharedState, Verdict


class Duplicate:
    name: ClassVar[str] = "duplicate"

    def __init__(self, copies: int) -> None:
        self.decision = Decision(Verdict.DUPLICATE, value=copies)

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        return self.decision
