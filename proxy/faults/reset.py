"""reset(): drop the frame and abort both sides with a real TCP RST."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import RESET, ConnectionState, Decision, SharedState


class Reset:
    name: ClassVar[str] = "reset"

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        return RESET
