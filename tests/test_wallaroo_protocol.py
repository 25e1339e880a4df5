"""The Wallaroo connector protocol: layouts, framer, convenience helpers."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wirefault.protocols import BACKEND, FRONTEND, OPAQUE, PROTOCOL_ERROR, Frame, get
from wirefault.protocols import wallaroo as w

EPHEMERAL, BOUNDARY, UNSTABLE, EVENT_TIME, KEY = 1, 2, 8, 16, 32
TWO_PC_TAGS = {201: "ListUncommitted", 202: "ReplyUncommitted", 203: "TwoPCPhase1",
               204: "TwoPCReply", 205: "TwoPCPhase2"}
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Examples and strategies


def message_fields(flags: int, stream_id: int = 7, payload: bytes = b"hello") -> dict[str, Any]:
    """A Message's fields as the flags require them (absent ones None)."""
    return {
        "stream_id": stream_id,
        "flags": flags,
        "message_id": None if flags & EPHEMERAL else 42,
        "event_time": -1_600_000_000_000 if flags & EVENT_TIME else None,
        "key": "k\u00e9y" if flags & KEY and not flags & BOUNDARY else None,
        "payload": None if flags & BOUNDARY else payload,
    }


def legal_flags() -> list[int]:
    """Legal flag values, derived here from the rules rather than taken from the module."""
    legal = []
    for flags in range(256):
        if flags & ~(EPHEMERAL | BOUNDARY | UNSTABLE | EVENT_TIME | KEY):
            continue
        if flags & EPHEMERAL and flags & (BOUNDARY | UNSTABLE):
            continue
        if flags & BOUNDARY and flags & (UNSTABLE | KEY):
            continue
        legal.append(flags)
    return legal


LEGAL_FLAGS = legal_flags()
ILLEGAL_FLAGS = [flags for flags in range(256) if flags not in LEGAL_FLAGS]

TWO_PC_ENVELOPE = {"stream_id": 0, "flags": 0, "message_id": 0}
EXAMPLES: list[tuple[str, dict[str, Any]]] = [
    ("Hello", {"version": "v3-guid", "cookie": "secret", "program_name": "celsius",
               "instance_name": "instance-1"}),
    ("Ok", {"initial_credits": 100,
            "credit_list": [{"stream_id": 1, "stream_name": "s1", "point_of_ref": 10},
                            {"stream_id": 2, "stream_name": "", "point_of_ref": 0}],
            "source_list": [{"source_name": "src", "source_address": "127.0.0.1:7100"}]}),
    ("Ok", {"initial_credits": 0, "credit_list": [], "source_list": []}),
    ("Error", {"message": "bad cookie"}),
    ("Notify", {"stream_id": 2**64 - 1, "stream_name": "stream-\u2603", "point_of_ref": 5}),
    ("NotifyAck", {"success": 1, "stream_id": 3, "point_of_ref": 99}),
    *[("Message", message_fields(flags)) for flags in LEGAL_FLAGS],
    ("Message", message_fields(0, payload=b"")),
    ("Ack", {"credits": 10, "acks": [{"stream_id": 1, "point_of_ref": 2},
                                     {"stream_id": 3, "point_of_ref": 4}]}),
    ("Ack", {"credits": 0, "acks": []}),
    ("Restart", {"address": "10.0.0.1:5555"}),
    ("Restart", {"address": ""}),
    ("EosMessage", {"stream_id": 9, "message_id": None}),
    ("EosMessage", {"stream_id": 9, "message_id": 1234}),
    ("ListUncommitted", {**TWO_PC_ENVELOPE, "rtag": 77}),
    ("ReplyUncommitted", {**TWO_PC_ENVELOPE, "rtag": 77, "txn_ids": ["t1", "t2"]}),
    ("ReplyUncommitted", {**TWO_PC_ENVELOPE, "rtag": 0, "txn_ids": []}),
    ("TwoPCPhase1", {**TWO_PC_ENVELOPE, "txn_id": "txn-1",
                     "ranges": [{"stream_id": 1, "start_por": 0, "end_por": 4096}]}),
    ("TwoPCReply", {**TWO_PC_ENVELOPE, "txn_id": "txn-1", "commit": 1}),
    ("TwoPCPhase2", {**TWO_PC_ENVELOPE, "txn_id": "txn-1", "commit": 0}),
    ("TwoPCPhase2", {**TWO_PC_ENVELOPE, "message_id": 8, "txn_id": "", "commit": 1}),
]

