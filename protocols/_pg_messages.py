"""The PostgreSQL v3 message catalogue: one construct layout per message, written once.

Each message is framed one of three ways on the wire:
- typed: a type byte, an Int32 length (counting itself), then the body (almost everything);
- untyped: an Int32 length then the body (the client's first message: StartupMessage and the
  SSL / GSSAPI / cancel requests, told apart by the Int32 code opening the body);
- bare: the single byte the server answers an SSLRequest / GSSENCRequest with.
The layout describes the body; the framing around it is added here. `decode` parses with a
fast parser derived from the layout (see `_pg_layout`), `encode` builds with construct.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from construct import (
    Adapter,
    Bytes,
    Const,
    Construct,
    GreedyBytes,
    Int8ub,
    Int16sb,
    Int16ub,
    Int32sb,
    Int32ub,
    Renamed,
    Struct,
)

from ._pg_layout import (
    Char,
    Counted,
    Entries,
    ListUntil,
    NullableBytes,
    RenamedKeys,
    SecretKey,
    Text,
    fast_parser,
)
from .base import BACKEND, FRONTEND, MessageSpec

BOTH = frozenset({FRONTEND, BACKEND})
CLIENT = frozenset({FRONTEND})
SERVER = frozenset({BACKEND})

PROTOCOL_VERSION_3_0 = 3 << 16
"""StartupMessage's protocol_version for protocol 3.0 (196608)."""
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104

TYPED, UNTYPED, BARE = "typed", "untyped", "bare"

_TYPED_HEADER = struct.Struct(">BI")
_LENGTH = struct.Struct(">I")


@dataclass(frozen=True)
class Wire:
    """How a message is framed: its framing kind, type byte (typed) and layout."""

    kind: str
    layout: Construct
    type_byte: int | None = None
    request_code: int | None = None
    auth_code: int | None = None


WIRE: dict[str, Wire] = {}
"""Per message name, its framing and construct layout (the one place each is written)."""
CATALOGUE: dict[str, MessageSpec] = {}
"""Per message name, its MessageSpec."""


def _field_names(layout: Construct) -> tuple[str, ...]:
    return tuple(member.name for member in getattr(layout, "subcons", ()) if member.name)


def _check_end(name: str, data: bytes, end: int) -> None:
    if end != len(data):
        raise ValueError(f"{name} body has {len(data) - end} unexpected trailing bytes")


def _typed_codec(
    name: str, type_byte: int, layout: Construct, defaults: Mapping[str, Any]
) -> tuple[Callable[[bytes], dict[str, Any]], Callable[..., bytes]]:
    parse_body = fast_parser(layout)
    unpack_header = _TYPED_HEADER.unpack_from

    def decode(data: bytes) -> dict[str, Any]:
        found, length = unpack_header(data)
        if found != type_byte:
            raise ValueError(f"{name} starts with type byte {found:#04x}, not {type_byte:#04x}")
        if length != len(data) - 1:
            raise ValueError(f"{name} declares length {length} but holds {len(data) - 1}")
        values, end = parse_body(data, 5)
        if end != len(data):
            _check_end(name, data, end)
        return values

    def encode(**fields: Any) -> bytes:
        body = layout.build({**defaults, **fields})
        return _TYPED_HEADER.pack(type_byte, len(body) + 4) + body

    return decode, encode


def _untyped_codec(
    name: str, layout: Construct, defaults: Mapping[str, Any]
) -> tuple[Callable[[bytes], dict[str, Any]], Callable[..., bytes]]:
    parse_body = fast_parser(layout)

    def decode(data: bytes) -> dict[str, Any]:
        (length,) = _LENGTH.unpack_from(data)
        if length != len(data):
            raise ValueError(f"{name} declares length {length} but holds {len(data)}")
        values, end = parse_body(data, 4)
        _check_end(name, data, end)
        return values

    def encode(**fields: Any) -> bytes:
        body = layout.build({**defaults, **fields})
        return _LENGTH.pack(len(body) + 4) + body

    return decode, encode


