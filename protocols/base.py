"""The contract every protocol module fulfils: frames, message specs, framers, sessions.

A protocol module offers a `ProtocolSpec`: a catalogue of `MessageSpec`s (the public names
users filter on, with their fields) and a factory for a `Session`, which holds one `Framer`
per direction of a connection. Framing (finding boundaries and the type) is cheap and eager;
decoding fields is paid only when `Frame.fields` is first read.
"""

from __future__ import annotations

import itertools
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .batch import FrameBatch

FRONTEND = "frontend"
"""Direction of messages sent by the client (the side that opened the connection)."""
BACKEND = "backend"
"""Direction of messages sent by the server."""

PROTOCOL_ERROR = "ProtocolError"
"""Type of the frame a framer yields when its input breaks the protocol."""
OPAQUE = "Opaque"
"""Type of frames passed through without framing (encrypted streams, after a protocol error)."""


_typed_header = struct.Struct(">BI").unpack_from
"""A typed frame's type byte and length (`MessageSpec.sole_text`)."""


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """One message type of a protocol's catalogue.

    `decode` takes the whole frame's bytes and returns its fields by name; `encode` takes the
    fields as keyword arguments and returns the whole frame's bytes, byte-exact with what
    `decode` accepts. `fields` lists every field name `decode` returns, in wire order.
    """

    name: str
    directions: frozenset[str]
    fields: tuple[str, ...]
    decode: Callable[[bytes], dict[str, Any]]
    encode: Callable[..., bytes]
    doc: str = ""
    payload_offset: int | None = None
    """Set when the message is this many header bytes followed by its only field, a bytes
    payload to the end of the frame (PostgreSQL's CopyData): such a frame renders from the
    start of its payload and its size (`cut_payload`), without decoding or copying it."""
    sole_text: tuple[str, int] | None = None
    """(field name, type byte) when the message is a type byte, a big-endian 32-bit length
    and its only field, NUL-terminated text (PostgreSQL's Query, CommandComplete):
    `Frame.field_text` of a well-formed one slices it out of the frame without decoding the
    frame (a regex filter on a Query's text runs per transaction)."""


class Frame:
    """One protocol frame, as found by a framer.

    `data` is the whole frame's bytes (reassembled when TCP split it). `span` is the part of
    the read that completed this frame: `(start, end)` offsets into the bytes given to the
    `feed` call that returned it (`start` is 0 for a frame begun in an earlier read).
    `alias` is a second name the frame answers to (a Wallaroo two-phase-commit message is
    also a `Message`). `error` explains a `ProtocolError` frame.
    """

    __slots__ = ("_fields", "_text", "_text_field", "alias", "data", "encrypted", "error",
                 "from_client", "span", "spec", "type")

    def __init__(
        self,
        type: str,
        data: bytes,
        span: tuple[int, int],
        from_client: bool,
        spec: MessageSpec | None = None,
        alias: str | None = None,
        error: str | None = None,
        encrypted: bool = False,
    ) -> None:
        self.type = type
        self.data = data
        self.span = span
        self.from_client = from_client
        self.spec = spec
        self.alias = alias
        self.error = error
        self.encrypted = encrypted
        self._fields: dict[str, Any] | None = None
        self._text_field: str | None = None  # the field `_text` holds (`field_text`)

    @property
    def fields(self) -> dict[str, Any]:
        """The decoded fields (decoded on first access, then cached).

        A body the spec cannot decode gives `{}` and sets `error`: decoding never raises.
        """
        if self._fields is None:
            if self.spec is None:
                self._fields = {"error": self.error} if self.error else {}
            else:
                try:
                    self._fields = self.spec.decode(self.data)
                except Exception as exc:  # any decoder failure is reported, never raised
                    self.error = f"cannot decode {self.type}: {exc}"
                    self._fields = {}
        return self._fields

    def fields_once(self) -> dict[str, Any]:
        """`fields`, without keeping what it decodes for the next reader: for one that keeps
        only a cut copy (the recorder), so a large frame's decoded values are freed at once
        instead of living as long as the frame."""
        if self._fields is not None:
            return self._fields
        fields = self.fields
        self._fields = None
        return fields

    def field_text(self, name: str) -> str | None:
        """The text form of one field, as regex filters see it; None when absent.

        The last answer is kept: several faults filtering the same field (three Query
        regexes, say) see one decoding, not one each."""
        if self._text_field == name:
            return self._text
        text: str | None = None
        sole = self.spec.sole_text if self._fields is None and self.spec is not None else None
        if sole is not None and sole[0] == name:
            text = sole_text(self.data, sole[1])
        if text is None:
            fields = self.fields
            if name in fields:
                text = text_of(fields[name])
        self._text_field, self._text = name, text
        return text

    def render(self, limits: Limits | None = None) -> str:
        """A one-line readable form, e.g. `Query(query=SELECT 1)`.

        With `limits`, every value is cut to them before any of it is rendered (see
        `cut_fields`), so a large frame costs what its cut copy costs, not its size."""
        if self.type == PROTOCOL_ERROR:
            return f"{PROTOCOL_ERROR}(error={self.error})"
        if self.spec is None:
            return f"{self.type}(length={len(self.data)})"
        return render_cut(self.type, cut_fields(self.fields, limits or NO_LIMITS)[0])

    def __repr__(self) -> str:
        direction = "C>S" if self.from_client else "S>C"
        return f"<Frame {direction} {self.type} {len(self.data)}B span={self.span}>"


