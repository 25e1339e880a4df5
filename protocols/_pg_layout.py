"""Building blocks for PostgreSQL message layouts, and a fast parser derived from a layout.

Each message layout is written once, as a `construct` struct made of construct's own classes
(Struct, FormatField, Const, NullTerminated, GreedyBytes, Bytes) plus the few PostgreSQL
shapes defined here (text, nullable byte strings, counted lists, terminated entries).
`construct` builds every message and is the reference parser; but its parse costs ~10 us even
compiled (its CString cannot be compiled), too slow for the rules engine's hot path. So
`fast_parser(layout)` walks the same layout object once and derives a parser made of plain
closures over `struct.unpack_from` and `bytes.find`: same layout, same results (the tests
check both parsers agree), a fraction of the cost.

A fast parser is `parse(data, pos) -> (value, new_pos)` over the whole frame's bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from io import BytesIO
from typing import Any

from construct import (
    Adapter,
    Byte,
    Bytes,
    Const,
    ConstError,
    Construct,
    Container,
    FormatField,
    GreedyBytes,
    Int16ub,
    NullTerminated,
    Renamed,
    StreamError,
    Struct,
    stream_read,
    stream_write,
)

FastParser = Callable[[bytes, int], tuple[Any, int]]

_INT32 = struct.Struct(">i")
_UINT16 = struct.Struct(">H")


def _tolerant_text(raw: bytes) -> str:
    # surrogateescape keeps undecodable bytes, so re-encoding gives back the same bytes;
    # filters and dumps show them as \xNN (base.text_of)
    return raw.decode("utf-8", "surrogateescape")


def _text_bytes(value: str | bytes) -> bytes:
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
    else:
        raw = str(value).encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise ValueError(f"text field cannot hold a NUL byte: {value!r}")
    return raw


class TolerantUtf8(Adapter):
    """UTF-8 text that never fails to decode (stray bytes kept as surrogate escapes)."""

    def _decode(self, obj: bytes, context: Any, path: Any) -> str:
        return _tolerant_text(obj)

    def _encode(self, obj: str | bytes, context: Any, path: Any) -> bytes:
        return _text_bytes(obj)


class OneChar(Adapter):
    """A one-byte code shown as a one-character string ('S', 'P', 'I'...)."""

    def _decode(self, obj: int, context: Any, path: Any) -> str:
        return chr(obj)

    def _encode(self, obj: str | int, context: Any, path: Any) -> int:
        return obj if isinstance(obj, int) else ord(obj)


Text = TolerantUtf8(NullTerminated(GreedyBytes))
"""A NUL-terminated string (PostgreSQL's `String`)."""

Char = OneChar(Byte)
"""A one-byte code as a character."""


class NullableBytes(Construct):
    """Bytes preceded by their Int32 length, where length -1 means NULL (None)."""

    def _parse(self, stream: Any, context: Any, path: Any) -> bytes | None:
        (length,) = _INT32.unpack(stream_read(stream, 4, path))
        if length < 0:
            return None
        return stream_read(stream, length, path)

    def _build(self, obj: bytes | None, stream: Any, context: Any, path: Any) -> bytes | None:
        if obj is None:
            stream_write(stream, _INT32.pack(-1), 4, path)
            return obj
        raw = obj.encode("utf-8") if isinstance(obj, str) else bytes(obj)
        stream_write(stream, _INT32.pack(len(raw)), 4, path)
        stream_write(stream, raw, len(raw), path)
        return obj

    def fast_parser(self) -> FastParser:
        unpack = _INT32.unpack_from

        def parse(data: bytes, pos: int) -> tuple[bytes | None, int]:
            (length,) = unpack(data, pos)
            pos += 4
            if length < 0:
                return None, pos
            end = pos + length
            if end > len(data):
                raise StreamError(f"value of {length} bytes overruns the message")
            return data[pos:end], end

        return parse


class Counted(Construct):
    """A list of `item`s preceded by their count (an Int16 unless told otherwise)."""

    def __init__(self, item: Construct, count: Construct = Int16ub) -> None:
        super().__init__()
        self.item = item
        self.count = count

    def _parse(self, stream: Any, context: Any, path: Any) -> list[Any]:
        number = self.count._parsereport(stream, context, path)
        return [self.item._parsereport(stream, context, path) for _ in range(number)]

    def _build(self, obj: list[Any], stream: Any, context: Any, path: Any) -> list[Any]:
        self.count._build(len(obj), stream, context, path)
        for value in obj:
            self.item._build(value, stream, context, path)
        return obj

    def fast_parser(self) -> FastParser:
        count = fast_parser(self.count)
        fixed = _fixed_format(self.item)
        if fixed is not None:
            return _fast_counted_fixed(count, fixed)
        item = fast_parser(self.item)

        def parse(data: bytes, pos: int) -> tuple[list[Any], int]:
            number, pos = count(data, pos)
            values = []
            for _ in range(number):
                value, pos = item(data, pos)
                values.append(value)
            return values, pos

        return parse


def _fast_counted_fixed(count: FastParser, fmt: str) -> FastParser:
    """A counted list of plain integers: one unpack for the whole list."""
    item_size = struct.calcsize(">" + fmt)

    def parse(data: bytes, pos: int) -> tuple[list[int], int]:
        number, pos = count(data, pos)
        values = list(struct.unpack_from(f">{number}{fmt}", data, pos))
        return values, pos + number * item_size

    return parse


class Entries(Construct):
    """`key value` pairs ended by a lone `end` key, as a dict (StartupMessage parameters,
    ErrorResponse fields)."""

    def __init__(self, key: Construct, value: Construct, end: Any) -> None:
        super().__init__()
        self.key = key
        self.value = value
        self.end = end

    def _parse(self, stream: Any, context: Any, path: Any) -> dict[Any, Any]:
        entries = {}
        while True:
            key = self.key._parsereport(stream, context, path)
            if key == self.end:
                return entries
            entries[key] = self.value._parsereport(stream, context, path)

    def _build(self, obj: Mapping[Any, Any], stream: Any, context: Any, path: Any) -> Any:
        for key, value in obj.items():
            if key == self.end:
                raise ValueError(f"entry key cannot be the terminator {self.end!r}")
            self.key._build(key, stream, context, path)
            self.value._build(value, stream, context, path)
        self.key._build(self.end, stream, context, path)
        return obj

    def fast_parser(self) -> FastParser:
        key_parser = fast_parser(self.key)
        value_parser = fast_parser(self.value)
        end = self.end

        def parse(data: bytes, pos: int) -> tuple[dict[Any, Any], int]:
            entries = {}
            while True:
                key, pos = key_parser(data, pos)
                if key == end:
                    return entries, pos
                entries[key], pos = value_parser(data, pos)

        return parse


class ListUntil(Construct):
    """Items ended by one equal to `end` (which is not part of the list)."""

    def __init__(self, item: Construct, end: Any) -> None:
        super().__init__()
        self.item = item
        self.end = end

    def _parse(self, stream: Any, context: Any, path: Any) -> list[Any]:
        items = []
        while (item := self.item._parsereport(stream, context, path)) != self.end:
            items.append(item)
        return items

    def _build(self, obj: list[Any], stream: Any, context: Any, path: Any) -> list[Any]:
        for item in [*obj, self.end]:
            self.item._build(item, stream, context, path)
        return obj

    def fast_parser(self) -> FastParser:
        item_parser = fast_parser(self.item)
        end = self.end

        def parse(data: bytes, pos: int) -> tuple[list[Any], int]:
            items = []
            while True:
                item, pos = item_parser(data, pos)
                if item == end:
                    return items, pos
                items.append(item)

        return parse


class RenamedKeys(Adapter):
    """Shows a dict's wire keys under readable names; keys without a name are kept as is."""

    def __init__(self, subcon: Construct, names: Mapping[Any, str]) -> None:
        super().__init__(subcon)
        self.names = dict(names)
        self.wire_keys = {name: key for key, name in names.items()}

    def _decode(self, obj: Mapping[Any, Any], context: Any, path: Any) -> dict[str, Any]:
        names = self.names
        return {names.get(key, key): value for key, value in obj.items()}

    def _encode(self, obj: Mapping[str, Any], context: Any, path: Any) -> dict[Any, Any]:
        wire_keys = self.wire_keys
        return {wire_keys.get(name, name): value for name, value in obj.items()}


class ShortOrLongKey(Adapter):
    """A cancel secret key: an Int32 in protocol 3.0, longer bytes from protocol 3.2 on."""

    def _decode(self, obj: bytes, context: Any, path: Any) -> int | bytes:
        return int.from_bytes(obj, "big") if len(obj) == 4 else obj

    def _encode(self, obj: int | bytes, context: Any, path: Any) -> bytes:
        return obj.to_bytes(4, "big") if isinstance(obj, int) else bytes(obj)


SecretKey = ShortOrLongKey(GreedyBytes)


# --- deriving the fast parser ------------------------------------------------------------


def fast_parser(layout: Construct) -> FastParser:
    """A parser equivalent to `layout.parse`, over a frame's bytes from an offset."""
    own = getattr(layout, "fast_parser", None)
    if own is not None:
        return own()
    if isinstance(layout, Renamed):
        return fast_parser(layout.subcon)
    if isinstance(layout, Struct):
        return _fast_struct(layout)
    if isinstance(layout, FormatField):
        return _fast_format(layout.fmtstr)
    if isinstance(layout, Const):
        return _fast_const(layout)
    if isinstance(layout, Adapter):
        return _fast_adapter(layout)
    if _is_cstring(layout):
        return _fast_cstring
    if layout is GreedyBytes:
        return _fast_greedy
    if isinstance(layout, Bytes) and isinstance(layout.length, int):
        return _fast_bytes(layout.length)
    return _stream_parser(layout)


def _fixed_format(layout: Construct) -> str | None:
    """The struct format letter of a plain integer field (no byte order), else None."""
    while isinstance(layout, Renamed):
        layout = layout.subcon
    if isinstance(layout, FormatField) and layout.fmtstr[0] == ">":
        return layout.fmtstr[1:]
    return None


def _fast_format(fmtstr: str) -> FastParser:
    packer = struct.Struct(fmtstr)
    unpack = packer.unpack_from
    size = packer.size

    def parse(data: bytes, pos: int) -> tuple[Any, int]:
        return unpack(data, pos)[0], pos + size

    return parse


def _fast_struct(layout: Struct) -> FastParser:
    steps = _struct_steps(layout)
    if len(steps) == 1 and isinstance(steps[0][0], str):
        name, parse_one = steps[0]

        def parse_single(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
            value, pos = parse_one(data, pos)
            return {name: value}, pos

        return parse_single

    def parse(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
        values: dict[str, Any] = {}
        for names, step in steps:
            value, pos = step(data, pos)
            if type(names) is tuple:
                values.update(zip(names, value, strict=True))
            elif names is not None:
                values[names] = value
        return values, pos

    return parse


def _struct_steps(layout: Struct) -> list[tuple[str | tuple[str, ...] | None, FastParser]]:
    """The struct's members as (name, parser) steps; a run of named integers becomes one
    step (names tuple) unpacked at once."""
    steps: list[tuple[str | tuple[str, ...] | None, FastParser]] = []
    run_names: list[str] = []
    run_format = ""

    def close_run() -> None:
        nonlocal run_names, run_format
        if len(run_names) == 1:
            steps.append((run_names[0], _fast_format(">" + run_format)))
        elif run_names:
            steps.append((tuple(run_names), _fast_run(">" + run_format)))
        run_names, run_format = [], ""

    for member in layout.subcons:
        letter = _fixed_format(member)
        if member.name is not None and letter is not None:
            run_names.append(member.name)
            run_format += letter
            continue
        close_run()
        steps.append((member.name, fast_parser(member)))
    close_run()
    return steps


def _fast_run(fmt: str) -> FastParser:
    packer = struct.Struct(fmt)
    unpack = packer.unpack_from
    size = packer.size

    def parse(data: bytes, pos: int) -> tuple[tuple[int, ...], int]:
        return unpack(data, pos), pos + size

    return parse


def _fast_const(layout: Const) -> FastParser:
    inner = fast_parser(layout.subcon)
    expected = layout.value

    def parse(data: bytes, pos: int) -> tuple[Any, int]:
        value, pos = inner(data, pos)
        if value != expected:
            raise ConstError(f"expected {expected!r} but parsed {value!r}")
        return value, pos

    return parse


def _fast_adapter(layout: Adapter) -> FastParser:
    if isinstance(layout, TolerantUtf8) and _is_cstring(layout.subcon):
        return _fast_text
    inner = fast_parser(layout.subcon)
    decode = layout._decode

    def parse(data: bytes, pos: int) -> tuple[Any, int]:
        value, pos = inner(data, pos)
        return decode(value, None, None), pos

    return parse


def _is_cstring(layout: Construct) -> bool:
    return (
        isinstance(layout, NullTerminated)
        and layout.subcon is GreedyBytes
        and layout.term == b"\x00"
        and not layout.include
        and layout.consume
    )


def _fast_text(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(0, pos)
    return data[pos:end].decode("utf-8", "surrogateescape"), end + 1


def _fast_cstring(data: bytes, pos: int) -> tuple[bytes, int]:
    end = data.index(0, pos)
    return data[pos:end], end + 1


def _fast_greedy(data: bytes, pos: int) -> tuple[bytes, int]:
    return data[pos:], len(data)


def _fast_bytes(length: int) -> FastParser:
    def parse(data: bytes, pos: int) -> tuple[bytes, int]:
        end = pos + length
        if end > len(data):
            raise StreamError(f"expected {length} bytes, found {len(data) - pos}")
        return data[pos:end], end

    return parse


def _stream_parser(layout: Construct) -> FastParser:
    """Any other construct: construct's own parser on a stream."""

    def parse(data: bytes, pos: int) -> tuple[Any, int]:
        stream = BytesIO(data)
        stream.seek(pos)
        value = layout.parse_stream(stream)
        return value, stream.tell()

    return parse


def plain(value: Any) -> Any:
    """construct's parse result as plain dicts and lists (no Container, no `_io`)."""
    if isinstance(value, Container):  # a Struct's result: its stream rides along as `_io`
        return {k: plain(v) for k, v in value.items() if k != "_io"}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


__all__ = [
    "Char",
    "Counted",
    "Entries",
    "FastParser",
    "ListUntil",
    "NullableBytes",
    "RenamedKeys",
    "SecretKey",
    "Text",
    "fast_parser",
    "plain",
]
