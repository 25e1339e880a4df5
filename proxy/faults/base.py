"""What a fault decides for one frame, and the small interface every fault implements.

A fault's settings (from the parsed command) live on the fault object, shared by every
connection; per-connection state lives in `ConnectionState`, owned by the proxy layer, and
what one installed fault shares across connections (its counts, killall's switch) in
`SharedState`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from wirefault.protocols import Frame

if TYPE_CHECKING:
    from wirefault.protocols import ConnectionAgent


class Verdict(Enum):
    FORWARD = "forward"
    """Not acting: the frame goes on to the next fault (or out)."""
    PASS = "pass"
    """allow(): forwarded, and the faults after this one do not see it."""
    KILL = "kill"
    RESET = "reset"
    DROP = "drop"
    ERROR = "error"
    """`value`: (code, message, severity); the protocol's agent builds the reply."""
    HANG = "hang"
    """`value`: milliseconds until the connection is closed, or None (until removed)."""
    HOLD = "hold"
    """Hold the frame for `delay` seconds (and its direction behind it), then go on."""
    PAUSE_PROXY = "pause_proxy"
    """As HOLD, and every other connection of the proxy waits too (see proxy/pause.py)."""
    DUPLICATE = "duplicate"
    """`value`: extra copies to forward."""
    THROTTLE = "throttle"
    """`value`: bytes per second for this direction from this frame on."""
    SLICE = "slice"
    """`value`: (a piece size or the pieces' lengths in order, seconds between pieces,
    whether that gap also follows the last piece) for this frame (see faults/slice.py)."""
    SLOW_CLOSE = "slow_close"
    """`value`: seconds a close is held before it is passed on."""
    LIMIT = "limit"
    """`value`: bytes this direction may still carry before the connection is closed."""
    CANCEL_BACKEND = "cancel_backend"
    """Send the protocol's cancel request to the upstream `delay` seconds from now."""


ENDS_THE_WALK = frozenset({Verdict.PASS, Verdict.KILL, Verdict.RESET, Verdict.DROP,
                           Verdict.ERROR, Verdict.HANG})
"""Verdicts after which the faults later in the list do not see the frame."""


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    delay: float = 0.0
    value: Any = None


FORWARD = Decision(Verdict.FORWARD)
KILL = Decision(Verdict.KILL)
RESET = Decision(Verdict.RESET)
DROP = Decision(Verdict.DROP)
PASS = Decision(Verdict.PASS)


@dataclass(slots=True)
class FaultConnectionState:
    """One fault's state on one connection; a replaced fault's state is never reused."""

    after_counts: list[int]
    enabled: bool | None = None
    """Whether where() and connectionProbability() let the fault act on this connection;
    None until that can be decided (where() waits for the startup parameters)."""


@dataclass(slots=True)
class ConnectionState:
    """Per-connection state of the fault engine."""

    number: int = 0
    """The connection's number on this proxy: 1, 2, ... from its start, never reset (the
    recorder numbers connections its own way, from 0 after each recorder.reset(), as
    Citus's expected outputs show them)."""
    client: str = "?"
    """The client's address, HOST:PORT."""
    agent: ConnectionAgent | None = None
    """The protocol's per-connection state (startup parameters, derived fields, replies)."""
    client_frames_seen: int = 0
    """Client frames seen on this connection (the frame being judged included)."""
    server_frames_seen: int = 0
    faults: dict[int, FaultConnectionState] = field(default_factory=dict)
    """By installed fault id."""


@dataclass(slots=True)
class SharedState:
    """What one installed fault shares across connections."""

    name: str = "conn"
    seed: int = 0
    killall_fired: bool = False
    matched: int = 0
    """Frames that passed the fault's filters (whether or not an after() or probability()
    then let them through)."""
    fired: int = 0
    """Times the fault acted."""


def chance(seed: int, name: str, *key: object) -> float:
    """A number in [0, 1) that depends only on its arguments: the seeded randomness of
    probability(), connectionProbability() and jitter, the same for the same traffic."""
    text = "\0".join(map(str, (seed, name, *key))).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def frame_number(frame: Frame, conn: ConnectionState) -> int:
    return conn.client_frames_seen if frame.from_client else conn.server_frames_seen


class Fault(Protocol):
    """One action at the end of a command's chain."""

    name: ClassVar[str]

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        """Called when a frame reaches the end of the chain; may have side effects."""
        ...
