"""The Wallaroo connector protocol (sources and sinks), with an incremental framer.

Every frame is a 4-byte big-endian length (counting the tag byte and the body), a 1-byte tag,
then the body; integers are big-endian and `str16` is a u16 length then UTF-8 bytes.

Directions (the side that opens the TCP connection is the client, `FRONTEND`):

- A connector source connects to a worker; a worker connects to a connector sink. Either way
  the client sends Hello, Notify, Message and EosMessage, and the server answers with Ok,
  Error, NotifyAck, Ack and Restart.
- Two-phase-commit (2PC) messages travel inside Message frames on stream 0 between a worker
  and its sink: the worker sends ListUncommitted, TwoPCPhase1 and TwoPCPhase2, the sink
  answers with ReplyUncommitted and TwoPCReply. The framer yields them under their own names
  with `alias="Message"`, so a `Message` filter sees them too.

Each message layout is written once below as a `construct` struct that both parses and
builds the whole frame. `encode(name, **fields)` and `decode_frame(frame_bytes)` are the
convenient entry points for code that speaks the protocol (e.g. test peers).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntFlag
from typing import Any

from construct import (
    Adapter,
    Check,
    Const,
    Construct,
    ConstructError,
    Container,
    Default,
    FocusedSeq,
    GreedyBytes,
    If,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64sb,
    Int64ub,
    ListContainer,
    Optional,
    Prefixed,
    PrefixedArray,
    Struct,
    Terminated,
)

from .base import (
    BACKEND,
    FRONTEND,
    OPAQUE,
    PROTOCOL_ERROR,
    ErrorPlan,
    Frame,
    MessageSpec,
    ProtocolSpec,
)
from .batch import FrameBatch

DEFAULT_MAX_FRAME = 64 * 1024 * 1024
"""Largest accepted value of the length field (tag + body), in bytes."""

LENGTH_SIZE = 4
HEADER_SIZE = LENGTH_SIZE + 1
MESSAGE_TAG = 5
TWO_PC_STREAM_ID = 0

_LENGTH = struct.Struct(">I")
_U64 = struct.Struct(">Q")

# Offsets inside a whole Message frame, used by the framer's byte peeks.
_MESSAGE_FLAGS_AT = HEADER_SIZE + 8
_MESSAGE_MIN_LENGTH = 1 + 8 + 1  # tag, stream_id, flags
_TWO_PC_TAG_AT = _MESSAGE_FLAGS_AT + 1 + 8  # after flags and message_id
_TWO_PC_MIN_SIZE = _TWO_PC_TAG_AT + 1

BOTH = frozenset({FRONTEND, BACKEND})
CLIENT_TO_SERVER = frozenset({FRONTEND})
SERVER_TO_CLIENT = frozenset({BACKEND})


class Flag(IntFlag):
    """Bits of a Message frame's `flags` byte."""

    EPHEMERAL = 1
    BOUNDARY = 2
    UNSTABLE_REFERENCE = 8
    EVENT_TIME = 16
    KEY = 32


_KNOWN_FLAGS = int(Flag.EPHEMERAL | Flag.BOUNDARY | Flag.UNSTABLE_REFERENCE | Flag.EVENT_TIME
                   | Flag.KEY)


def flags_problem(flags: int) -> str | None:
    """Why a Message `flags` byte is illegal, or None when it is legal."""
    unknown = flags & ~_KNOWN_FLAGS
    if unknown:
        return f"unknown flag bits {unknown:#04x}"
    if flags & Flag.EPHEMERAL and flags & (Flag.BOUNDARY | Flag.UNSTABLE_REFERENCE):
        return "Ephemeral excludes Boundary and UnstableReference"
    if flags & Flag.BOUNDARY and flags & (Flag.UNSTABLE_REFERENCE | Flag.KEY):
        return "Boundary excludes UnstableReference and Key"
    return None


