"""slow_close(ms): from this frame on, a side's close is passed on ms later."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import ConnectionState, Decision, SharedState, Verdict


class SlowClose:
    name: ClassVar[str] = "slow_close"

    def __init__(self, ms: float) -> None:
        self.decision = Decision(Verdict.SLOW_CLOSE, value=ms / 1000.0)

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        return self.decision
