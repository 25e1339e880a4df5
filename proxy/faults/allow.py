"""allow(): forward the frame; faults added after this one do not see it.

`conn.allow()` clears every fault (Citus's meaning); in a list of faults, an allow() placed
first exempts what it matches from the faults after it."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import PASS, ConnectionState, Decision, SharedState


class Allow:
    name: ClassVar[str] = "allow"

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        return PASS