# One lookup per Message frame in the framer instead of re-deriving the rules.
_LEGAL_FLAGS = tuple(flags_problem(value) is None for value in range(256))
LEGAL_FLAG_VALUES = tuple(value for value in range(256) if _LEGAL_FLAGS[value])
"""Every legal value of a Message `flags` byte."""


# ---------------------------------------------------------------------------------------------
# Layout building blocks


class _Text(Adapter):
    """Bytes shown as text. Invalid UTF-8 decodes through surrogate escapes, so decoding never
    fails and re-encoding restores the exact bytes (filters and dumps show such bytes as
    `\\xNN`: see `base.text_of`); encoding also accepts bytes."""

    def _decode(self, obj: bytes, context: Any, path: str) -> str:
        return obj.decode("utf-8", "surrogateescape")

    def _encode(self, obj: str | bytes, context: Any, path: str) -> bytes:
        if isinstance(obj, bytes | bytearray | memoryview):
            return bytes(obj)
        if not isinstance(obj, str):
            raise TypeError(f"text expected, got {type(obj).__name__}")
        return obj.encode("utf-8", "surrogateescape")


class _Rows(Adapter):
    """A u32 count then that many items. Decodes to a plain list (of dicts for struct items);
    building also accepts tuples in the item's field order."""

    def __init__(self, item: Construct) -> None:
        super().__init__(PrefixedArray(Int32ub, item))
        self.item_names = (
            tuple(sc.name for sc in item.subcons if sc.name) if isinstance(item, Struct) else None
        )

    def _decode(self, obj: ListContainer, context: Any, path: str) -> list[Any]:
        return [_plain(item) for item in obj]

    def _encode(self, obj: Any, context: Any, path: str) -> list[Any]:
        if self.item_names is None:
            return list(obj)
        return [
            dict(zip(self.item_names, item, strict=True)) if isinstance(item, tuple | list)
            else item
            for item in obj
        ]


def _plain(value: Any) -> Any:
    """Construct containers turned into plain dicts (without construct's private keys)."""
    if isinstance(value, Container):
        return {k: v for k, v in value.items() if not k.startswith("_")}
    return value


STR16 = _Text(Prefixed(Int16ub, GreedyBytes))
"""A u16 byte length then that many bytes, shown as text."""
STR32 = _Text(Prefixed(Int32ub, GreedyBytes))
"""A u32 byte length then that many bytes, shown as text."""


def _whole_frame(tag: int, body: tuple[Construct, ...]) -> Construct:
    """The layout of a complete frame: length, tag, body, and nothing left over anywhere."""
    framed = Prefixed(Int32ub, Struct(Const(tag, Int8ub), *body, Terminated))
    return FocusedSeq("frame", "frame" / framed, Terminated)


def _message_envelope(tag: int) -> tuple[Construct, ...]:
    """The Message fields that carry a 2PC payload, then the payload's 2PC tag."""
    return (
        "stream_id" / Const(TWO_PC_STREAM_ID, Int64ub),
        "flags" / Const(0, Int8ub),
        "message_id" / Default(Int64ub, 0),
        Const(tag, Int8ub),
    )


@dataclass(frozen=True)
class _Layout:
    """One catalogue entry as written below; turned into a `MessageSpec`."""

    name: str
    tag: int
    body: tuple[Construct, ...]
    directions: frozenset[str]
    doc: str
    defaults: Mapping[str, Any]
    two_pc_tag: int | None = None
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(sc.name for sc in self.body if sc.name)


# ---------------------------------------------------------------------------------------------
# Message: optional fields follow the flags


def _has_message_id(ctx: Any) -> bool:
    return not ctx.flags & Flag.EPHEMERAL


def _has_event_time(ctx: Any) -> bool:
    return bool(ctx.flags & Flag.EVENT_TIME)


def _has_key(ctx: Any) -> bool:
    return bool(ctx.flags & Flag.KEY) and not ctx.flags & Flag.BOUNDARY


def _has_payload(ctx: Any) -> bool:
    return not ctx.flags & Flag.BOUNDARY


