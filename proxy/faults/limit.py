"""limit(bytes): the connection is closed once that many more bytes (this frame's first)
have passed in this direction; the last frame is cut to fit, as Toxiproxy's limit_data."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import ConnectionState, Decision, SharedState, Verdict


class Limit:
    name: ClassVar[str] = "limit"

    def __init__(self, budget: int) -> None:
        self.decision = Decision(Verdict.LIMIT, value=budget)

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        return self.decision
