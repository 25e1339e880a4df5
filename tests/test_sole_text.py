"""`Frame.field_text` of a message whose only field is NUL-terminated text (Query,
CommandComplete...) slices the text out without decoding the frame: it must say what the full
decode says, for any bytes, and leave a frame it cannot read to the full path (its error)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from wirefault.protocols._pg_messages import CATALOGUE
from wirefault.protocols.base import Frame

SOLE_TEXT = [spec for spec in CATALOGUE.values() if spec.sole_text]


def _frames(spec, data: bytes) -> tuple[Frame, Frame]:
    return (Frame(spec.name, data, (0, len(data)), True, spec),
            Frame(spec.name, data, (0, len(data)), True, spec))


def test_the_text_only_messages_are_marked() -> None:
    names = {spec.name for spec in SOLE_TEXT}
    assert {"Query", "CommandComplete"} <= names
    assert "DataRow" not in names and "Parse" not in names


@given(st.sampled_from(SOLE_TEXT), st.binary(max_size=40), st.booleans(), st.booleans(),
       st.integers(-2, 2), st.sampled_from([None, 0x51, 0x43, 0x00]))
def test_field_text_is_the_decoded_text(spec, body: bytes, terminate: bool, exact_length: bool,
                                        length_off: int, type_byte: int | None) -> None:
    name, own_type = spec.sole_text
    payload = body + (b"\x00" if terminate else b"")
    length = len(payload) + 4 + (0 if exact_length else length_off)
    data = struct.pack(">BI", own_type if type_byte is None else type_byte,
                       length & 0xFFFFFFFF) + payload
    quick, full = _frames(spec, data)
    decoded = full.fields  # decoded first: field_text takes the full path
    assert quick.field_text(name) == full.field_text(name)
    assert quick.field_text(name) is None or decoded
    assert quick.field_text("no such field") is None
    assert quick.fields == decoded and quick.error == full.error


@given(st.sampled_from(SOLE_TEXT), st.text(max_size=30).filter(lambda t: "\x00" not in t))
def test_valid_text_frames(spec, text: str) -> None:
    name, _ = spec.sole_text
    data = spec.encode(**{name: text})
    quick, full = _frames(spec, data)
    assert full.fields
    assert quick.field_text(name) == full.field_text(name)
    if text.isascii():
        assert quick.field_text(name) == text
    assert quick.fields == full.fields  # the fields are still there for whoever asks