_MESSAGE_BODY = (
    "stream_id" / Int64ub,
    "flags" / Int8ub,
    Check(lambda ctx: _LEGAL_FLAGS[ctx.flags]),
    "message_id" / If(_has_message_id, Int64ub),
    "event_time" / If(_has_event_time, Int64sb),
    "key" / If(_has_key, STR16),
    "payload" / If(_has_payload, GreedyBytes),
)

_MESSAGE_OPTIONAL = {
    "message_id": _has_message_id,
    "event_time": _has_event_time,
    "key": _has_key,
    "payload": _has_payload,
}


def _prepare_message(values: dict[str, Any]) -> dict[str, Any]:
    """Check a Message's fields against its flags, deriving the flags when not given.

    Without `flags`: EventTime when `event_time` is given, Key when `key` is given, and
    Ephemeral when `message_id` is not.
    """
    flags = values.get("flags")
    if flags is None:
        flags = 0
        if values.get("message_id") is None:
            flags |= Flag.EPHEMERAL
        if values.get("event_time") is not None:
            flags |= Flag.EVENT_TIME
        if values.get("key") is not None:
            flags |= Flag.KEY
    flags = int(flags)
    problem = flags_problem(flags) if 0 <= flags <= 255 else "flags must fit one byte"
    if problem:
        raise ValueError(f"Message flags {flags:#04x} are illegal: {problem}")
    values["flags"] = flags
    present = Container(flags=flags)
    for name, wanted in _MESSAGE_OPTIONAL.items():
        value = values.get(name)
        if name == "payload" and not value:
            values[name] = b"" if wanted(present) else None
        elif wanted(present) and value is None:
            raise ValueError(f"Message flags {flags:#04x} require {name}")
        elif not wanted(present) and value is not None:
            raise ValueError(f"Message flags {flags:#04x} leave out {name}, yet it was given")
    return values


# ---------------------------------------------------------------------------------------------
# The catalogue: each layout written once

_CREDIT = Struct("stream_id" / Int64ub, "stream_name" / STR16, "point_of_ref" / Int64ub)
_SOURCE = Struct("source_name" / STR16, "source_address" / STR16)
_ACKED = Struct("stream_id" / Int64ub, "point_of_ref" / Int64ub)
_RANGE = Struct("stream_id" / Int64ub, "start_por" / Int64ub, "end_por" / Int64ub)
_TWO_PC_DEFAULTS = {"stream_id": TWO_PC_STREAM_ID, "flags": 0, "message_id": 0}

