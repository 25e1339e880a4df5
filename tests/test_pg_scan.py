"""The walk over PostgreSQL message headers: the native one agrees with the Python reference
on every input (any int as a limit, bad arguments refused alike), is built wherever a C
compiler is; framing gives the same frames with either, whatever the framer's limit."""

from __future__ import annotations

import shutil
import struct
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_postgres_protocol import any_limit, cut

from wirefault.protocols import _pg_framer, _pg_scan
from wirefault.protocols._pg_framer import _BACKEND_TABLE, _FRONTEND_TABLE
from wirefault.protocols._pg_scan import scan_python
from wirefault.protocols.postgres import PROTOCOL

M = PROTOCOL.messages
IMPLEMENTATIONS = [pytest.param(scan_python, id="python")]
if _pg_scan.NATIVE:
    IMPLEMENTATIONS.append(pytest.param(_pg_scan.scan, id="native"))


def header(type_byte: int, length: int) -> bytes:
    return struct.pack(">BI", type_byte, length)


def test_the_native_walk_is_built_where_a_c_compiler_and_python_headers_are():
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not (shutil.which(sysconfig.get_config_var("CC").split()[0] or "cc") and headers.exists()):
        pytest.skip("no C compiler or Python headers: the pure-Python walk is expected")
    assert _pg_scan.NATIVE, "pip install should have built wirefault.protocols._pg_scan_native"


@pytest.mark.parametrize("scan", IMPLEMENTATIONS)
def test_walks_complete_plain_messages_and_stops_where_python_must_think(scan):
    plain = _BACKEND_TABLE.plain
    ready = M["ReadyForQuery"].encode()
    row = M["DataRow"].encode(values=[b"1"])
    auth = M["AuthenticationOk"].encode()  # 'R' is shared: Python names it
    data = ready + row + auth + ready
    stop, types, ends = scan(data, 0, plain, 1 << 30)
    assert stop == len(ready + row)
    assert types == b"ZD"
    assert list(memoryview(ends).cast("q")) == [len(ready), len(ready + row)]
    # resumes from an offset; stops at a partial message, at the end, or before the header
    assert scan(data, len(ready + row + auth), plain, 1 << 30)[:2] == (len(data), b"Z")
    assert scan(ready + row[:-1], 0, plain, 1 << 30)[0] == len(ready)
    assert scan(ready + b"D\x00", 0, plain, 1 << 30)[0] == len(ready)
    assert scan(b"", 0, plain, 1 << 30) == (0, b"", b"")


@pytest.mark.parametrize("scan", IMPLEMENTATIONS)
def test_stops_at_bad_lengths_and_unknown_types(scan):
    plain = _FRONTEND_TABLE.plain
    sync = M["Sync"].encode()
    assert scan(sync + header(ord("Q"), 3), 0, plain, 1 << 30)[0] == len(sync)
    assert scan(sync + header(ord("Q"), 100) + b"x" * 96, 0, plain, 50)[0] == len(sync)
    assert scan(sync + header(ord("Q"), 0xFFFFFFFF), 0, plain, 1 << 30)[0] == len(sync)
    assert scan(sync + header(0, 4), 0, plain, 1 << 30)[0] == len(sync)
    assert scan(sync + b"p\x00\x00\x00\x04", 0, plain, 1 << 30)[0] == len(sync)  # shared 'p'


@pytest.mark.parametrize("scan", IMPLEMENTATIONS)
def test_rejects_bad_arguments(scan):
    plain = _FRONTEND_TABLE.plain
    with pytest.raises(ValueError, match="pos"):
        scan(b"abc", 4, plain, 10)
    with pytest.raises(ValueError, match="pos"):
        scan(b"abc", -1, plain, 10)
    with pytest.raises(ValueError, match="pos"):
        scan(b"abc", 1 << 64, plain, 10)  # beyond ssize_t: outside data, as any other
    with pytest.raises(ValueError, match="pos"):
        scan(b"abc", -(1 << 64), plain, 10)
    with pytest.raises(TypeError):
        scan(b"abc", 0, plain)
    if scan is not scan_python:  # the framer always passes bytes and ints; C checks
        with pytest.raises(ValueError, match="256"):
            scan(b"abc", 0, b"\x01", 10)
        with pytest.raises(TypeError):
            scan(bytearray(b"abc"), 0, plain, 10)
        with pytest.raises(TypeError):
            scan(b"abc", 0, plain, 10.0)


