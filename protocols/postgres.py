"""PostgreSQL's frontend/backend protocol, version 3.

`PROTOCOL` is the public face: the message catalogue (every frontend and backend message,
each Authentication request under its own name, and the one-byte answers to SSLRequest /
GSSENCRequest) and `new_session(max_frame=None)`, whose `.client` and `.server` framers frame
the two directions of one connection incrementally, and `new_agent()`, a `PgAgent` per
connection (startup parameters, cancel key, the `query` derived field, injected errors:
see `_pg_agent`).

Layouts are written once as construct structs (see `_pg_messages`); framing lives in
`_pg_framer`. Field names are public: rules filter on them (`onQuery(query="^COMMIT")`,
`onErrorResponse(code="57014")`).
"""

from __future__ import annotations

from ._pg_agent import PgAgent
from ._pg_framer import DEFAULT_MAX_FRAME, MAX_STARTUP_PACKET, PgFramer, PgSession, new_session
from ._pg_messages import (
    CANCEL_REQUEST_CODE,
    CATALOGUE,
    ERROR_FIELD_NAMES,
    GSSENC_REQUEST_CODE,
    PROTOCOL_VERSION_3_0,
    SSL_REQUEST_CODE,
    STARTUP_FILTERABLE,
)
from .base import OPAQUE, PROTOCOL_ERROR, ProtocolSpec

PROTOCOL = ProtocolSpec(
    name="postgres",
    messages=CATALOGUE,
    new_session=new_session,
    default_max_frame=DEFAULT_MAX_FRAME,
    description="PostgreSQL frontend/backend protocol v3 (with SSL/GSSAPI negotiation).",
    extra_types=(PROTOCOL_ERROR, OPAQUE, "SSLResponse", "GSSENCResponse"),
    new_agent=PgAgent,
    derived_fields={"Bind": ("query",), "Execute": ("query",), "Describe": ("query",),
                    "Close": ("query",)},
    error_parameters=("code", "message", "severity"),
    cancels_backends=True,
    closing_types=frozenset({"Terminate"}),
)

__all__ = [
    "CANCEL_REQUEST_CODE",
    "CATALOGUE",
    "DEFAULT_MAX_FRAME",
    "ERROR_FIELD_NAMES",
    "GSSENC_REQUEST_CODE",
    "MAX_STARTUP_PACKET",
    "PROTOCOL",
    "PROTOCOL_VERSION_3_0",
    "SSL_REQUEST_CODE",
    "STARTUP_FILTERABLE",
    "PgAgent",
    "PgFramer",
    "PgSession",
    "new_session",
]