_LAYOUTS = (
    _Layout(
        "Hello", 0,
        ("version" / STR16, "cookie" / STR16, "program_name" / STR16,
         "instance_name" / STR16),
        CLIENT_TO_SERVER,
        "Handshake opening a session (source->worker, worker->sink).",
        {"cookie": ""},
    ),
    _Layout(
        "Ok", 1,
        ("initial_credits" / Int32ub, "credit_list" / _Rows(_CREDIT),
         "source_list" / _Rows(_SOURCE)),
        SERVER_TO_CLIENT,
        "Handshake accepted, with the initial credits (worker->source, sink->worker).",
        {"credit_list": (), "source_list": ()},
    ),
    _Layout(
        "Error", 2, ("message" / STR16,), SERVER_TO_CLIENT,
        "Handshake refused or session failed; the connection ends (worker->source, sink->worker).",
        {},
    ),
    _Layout(
        "Notify", 3,
        ("stream_id" / Int64ub, "stream_name" / STR16, "point_of_ref" / Int64ub),
        CLIENT_TO_SERVER,
        "Names a stream before its first Message (source->worker).",
        {"point_of_ref": 0},
    ),
    _Layout(
        "NotifyAck", 4,
        ("success" / Int8ub, "stream_id" / Int64ub, "point_of_ref" / Int64ub),
        SERVER_TO_CLIENT,
        "Accepts or rejects a Notify, with where to resume (worker->source, sink->worker).",
        {"point_of_ref": 0},
    ),
    _Layout(
        "Message", MESSAGE_TAG, _MESSAGE_BODY, BOTH,
        "One application message of a stream (source->worker, worker->sink); a sink's 2PC "
        "replies travel back in Message frames too, hence both directions.",
        {"flags": None, "message_id": None, "event_time": None, "key": None, "payload": b""},
        prepare=_prepare_message,
    ),
    _Layout(
        "Ack", 6,
        ("credits" / Int32ub, "acks" / _Rows(_ACKED)),
        SERVER_TO_CLIENT,
        "Returns credits and acknowledges points of reference (worker->source, sink->worker).",
        {"acks": ()},
    ),
    _Layout(
        "Restart", 7, ("address" / Optional(STR32),), SERVER_TO_CLIENT,
        "Asks the peer to reconnect, optionally elsewhere (worker->source, sink->worker). "
        "A body without the address field decodes as address=None.",
        {"address": ""},
    ),
    _Layout(
        "EosMessage", 8,
        ("stream_id" / Int64ub, "message_id" / Optional(Int64ub)),
        CLIENT_TO_SERVER,
        "End of a stream (source->worker); message_id is None when the sender omits it.",
        {"message_id": None},
    ),
    _Layout(
        "ListUncommitted", MESSAGE_TAG, (*_message_envelope(201), "rtag" / Int64ub),
        CLIENT_TO_SERVER,
        "2PC: asks the sink for its uncommitted transactions (worker->sink).",
        _TWO_PC_DEFAULTS, two_pc_tag=201,
    ),
    _Layout(
        "ReplyUncommitted", MESSAGE_TAG,
        (*_message_envelope(202), "rtag" / Int64ub, "txn_ids" / _Rows(STR16)),
        SERVER_TO_CLIENT,
        "2PC: the sink's uncommitted transaction ids (sink->worker).",
        {**_TWO_PC_DEFAULTS, "txn_ids": ()}, two_pc_tag=202,
    ),
    _Layout(
        "TwoPCPhase1", MESSAGE_TAG,
        (*_message_envelope(203), "txn_id" / STR16, "ranges" / _Rows(_RANGE)),
        CLIENT_TO_SERVER,
        "2PC: phase 1 request with the byte ranges of the transaction (worker->sink).",
        {**_TWO_PC_DEFAULTS, "ranges": ()}, two_pc_tag=203,
    ),
    _Layout(
        "TwoPCReply", MESSAGE_TAG,
        (*_message_envelope(204), "txn_id" / STR16, "commit" / Int8ub),
        SERVER_TO_CLIENT,
        "2PC: the sink's vote or phase 2 confirmation, commit=1 / abort=0 (sink->worker).",
        _TWO_PC_DEFAULTS, two_pc_tag=204,
    ),
    _Layout(
        "TwoPCPhase2", MESSAGE_TAG,
        (*_message_envelope(205), "txn_id" / STR16, "commit" / Int8ub),
        CLIENT_TO_SERVER,
        "2PC: the decision, commit=1 / abort=0 (worker->sink).",
        _TWO_PC_DEFAULTS, two_pc_tag=205,
    ),
)


def _decoder(layout: _Layout, frame_layout: Construct) -> Callable[[bytes], dict[str, Any]]:
    def decode(data: bytes) -> dict[str, Any]:
        return _plain(frame_layout.parse(data))

    decode.__name__ = f"decode_{layout.name}"
    return decode


def _encoder(layout: _Layout, frame_layout: Construct) -> Callable[..., bytes]:
    names = layout.field_names

    def encode(**fields: Any) -> bytes:
        unknown = set(fields) - set(names)
        if unknown:
            raise ValueError(
                f"{layout.name} has no field {', '.join(sorted(unknown))}; "
                f"fields: {', '.join(names)}"
            )
        values = {**layout.defaults, **fields}
        if layout.prepare is not None:
            values = layout.prepare(values)
        missing = [name for name in names if name not in values]
        if missing:
            raise ValueError(f"{layout.name} needs {', '.join(missing)}")
        try:
            return frame_layout.build(values)
        except (ConstructError, TypeError, ValueError) as exc:
            raise ValueError(f"cannot encode {layout.name}: {exc}") from exc

    encode.__name__ = f"encode_{layout.name}"
    return encode