u8 = st.integers(0, 255)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
text = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    # invalid UTF-8 must survive a round trip too
    st.binary(max_size=12).map(lambda raw: raw.decode("utf-8", "surrogateescape")),
)


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """Any valid message of the catalogue, as (name, fields)."""
    name = draw(st.sampled_from(sorted(w.MESSAGES)))
    if name == "Message":
        flags = draw(st.sampled_from(LEGAL_FLAGS))
        fields = message_fields(flags, draw(st.integers(0, 3)), draw(st.binary(max_size=40)))
        for field, value in (("message_id", u64), ("event_time", i64), ("key", text)):
            if fields[field] is not None:
                fields[field] = draw(value)
        return name, fields
    shapes: dict[str, dict[str, Any]] = {
        "Hello": {"version": text, "cookie": text, "program_name": text, "instance_name": text},
        "Ok": {"initial_credits": u32,
               "credit_list": st.lists(st.fixed_dictionaries(
                   {"stream_id": u64, "stream_name": text, "point_of_ref": u64}), max_size=3),
               "source_list": st.lists(st.fixed_dictionaries(
                   {"source_name": text, "source_address": text}), max_size=3)},
        "Error": {"message": text},
        "Notify": {"stream_id": u64, "stream_name": text, "point_of_ref": u64},
        "NotifyAck": {"success": u8, "stream_id": u64, "point_of_ref": u64},
        "Ack": {"credits": u32, "acks": st.lists(st.fixed_dictionaries(
            {"stream_id": u64, "point_of_ref": u64}), max_size=3)},
        "Restart": {"address": text},
        "EosMessage": {"stream_id": u64, "message_id": st.none() | u64},
        "ListUncommitted": {"rtag": u64},
        "ReplyUncommitted": {"rtag": u64, "txn_ids": st.lists(text, max_size=3)},
        "TwoPCPhase1": {"txn_id": text, "ranges": st.lists(st.fixed_dictionaries(
            {"stream_id": u64, "start_por": u64, "end_por": u64}), max_size=3)},
        "TwoPCReply": {"txn_id": text, "commit": u8},
        "TwoPCPhase2": {"txn_id": text, "commit": u8},
    }
    fields = draw(st.fixed_dictionaries(shapes[name]))
    if name in TWO_PC_TAGS.values():
        fields = {"stream_id": 0, "flags": 0, "message_id": draw(u64), **fields}
    return name, fields


def expected_type(name: str, data: bytes) -> str:
    """The type a framer must give: a plain Message on stream 0 with flags 0 whose payload
    starts with a 2PC tag is, on the wire, that 2PC message."""
    if name == "Message":
        stream_id, flags = struct.unpack_from(">QB", data, 5)
        if stream_id == 0 and flags == 0 and len(data) > 22 and data[22] in TWO_PC_TAGS:
            return TWO_PC_TAGS[data[22]]
    return name