@dataclass(frozen=True, slots=True)
class Limits:
    """How much of each value a rendering keeps; None keeps all of it."""

    chars: int | None = None
    """Of a text value, in characters."""
    bytes: int | None = None
    """Of a bytes value, in bytes."""
    items: int | None = None
    """Of a list or map, in items (each item then cut by these limits too)."""


NO_LIMITS = Limits()

# A cut copy is one flat tuple of strings, bytes and numbers, which the garbage collector
# stops tracking at its first pass (nested tuples would take a pass per level). Each value is
# written as itself, except an int and a value that was cut or has items, which start with a
# tag (an int): `_WHOLE, 7`; `_CUT_BYTES, first bytes, full size`; `_CUT_TEXT, first
# characters, full length`; `_LIST, full count, kept count, item...`; `_MAP, full count,
# kept count, key, value...`.
_WHOLE, _CUT_BYTES, _CUT_TEXT, _LIST, _MAP = range(5)

_OBJECT_BYTES = 40
"""Roughly what CPython spends on one small object besides its content (33 for bytes, 49 for
text, 28 for an int), for the estimate of what a cut copy holds."""


def cut_fields(fields: Mapping[str, Any], limits: Limits) -> tuple[tuple[Any, ...], int]:
    """A bounded copy of decoded fields, to render later with `render_cut`: each field's
    name then its value cut to `limits` (nested values each by its own limit), in one flat
    tuple; and an estimate of the bytes the copy holds."""
    cut: list[Any] = []
    size = _OBJECT_BYTES
    for name, value in fields.items():
        cut.append(name)
        size += _cut_into(cut, value, limits)
    return tuple(cut), size + 8 * len(cut)


def cut_payload(spec: MessageSpec, head: bytes, size: int,
                limits: Limits) -> tuple[tuple[Any, ...], int]:
    """`cut_fields` of a frame of a payload message (see `MessageSpec.payload_offset`) whose
    payload is `size` bytes long and starts with `head` (at least `limits.bytes` of it),
    without decoding the frame."""
    (name,) = spec.fields
    cut = [name]
    held = _cut_bytes_into(cut, head, size, limits.bytes)
    return tuple(cut), held + _OBJECT_BYTES + 8 * len(cut)


def _cut_into(cut: list[Any], value: Any, limits: Limits) -> int:
    """Appends `value`, cut to `limits`, to the cut copy `cut`; returns roughly the bytes of
    the objects it added (besides their slots)."""
    if isinstance(value, bytes | bytearray | memoryview):  # the usual values first
        return _cut_bytes_into(cut, value, len(value), limits.bytes)
    if isinstance(value, list | tuple):
        return _cut_items_into(cut, _LIST, len(value), value, limits)
    if isinstance(value, str):
        most = limits.chars
        if most is not None and len(value) > most:
            cut += (_CUT_TEXT, value[:most], len(value))
            return most + 2 * _OBJECT_BYTES
        cut.append(value)
        return len(value) + _OBJECT_BYTES
    if type(value) is int:
        cut += (_WHOLE, value)
        return _OBJECT_BYTES
    if value is None or isinstance(value, int | float):  # bool, float: not tags
        cut.append(value)
        return _OBJECT_BYTES
    if isinstance(value, Mapping):  # last: an ABC's check costs more than the others
        return _cut_items_into(cut, _MAP, len(value), value.items(), limits)
    return _cut_into(cut, str(value), limits)


def _cut_bytes_into(cut: list[Any], value: bytes | bytearray | memoryview, size: int,
                    most: int | None) -> int:
    """`_cut_into` for a bytes value of `size` bytes that starts with `value`."""
    if most is not None and size > most:
        cut += (_CUT_BYTES, bytes(value[:most]), size)
        return most + 2 * _OBJECT_BYTES
    cut.append(value if type(value) is bytes else bytes(value))
    return size + _OBJECT_BYTES