def _message_spec(layout: _Layout) -> MessageSpec:
    frame_layout = _whole_frame(layout.tag, layout.body)
    return MessageSpec(
        name=layout.name,
        directions=layout.directions,
        fields=layout.field_names,
        decode=_decoder(layout, frame_layout),
        encode=_encoder(layout, frame_layout),
        doc=layout.doc,
    )


MESSAGES: dict[str, MessageSpec] = {layout.name: _message_spec(layout) for layout in _LAYOUTS}
"""The catalogue, by message name."""

_BY_TAG: dict[int, MessageSpec] = {
    layout.tag: MESSAGES[layout.name] for layout in _LAYOUTS if layout.two_pc_tag is None
}
_TWO_PC_BY_TAG: dict[int, MessageSpec] = {
    layout.two_pc_tag: MESSAGES[layout.name] for layout in _LAYOUTS
    if layout.two_pc_tag is not None
}
_MESSAGE_SPEC = MESSAGES["Message"]
TWO_PC_NAMES = tuple(spec.name for spec in _TWO_PC_BY_TAG.values())
"""The two-phase-commit message names (carried in Message frames)."""


# ---------------------------------------------------------------------------------------------
# Framing


class WallarooFramer:
    """Frames one direction of a Wallaroo connection, incrementally.

    Framing only reads the length, the tag and, for Message frames, the flags byte (plus three
    peeks to spot a 2PC message); fields are decoded lazily by `Frame.fields`. The first
    violation of the framing (length 0, length over `max_frame`, unknown tag, illegal Message
    flags) yields one `ProtocolError` frame holding the rest of the input, and from then on
    each read passes through as one `Opaque` frame.
    """

    __slots__ = ("_need", "_opaque", "_partial", "from_client", "max_frame")

    def __init__(self, from_client: bool, max_frame: int | None = None) -> None:
        self.from_client = from_client
        self.max_frame = DEFAULT_MAX_FRAME if max_frame is None else max_frame
        self._partial = bytearray()
        self._need = 0  # whole size of the partial frame once its header is judged valid
        self._opaque = False

    @property
    def buffered(self) -> int:
        """Bytes held for a partial frame (at most its length field + 4)."""
        return len(self._partial)

    @property
    def opaque(self) -> bool:
        """True once a protocol error switched this direction to passthrough."""
        return self._opaque

    def feed_batch(self, data: bytes) -> FrameBatch:
        """`feed`, as a batch (Wallaroo frames are not kept as runs)."""
        return FrameBatch(self.feed(data))

    def feed(self, data: bytes) -> list[Frame]:
        """The frames completed by this read, in order. Never raises."""
        if not data:
            return []
        if not isinstance(data, bytes):
            data = bytes(data)
        if self._opaque:
            return [Frame(OPAQUE, data, (0, len(data)), self.from_client)]
        frames: list[Frame] = []
        pos = self._resume(data, frames) if self._partial else 0
        if not self._opaque:
            self._scan(data, pos, frames)
        return frames

    def _judge(self, buf: bytes | bytearray, at: int, available: int) -> int | str:
        """Judges the frame starting at `buf[at]` from its first bytes.

        Returns the frame's whole size when its header is valid, minus the number of bytes
        needed to judge it when fewer are available, or the reason it breaks the protocol.
        """
        if available < LENGTH_SIZE:
            return -LENGTH_SIZE
        (length,) = _LENGTH.unpack_from(buf, at)
        if length == 0:
            return "frame length 0 leaves no room for the frame tag"
        if length > self.max_frame:
            return f"frame length {length} exceeds the limit of {self.max_frame} bytes"
        if available < HEADER_SIZE:
            return -HEADER_SIZE
        tag = buf[at + LENGTH_SIZE]
        if tag not in _BY_TAG:
            return f"unknown frame tag {tag} (frame length {length})"
        if tag == MESSAGE_TAG:
            if length < _MESSAGE_MIN_LENGTH:
                return f"Message frame length {length} cannot hold stream_id and flags"
            if available <= _MESSAGE_FLAGS_AT:
                return -(_MESSAGE_FLAGS_AT + 1)
            flags = buf[at + _MESSAGE_FLAGS_AT]
            if not _LEGAL_FLAGS[flags]:
                return f"Message with illegal flags {flags:#04x}: {flags_problem(flags)}"
        return LENGTH_SIZE + length

    def _scan(self, data: bytes, pos: int, frames: list[Frame]) -> None:
        """Frames `data` from `pos` on; keeps a trailing partial frame."""
        end_of_read = len(data)
        while pos < end_of_read:
            verdict = self._judge(data, pos, end_of_read - pos)
            if isinstance(verdict, str):
                self._fail(verdict, data, pos, pos, frames)
                return
            if verdict < 0 or pos + verdict > end_of_read:
                self._partial += memoryview(data)[pos:]
                self._need = max(verdict, 0)
                return
            end = pos + verdict
            frames.append(self._frame(data[pos:end], (pos, end)))
            pos = end

    def _resume(self, data: bytes, frames: list[Frame]) -> int:
        """Continues the partial frame with `data`; returns where the rest of `data` starts."""
        partial = self._partial
        pos = 0
        while not self._need:
            verdict = self._judge(partial, 0, len(partial))
            if isinstance(verdict, str):
                self._fail(verdict, data, pos, 0, frames)
                return len(data)
            if verdict > 0:
                self._need = verdict
                break
            pos = self._take(data, pos, -verdict)
            if len(partial) < -verdict:
                return pos
        pos = self._take(data, pos, self._need)
        if len(partial) == self._need:
            frames.append(self._frame(bytes(partial), (0, pos)))
            partial.clear()
            self._need = 0
        return pos

    def _take(self, data: bytes, pos: int, size: int) -> int:
        """Moves bytes of `data` from `pos` into the partial frame until it holds `size`."""
        end = min(len(data), pos + size - len(self._partial))
        self._partial += memoryview(data)[pos:end]
        return end

    def _fail(self, reason: str, data: bytes, pos: int, start: int, frames: list[Frame]) -> None:
        """Reports a protocol error, hands over everything not yet framed, goes opaque."""
        rest = bytes(self._partial) + data[pos:] if self._partial else data[pos:]
        self._partial = bytearray()
        self._need = 0
        self._opaque = True
        error = f"wallaroo: {reason}; passing the rest of this direction through unframed"
        frames.append(
            Frame(PROTOCOL_ERROR, rest, (start, len(data)), self.from_client, error=error)
        )

    def _frame(self, data: bytes, span: tuple[int, int]) -> Frame:
        """A Frame for one complete, header-validated frame."""
        tag = data[LENGTH_SIZE]
        if tag == MESSAGE_TAG:
            spec = _two_pc_spec(data)
            if spec is not None:
                return Frame(spec.name, data, span, self.from_client, spec, alias="Message")
            return Frame("Message", data, span, self.from_client, _MESSAGE_SPEC)
        spec = _BY_TAG[tag]
        return Frame(spec.name, data, span, self.from_client, spec)


