"""connect_delay(ms): hold the first client frame of each new connection."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import FORWARD, ConnectionState, Decision, SharedState, Verdict


class ConnectDelay:
    name: ClassVar[str] = "connect_delay"

    def __init__(self, delay_ms: float) -> None:
        self.hold = Decision(Verdict.HOLD, delay_ms / 1000.0)

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        # The layer counts the frame before asking, so the first client frame sees 1.
        if frame.from_client and conn.client_frames_seen == 1:
            return self.hold
        return FORWARD
