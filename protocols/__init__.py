"""Protocol definitions and incremental framers, one module per protocol.

`get(name)` returns a protocol's `ProtocolSpec`; `names()` lists the registered ones.
Adding a protocol is one new module exposing `PROTOCOL` plus one line in `_MODULES`.
"""

from __future__ import annotations

import importlib

from .base import (
    BACKEND,
    FRONTEND,
    OPAQUE,
    PROTOCOL_ERROR,
    ConnectionAgent,
    ErrorPlan,
    Frame,
    Framer,
    MessageSpec,
    ProtocolSpec,
    Session,
    text_of,
)
from .batch import FrameBatch, FrameRun, TypeTable

_MODULES = {
    "postgres": "wirefault.protocols.postgres",
    "wallaroo": "wirefault.protocols.wallaroo",
    "raw": "wirefault.protocols.raw",
}


def names() -> list[str]:
    """The registered protocol names."""
    return list(_MODULES)


def get(name: str) -> ProtocolSpec:
    """The protocol called `name`; ValueError naming the known ones otherwise."""
    try:
        module = _MODULES[name]
    except KeyError:
        raise ValueError(
            f"unknown protocol {name!r}; known: {', '.join(_MODULES)}"
        ) from None
    return importlib.import_module(module).PROTOCOL


__all__ = [
    "BACKEND",
    "FRONTEND",
    "OPAQUE",
    "PROTOCOL_ERROR",
    "ConnectionAgent",
    "ErrorPlan",
    "Frame",
    "FrameBatch",
    "FrameRun",
    "Framer",
    "MessageSpec",
    "ProtocolSpec",
    "Session",
    "TypeTable",
    "get",
    "names",
    "text_of",
]
