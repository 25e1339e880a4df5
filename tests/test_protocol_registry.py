"""The protocol registry (`wirefault.protocols.get`, `names`) and the raw protocol."""

from __future__ import annotations

import pytest

from wirefault import protocols
from wirefault.protocols import BACKEND, FRONTEND, Frame, ProtocolSpec


def test_registry_lists_the_three_protocols() -> None:
    assert sorted(protocols.names()) == ["postgres", "raw", "wallaroo"]


@pytest.mark.parametrize("name", ["postgres", "wallaroo", "raw"])
def test_each_registered_name_gives_a_protocol_spec_of_that_name(name: str) -> None:
    spec = protocols.get(name)
    assert isinstance(spec, ProtocolSpec)
    assert spec.name == name


def test_unknown_protocol_error_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown protocol 'mysql'.*postgres.*wallaroo.*raw"):
        protocols.get("mysql")


@pytest.mark.parametrize("name", ["wallaroo", "raw"])
def test_spec_catalogue_and_sessions_follow_the_contract(name: str) -> None:
    spec = protocols.get(name)
    assert spec.default_max_frame > 0 and spec.description
    for message_name, message in spec.messages.items():
        assert message.name == message_name
        assert message.directions and message.directions <= {FRONTEND, BACKEND}
        assert spec.message(message_name) is message
    session = spec.new_session()
    other = spec.new_session(max_frame=1024)
    assert session.client is not other.client
    assert session.client.from_client and not session.server.from_client
    assert session.client.buffered == session.server.buffered == 0
    assert session.client.feed(b"") == []


def test_raw_frames_each_read_as_one_data_frame() -> None:
    session = protocols.get("raw").new_session()
    reads = [b"\x00\x00\x00\x05hello", b"x", bytearray(b"\xff" * 70_000)]
    for read in reads:
        (frame,) = session.client.feed(read)
        assert isinstance(frame, Frame)
        assert (frame.type, frame.data, frame.span) == ("Data", bytes(read), (0, len(read)))
        assert frame.from_client and frame.fields == {"data": bytes(read)}
        assert session.client.buffered == 0
    (reply,) = session.server.feed(b"pong")
    assert not reply.from_client and reply.render() == "Data(data=pong)"


def test_raw_data_spec_round_trips_any_bytes() -> None:
    data = protocols.get("raw").message("Data")
    assert data.fields == ("data",)
    assert data.encode(data=b"\x00\x01abc") == b"\x00\x01abc"
    assert data.decode(b"\x00\x01abc") == {"data": b"\x00\x01abc"}
