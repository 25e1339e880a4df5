"""Faults: the actions that end a command's chain, one per module, and their registry."""

from __future__ import annotations

from collections.abc import Callable

from wirefault.proxy.dsl import Action

from .allow import Allow
from .base import (
    FORWARD,
    KILL,
    RESET,
    ConnectionState,
    Decision,
    Fault,
    SharedState,
    Verdict,
)
from .cancel import Cancel
from .connect_delay import ConnectDelay
from .kill import Kill
from .killall import KillAll
from .reset import Reset

REGISTRY: dict[str, Callable[[Action], Fault]] = {
    Allow.name: lambda action: Allow(),
    Kill.name: lambda action: Kill(),
    Reset.name: lambda action: Reset(),
    KillAll.name: lambda action: KillAll(),
    Cancel.name: lambda action: Cancel(int(action.pid or 0)),
    ConnectDelay.name: lambda action: ConnectDelay(float(action.delay_ms or 0)),
}


def build(action: Action) -> Fault:
    """The fault for a parsed action (the parser has already validated it)."""
    return REGISTRY[action.name](action)


__all__ = [
    "FORWARD",
    "KILL",
    "REGISTRY",
    "RESET",
    "ConnectionState",
    "Decision",
    "Fault",
    "SharedState",
    "Verdict",
    "build",
]
