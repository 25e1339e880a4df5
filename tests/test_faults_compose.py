"""Several faults at once, end to end, and what a user reads about them.

A frame meets the faults in the order they were added: holds add up and the fault that
ends the frame (kill, drop, error, allow...) stops the walk; faults.add of a name replaces
that fault in place with fresh counters; faults.remove / clear, and conn.* replacing every
fault. What the user reads: faults.list() lines, recorder.dump() rows marked with the
fault that acted, one proxy log line per firing. Last, the same engine on Wallaroo, with
the test peers: error() answers with an Error frame and closes, drop() drops one frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from fault_e2e_shaping import (
    TIMER_SLACK,
    faults_by_name,
    fired_lines,
    fresh_proxy,
    read_to_eof,
    split_messages,
    through,
    wait_for,
)
from peers.wire import VERSION, FrameStream
from pgwire import open_session, query_message, read_until_ready

from wirefault.fifo_client import CommandError, FaultProxy
from wirefault.protocols import Frame

pytest_plugins = ["fault_e2e_shaping"]

TESTS_DIR = Path(__file__).resolve().parent


def notices(conn: psycopg.Connection) -> list[str]:
    seen: list[str] = []
    conn.add_notice_handler(lambda diag: seen.append(diag.message_primary))
    return seen


RAISE_NOTICE = "DO $$ BEGIN RAISE NOTICE 'compose-notice'; END $$"


# -- how faults compose on one frame ----------------------------------------------------------


def test_a_delay_and_a_later_kill_on_the_same_frame_both_apply(wf_proxy, pg, wf_control):
    wf_control.send('faults.add("slow").onQuery(query="^SELECT .both.").delay(400)')
    wf_control.send('faults.add("k").onQuery(query="^SELECT .both.").kill()')
    with through(wf_proxy, pg) as conn:
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 'both'")
        assert time.monotonic() - started >= 0.4 - TIMER_SLACK  # waited, then killed
    assert faults_by_name(wf_control) == {"slow": (1, 1, "active"), "k": (1, 1, "active")}
    marked = [r.message for r in wf_control.dump() if r.message.startswith("Query(")]
    assert marked == ["Query(query=SELECT 'both') [fault slow: delay] [fault k: kill]"]


def test_two_delays_add_up(wf_proxy, pg, wf_control):
    wf_control.send('faults.add("a").onQuery(query="^SELECT .twice.").delay(250)')
    wf_control.send('faults.add("b").onQuery(query="^SELECT .twice.").delay(250)')
    with through(wf_proxy, pg) as conn:
        started = time.monotonic()
        assert conn.execute("SELECT 'twice'").fetchone() == ("twice",)
        assert time.monotonic() - started >= 0.5 - TIMER_SLACK


def test_throttle_and_limit_on_one_direction_both_shape_it(wf_proxy, pg, wf_control):
    """Shaping adds up: the bytes the limit lets through come at the throttle's pace."""
    wf_control.send('faults.add("slow").fromServer().onDataRow().once().throttle(100000)')
    wf_control.send('faults.add("cut").fromServer().onDataRow().once().limit(50000)')
    query = query_message("SELECT g, repeat('v', 1000) FROM generate_series(1, 200) g")
    with open_session(pg.port) as direct:
        direct.sendall(query)
        expected = read_until_ready(direct)
    first_row = expected.index(next(m for m in split_messages(expected) if m[:1] == b"D"))
    with open_session(wf_proxy.port) as sock:
        started = time.monotonic()
        sock.sendall(query)
        got = read_to_eof(sock)
        elapsed = time.monotonic() - started
    assert got == expected[:first_row + 50000]
    assert elapsed >= 0.45 - TIMER_SLACK  # 50 kB at 100 kB/s, less the first 50 ms tick
    assert {name: fired for name, (_, fired, _) in faults_by_name(wf_control).items()} == {
        "slow": 1, "cut": 1}


