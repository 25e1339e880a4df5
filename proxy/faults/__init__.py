"""Faults: the actions that end a command's chain, one per module, and their registry."""

from __future__ import annotations

from collections.abc import Callable

from wirefault.proxy.dsl import Action

from .allow import Allow
from .base import (
    DROP,
    ENDS_THE_WALK,
    FORWARD,
    KILL,
    PASS,
    RESET,
    ConnectionState,
    Decision,
    Fault,
    FaultConnectionState,
    SharedState,
    Verdict,
    chance,
)
from .cancel import Cancel, CancelBackend
from .connect_delay import ConnectDelay
from .delay import Delay
from .drop import Drop
from .duplicate import Duplicate
from .error import Error
from .hang import Hang
from .kill import Kill
from .killall import KillAll
from .limit import Limit
from .reset import Reset
from .slice import Slice
from .slow_close import SlowClose
from .throttle import Throttle
from .timeout import Timeout


def _cancel(action: Action) -> Fault:
    if action.pid is not None:
        return Cancel(int(action.pid))
    return CancelBackend(float(action.option("after_ms", 100.0)))  # type: ignore[arg-type]


def _opt(action: Action, name: str, default: object = None) -> object:
    return action.option(name, default)


def _variation(action: Action) -> int | None:
    value = action.option("variation")
    return None if value is None else int(value)  # type: ignore[call-overload]


REGISTRY: dict[str, Callable[[Action], Fault]] = {
    Allow.name: lambda action: Allow(),
    Kill.name: lambda action: Kill(),
    Reset.name: lambda a: Reset(float(_opt(a, "after_ms", 0) or 0)),  # type: ignore[arg-type]
    KillAll.name: lambda action: KillAll(),
    Cancel.name: _cancel,
    ConnectDelay.name: lambda action: ConnectDelay(float(action.delay_ms or 0)),
    Delay.name: lambda a: Delay(float(_opt(a, "ms", 0)), float(_opt(a, "jitter", 0))),  # type: ignore[arg-type]
    Drop.name: lambda a: Drop() if _opt(a, "timeout_ms") is None else Timeout(
        float(_opt(a, "timeout_ms"))),  # type: ignore[arg-type]
    Duplicate.name: lambda a: Duplicate(int(_opt(a, "n", 1))),  # type: ignore[call-overload]
    Error.name: lambda a: Error(_opt(a, "code"), _opt(a, "message"),  # type: ignore[arg-type]
                                _opt(a, "severity")),
    Hang.name: lambda a: Hang(_opt(a, "ms")),  # type: ignore[arg-type]
    Throttle.name: lambda a: Throttle(int(_opt(a, "bytes_per_second", 1))),  # type: ignore[call-overload]
    Slice.name: lambda a: Slice(int(_opt(a, "size", 1)),  # type: ignore[call-overload]
                                float(_opt(a, "delay_ms", 0)),  # type: ignore[arg-type]
                                _variation(a)),
    SlowClose.name: lambda a: SlowClose(float(_opt(a, "ms", 0))),  # type: ignore[arg-type]
    Limit.name: lambda a: Limit(int(_opt(a, "bytes", 0))),  # type: ignore[call-overload]
}


def build(action: Action) -> Fault:
    """The fault for a parsed action (the parser has already validated it)."""
    return REGISTRY[action.name](action)


__all__ = [
    "DROP",
    "ENDS_THE_WALK",
    "FORWARD",
    "KILL",
    "PASS",
    "REGISTRY",
    "RESET",
    "ConnectionState",
    "Decision",
    "Fault",
    "FaultConnectionState",
    "SharedState",
    "Verdict",
    "build",
    "chance",
]
