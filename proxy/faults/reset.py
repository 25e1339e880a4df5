"""reset(after_ms=0): abort both sides with a real TCP RST (SO_LINGER 0).

With `after_ms`, as Toxiproxy's `reset_peer` (toxics/reset_peer.go): the triggering frame is
swallowed and its direction carries nothing more (what follows waits in the lane, the
sender is eventually stopped), the other direction flows on, and both sides are reset
`after_ms` after the trigger, even if the fault is removed meanwhile."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import RESET, ConnectionState, Decision, SharedState, Verdict


class Reset:
    name: ClassVar[str] = "reset"

    def __init__(self, after_ms: float = 0.0) -> None:
        self.decision = RESET if not after_ms else Decision(Verdict.RESET,
                                                            value=after_ms / 1000.0)

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        return self.decision
