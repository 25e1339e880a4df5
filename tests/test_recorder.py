"""The recorder: numbering, labels, COPY escaping, the ring buffer's bound."""

from __future__ import annotations

from wirefault.protocols import Frame, get
from wirefault.proxy.recorder import (
    KEEP_FRAME_BYTES,
    LIMITS,
    Recorder,
    RecorderSlot,
    copy_escape,
)

RAW_PROTOCOL = get("raw")
RAW = RAW_PROTOCOL.messages["Data"]


def data_frame(payload: bytes, from_client: bool = True) -> Frame:
    return Frame("Data", payload, (0, len(payload)), from_client, RAW)


def test_rows_are_copy_text_with_numbers_in_order_of_first_frame():
    rec = Recorder(messages=RAW_PROTOCOL.messages)
    a, b = RecorderSlot(), RecorderSlot()
    rec.record(b, data_frame(b"first", True))
    rec.record(a, data_frame(b"second", False))
    rec.record(b, data_frame(b"third", False))
    assert rec.dump().splitlines() == [
        "0\tcoordinator\tData(data=first)",
        "1\tworker\tData(data=second)",
        "0\tworker\tData(data=third)",
    ]
    assert rec.dump() == ""


def test_reset_restarts_numbering_and_forgets_rows():
    rec = Recorder(messages=RAW_PROTOCOL.messages)
    a, b = RecorderSlot(), RecorderSlot()
    rec.record(a, data_frame(b"x"))
    rec.record(b, data_frame(b"y"))
    rec.reset()
    rec.record(b, data_frame(b"z"))
    assert rec.dump() == "0\tcoordinator\tData(data=z)"


def test_labels_are_configurable():
    rec = Recorder(client_label="source", server_label="sink", messages=RAW_PROTOCOL.messages)
    rec.record(RecorderSlot(), data_frame(b"x", True))
    rec.record(RecorderSlot(), data_frame(b"y", False))
    assert [row.split("\t")[1] for row in rec.dump().splitlines()] == ["source", "sink"]


def test_copy_escaping():
    assert copy_escape("a\\b\tc\nd\re") == "a\\\\b\\tc\\nd\\re"
    rec = Recorder(messages=RAW_PROTOCOL.messages)
    rec.record(RecorderSlot(), data_frame(b"tab\there\\"))
    assert rec.dump() == "0\tcoordinator\tData(data=tab\\there\\\\)"


def test_ring_buffer_is_bounded_and_reports_drops_first():
    rec = Recorder(limit=10, messages=RAW_PROTOCOL.messages)
    slot = RecorderSlot()
    for i in range(2500):
        rec.record(slot, data_frame(str(i).encode()))
    assert len(rec) == 10
    rows = rec.dump().splitlines()
    assert rows[0] == "-1\trecorder\t2490 frames dropped (ring buffer limit 10)"
    assert rows[1] == "0\tcoordinator\tData(data=2490)" and len(rows) == 11


def test_large_frames_are_rendered_at_once_and_truncated():
    rec = Recorder(messages=RAW_PROTOCOL.messages)
    payload = b"x" * (KEEP_FRAME_BYTES * 10)
    rec.record(RecorderSlot(), data_frame(payload))
    row = rec.dump()
    assert row.startswith("0\tcoordinator\tData(data=xxx")
    assert row.endswith(f"...({len(payload)} bytes))")
    assert len(row) < 5000


def test_long_text_fields_are_cut_and_marked():
    from wirefault.protocols import get as get_protocol
    from wirefault.proxy.recorder import MAX_RENDERED_CHARS

    query = get_protocol("postgres").messages["Query"]
    text = "SELECT " + "x" * (MAX_RENDERED_CHARS * 2)
    data = query.encode(query=text)
    rec = Recorder(messages=get_protocol("postgres").messages)
    rec.record(RecorderSlot(), Frame("Query", data, (0, len(data)), True, query))
    row = rec.dump()
    assert row.endswith(f"...({len(text)} chars))") and len(row) < MAX_RENDERED_CHARS + 100


def test_binary_payloads_render_quickly_as_escapes():
    payload = bytes(range(256)) * 64
    frame = data_frame(payload)
    rendered = frame.render(LIMITS)
    assert rendered.startswith("Data(data=\\x00\\x01\\x02")
    assert rendered.endswith(f"...({len(payload)} bytes))")


def test_terminate_frames_are_left_out():
    rec = Recorder(messages=RAW_PROTOCOL.messages)
    rec.record(RecorderSlot(), Frame("Terminate", b"X\0\0\0\4", (0, 5), True, None))
    assert rec.dump() == ""


def test_control_bytes_are_shown_escaped_so_copy_can_load_them():
    rec = Recorder(messages=RAW_PROTOCOL.messages)
    rec.record(RecorderSlot(), data_frame(b"a\x00b\x01"))
    # printable() shows \x00 as four characters; COPY escaping then doubles the backslash
    assert rec.dump() == "0\tcoordinator\tData(data=a\\\\x00b\\\\x01)"


def test_a_full_ring_gives_the_garbage_collector_nothing_to_traverse():
    import gc

    rec = Recorder(messages=RAW_PROTOCOL.messages)
    for i in range(100):
        rec.record(RecorderSlot(), data_frame(str(i).encode()))
    gc.collect()
    assert not any(gc.is_tracked(row) for row in rec._rows)


def test_printable_escapes_exactly_the_control_characters_a_dump_cannot_show():
    from wirefault.protocols.base import printable

    shown = {c for c in range(0x80) if printable(chr(c)) != chr(c)}
    assert shown == {*range(0x20), 0x7F} - {9, 10, 13}
    assert printable("plain text, é\t\n") == "plain text, é\t\n"
    assert printable("a\x00b\x1bc") == "a\\x00b\\x1bc"