def _two_pc_spec(data: bytes) -> MessageSpec | None:
    """The 2PC spec of a whole Message frame carrying one (stream 0, flags 0, payload tag
    201..205), else None. Byte peeks only."""
    if len(data) < _TWO_PC_MIN_SIZE or data[_MESSAGE_FLAGS_AT] != 0:
        return None
    if _U64.unpack_from(data, HEADER_SIZE)[0] != TWO_PC_STREAM_ID:
        return None
    return _TWO_PC_BY_TAG.get(data[_TWO_PC_TAG_AT])


@dataclass
class WallarooSession:
    """Both directions of one Wallaroo connection (they share no state)."""

    client: WallarooFramer
    server: WallarooFramer


def new_session(max_frame: int | None = None) -> WallarooSession:
    """A fresh session; `max_frame` caps the length field (None: 64 MiB)."""
    return WallarooSession(WallarooFramer(True, max_frame), WallarooFramer(False, max_frame))


# ---------------------------------------------------------------------------------------------
# Convenience for code that speaks the protocol


def encode(name: str, **fields: Any) -> bytes:
    """The whole frame of message `name` built from `fields`.

    E.g. `encode("Notify", stream_id=1, stream_name="s")`, `encode("Message", stream_id=1,
    message_id=7, payload=b"x")` or `encode("TwoPCPhase1", txn_id="t", ranges=[(1, 0, 9)])`.
    Lists take dicts or tuples in field order; omitted optional fields are absent on the wire.
    Raises ValueError for an unknown name or fields the layout cannot hold.
    """
    try:
        spec = MESSAGES[name]
    except KeyError:
        raise ValueError(f"unknown Wallaroo message {name!r}; known: {', '.join(MESSAGES)}") \
            from None
    return spec.encode(**fields)


