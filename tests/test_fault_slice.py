"""slice(size, delay_ms), end to end: a frame reaches its peer in pieces of `size` bytes,
delay_ms apart, intact, and the connection carries on."""

from __future__ import annotations

import hashlib
import math
import time

import pytest
from fault_e2e_shaping import (
    faults_by_name,
    split_messages,
    through,
)
from pgwire import open_session, query_message

pytest_plugins = ["fault_e2e_shaping"]

GAP = 0.05
EARLY = 0.9
"""A gap may be that much shorter: each is an event-loop timer, which may fire a tick early."""


def timed_reads(sock, until: bytes) -> tuple[bytes, list[tuple[float, int]]]:
    """Read until the data ends with `until`: the data, and (time, bytes so far) per read."""
    data, reads = b"", []
    while not data.endswith(until):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
        reads.append((time.monotonic(), len(data)))
    return data, reads


READY = b"Z\x00\x00\x00\x05I"


def direct_reply(pg, query: str) -> bytes:
    """What the server itself answers (the reply of SELECT 1 has nothing session-specific)."""
    with open_session(pg.port) as sock:
        sock.sendall(query_message(query))
        return timed_reads(sock, READY)[0]


def test_a_server_frame_sliced_in_single_bytes_arrives_whole_after_its_gaps(
        wf_proxy, pg, wf_control):
    wf_control.send(f'faults.add("s").fromServer().onCommandComplete().slice(1, {GAP * 1000:g})')
    expected = direct_reply(pg, "SELECT 1")
    complete = next(m for m in split_messages(expected) if m[:1] == b"C")
    start = expected.index(complete)
    end = start + len(complete)
    with open_session(wf_proxy.port) as sock:
        for _ in range(2):  # the connection carries on: a second query is answered the same
            sent = time.monotonic()
            sock.sendall(query_message("SELECT 1"))
            data, reads = timed_reads(sock, READY)
            whole = next(t for t, size in reads if size >= end)
            # len(complete) one-byte pieces have len(complete) - 1 gaps between them
            assert whole - sent >= (len(complete) - 1) * GAP * EARLY, (whole - sent, len(complete))
            assert data == expected
            # seen in pieces: some read ended inside the frame
            assert any(start < size < end for _, size in reads), reads
        wf_control.remove_fault("s")
        sock.sendall(query_message("SELECT 1"))
        assert timed_reads(sock, READY)[0] == expected
    assert faults_by_name(wf_control) == {}
    rows = [r.message for r in wf_control.dump()]
    assert rows.count("CommandComplete(command=SELECT 1) [fault s: slice]") == 2, rows
    assert rows.count("CommandComplete(command=SELECT 1)") == 1, rows


@pytest.mark.parametrize("size", [4, 64])
def test_a_client_frame_sliced_reaches_the_server_intact(wf_proxy, pg, wf_control, size):
    wf_control.send(f'faults.add("s").fromClient().onQuery(query="sliced").slice({size}, 20)')
    text = "x" * 200
    query = f"SELECT 'sliced', '{text}'"
    pieces = math.ceil(len(query_message(query)) / size)
    with through(wf_proxy, pg) as conn:
        started = time.monotonic()
        assert conn.execute(query).fetchone() == ("sliced", text)
        elapsed = time.monotonic() - started
        assert conn.execute("SELECT 2").fetchone() == (2,)
    assert elapsed >= (pieces - 1) * 0.02 * EARLY, (elapsed, pieces)
    assert faults_by_name(wf_control)["s"][1] == 1


def test_slice_without_delay_still_delivers_everything(wf_proxy, pg, wf_control):
    """Big server frames cut in 1000-byte pieces with no gap: every byte, in order."""
    wf_control.send('faults.add("s").fromServer().onDataRow().slice(1000)')
    with through(wf_proxy, pg) as conn:
        rows = conn.execute(
            "SELECT g, repeat(md5(g::text), 100) FROM generate_series(1, 200) g").fetchall()
    assert rows == [(g, hashlib.md5(str(g).encode()).hexdigest() * 100)
                    for g in range(1, 201)]
    assert faults_by_name(wf_control)["s"][1] == 200
