"""The recorder's bounds: every value cut before it is rendered, and the ring bounded in
frames and in bytes.

A large frame is kept as a bounded copy of its fields, each value (nested ones too) cut to
its own limit: 256 bytes of a bytes value, 4,096 characters of text, 100 items of a list or
map, each marked with its full size. The ring forgets its oldest rows when either
`--recorder-limit` frames or `--recorder-max-bytes` bytes are reached.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import tracemalloc

import pytest
from proxy_helpers import BIN, MITMDUMP_SCRIPT, peak_rss_kib, running_proxy
from test_proxy_e2e import LAUNCHES

from wirefault.fifo_client import FaultProxy, parse_dump
from wirefault.protocols import Frame, get
from wirefault.proxy.recorder import (
    DEFAULT_MAX_BYTES,
    MAX_RENDERED_BYTES,
    MAX_RENDERED_ITEMS,
    Recorder,
    RecorderSlot,
)

POSTGRES = get("postgres")
M = POSTGRES.messages
MIB = 1024 * 1024
BIG_VALUE = 50 * MIB


def frame(name: str, from_client: bool = False, **fields: object) -> Frame:
    data = M[name].encode(**fields)
    return Frame(name, data, (0, len(data)), from_client, M[name])


def dumped(*frames: Frame, recorder: Recorder | None = None) -> list[str]:
    """The messages of a dump of `frames`, as the FIFO client returns them."""
    recorder = Recorder(messages=M) if recorder is None else recorder
    slot = RecorderSlot()
    for f in frames:
        recorder.record(slot, f)
    return [row.message for row in parse_dump(recorder.dump())]


def escapes(data: bytes) -> str:
    """`data` as a dump row shows binary bytes, once COPY escaping is undone."""
    return "".join(f"\\x{b:02x}" for b in data)


# -- cut before rendering ---------------------------------------------------------------------


def test_each_value_of_a_list_is_cut_by_its_own_limit_and_the_rest_still_shows():
    big, text = b"\xec\xab" * 1000, "long " * 2000
    row = frame("DataRow", values=[big, b"small", None, text.encode()])
    (message,) = dumped(row)
    assert message == (
        f"DataRow(values=[{escapes(big[:MAX_RENDERED_BYTES])}...(2000 bytes), small, NULL, "
        f"{text[:MAX_RENDERED_BYTES]}...(10000 bytes)])")


def test_long_lists_and_maps_show_their_first_items_and_their_full_count():
    columns = [{"name": f"c{i}", "table_oid": 0, "column_number": i, "type_oid": 25,
                "type_size": -1, "type_modifier": -1, "format": 0} for i in range(150)]
    (message,) = dumped(frame("RowDescription", columns=columns))
    assert message.startswith("RowDescription(columns=[{name: c0, table_oid: 0, ")
    assert message.endswith(f"{{name: c{MAX_RENDERED_ITEMS - 1}, table_oid: 0, "
                            f"column_number: {MAX_RENDERED_ITEMS - 1}, type_oid: 25, "
                            "type_size: -1, type_modifier: -1, format: 0}, ...(150 items)])")
    assert "c100" not in message


def test_a_long_text_inside_a_map_is_cut_in_characters_and_the_next_fields_still_show():
    error = frame("ErrorResponse", severity="ERROR", code="XX000", message="é" * 5000,
                  detail="after")
    (message,) = dumped(error)
    assert message == (f"ErrorResponse(severity=ERROR, code=XX000, message={'é' * 4096}"
                       "...(5000 chars), detail=after)")


def test_a_bind_with_several_large_parameters_shows_each_of_them_cut_in_bytes():
    parameters = [bytes([0xEC, 0xAB]) * 2_500_000, b"p" * 5_000_000, None, b"last"]
    bind = frame("Bind", True, statement="s1", parameter_formats=[1],
                 parameters=parameters, result_formats=[1])
    assert len(bind.data) > 9 * MIB
    (message,) = dumped(bind)
    assert message == (
        "Bind(portal=, statement=s1, parameter_formats=[1], parameters=["
        f"{escapes(parameters[0][:MAX_RENDERED_BYTES])}...(5000000 bytes), "
        f"{'p' * MAX_RENDERED_BYTES}...(5000000 bytes), NULL, last], result_formats=[1])")


def test_a_50_mib_value_costs_the_recorder_a_bounded_copy_not_its_text():
    row = frame("DataRow", values=[b"\xec" * BIG_VALUE, b"after"])
    recorder = Recorder(messages=M)
    tracemalloc.start()
    try:
        recorder.record(RecorderSlot(), row)
        del row  # and the fields it decoded
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Decoding copies the value once; rendering it whole made ~10 copies' worth of text.
    assert peak < BIG_VALUE * 1.1, peak
    assert kept < 16 * 1024, kept  # what stays: the cut copy, not the 50 MiB
    (message,) = dumped(recorder=recorder)
    head = escapes(b"\xec" * MAX_RENDERED_BYTES)
    assert message == f"DataRow(values=[{head}...({BIG_VALUE} bytes), after])"


def test_rows_of_large_frames_give_the_garbage_collector_nothing_to_traverse():
    recorder = Recorder(messages=M)
    slot = RecorderSlot()
    recorder.record(slot, frame("DataRow", values=[b"x" * 5000, None, b"y"]))
    recorder.record(slot, frame("Bind", True, parameters=[b"z" * 5000], result_formats=[0]))
    recorder.record(slot, frame("CopyData", data=b"c" * 5000))
    # A tuple stops being tracked once its items are: the flat cut copy at the first pass,
    # the row holding it at the next (as rows of runs).
    gc.collect()
    gc.collect()
    assert not any(gc.is_tracked(row) for row in recorder._rows)


# -- the bound in bytes -----------------------------------------------------------------------


def kilobyte_rows(count: int) -> list[Frame]:
    return [frame("DataRow", values=[b"%07d" % i + b"r" * 1000]) for i in range(count)]


def test_the_byte_bound_drops_the_oldest_rows_and_says_so_truthfully():
    recorder = Recorder(limit=1_000_000, max_bytes=MIB, messages=M)
    rows = kilobyte_rows(20_000)
    tracemalloc.start()
    try:
        messages = dumped(*rows, recorder=recorder)
    finally:
        tracemalloc.stop()
    first, shown = messages[0], messages[1:]
    assert first == (f"{20_000 - len(shown)} frames dropped "
                     f"(ring buffer limit 1000000 frames or {MIB} bytes)")
    assert 800 < len(shown) < 1200  # about 1 MiB of 1 KB rows
    assert shown[-1].startswith("DataRow(values=[0019999r")  # the newest are kept, in order
    assert shown[0].startswith(f"DataRow(values=[{20_000 - len(shown):07d}r")


def test_what_the_byte_bound_counts_is_what_the_rows_hold():
    """Measured with tracemalloc: whole frames, runs of frames from reads, and cut copies."""
    stream = b"".join(M["DataRow"].encode(values=[b"%07d" % i + b"r" * n])
                      for i, n in enumerate([50, 1000, 5000] * 5000))
    single = frame("DataRow", values=[b"s" * 100])
    for max_bytes in (MIB, 4 * MIB):
        session = POSTGRES.new_session()
        recorder = Recorder(limit=1_000_000, max_bytes=max_bytes, messages=M)
        slot = RecorderSlot()
        tracemalloc.start()  # reads are made while tracing: rows of runs keep them
        try:
            for start in range(0, len(stream), 65536):
                recorder.record_batch(slot, session.server.feed_batch(
                    stream[start:start + 65536]))
                recorder.record(slot, single)
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        # full chunks up to the bound, plus the oldest and the open one (an eighth each)
        assert max_bytes * 0.8 < held < max_bytes * 1.4, (max_bytes, held)


def test_the_frame_bound_still_holds_beside_the_byte_bound():
    recorder = Recorder(limit=100, messages=M)
    messages = dumped(*kilobyte_rows(1000), recorder=recorder)
    assert messages[0] == "900 frames dropped (ring buffer limit 100)"
    assert len(messages) == 101 and DEFAULT_MAX_BYTES == 64 * MIB


def test_max_bytes_below_one_is_refused():
    with pytest.raises(ValueError, match="at least one byte"):
        Recorder(max_bytes=0)


def test_the_command_line_refuses_a_byte_bound_below_one_in_one_line():
    result = subprocess.run(
        [str(BIN / "wirefault"), "proxy", "--listen", "9", "--upstream", "localhost:5432",
         "--recorder-max-bytes", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("wirefault proxy: argument --recorder-max-bytes: "
                             "must be >= 1: '0'\n")


def test_mitmdump_refuses_a_byte_bound_below_one(tmp_path):
    result = subprocess.run(
        [str(BIN / "mitmdump"), "--rawtcp", "-p", "0", "--listen-host", "127.0.0.1",
         "--mode", "reverse:tcp://127.0.0.1:9", "-s", str(MITMDUMP_SCRIPT),
         "--set", "recorder_max_bytes=0", "--set", "termlog_verbosity=warn"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "recorder_max_bytes: must be >= 1: 0" in output  # mitmdump adds its traceback


# -- through a real proxy ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(LAUNCHES))
def launch(request) -> tuple[str, list[str]]:
    return LAUNCHES[request.param]


def test_a_50_mib_binary_bytea_is_dumped_cut_in_bytes_and_memory_stays_bounded(pg, launch):
    kind, extra = launch
    with running_proxy(pg.port, kind=kind, extra_args=extra) as proxy:
        control = FaultProxy(proxy.fifo, timeout=30)
        with pg.connect(port=proxy.port, autocommit=True) as conn:
            value, after = conn.execute("SELECT decode(repeat('ecab', %s), 'hex'), 'after'",
                                        (BIG_VALUE // 2,), binary=True).fetchone()
        assert len(value) == BIG_VALUE and after == "after"
        rows = [row.message for row in control.dump() if row.message.startswith("DataRow(")]
        peak = peak_rss_kib(proxy.process.pid)
    assert rows == [f"DataRow(values=[{escapes(bytes([0xEC, 0xAB]) * 128)}"
                    f"...({BIG_VALUE} bytes), after])"]
    assert peak < 250 * 1024, f"peak RSS {peak // 1024} MiB"


def test_the_byte_bound_through_a_proxy(pg, launch):
    kind, extra = launch
    option = (["--recorder-max-bytes", "1000000"] if kind == "runner"
              else ["--set", "recorder_max_bytes=1000000"])
    with running_proxy(pg.port, kind=kind, extra_args=[*extra, *option]) as proxy:
        with pg.connect(port=proxy.port, autocommit=True) as conn:
            rows = conn.execute("SELECT g, repeat('r', 1000) FROM generate_series(1, 5000) g"
                                ).fetchall()
        assert len(rows) == 5000
        dump = FaultProxy(proxy.fifo, timeout=30).dump()
    first, shown = dump[0], dump[1:]
    assert (first.conn, first.source) == (-1, "recorder")
    assert first.message.endswith("frames dropped (ring buffer limit 100000 frames or "
                                  "1000000 bytes)")
    dropped = int(first.message.split()[0])
    # ~1 MB of 1 KB rows, plus up to two chunks (a quarter) more; frames that came in one
    # read share their bookkeeping, so how the reads fell (a loaded machine reads bigger
    # ones) moves the count between these bounds. Without a byte bound: all 5,000.
    assert 600 < len(shown) < 1300 and dropped > 3700
    assert [row.message for row in shown[-3:]] == [
        f"DataRow(values=[5000, {'r' * 256}...(1000 bytes)])",
        "CommandComplete(command=SELECT 5000)", "ReadyForQuery(status=I)"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