@pytest.mark.parametrize("order", ["drop-first", "kill-first"])
def test_the_first_fault_that_ends_the_frame_stops_the_walk(wf_proxy, pg, wf_control, order):
    drop = 'faults.add("d").onNoticeResponse().drop()'
    kill = 'faults.add("k").onNoticeResponse().kill()'
    for command in ([drop, kill] if order == "drop-first" else [kill, drop]):
        wf_control.send(command)
    with through(wf_proxy, pg) as conn:
        seen = notices(conn)
        if order == "drop-first":
            conn.execute(RAISE_NOTICE)  # the notice is gone, the connection carries on
            assert conn.execute("SELECT 'alive'").fetchone() == ("alive",)
            assert seen == []
        else:
            with pytest.raises(psycopg.OperationalError):
                conn.execute(RAISE_NOTICE)
    counts = faults_by_name(wf_control)
    first, second = ("d", "k") if order == "drop-first" else ("k", "d")
    assert counts[first] == (1, 1, "active")
    assert counts[second] == (0, 0, "active")  # it never saw the frame


def test_an_allow_first_exempts_what_it_matches(wf_proxy, pg, wf_control):
    """The Citus case: the maintenance daemon's connections stay out of the failure."""
    wf_control.send('faults.add("exempt").where(application_name="^helper$").allow()')
    wf_control.send('faults.add("k").onQuery(query="^SELECT .victim.").kill()')
    with through(wf_proxy, pg, application_name="helper") as helper:
        assert helper.execute("SELECT 'victim'").fetchone() == ("victim",)
    with through(wf_proxy, pg, application_name="app") as app, \
            pytest.raises(psycopg.OperationalError):
        app.execute("SELECT 'victim'")
    counts = faults_by_name(wf_control)
    assert counts["k"][1] == 1 and counts["exempt"][1] >= 1


def test_an_allow_added_after_the_kill_exempts_nothing(wf_proxy, pg, wf_control):
    wf_control.send('faults.add("k").onQuery(query="^SELECT .victim.").kill()')
    wf_control.send('faults.add("exempt").where(application_name="^helper$").allow()')
    with through(wf_proxy, pg, application_name="helper") as helper, \
            pytest.raises(psycopg.OperationalError):
        helper.execute("SELECT 'victim'")


# -- changing what is in force ------------------------------------------------------------------


def test_adding_an_existing_name_replaces_it_in_place_with_fresh_counters(wf_proxy, pg, wf_control):
    wf_control.send('faults.add("a").onQuery(query="^SELECT .r.").after(1).error("40001")')
    wf_control.send('faults.add("b").onQuery(query="^SELECT .other.").delay(0)')
    with through(wf_proxy, pg) as conn:
        conn.execute("SELECT 'r'")
        with pytest.raises(psycopg.errors.SerializationFailure):
            conn.execute("SELECT 'r'")
        assert faults_by_name(wf_control)["a"] == (2, 1, "active")
        replacement = 'faults.add("a").onQuery(query="^SELECT .r.").after(1).error("40002")'
        wf_control.send(replacement)
        listed = wf_control.faults()
        assert [f.name for f in listed] == ["a", "b"]  # in place, not moved to the end
        assert (listed[0].matched, listed[0].fired, listed[0].command) == (0, 0, replacement)
        # the after(1) counter starts again on this very connection
        assert conn.execute("SELECT 'r'").fetchone() == ("r",)
        with pytest.raises(psycopg.errors.lookup("40002")):
            conn.execute("SELECT 'r'")


def test_remove_and_clear(wf_proxy, pg, wf_control):
    before = wf_control.status()["fired"]
    wf_control.send('faults.add("a").onQuery(query="^SELECT .gone.").error("40001")')
    wf_control.send('faults.add("b").onQuery(query="^SELECT .gone.").kill()')
    with through(wf_proxy, pg) as conn, pytest.raises(psycopg.errors.SerializationFailure):
        conn.execute("SELECT 'gone'")
    wf_control.send('faults.remove("a")')
    assert [f.name for f in wf_control.faults()] == ["b"]
    with pytest.raises(CommandError):
        wf_control.send('faults.remove("a")')  # no such fault any more
    with through(wf_proxy, pg) as conn, pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 'gone'")  # b acts now that a is gone
    wf_control.send("faults.clear()")
    assert wf_control.send("faults.list()") == ""  # the bare "\n" reply
    with through(wf_proxy, pg) as conn:
        assert conn.execute("SELECT 'gone'").fetchone() == ("gone",)
    status = wf_control.status()
    assert (status["fired"] - before, status["faults"]) == (2, 0)  # fired is never reset


