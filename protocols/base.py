"""The contract every protocol module fulfils: frames, message specs, framers, sessions.

A protocol module offers a `ProtocolSpec`: a catalogue of `MessageSpec`s (the public names
users filter on, with their fields) and a factory for a `Session`, which holds one `Framer`
per direction of a connection. Framing (finding boundaries and the type) is cheap and eager;
decoding fields is paid only when `Frame.fields` is first read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
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
    start of its payload and its size (`render_payload`), without decoding or copying it."""


class Frame:
    """One protocol frame, as found by a framer.

    `data` is the whole frame's bytes (reassembled when TCP split it). `span` is the part of
    the read that completed this frame: `(start, end)` offsets into the bytes given to the
    `feed` call that returned it (`start` is 0 for a frame begun in an earlier read).
    `alias` is a second name the frame answers to (a Wallaroo two-phase-commit message is
    also a `Message`). `error` explains a `ProtocolError` frame.
    """

    __slots__ = ("_fields", "alias", "data", "encrypted", "error", "from_client", "span",
                 "spec", "type")

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

    def field_text(self, name: str) -> str | None:
        """The text form of one field, as regex filters see it; None when absent."""
        fields = self.fields
        if name not in fields:
            return None
        return text_of(fields[name])

    def render(self, max_value_chars: int | None = None, max_bytes: int | None = None) -> str:
        """A one-line readable form, e.g. `Query(query=SELECT 1)`.

        With `max_value_chars`, each field's text is cut to that length; with `max_bytes`,
        bytes fields are cut to that many bytes before decoding (decoding binary data costs
        per invalid byte). Large payloads then cost little to render."""
        if self.type == PROTOCOL_ERROR:
            return f"{PROTOCOL_ERROR}(error={self.error})"
        if self.spec is None:
            return f"{self.type}(length={len(self.data)})"
        inner = ", ".join(
            f"{k}={_rendered_value(v, max_value_chars, max_bytes)}"
            for k, v in self.fields.items()
        )
        return f"{self.type}({inner})"

    def __repr__(self) -> str:
        direction = "C>S" if self.from_client else "S>C"
        return f"<Frame {direction} {self.type} {len(self.data)}B span={self.span}>"


def render_payload(spec: MessageSpec, head: bytes, size: int, max_value_chars: int | None,
                   max_bytes: int) -> str:
    """`Frame.render(max_value_chars, max_bytes)` of a frame of a payload message (see
    `MessageSpec.payload_offset`) whose payload is `size` bytes long and starts with `head`
    (at least its first `max_bytes` bytes)."""
    (field_name,) = spec.fields
    value = _rendered_value(head, max_value_chars, max_bytes, size)
    return f"{spec.name}({field_name}={value})"


def _rendered_value(value: Any, max_chars: int | None, max_bytes: int | None,
                    full_size: int | None = None) -> str:
    """A field's text for `Frame.render`, cut (and marked as cut) to the given limits.
    `full_size`: the length of a bytes value of which `value` is the start."""
    size = ""
    if max_bytes is not None and isinstance(value, bytes | bytearray | memoryview):
        length = len(value) if full_size is None else full_size
        if length > max_bytes:
            size = f"...({length} bytes)"
            value = value[:max_bytes]
    text = text_of(value)
    if max_chars is not None and len(text) > max_chars:
        size = size or f"...({len(text)} chars)"
        text = text[:max_chars]
    return printable(text) + size


def text_of(value: Any) -> str:
    """The text form of a decoded field value, used by regex filters and the recorder.

    Bytes are UTF-8 text when they are valid UTF-8; otherwise Python's bytes escapes
    (`\\xNN` for every non-ASCII or control byte), which cost little even for large
    binary payloads."""
    if isinstance(value, str):
        return value
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
        return "{" + ", ".join(f"{k}: {text_of(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(text_of(v) for v in value) + "]"
    return str(value)


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

    def message(self, name: str) -> MessageSpec:
        return self.messages[name]