def _bare_codec(
    name: str, layout: Construct, defaults: Mapping[str, Any]
) -> tuple[Callable[[bytes], dict[str, Any]], Callable[..., bytes]]:
    parse_body = fast_parser(layout)

    def decode(data: bytes) -> dict[str, Any]:
        values, end = parse_body(data, 0)
        _check_end(name, data, end)
        return values

    def encode(**fields: Any) -> bytes:
        return layout.build({**defaults, **fields})

    return decode, encode


def _add(
    name: str,
    wire: Wire,
    directions: frozenset[str],
    doc: str,
    fields: tuple[str, ...] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    defaults = defaults or {}
    if wire.kind == TYPED:
        assert wire.type_byte is not None
        decode, encode = _typed_codec(name, wire.type_byte, wire.layout, defaults)
    elif wire.kind == UNTYPED:
        decode, encode = _untyped_codec(name, wire.layout, defaults)
    else:
        decode, encode = _bare_codec(name, wire.layout, defaults)
    WIRE[name] = wire
    CATALOGUE[name] = MessageSpec(
        name=name,
        directions=directions,
        fields=fields if fields is not None else _field_names(wire.layout),
        decode=decode,
        encode=encode,
        doc=doc,
        payload_offset=5 if wire.kind == TYPED and _is_one_payload(wire.layout) else None,
        sole_text=(_sole_text_name(wire.layout), wire.type_byte)  # type: ignore[arg-type]
        if wire.kind == TYPED and _sole_text_name(wire.layout) else None,
    )


def _sole_text_name(layout: Construct) -> str | None:
    """The name of `layout`'s only field when it is NUL-terminated text (`Text`)."""
    if not isinstance(layout, Struct) or len(layout.subcons) != 1:
        return None
    field = layout.subcons[0]
    return field.name if isinstance(field, Renamed) and field.subcon is Text else None


def _is_one_payload(layout: Construct) -> bool:
    """Whether `layout` is a single bytes field running to the end (GreedyBytes)."""
    if not isinstance(layout, Struct) or len(layout.subcons) != 1:
        return False
    field = layout.subcons[0]
    return isinstance(field, Renamed) and field.subcon is GreedyBytes


def typed(
    name: str,
    type_char: str,
    directions: frozenset[str],
    layout: Construct,
    doc: str,
    defaults: Mapping[str, Any] | None = None,
    fields: tuple[str, ...] | None = None,
) -> None:
    _add(name, Wire(TYPED, layout, ord(type_char)), directions, doc, fields, defaults)


EMPTY = Struct()

# --- frontend -----------------------------------------------------------------------------

typed("Bind", "B", CLIENT, Struct(
    "portal" / Text,
    "statement" / Text,
    "parameter_formats" / Counted(Int16ub),
    "parameters" / Counted(NullableBytes()),
    "result_formats" / Counted(Int16ub),
), "Binds parameters to a prepared statement, making a portal.",
    defaults={"portal": "", "statement": "", "parameter_formats": [], "parameters": [],
              "result_formats": []})
typed("Close", "C", CLIENT, Struct("kind" / Char, "name" / Text),
      "Closes a prepared statement (kind S) or portal (kind P).", defaults={"name": ""})
typed("CopyData", "d", BOTH, Struct("data" / GreedyBytes), "A chunk of COPY data.",
      defaults={"data": b""})
typed("CopyDone", "c", BOTH, EMPTY, "End of COPY data.")
typed("CopyFail", "f", CLIENT, Struct("message" / Text), "Aborts a COPY FROM STDIN.")
typed("Describe", "D", CLIENT, Struct("kind" / Char, "name" / Text),
      "Asks to describe a prepared statement (kind S) or portal (kind P).",
      defaults={"name": ""})
typed("Execute", "E", CLIENT, Struct("portal" / Text, "max_rows" / Int32ub),
      "Runs a portal (max_rows 0: all rows).", defaults={"portal": "", "max_rows": 0})
typed("Flush", "H", CLIENT, EMPTY, "Asks the server to send its pending output.")
typed("FunctionCall", "F", CLIENT, Struct(
    "function_oid" / Int32ub,
    "argument_formats" / Counted(Int16ub),
    "arguments" / Counted(NullableBytes()),
    "result_format" / Int16ub,
), "Calls a function (fast-path interface).",
    defaults={"argument_formats": [], "arguments": [], "result_format": 0})
typed("GSSResponse", "p", CLIENT, Struct("data" / GreedyBytes),
      "A GSSAPI or SSPI token (after AuthenticationGSS / GSSContinue / SSPI).")
typed("Parse", "P", CLIENT, Struct(
    "statement" / Text,
    "query" / Text,
    "parameter_types" / Counted(Int32ub),
), "Prepares a statement (statement '' is the unnamed one).",
    defaults={"statement": "", "parameter_types": []})
typed("PasswordMessage", "p", CLIENT, Struct("password" / Text),
      "A cleartext or MD5-hashed password.")
typed("Query", "Q", CLIENT, Struct("query" / Text), "A simple-protocol query string.")
typed("SASLInitialResponse", "p", CLIENT, Struct(
    "mechanism" / Text,
    "data" / NullableBytes(),
), "The chosen SASL mechanism and its first message (data None: none).")
typed("SASLResponse", "p", CLIENT, Struct("data" / GreedyBytes), "A SASL message.")
typed("Sync", "S", CLIENT, EMPTY, "Ends an extended-protocol batch.")
typed("Terminate", "X", CLIENT, EMPTY, "The client closes the connection.")

STARTUP_FILTERABLE = ("user", "database", "application_name", "options")


class StartupView(Adapter):
    """StartupMessage's common parameters also shown as fields of their own, so rules can
    filter on `user=` or `database=`; `parameters` keeps them all in wire order."""

    def _decode(self, obj: Mapping[str, Any], context: Any, path: Any) -> dict[str, Any]:
        parameters = obj["parameters"]
        view: dict[str, Any] = {"protocol_version": obj["protocol_version"]}
        for key in STARTUP_FILTERABLE:
            if key in parameters:
                view[key] = parameters[key]
        view["parameters"] = parameters
        return view

    def _encode(self, obj: Mapping[str, Any], context: Any, path: Any) -> dict[str, Any]:
        parameters = dict(obj.get("parameters") or {})
        added = {}
        for key in STARTUP_FILTERABLE:
            value = obj.get(key)
            if value is None:
                continue
            if key in parameters:
                parameters[key] = value
            else:
                added[key] = value
        return {"protocol_version": obj["protocol_version"], "parameters": {**added, **parameters}}


_add("StartupMessage", Wire(UNTYPED, StartupView(Struct(
    "protocol_version" / Int32ub,
    "parameters" / Entries(Text, Text, end=""),
))), CLIENT, "The client's first message: protocol version and parameters.",
    fields=("protocol_version", *STARTUP_FILTERABLE, "parameters"),
    defaults={"protocol_version": PROTOCOL_VERSION_3_0, "parameters": {}})
_add("SSLRequest", Wire(UNTYPED, Struct(Const(SSL_REQUEST_CODE, Int32ub)),
                        request_code=SSL_REQUEST_CODE),
     CLIENT, "Asks to switch to TLS before the startup.")
_add("GSSENCRequest", Wire(UNTYPED, Struct(Const(GSSENC_REQUEST_CODE, Int32ub)),
                           request_code=GSSENC_REQUEST_CODE),
     CLIENT, "Asks to switch to GSSAPI encryption before the startup.")
_add("CancelRequest", Wire(UNTYPED, Struct(
    Const(CANCEL_REQUEST_CODE, Int32ub),
    "pid" / Int32ub,
    "secret_key" / SecretKey,
), request_code=CANCEL_REQUEST_CODE), CLIENT,
    "Asks, on a new connection, to cancel the query running in backend `pid`.")

# --- backend ------------------------------------------------------------------------------

_AUTHENTICATIONS: tuple[tuple[str, int, tuple[Any, ...], str], ...] = (
    ("AuthenticationOk", 0, (), "Authentication succeeded."),
    ("AuthenticationKerberosV5", 2, (), "Kerberos V5 authentication is required."),
    ("AuthenticationCleartextPassword", 3, (), "A cleartext password is required."),
    ("AuthenticationMD5Password", 5, ("salt" / Bytes(4),),
     "An MD5-hashed password is required, salted with `salt`."),
    ("AuthenticationGSS", 7, (), "GSSAPI authentication is required."),
    ("AuthenticationGSSContinue", 8, ("data" / GreedyBytes,), "GSSAPI or SSPI data."),
    ("AuthenticationSSPI", 9, (), "SSPI authentication is required."),
    ("AuthenticationSASL", 10, ("mechanisms" / ListUntil(Text, end=""),),
     "SASL authentication is required, with one of `mechanisms`."),
    ("AuthenticationSASLContinue", 11, ("data" / GreedyBytes,), "A SASL challenge."),
    ("AuthenticationSASLFinal", 12, ("data" / GreedyBytes,), "SASL outcome data."),
)
for _name, _code, _members, _doc in _AUTHENTICATIONS:
    _add(_name, Wire(TYPED, Struct(Const(_code, Int32ub), *_members), ord("R"),
                     auth_code=_code), SERVER, _doc)

typed("BackendKeyData", "K", SERVER, Struct("pid" / Int32ub, "secret_key" / SecretKey),
      "The backend's process id and the key a CancelRequest must give.")
typed("BindComplete", "2", SERVER, EMPTY, "Bind succeeded.")
typed("CloseComplete", "3", SERVER, EMPTY, "Close succeeded.")
typed("CommandComplete", "C", SERVER, Struct("command" / Text),
      "A command finished; `command` is its tag, e.g. 'INSERT 0 1'.")
for _name, _char, _doc in (
    ("CopyInResponse", "G", "The server is ready for COPY FROM STDIN data."),
    ("CopyOutResponse", "H", "The server starts sending COPY TO STDOUT data."),
    ("CopyBothResponse", "W", "The server starts a COPY in both directions (replication)."),
):
    typed(_name, _char, SERVER, Struct("format" / Int8ub, "column_formats" / Counted(Int16ub)),
          _doc + " format 0: text, 1: binary.", defaults={"format": 0, "column_formats": []})
typed("DataRow", "D", SERVER, Struct("values" / Counted(NullableBytes())),
      "One result row: column values as bytes, None for NULL.")
typed("EmptyQueryResponse", "I", SERVER, EMPTY, "The query string was empty.")

ERROR_FIELD_NAMES: dict[str, str] = {
    "S": "severity",
    "V": "severity_nonlocalized",
    "C": "code",
    "M": "message",
    "D": "detail",
    "H": "hint",
    "P": "position",
    "p": "internal_position",
    "q": "internal_query",
    "W": "where",
    "s": "schema",
    "t": "table",
    "c": "column",
    "d": "datatype",
    "n": "constraint",
    "F": "file",
    "L": "line",
    "R": "routine",
}
"""ErrorResponse / NoticeResponse field codes and their names; unknown codes keep the
one-letter code as their name."""

for _name, _char, _doc in (
    ("ErrorResponse", "E", "An error; `code` is its SQLSTATE (e.g. 57014 query_canceled)."),
    ("NoticeResponse", "N", "A notice (warning, RAISE NOTICE...)."),
):
    typed(_name, _char, SERVER, RenamedKeys(Entries(Char, Text, end="\0"), ERROR_FIELD_NAMES),
          _doc, fields=tuple(ERROR_FIELD_NAMES.values()))

typed("FunctionCallResponse", "V", SERVER, Struct("result" / NullableBytes()),
      "A FunctionCall's result (None: NULL).")
typed("NegotiateProtocolVersion", "v", SERVER, Struct(
    "newest_minor_version" / Int32ub,
    "unrecognized_options" / Counted(Text, count=Int32ub),
), "The server supports an older minor version or not all requested options.")
typed("NoData", "n", SERVER, EMPTY, "The described statement returns no rows.")
typed("NotificationResponse", "A", SERVER, Struct(
    "pid" / Int32ub,
    "channel" / Text,
    "payload" / Text,
), "A NOTIFY on a channel this session LISTENs to.", defaults={"payload": ""})
typed("ParameterDescription", "t", SERVER, Struct("parameter_types" / Counted(Int32ub)),
      "The type OIDs of a prepared statement's parameters.")
typed("ParameterStatus", "S", SERVER, Struct("name" / Text, "value" / Text),
      "A run-time parameter's value (server_version, TimeZone...).")
typed("ParseComplete", "1", SERVER, EMPTY, "Parse succeeded.")
typed("PortalSuspended", "s", SERVER, EMPTY, "Execute stopped at max_rows.")
typed("ReadyForQuery", "Z", SERVER, Struct("status" / Char),
      "Ready for a new query; status I: idle, T: in a transaction, E: in a failed one.",
      defaults={"status": "I"})
typed("RowDescription", "T", SERVER, Struct("columns" / Counted(Struct(
    "name" / Text,
    "table_oid" / Int32ub,
    "column_number" / Int16sb,
    "type_oid" / Int32ub,
    "type_size" / Int16sb,
    "type_modifier" / Int32sb,
    "format" / Int16ub,
))), "The columns of the rows to come.")

_add("SSLResponse", Wire(BARE, Struct("answer" / Char)), SERVER,
     "The server's one-byte answer to SSLRequest: S (go ahead with TLS) or N (refused).")
_add("GSSENCResponse", Wire(BARE, Struct("answer" / Char)), SERVER,
     "The server's one-byte answer to GSSENCRequest: G (accepted) or N (refused).")

UNTYPED_BY_CODE: dict[int, str] = {
    wire.request_code: name for name, wire in WIRE.items() if wire.request_code is not None
}
"""The untyped requests by the code opening their body."""
AUTHENTICATION_BY_CODE: dict[int, MessageSpec] = {
    wire.auth_code: CATALOGUE[name] for name, wire in WIRE.items() if wire.auth_code is not None
}
"""The Authentication* messages by their Int32 code."""


def typed_table(direction: str) -> list[MessageSpec | None]:
    """Per type byte, the message a direction sends with it; None for unknown bytes and for
    bytes several messages share ('p', 'R'), resolved from the connection's state."""
    by_byte: dict[int, list[MessageSpec]] = {}
    for name, wire in WIRE.items():
        spec = CATALOGUE[name]
        if wire.kind == TYPED and direction in spec.directions:
            assert wire.type_byte is not None
            by_byte.setdefault(wire.type_byte, []).append(spec)
    table: list[MessageSpec | None] = [None] * 256
    for type_byte, specs in by_byte.items():
        if len(specs) == 1:
            table[type_byte] = specs[0]
    return table


def shared_type_bytes(direction: str) -> frozenset[int]:
    """The type bytes several of a direction's messages share."""
    seen: dict[int, int] = {}
    for name, wire in WIRE.items():
        if wire.kind == TYPED and direction in CATALOGUE[name].directions:
            assert wire.type_byte is not None
            seen[wire.type_byte] = seen.get(wire.type_byte, 0) + 1
    return frozenset(b for b, count in seen.items() if count > 1)
