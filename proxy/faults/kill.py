"""kill(): drop the frame and everything after it, close the connection with a FIN."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import KILL, ConnectionState, Decision, SharedState


class Kill:
    name: ClassVar[str] = "kill"

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        return KILL