@st.composite
def cut_into_reads(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    """`stream` split at arbitrary points (empty reads included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def feed_all(framer: w.WallarooFramer, reads: list[bytes], limit: int) -> list[Frame]:
    """Feeds every read, checking the invariants that hold for any input, valid or not:
    spans tile the read from its start, frame bytes are the input's bytes in order (nothing
    lost, nothing duplicated), and the buffer stays within one frame."""
    frames: list[Frame] = []
    pending = b""  # bytes fed but not yet handed out in a frame
    for read in reads:
        pending += read
        got = framer.feed(read)
        position = 0
        for index, frame in enumerate(got):
            start, end = frame.span
            assert start == position and end <= len(read), (frame, position)
            if len(frame.data) != end - start:  # begun in an earlier read
                assert index == 0 and start == 0 and frame.data.endswith(read[:end])
            else:
                assert frame.data == read[start:end]
            assert pending.startswith(frame.data)
            pending = pending[len(frame.data):]
            position = end
        assert framer.buffered == len(pending)
        assert framer.buffered <= limit + 4
        if framer.buffered >= 4:
            (declared,) = struct.unpack_from(">I", pending)
            assert framer.buffered < 4 + declared
        frames.extend(got)
    return frames


def assert_error_then_opaque(frames: list[Frame], before: int) -> Frame:
    """The first `before` frames are regular, then one ProtocolError, then only Opaque."""
    assert all(f.type not in (PROTOCOL_ERROR, OPAQUE) for f in frames[:before])
    assert frames[before].type == PROTOCOL_ERROR, frames
    assert all(f.type == OPAQUE for f in frames[before + 1:])
    return frames[before]


# ---------------------------------------------------------------------------------------------
# Catalogue and round trips


def test_protocol_spec_is_registered_with_its_limits_and_extra_types() -> None:
    spec = get("wallaroo")
    assert spec is w.PROTOCOL
    assert spec.name == "wallaroo"
    assert spec.default_max_frame == 64 * 1024 * 1024
    assert spec.extra_types == ("ProtocolError", "Opaque")
    session = spec.new_session()
    assert session.client.from_client and not session.server.from_client
    assert session.client.buffered == session.server.buffered == 0


def test_examples_cover_every_catalogue_entry_and_every_legal_flag_combination() -> None:
    assert {name for name, _ in EXAMPLES} == set(w.PROTOCOL.messages)
    covered = {fields["flags"] for name, fields in EXAMPLES if name == "Message"}
    assert covered == set(LEGAL_FLAGS) == set(w.LEGAL_FLAG_VALUES)


@pytest.mark.parametrize(("name", "fields"), EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_round_trip_is_field_and_byte_exact(name: str, fields: dict[str, Any]) -> None:
    spec = w.PROTOCOL.message(name)
    data = spec.encode(**fields)
    assert spec.decode(data) == fields
    assert tuple(spec.decode(data)) == spec.fields
    assert spec.encode(**spec.decode(data)) == data
    assert w.decode_frame(data) == (name, fields)
    (length,) = struct.unpack_from(">I", data)
    assert length == len(data) - 4


@SETTINGS
@given(message=messages())
def test_any_valid_message_round_trips(message: tuple[str, dict[str, Any]]) -> None:
    name, fields = message
    data = w.encode(name, **fields)
    spec = w.MESSAGES[name]
    assert spec.decode(data) == fields
    assert spec.encode(**spec.decode(data)) == data


def test_directions_follow_who_sends_what() -> None:
    from_client = {"Hello", "Notify", "EosMessage", "ListUncommitted", "TwoPCPhase1",
                   "TwoPCPhase2"}
    from_server = {"Ok", "Error", "NotifyAck", "Ack", "Restart", "ReplyUncommitted",
                   "TwoPCReply"}
    for name, spec in w.MESSAGES.items():
        if name in from_client:
            assert spec.directions == {FRONTEND}, name
        elif name in from_server:
            assert spec.directions == {BACKEND}, name
        else:
            assert name == "Message" and spec.directions == {FRONTEND, BACKEND}
        assert spec.doc


def test_wire_layout_of_a_keyed_message_with_event_time_matches_the_specification() -> None:
    data = w.encode("Message", stream_id=1, flags=EVENT_TIME | KEY, message_id=2,
                    event_time=-3, key="ab", payload=b"xyz")
    body = (struct.pack(">QBQq", 1, EVENT_TIME | KEY, 2, -3) + struct.pack(">H", 2) + b"ab"
            + b"xyz")
    assert data == struct.pack(">IB", len(body) + 1, 5) + body


def test_two_pc_message_is_a_stream_zero_message_with_a_tagged_payload() -> None:
    data = w.encode("TwoPCPhase1", txn_id="t", ranges=[(1, 2, 3)])
    assert w.MESSAGES["Message"].decode(data) == {
        "stream_id": 0, "flags": 0, "message_id": 0, "event_time": None, "key": None,
        "payload": bytes([203]) + struct.pack(">H", 1) + b"t" + struct.pack(">IQQQ", 1, 1, 2, 3),
    }


def test_eos_message_accepts_both_variants_on_the_wire() -> None:
    short = struct.pack(">IBQ", 9, 8, 5)
    long = struct.pack(">IBQQ", 17, 8, 5, 6)
    assert w.decode_frame(short) == ("EosMessage", {"stream_id": 5, "message_id": None})
    assert w.decode_frame(long) == ("EosMessage", {"stream_id": 5, "message_id": 6})


def test_invalid_utf8_text_decodes_without_error_and_re_encodes_exactly() -> None:
    data = w.raw_frame(2, struct.pack(">H", 3) + b"a\xffb")
    name, fields = w.decode_frame(data)
    assert name == "Error" and fields["message"].startswith("a")
    assert w.encode("Error", **fields) == data


# ---------------------------------------------------------------------------------------------
# Convenience helpers


def test_encode_takes_tuples_for_list_items_and_defaults_for_omitted_fields() -> None:
    assert w.encode("Ack", credits=3, acks=[(1, 2)]) == w.encode(
        "Ack", credits=3, acks=[{"stream_id": 1, "point_of_ref": 2}])
    assert w.decode_frame(w.encode("Notify", stream_id=1, stream_name="s"))[1] == {
        "stream_id": 1, "stream_name": "s", "point_of_ref": 0}
    assert w.decode_frame(w.encode("TwoPCReply", txn_id="t", commit=True))[1]["commit"] == 1


def test_message_flags_are_derived_from_the_fields_given() -> None:
    assert w.decode_frame(w.encode("Message", stream_id=1, message_id=5))[1]["flags"] == 0
    fields = w.decode_frame(w.encode("Message", stream_id=1, key="k", event_time=9,
                                     payload=b"p"))[1]
    assert fields["flags"] == EPHEMERAL | KEY | EVENT_TIME
    assert fields["message_id"] is None and fields["payload"] == b"p"


@pytest.mark.parametrize(
    ("name", "fields", "complaint"),
    [
        ("Nope", {}, "unknown Wallaroo message"),
        ("Notify", {"stream_id": 1, "stream_name": "s", "colour": 1}, "no field colour"),
        ("Notify", {"stream_name": "s"}, "needs stream_id"),
        ("Message", {"stream_id": 1, "flags": EPHEMERAL | BOUNDARY}, "illegal"),
        ("Message", {"stream_id": 1, "flags": 4, "message_id": 1}, "unknown flag bits"),
        ("Message", {"stream_id": 1, "flags": 0}, "require message_id"),
        ("Message", {"stream_id": 1, "flags": BOUNDARY, "message_id": 1, "payload": b"x"},
         "leave out payload"),
        ("TwoPCReply", {"stream_id": 1, "txn_id": "t", "commit": 1}, "cannot encode"),
        ("Ack", {"credits": -1}, "cannot encode"),
        ("Error", {"message": 5}, "cannot encode"),
    ],
)
def test_encode_rejects_what_the_layout_cannot_hold(
    name: str, fields: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        w.encode(name, **fields)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        w.encode("Error", message="x")[:-1],
        w.encode("Error", message="x") + b"\0",
        w.encode("Error", message="x") * 2,
        w.raw_frame(3, b"\0" * 5),  # a Notify too short for its fields
        w.raw_frame(9),
        w.raw_frame(5, struct.pack(">QB", 1, 3) + b"\0" * 8),
    ],
    ids=["empty", "truncated", "trailing", "two", "short-body", "unknown-tag", "bad-flags"],
)
def test_decode_frame_rejects_anything_but_one_valid_frame(data: bytes) -> None:
    with pytest.raises(ValueError):
        w.decode_frame(data)


# ---------------------------------------------------------------------------------------------
# Framing valid streams


@SETTINGS
@given(st.data())
def test_valid_stream_cut_anywhere_frames_to_the_original_messages(data: st.DataObject) -> None:
    chosen = data.draw(st.lists(messages(), max_size=10))
    sent = [w.encode(name, **fields) for name, fields in chosen]
    reads = data.draw(cut_into_reads(b"".join(sent)))
    framer = w.new_session().client
    frames = feed_all(framer, reads, w.DEFAULT_MAX_FRAME)
    assert [f.data for f in frames] == sent
    assert [f.type for f in frames] == [
        expected_type(name, raw) for (name, _), raw in zip(chosen, sent, strict=True)]
    assert framer.buffered == 0


@SETTINGS
@given(st.data())
def test_framer_types_every_message_as_sent_and_decodes_it_lazily(data: st.DataObject) -> None:
    sent = data.draw(st.lists(messages(), min_size=1, max_size=8))
    wire = [w.encode(name, **fields) for name, fields in sent]
    reads = data.draw(cut_into_reads(b"".join(wire)))
    frames = feed_all(w.new_session().server, reads, w.DEFAULT_MAX_FRAME)
    assert len(frames) == len(sent)
    for frame, (name, fields), raw in zip(frames, sent, wire, strict=True):
        assert frame.type == expected_type(name, raw)
        assert frame.data == raw and not frame.from_client
        if frame.type == name:
            assert frame.fields == fields and frame.error is None


def test_several_frames_in_one_read_come_out_in_order_with_their_spans() -> None:
    parts = [w.encode("Notify", stream_id=i, stream_name=f"s{i}") for i in range(3)]
    frames = w.new_session().client.feed(b"".join(parts))
    assert [f.fields["stream_id"] for f in frames] == [0, 1, 2]
    ends = [len(parts[0]), len(parts[0]) * 2, len(parts[0]) * 3]
    assert [f.span for f in frames] == [(0, ends[0]), (ends[0], ends[1]), (ends[1], ends[2])]


def test_frame_fed_one_byte_at_a_time_is_found_once_in_the_last_read() -> None:
    data = w.encode("TwoPCPhase1", txn_id="txn", ranges=[(1, 0, 10)])
    framer = w.new_session().client
    found = [(framer.feed(data[i:i + 1]), framer.buffered) for i in range(len(data))]
    assert [i for i, (frames, _) in enumerate(found) if frames] == [len(data) - 1]
    (frame,) = found[-1][0]
    assert frame.span == (0, 1) and frame.data == data
    assert [buffered for _, buffered in found] == [*range(1, len(data)), 0]


def test_two_pc_frames_keep_message_as_alias_and_plain_messages_do_not() -> None:
    framer = w.new_session().client
    frames = framer.feed(
        w.encode("TwoPCPhase2", txn_id="t", commit=1)
        + w.encode("Message", stream_id=1, message_id=0, payload=bytes([203]))
        + w.encode("Message", stream_id=0, message_id=0, payload=bytes([200, 1]))
        + w.encode("Message", stream_id=0, flags=KEY, message_id=0, key="", payload=b"\xcb")
    )
    assert [(f.type, f.alias) for f in frames] == [
        ("TwoPCPhase2", "Message"), ("Message", None), ("Message", None), ("Message", None)]
    assert frames[0].spec is w.MESSAGES["TwoPCPhase2"]
    assert frames[0].fields == {"stream_id": 0, "flags": 0, "message_id": 0, "txn_id": "t",
                                "commit": 1}


def test_body_that_cannot_be_decoded_is_still_framed_and_reports_its_error() -> None:
    broken_notify = w.raw_frame(3, b"\0" * 5)
    frames = w.new_session().client.feed(broken_notify + w.encode("Error", message="m"))
    assert [f.type for f in frames] == ["Notify", "Error"]
    assert frames[0].fields == {} and "cannot decode Notify" in frames[0].error
    assert frames[0].render() == "Notify()"
    assert frames[1].fields == {"message": "m"}


def test_render_gives_readable_text() -> None:
    framer = w.new_session().client
    frames = framer.feed(
        w.encode("Notify", stream_id=1, stream_name="s", point_of_ref=0)
        + w.encode("Message", stream_id=2, message_id=3, payload=b"hi")
        + w.encode("TwoPCPhase1", txn_id="t1", ranges=[(1, 0, 9)])
        + w.raw_frame(99, b"junk")
    )
    assert [f.render() for f in frames[:3]] == [
        "Notify(stream_id=1, stream_name=s, point_of_ref=0)",
        "Message(stream_id=2, flags=0, message_id=3, event_time=NULL, key=NULL, payload=hi)",
        "TwoPCPhase1(stream_id=0, flags=0, message_id=0, txn_id=t1, "
        "ranges=[{stream_id: 1, start_por: 0, end_por: 9}])",
    ]
    assert frames[3].render().startswith("ProtocolError(error=wallaroo: unknown frame tag 99")
    assert framer.feed(b"abc")[0].render() == "Opaque(length=3)"


# ---------------------------------------------------------------------------------------------
# Bad input


def bad_frames(limit: int) -> list[tuple[str, bytes]]:
    """Frame starts that break the protocol, with words the error must contain."""
    cases = [
        ("length 0", struct.pack(">I", 0) + b"\x05rest"),
        (f"exceeds the limit of {limit}", struct.pack(">IB", limit + 1, 0)),
        ("unknown frame tag 9", w.raw_frame(9, b"abc")),
        ("unknown frame tag 255", w.raw_frame(255)),
        ("cannot hold stream_id and flags", w.raw_frame(5, b"\0" * 8)),
    ]
    for flags in ILLEGAL_FLAGS:
        cases.append((f"illegal flags {flags:#04x}", w.raw_frame(5, struct.pack(">QBQ", 1,
                                                                                 flags, 2))))
    return cases


@pytest.mark.parametrize(("complaint", "bad"), bad_frames(1000), ids=lambda v: str(v)[:30])
def test_protocol_error_after_valid_frames_then_passthrough(complaint: str, bad: bytes) -> None:
    good = w.encode("Hello", version="v", program_name="p", instance_name="i")
    framer = w.new_session(max_frame=1000).client
    frames = framer.feed(good + bad)
    assert [f.type for f in frames] == ["Hello", PROTOCOL_ERROR]
    error = frames[1]
    assert complaint in error.error and "through unframed" in error.error
    assert error.data == bad and error.span == (len(good), len(good) + len(bad))
    assert framer.buffered == 0
    later = [framer.feed(b"\0\0\0\x05\x03next"), framer.feed(good)]
    assert [[(f.type, f.data, f.span) for f in reads] for reads in later] == [
        [(OPAQUE, b"\0\0\0\x05\x03next", (0, 9))], [(OPAQUE, good, (0, len(good)))]]


@pytest.mark.parametrize(("complaint", "bad"), bad_frames(1000), ids=lambda v: str(v)[:30])
def test_protocol_error_found_across_reads_carries_the_buffered_bytes(
    complaint: str, bad: bytes
) -> None:
    framer = w.new_session(max_frame=1000).server
    before = [framer.feed(bad[i:i + 1]) for i in range(len(bad))]
    frames = [f for reads in before for f in reads]
    error = assert_error_then_opaque(frames, 0)
    assert complaint in error.error
    assert b"".join(f.data for f in frames) == bad
    # the error surfaces as soon as the header shows it: at most 14 bytes in
    assert len(error.data) <= 14 and error.span == (0, 1)


def test_oversized_length_is_refused_before_any_body_is_buffered() -> None:
    framer = w.new_session().client
    header = struct.pack(">I", w.DEFAULT_MAX_FRAME + 1)
    assert framer.feed(header[:3]) == [] and framer.buffered == 3
    (error,) = framer.feed(header[3:])
    assert error.type == PROTOCOL_ERROR and "exceeds the limit of 67108864" in error.error
    assert framer.buffered == 0


def test_configured_limit_admits_exactly_that_length() -> None:
    payload = b"x" * (100 - 18)
    at_limit = w.encode("Message", stream_id=1, message_id=1, payload=payload)
    assert struct.unpack_from(">I", at_limit)[0] == 100
    assert w.new_session(max_frame=100).client.feed(at_limit)[0].type == "Message"
    assert w.new_session(max_frame=99).client.feed(at_limit)[0].type == PROTOCOL_ERROR


def test_large_frame_in_many_reads_buffers_at_most_its_own_size() -> None:
    data = w.encode("Message", stream_id=1, message_id=1, payload=b"p" * 300_000)
    framer = w.new_session().client
    frames: list[Frame] = []
    for start in range(0, len(data), 65536):
        frames += framer.feed(data[start:start + 65536])
        assert framer.buffered <= len(data)
    assert [f.data for f in frames] == [data] and framer.buffered == 0


@SETTINGS
@given(st.data())
def test_truncated_stream_keeps_only_the_partial_frame(data: st.DataObject) -> None:
    sent = [w.encode(n, **f) for n, f in data.draw(st.lists(messages(), min_size=1,
                                                            max_size=6))]
    cut = data.draw(st.integers(0, len(sent[-1]) - 1))
    stream = b"".join(sent[:-1]) + sent[-1][:cut]
    framer = w.new_session().client
    frames = feed_all(framer, data.draw(cut_into_reads(stream)), w.DEFAULT_MAX_FRAME)
    assert [f.data for f in frames] == sent[:-1]
    assert framer.buffered == cut


@SETTINGS
@given(st.data())
def test_valid_frames_then_a_bad_one_then_junk(data: st.DataObject) -> None:
    limit = 4096
    sent = [w.encode(n, **f) for n, f in data.draw(st.lists(messages(), max_size=5))]
    complaint, bad = data.draw(st.sampled_from(bad_frames(limit)))
    junk = data.draw(st.binary(max_size=60))
    framer = w.new_session(max_frame=limit).client
    frames = feed_all(framer, data.draw(cut_into_reads(b"".join(sent) + bad + junk)), limit)
    error = assert_error_then_opaque(frames, len(sent))
    assert [f.data for f in frames[:len(sent)]] == sent
    assert complaint in error.error
    assert b"".join(f.data for f in frames[len(sent):]) == bad + junk
    assert framer.buffered == 0


@SETTINGS
@given(st.data())
def test_random_bytes_never_raise_and_never_overbuffer(data: st.DataObject) -> None:
    limit = data.draw(st.sampled_from([16, 300, w.DEFAULT_MAX_FRAME]))
    stream = data.draw(st.binary(max_size=400))
    framer = w.new_session(max_frame=limit).server
    frames = feed_all(framer, data.draw(cut_into_reads(stream)), limit)
    errors = [i for i, f in enumerate(frames) if f.type == PROTOCOL_ERROR]
    assert len(errors) <= 1
    if errors:
        assert_error_then_opaque(frames, errors[0])
    for frame in frames:
        frame.render()  # decoding garbage reports, never raises


@SETTINGS
@given(st.binary(min_size=1, max_size=200).filter(lambda b: b[0] >= 5))
def test_random_bytes_with_a_huge_length_prefix_error_at_once(stream: bytes) -> None:
    framer = w.new_session().client
    frames = framer.feed(stream + b"\0" * 3)
    assert frames[0].type == PROTOCOL_ERROR and frames[0].data == stream + b"\0" * 3
