"""drop(): the frame is never forwarded; the connection carries on."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import DROP, ConnectionState, Decision, SharedState


class Drop:
    name: ClassVar[str] = "drop"

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        return DROP
