"""allow(): forward the frame (the default rule)."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import FORWARD, ConnectionState, Decision, SharedState


class Allow:
    name: ClassVar[str] = "allow"

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        return FORWARD