def test_conn_replaces_every_fault_and_conn_allow_clears_them(wf_proxy, pg, wf_control):
    wf_control.send('faults.add("a").onQuery(query="^SELECT .c.").delay(0)')
    wf_control.send('faults.add("b").onQuery(query="^SELECT .c.").delay(0)')
    wf_control.send('conn.onQuery(query="^SELECT .c.").kill()')
    (only,) = wf_control.faults()
    assert (only.name, only.command) == ("conn", 'conn.onQuery(query="^SELECT .c.").kill()')
    with through(wf_proxy, pg) as conn, pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 'c'")
    wf_control.send("conn.allow()")
    assert wf_control.faults() == []
    with through(wf_proxy, pg) as conn:
        assert conn.execute("SELECT 'c'").fetchone() == ("c",)


# -- what the user reads ------------------------------------------------------------------------

LIST_LINE = re.compile(r"name=(?P<name>\S+) matched=(?P<matched>\d+) fired=(?P<fired>\d+) "
                       r"added=(?P<added>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) "
                       r"state=(?P<state>active|spent) command=(?P<command>.*)")


def test_faults_list_lines(wf_proxy, pg, wf_control):
    commands = ['faults.add("one").onQuery(query="^SELECT .l.").once().error("40001")',
                'faults.add("two-words").onQuery(query="^SELECT .l. ").delay(0)']
    for command in commands:
        wf_control.send(command)
    with through(wf_proxy, pg) as conn:
        with pytest.raises(psycopg.errors.SerializationFailure):
            conn.execute("SELECT 'l'")
        conn.execute("SELECT 'l'")
        conn.execute("SELECT 'l' ")
    lines = wf_control.send("faults.list()").split("\n")
    found = [LIST_LINE.fullmatch(line) for line in lines]
    assert all(found), lines
    now = datetime.now(UTC)
    rows = [m.groupdict() for m in found]  # type: ignore[union-attr]
    for row in rows:
        added = datetime.strptime(row["added"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert abs(now - added) < timedelta(minutes=5), row
    assert [(r["name"], r["fired"], r["state"], r["command"]) for r in rows] == [
        ("one", "1", "spent", commands[0]),
        ("two-words", "1", "active", commands[1]),
    ]


def test_dump_rows_name_the_named_faults_that_acted_but_not_conn(wf_proxy, pg, wf_control):
    wf_control.send('faults.add("slow").onQuery(query="^SELECT .marked.").delay(0)')
    with through(wf_proxy, pg) as conn:
        conn.execute("SELECT 'marked'")
        conn.execute("SELECT 'unmarked'")
    rows = [r.message for r in wf_control.dump() if r.message.startswith("Query(")]
    assert rows == ["Query(query=SELECT 'marked') [fault slow: delay]",
                    "Query(query=SELECT 'unmarked')"]
    wf_control.send('conn.onQuery(query="^SELECT .marked.").delay(0)')
    with through(wf_proxy, pg) as conn:
        conn.execute("SELECT 'marked'")
    rows = [r.message for r in wf_control.dump() if r.message.startswith("Query(")]
    assert rows == ["Query(query=SELECT 'marked')"]  # as Citus's expected outputs show it


def test_the_proxy_log_has_one_line_per_firing(wf_proxy, pg, wf_control):
    before = len(fired_lines(wf_proxy))
    wf_control.send('faults.add("logged").onQuery(query="^SELECT .log.").error("40001")')
    with open_session(wf_proxy.port) as sock:
        client = f"127.0.0.1:{sock.getsockname()[1]}"
        for text in ("SELECT 'log'", "SELECT 'log'", "SELECT 'quiet'", "SELECT 'log'"):
            sock.sendall(query_message(text))
            read_until_ready(sock)
    wait_for(lambda: len(fired_lines(wf_proxy)) >= before + 3, 30, "three log lines")
    lines = fired_lines(wf_proxy)[before:]
    assert len(lines) == 3, lines
    assert {(x["fault"], x["client"], x["frame"], x["action"]) for x in lines} == {
        ("logged", client, "Query", "error")}
    assert len({x["conn"] for x in lines}) == 1


# -- Wallaroo, with the test peers ---------------------------------------------------------------


@contextlib.contextmanager
def sink_peer(tmp_path: Path) -> Iterator[int]:
    """tests/peers/sink.py as a process; its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "peers.sink", "--listen", "127.0.0.1:0",
         "--output", str(tmp_path / "out.txt")],
        cwd=TESTS_DIR, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 15)
        line = process.stdout.readline().decode() if ready else ""
        assert line.startswith("ready "), line
        yield int(line.split()[1])
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class WallarooLink:
    """A wallaroo proxy in front of a sink peer: where a worker connects, its control."""

    port: int
    control: FaultProxy


@pytest.fixture(scope="module")
def wallaroo(wf_mode, tmp_path_factory) -> Iterator[WallarooLink]:
    with sink_peer(tmp_path_factory.mktemp("sink")) as port, \
            fresh_proxy(port, wf_mode, protocol="wallaroo") as running:
        yield WallarooLink(running.port, FaultProxy(running.fifo))


async def worker_session(port: int) -> FrameStream:
    stream = await FrameStream.connect("127.0.0.1", port)
    stream.send("Hello", version=VERSION, cookie="", program_name="t", instance_name="t")
    await stream.expect("Ok", timeout=10)
    return stream


async def next_reply(stream: FrameStream) -> Frame | None:
    """The sink's next frame that is not an Ack (it acks every read); None at EOF."""
    while True:
        frame = await asyncio.wait_for(stream.read(), 10)
        if frame is None or frame.type != "Ack":
            return frame


def test_wallaroo_drop_loses_one_frame_and_the_connection_carries_on(wallaroo):
    wallaroo.control.clear_faults()
    wallaroo.control.send('faults.add("d").onNotify(stream_name="^dropped$").drop()')

    async def run() -> list[int]:
        stream = await worker_session(wallaroo.port)
        for sid, name in ((1, "dropped"), (2, "kept"), (3, "later")):
            stream.send("Notify", stream_id=sid, stream_name=name)
            if sid == 1:
                await stream.drain()
        acked = []
        while len(acked) < 2:
            frame = await next_reply(stream)
            assert frame is not None and frame.type == "NotifyAck", frame
            acked.append(frame.fields["stream_id"])
        stream.close()
        return acked

    assert asyncio.run(run()) == [2, 3]
    assert faults_by_name(wallaroo.control)["d"][1] == 1


def test_wallaroo_error_sends_an_error_frame_and_closes(wallaroo):
    wallaroo.control.clear_faults()
    wallaroo.control.send(
        'faults.add("e").onNotify(stream_name="^boom$").error(message="injected")')

    async def run() -> tuple[Frame | None, Frame | None]:
        stream = await worker_session(wallaroo.port)
        stream.send("Notify", stream_id=1, stream_name="boom")
        error = await next_reply(stream)
        end = await next_reply(stream)
        stream.close()
        return error, end

    error, end = asyncio.run(run())
    assert error is not None
    assert (error.type, error.fields["message"]) == ("Error", "injected")
    assert end is None  # then the connection closed
    assert faults_by_name(wallaroo.control)["e"][1] == 1


def test_wallaroo_where_takes_the_client_address_only(wallaroo):
    wallaroo.control.clear_faults()
    with pytest.raises(CommandError):
        wallaroo.control.send('faults.add("w").where(user="x").kill()')
    wallaroo.control.send('faults.add("w").where(client="^10\\\\.").onNotify().kill()')

    async def run() -> Frame | None:
        stream = await worker_session(wallaroo.port)
        stream.send("Notify", stream_id=1, stream_name="s")
        frame = await next_reply(stream)
        stream.close()
        return frame

    frame = asyncio.run(run())
    assert frame is not None and frame.type == "NotifyAck"
    assert faults_by_name(wallaroo.control)["w"][1] == 0