def _cut_items_into(cut: list[Any], tag: int, count: int, items: Iterable[Any],
                    limits: Limits) -> int:
    """`_cut_into` for a list (tag _LIST) or the (key, value) pairs of a map (_MAP) of
    `count` items: the first `limits.items` of them, each cut."""
    kept = count if limits.items is None else min(count, limits.items)
    cut += (tag, count, kept)
    held = 0
    for item in itertools.islice(items, kept):
        if tag == _MAP:
            held += _cut_into(cut, item[0], limits) + _cut_into(cut, item[1], limits)
        else:
            held += _cut_into(cut, item, limits)
    return held


def render_cut(type_name: str, cut: tuple[Any, ...]) -> str:
    """The readable form of a frame from the cut copy of its fields (`cut_fields`): each
    value's text, with control characters escaped, and where a value was cut, its full size
    (`...(8192 bytes)`, `...(5000 chars)`, `...(300 items)`)."""
    fields = []
    at = 0
    while at < len(cut):
        text, after = _text_at(cut, at + 1)
        fields.append(f"{cut[at]}={printable(text)}")
        at = after
    return f"{type_name}({', '.join(fields)})"


def _text_at(cut: tuple[Any, ...], at: int) -> tuple[str, int]:
    """The text of the value written at `cut[at]` (`text_of` of the value it was cut from,
    as far as it was kept, marked where cut), and where the next value starts."""
    token = cut[at]
    if type(token) is not int:
        return text_of(token), at + 1
    if token == _WHOLE:
        return text_of(cut[at + 1]), at + 2
    if token in (_CUT_BYTES, _CUT_TEXT):
        unit = "bytes" if token == _CUT_BYTES else "chars"
        return f"{text_of(cut[at + 1])}...({cut[at + 2]} {unit})", at + 3
    count, kept = cut[at + 1], cut[at + 2]
    at += 3
    parts = []
    for _ in range(kept):
        text, at = _text_at(cut, at)
        if token == _MAP:
            value, at = _text_at(cut, at)
            text = f"{text}: {value}"
        parts.append(text)
    if count > kept:
        parts.append(f"...({count} items)")
    return (_list_text(parts) if token == _LIST else _map_text(parts)), at


def _list_text(parts: Iterable[str]) -> str:
    return "[" + ", ".join(parts) + "]"


def _map_text(entries: Iterable[str]) -> str:
    return "{" + ", ".join(entries) + "}"


def text_of(value: Any) -> str:
    """The text form of a decoded field value, used by regex filters and the recorder.

    Text is itself, except that each byte that was not valid UTF-8 (decoded as a surrogate
    escape) shows as `\\xNN`. Bytes are UTF-8 text when they are valid UTF-8; otherwise
    Python's bytes escapes (`\\xNN` for every non-ASCII or control byte), which cost little
    even for large binary payloads."""
    if isinstance(value, str):
        return value if value.isascii() else _undecodable_escaped(value)
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.reason == "unexpected end of data":  # text cut inside a character
                return raw[: exc.start].decode("utf-8") + repr(raw[exc.start:])[2:-1]
            return repr(raw)[2:-1]
    if value is None:
        return "NULL"
    if isinstance(value, Mapping):
        return _map_text(f"{text_of(k)}: {text_of(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return _list_text(text_of(v) for v in value)
    return str(value)


def sole_text(data: bytes, type_byte: int) -> str | None:
    """The text of a frame whose only field is NUL-terminated text (`MessageSpec.sole_text`),
    as `text_of` shows the decoded field, taken straight from its bytes; None unless the
    frame is what decode() accepts without error (the header is right and the only NUL is
    the last byte): the caller then decodes it in full, which reports the error."""
    end = len(data) - 1
    if end >= 5 and data.find(0, 5) == end and _typed_header(data) == (type_byte, end):
        text = data[5:end].decode("utf-8", "surrogateescape")
        return text if text.isascii() else _undecodable_escaped(text)
    return None


def _undecodable_escaped(text: str) -> str:
    """`text` with the bytes a tolerant decoder could not decode (surrogate escapes,
    U+DC80..U+DCFF) shown as `\\xNN`, as Python's `backslashreplace` shows them."""
    try:
        text.encode("utf-8")
        return text  # no surrogates: the usual case for non-ASCII text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no decoder makes: show its code point
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c not in (9, 10, 13)}
_CONTROL = re.compile("[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f]")  # the keys above


def printable(text: str) -> str:
    """`text` with control characters (NUL included) shown as `\\xNN`, for readable dumps.

    Tab, newline and carriage return stay: the recorder's COPY escaping shows them."""
    if _CONTROL.search(text) is None:  # the usual case: a search costs less than translate
        return text
    return text.translate(_CONTROL_ESCAPES)


