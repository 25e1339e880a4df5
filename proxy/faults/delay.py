"""delay(ms, jitter=0): hold the frame, and its direction behind it, then carry on."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import ConnectionState, Decision, SharedState, Verdict, chance, frame_number


class Delay:
    name: ClassVar[str] = "delay"

    def __init__(self, ms: float, jitter_ms: float = 0.0) -> None:
        self.seconds = ms / 1000.0
        self.jitter = jitter_ms / 1000.0
        self.fixed = Decision(Verdict.HOLD, self.seconds)

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        if not self.jitter:
            return self.fixed
        # Seeded, so a replayed run waits the same: plus or minus up to `jitter`.
        draw = chance(shared.seed, shared.name, "jitter", conn.number, frame.from_client,
                      frame_number(frame, conn))
        return Decision(Verdict.HOLD, max(0.0, self.seconds + (2 * draw - 1) * self.jitter))