# Limits a misconfigured framer hands the walk (its max_frame minus one): none may raise.
NO_LENGTH_FITS = [-(1 << 70), -(1 << 64), -(1 << 63) - 1, -(1 << 63), -(1 << 31), -2, -1, 0, 3]
EVERY_LENGTH_FITS = [(1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 1 << 64,
                     1 << 70]


@pytest.mark.parametrize("scan", IMPLEMENTATIONS)
@pytest.mark.parametrize("max_length", NO_LENGTH_FITS + EVERY_LENGTH_FITS)
def test_any_int_is_a_limit(scan, max_length):
    plain = _FRONTEND_TABLE.plain
    sync = M["Sync"].encode()
    huge = header(ord("Q"), 0xFFFFFFFF)  # the largest length there is, its body not here
    stop, types, _ = scan(sync + sync + huge, 0, plain, max_length)
    if max_length in NO_LENGTH_FITS:
        assert (stop, types) == (0, b"")
    else:
        assert (stop, types) == (2 * len(sync), b"SS")


plain_tables = st.binary(min_size=256, max_size=256).map(
    lambda b: bytes(1 if x & 1 else 0 for x in b))


@st.composite
def header_streams(draw: st.DrawFn) -> bytes:
    """Messages with plausible and implausible headers, then maybe a torn one."""
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        type_byte = draw(st.sampled_from([ord("D"), ord("Z"), ord("Q"), ord("R"), 0, 255]))
        body = draw(st.binary(max_size=40))
        length = draw(st.one_of(st.just(len(body) + 4), st.integers(0, 0xFFFFFFFF)))
        parts.append(header(type_byte, length) + body)
    return b"".join(parts) + draw(st.binary(max_size=6))


def outcome(scan, *args) -> tuple:
    """What a walk returns, or the exception it raises, as comparable values."""
    try:
        return ("returned", scan(*args))
    except Exception as exc:
        return ("raised", type(exc), str(exc))


limits = st.one_of(st.integers(0, 1 << 31), any_limit)


@pytest.mark.skipif(not _pg_scan.NATIVE, reason="the native walk was not built")
@settings(max_examples=600, deadline=None)
@given(data=st.one_of(header_streams(), st.binary(max_size=200)), plain=plain_tables,
       pos=st.one_of(st.integers(0, 300), st.integers(-(1 << 70), 1 << 70)),
       max_length=limits)
def test_native_and_python_walks_agree(data, plain, pos, max_length):
    if 0 <= pos <= 300:
        pos = min(pos, len(data))  # mostly inside data; otherwise both must refuse it
    assert outcome(_pg_scan.scan, data, pos, plain, max_length) == outcome(
        scan_python, data, pos, plain, max_length)


def _frames_with(scan, monkeypatch, reads: list[bytes], max_frame: int | None) -> list[tuple]:
    monkeypatch.setattr(_pg_framer, "scan", scan)
    session = PROTOCOL.new_session(max_frame=max_frame)
    session.client.feed(M["StartupMessage"].encode(user="u"))
    got = []
    for data in reads:
        got += [(f.type, f.data, f.span, f.error) for f in session.server.feed(data)]
    return [*got, ("buffered", session.server.buffered)]


@settings(max_examples=150, deadline=None)
@given(stream=header_streams(), cuts=st.lists(st.integers(0, 600), max_size=8),
       max_frame=st.one_of(st.none(), limits))
def test_framing_gives_the_same_frames_with_either_walk(stream, cuts, max_frame):
    reads = cut(stream, cuts) if stream else []
    with pytest.MonkeyPatch.context() as patch:
        expected = _frames_with(scan_python, patch, reads, max_frame)
    with pytest.MonkeyPatch.context() as patch:
        assert _frames_with(_pg_scan.scan, patch, reads, max_frame) == expected
