"""drop(timeout_ms): Toxiproxy's `timeout` toxic (toxics/timeout.go) on one direction.

Every frame of the direction is dropped (the other direction flows), and the connection is
closed (FIN) once `timeout_ms` have passed with no frame in this direction since the last
one dropped (Toxiproxy restarts its timer with every chunk it drops); 0: never on time.
Removing the fault closes the connections it timed out, as Toxiproxy's Cleanup does: the
dropped data is gone, and the connection cannot carry on without it."""

from __future__ import annotations

from typing import ClassVar

from wirefault.protocols import Frame

from .base import ConnectionState, Decision, SharedState, Verdict


class Timeout:
    name: ClassVar[str] = "drop"

    def __init__(self, timeout_ms: float) -> None:
        self.timeout = timeout_ms / 1000.0
        """Seconds (0: never on time); the layer reads it when the fault is replaced."""
        self.decision = Decision(Verdict.DROP, value=self.timeout)

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        return self.decision
