"""What a fault decides for one frame, and the small interface every fault implements.

A fault's settings (from the parsed command) live on the fault object, shared by every
connection; per-connection state lives in `ConnectionState`, owned by the proxy layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar, Protocol

from wirefault.protocols import Frame


class Verdict(Enum):
    FORWARD = "forward"
    KILL = "kill"
    RESET = "reset"
    HOLD = "hold"
    """Hold the frame for `Decision.delay` seconds, then forward it without re-evaluation."""
    PAUSE_PROXY = "pause_proxy"
    """As HOLD, and every other connection of the proxy waits too (see proxy/pause.py)."""


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    delay: float = 0.0


FORWARD = Decision(Verdict.FORWARD)
KILL = Decision(Verdict.KILL)
RESET = Decision(Verdict.RESET)


@dataclass(slots=True)
class ConnectionState:
    """Per-connection state of the rules engine; starts fresh when the rule is replaced."""

    generation: int = -1
    after_counts: list[int] = field(default_factory=list)
    client_frames_seen: int = 0
    """Client frames seen on this connection, whatever the rule (connect_delay needs it)."""


@dataclass(slots=True)
class SharedState:
    """State one rule shares across connections (killall's switch, and what it did)."""

    killall_fired: bool = False
    fired: int = 0
    """Frames the rule acted on (anything but forwarding them), on every connection."""


class Fault(Protocol):
    """One action at the end of a command's chain."""

    name: ClassVar[str]

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        """Called when a frame reaches the end of the chain; may have side effects."""
        ...