def decode_frame(frame_bytes: bytes) -> tuple[str, dict[str, Any]]:
    """The name and fields of exactly one whole frame, typed as the framer types it.

    Raises ValueError when the bytes are not exactly one valid frame.
    """
    framer = WallarooFramer(True, max_frame=max(DEFAULT_MAX_FRAME, len(frame_bytes)))
    frames = framer.feed(frame_bytes)
    if len(frames) != 1 or framer.buffered:
        raise ValueError(
            f"expected exactly one whole frame, got {len(frames)} frame(s) and "
            f"{framer.buffered} byte(s) of a partial one"
        )
    frame = frames[0]
    if frame.type == PROTOCOL_ERROR:
        raise ValueError(frame.error)
    fields = frame.fields
    if frame.error:
        raise ValueError(frame.error)
    return frame.type, fields


def raw_frame(tag: int, body: bytes = b"") -> bytes:
    """A frame with any tag and body, valid or not: for sending deliberately broken input."""
    return _LENGTH.pack(len(body) + 1) + bytes([tag]) + bytes(body)


DEFAULT_ERROR_MESSAGE = "wirefault: injected error"


class WallarooAgent:
    """A Wallaroo connection's agent (see `base.ConnectionAgent`): the protocol has no
    startup parameters, no derived fields and no cancel, so it never watches a frame; an
    injected `error()` answers the client with an Error frame, which ends a Wallaroo
    session, and closes the connection, whichever side sent the triggering frame."""

    __slots__ = ("skim_client", "skim_server", "started", "track_statements", "watch_client",
                 "watch_server")

    skim_tests: Mapping[str, tuple[re.Pattern[str], ...] | None] = {}

    def __init__(self) -> None:
        self.watch_client = False
        self.watch_server = False
        self.skim_client = False
        self.skim_server = False
        self.track_statements = False
        self.started = True

    def observe(self, frame: Frame) -> bytes | None:
        return None

    def parameters(self) -> Mapping[str, str]:
        return {}

    def derived_field(self, frame: Frame, name: str) -> str | None:
        return None

    def error_plan(self, frame: Frame, code: str | None, message: str | None,
                   severity: str | None) -> ErrorPlan:
        """`code` and `severity` are not Wallaroo's: ignored (the DSL refuses them)."""
        text = DEFAULT_ERROR_MESSAGE if message is None else message
        return ErrorPlan(to_server=b"", to_client=MESSAGES["Error"].encode(message=text),
                         close=True)

    def cancel_request(self) -> bytes | None:
        return None


PROTOCOL = ProtocolSpec(
    name="wallaroo",
    messages=MESSAGES,
    new_session=new_session,
    default_max_frame=DEFAULT_MAX_FRAME,
    description="Wallaroo connector protocol (sources, sinks and their two-phase commit).",
    extra_types=(PROTOCOL_ERROR, OPAQUE),
    new_agent=WallarooAgent,
    error_parameters=("message",),
)
