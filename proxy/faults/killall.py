"""killall(): kill this connection, then every connection at its next frame.

The switch lives in the rule's shared state, so replacing the rule turns it off.
"""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import KILL, ConnectionState, Decision, SharedState


class KillAll:
    name: ClassVar[str] = "killall"

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        shared.killall_fired = True
        return KILL
