"""cancel(pid): SIGINT the process, then pause the whole proxy briefly so the signal lands
before the triggering frame, or any other connection's traffic, is forwarded."""

from __future__ import annotations

import logging
import os
import signal
from typing import ClassVar

from wirefault.protocols import Frame

from .base import ConnectionState, Decision, SharedState, Verdict

logger = logging.getLogger(__name__)

HOLD_SECONDS = 0.1


def protected_pids() -> dict[int, str]:
    """Processes cancel(pid) must never signal: SIGINT would stop the proxy itself, or the
    harness that started it."""
    return {os.getpid(): "the proxy itself", os.getppid(): "the process that started the proxy"}


class Cancel:
    name: ClassVar[str] = "cancel"

    def __init__(self, pid: int, hold_seconds: float = HOLD_SECONDS) -> None:
        self.pid = pid
        self.hold = Decision(Verdict.PAUSE_PROXY, hold_seconds)

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        try:
            os.kill(self.pid, signal.SIGINT)
        except OSError as exc:  # the frame still goes through, as it would without the proxy
            logger.warning("cancel(%d): cannot signal the process: %s", self.pid, exc)
        return self.hold


class CancelBackend:
    """cancel(after_ms=100): forward the frame; after_ms later, the proxy sends the
    protocol's cancel request (PostgreSQL's CancelRequest with this connection's
    BackendKeyData) on a connection of its own to the upstream."""

    name: ClassVar[str] = "cancel"

    def __init__(self, after_ms: float) -> None:
        self.decision = Decision(Verdict.CANCEL_BACKEND, after_ms / 1000.0)

    def decide(self, frame: Frame, conn: ConnectionState, shared: SharedState) -> Decision:
        return self.decision