class Framer(Protocol):
    """Frames one direction of a connection, incrementally.

    `feed` returns the frames completed by this read, in order; never raises; keeps a partial
    frame until the rest arrives, and never buffers more than one frame's declared length.
    """

    def feed(self, data: bytes) -> list[Frame]: ...

    def feed_batch(self, data: bytes) -> FrameBatch:
        """`feed` for the proxy's hot path: the same frames, where the framer can, with runs
        of ordinary frames kept compact (`batch.FrameRun`)."""
        ...

    @property
    def buffered(self) -> int:
        """Bytes held for a partial frame."""
        ...


class Session(Protocol):
    """Both directions of one connection. Directions may share state (PostgreSQL's SSL
    negotiation crosses them)."""

    client: Framer
    """Frames bytes sent by the client."""
    server: Framer
    """Frames bytes sent by the server."""


@dataclass(frozen=True, slots=True)
class ErrorPlan:
    """How a connection answers an injected error (the `error()` fault), from its agent."""

    to_server: bytes
    """Sent upstream in place of the triggering frame (b"": nothing)."""
    to_client: bytes
    """Sent to the client at once (b"": nothing)."""
    close: bool
    """Close the connection once `to_client` is written."""


class ConnectionAgent(Protocol):
    """Per-connection protocol state the fault engine needs beyond framing: the startup
    parameters (`where()`), derived fields (the query a PostgreSQL Execute runs), and the
    replies a protocol-level fault sends (`error()`, `cancel()`). Pure: no sockets.

    The proxy passes a frame to `observe` only while the flag of its direction is set, so
    an agent that has seen what it needs costs nothing per read."""

    watch_client: bool
    watch_server: bool
    skim_client: bool
    skim_server: bool
    """While its direction is watched: True when `observe` would change nothing for a frame
    that `skim_tests` lets by, so a read of such frames may go by unobserved."""
    skim_tests: Mapping[str, tuple[re.Pattern[str], ...] | None]
    """For skimming, by message type: None, a frame of it must be observed; patterns, it
    must be observed when one finds its sole text field (`MessageSpec.sole_text`). A type
    not named is let by."""
    track_statements: bool
    """Set by the proxy when a fault filters on a derived field: keep watching the client's
    frames that define what those fields say (PostgreSQL's Parse, Bind, Close, Query)."""
    started: bool
    """True once `parameters()` is final (the StartupMessage was seen, or the protocol has
    none): `where()` can be decided."""

    def observe(self, frame: Frame) -> bytes | None:
        """Sees a frame before the faults judge it. None: forward it as it is; else the
        bytes to forward in its place (b"": nothing), e.g. a rewritten server reply."""
        ...

    def parameters(self) -> Mapping[str, str]: ...

    def derived_field(self, frame: Frame, name: str) -> str | None: ...

    def error_plan(self, frame: Frame, code: str | None, message: str | None,
                   severity: str | None) -> ErrorPlan: ...

    def cancel_request(self) -> bytes | None:
        """A whole cancel request for this connection's server session; None before the
        server said how (PostgreSQL's BackendKeyData)."""
        ...


@dataclass(frozen=True)
class ProtocolSpec:
    """A protocol as the rest of wirefault sees it."""

    name: str
    messages: Mapping[str, MessageSpec]
    new_session: Callable[..., Session]
    """`new_session(max_frame=None)` returns a fresh `Session` (None: the default limit)."""
    default_max_frame: int
    description: str = ""
    extra_types: tuple[str, ...] = field(default=())
    """Frame types the framer can yield beyond the catalogue (e.g. `ProtocolError`)."""
    client_speaks_first: bool = True
    """Whether the client always sends before the server: then the upstream connection can
    wait for the client's first bytes; otherwise it is opened at once (a server's banner)."""
    new_agent: Callable[[], ConnectionAgent] | None = None
    """A fresh `ConnectionAgent` per connection; None: the protocol needs none."""
    derived_fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Fields a filter may name beyond a message's own, by message type (their text comes
    from the connection's agent): PostgreSQL's `query` on Bind, Execute, Describe, Close."""
    error_parameters: tuple[str, ...] | None = None
    """The parameters `error()` takes on this protocol; None: it cannot inject errors."""
    cancels_backends: bool = False
    """Whether `cancel()` without a pid can cancel the server's running work."""
    closing_types: frozenset[str] = frozenset()
    """Client messages that begin the client's close (PostgreSQL's Terminate: the server
    ends the session on it, not on the FIN behind it), which slow_close holds with it."""

    def message(self, name: str) -> MessageSpec:
        return self.messages[name]
