"""error(code, message, severity): answer the frame with the protocol's own error.

The reply is the protocol's business (its connection agent builds it: PostgreSQL makes the
server fail on a stand-in so its transaction state is exactly right, then rewrites the
server's error into this one; Wallaroo sends an Error frame and closes)."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import ConnectionState, Decision, SharedState, Verdict


class Error:
    name: ClassVar[str] = "error"

    def __init__(self, code: str | None, message: str | None, severity: str | None) -> None:
        self.decision = Decision(Verdict.ERROR, value=(code, message, severity))

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        return self.decision
