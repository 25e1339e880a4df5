"""hang(ms=None): from this frame on nothing is forwarded either way and nothing closed,
until the fault is removed; with ms, the connection is closed that much later."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import ConnectionState, Decision, SharedState, Verdict


class Hang:
    name: ClassVar[str] = "hang"

    def __init__(self, ms: float | None) -> None:
        self.decision = Decision(Verdict.HANG, value=None if ms is None else ms / 1000.0)

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        return self.decision
