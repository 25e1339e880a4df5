"""Frames kept compact per read (`FrameBatch`, `FrameRun`): the rules engine and the recorder
give, batch by batch, exactly what they give frame by frame; a batch forwards the same bytes
as its frames."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_postgres_protocol import CLIENT_TYPED, SERVER_TYPED, cut, message

from wirefault.protocols import FrameBatch, FrameRun, TypeTable
from wirefault.protocols.postgres import PROTOCOL
from wirefault.proxy.faults import FORWARD, ConnectionState
from wirefault.proxy.recorder import (
    KEEP_FRAME_BYTES,
    MAX_RENDERED_BYTES,
    Recorder,
    RecorderSlot,
    render_frame,
)
from wirefault.proxy.rules import RuleEngine

M = PROTOCOL.messages
STARTUP = M["StartupMessage"].encode(user="u", database="d")

RULES = [
    "conn.allow()",
    'conn.onQuery(query="^NEVER").kill()',
    'conn.onQuery(query="^SELECT").after(1).kill()',
    "conn.onDataRow().after(3).kill()",
    "conn.onReadyForQuery().after(2).killall()",
    "conn.onCopyData().after(2).reset()",
    'conn.onCommandComplete(command="1").kill()',
    'conn.matches(b"[0-9]{2}").after(1).kill()',
    'conn.contains(b"a").kill()',
    "conn.after(5).kill()",
    "conn.connect_delay(10)",
    "conn.onTerminate().kill()",
    "conn.onSync().after(1).kill()",
]


@st.composite
def conversations(draw: st.DrawFn) -> list[tuple[bool, bytes]]:
    """A client stream (start-up first) and a server stream, each cut into reads, the reads
    of the two directions interleaved in a drawn order."""
    client = STARTUP + b"".join(d for _, d in draw(st.lists(message(CLIENT_TYPED),
                                                                max_size=12)))
    server = b"".join(d for _, d in draw(st.lists(message(SERVER_TYPED), max_size=15)))
    client_reads = cut(client, draw(st.lists(st.integers(0, 5000), max_size=6)))
    server_reads = cut(server, draw(st.lists(st.integers(0, 5000), max_size=6)))
    order = draw(st.permutations([True] * len(client_reads) + [False] * len(server_reads)))
    reads, queues = [], {True: iter(client_reads), False: iter(server_reads)}
    for from_client in order:
        reads.append((from_client, next(queues[from_client])))
    return reads


def batches(reads: list[tuple[bool, bytes]]) -> list[tuple[bool, FrameBatch]]:
    session = PROTOCOL.new_session()
    return [(fc, (session.client if fc else session.server).feed_batch(data))
            for fc, data in reads]


def test_a_bulk_read_is_one_run_between_its_partial_ends():
    row = M["CopyData"].encode(data=b"x" * 200)
    session = PROTOCOL.new_session()
    session.server.feed(M["CopyOutResponse"].encode(format=0, column_formats=[0]))
    first = session.server.feed_batch(row * 10 + row[:50])
    assert [type(s) for s in first.segments] == [FrameRun]
    second = session.server.feed_batch(row[50:] + row * 3 + row[:7])
    head, run = second.segments
    assert head.type == "CopyData" and head.data == row and head.span == (0, len(row) - 50)
    assert isinstance(run, FrameRun) and len(run) == 3 and len(second) == 4
    assert second.payload() == row * 4
    assert [f.span for f in second[1:]] == [
        (len(row) - 50 + i * len(row), len(row) - 50 + (i + 1) * len(row)) for i in range(3)]
    assert run.frames() is run.frames()  # made once, shared by the engine and the layer


@settings(max_examples=150, deadline=None)
@given(reads=conversations())
def test_a_batch_is_the_sequence_of_the_frames_it_forwards(reads):
    for _, batch in batches(reads):
        frames = list(batch)
        assert len(batch) == len(frames) and bool(batch) == bool(frames)
        assert batch.payload() == b"".join(f.data for f in frames)
        for segment in batch.segments:
            if isinstance(segment, FrameRun):
                assert all(segment.table[b] is not None for b in segment.types)
                assert all(f.alias is None and f.error is None for f in segment.frames())


def test_type_table_codes_name_each_message_once():
    table = TypeTable([None] * 256)  # a new table joins the registry under its index
    assert TypeTable.known[table.index] is table
    from wirefault.protocols._pg_framer import _BACKEND_TABLE, _FRONTEND_TABLE
    assert _FRONTEND_TABLE.codes(frozenset({"Query", "Sync"})) == b"QS"
    assert _BACKEND_TABLE.codes(frozenset({"Query"})) == b""
    with pytest.raises(ValueError):
        TypeTable([None])


def _frame_by_frame(engine: RuleEngine, batch: FrameBatch, state: ConnectionState,
                    from_client: bool):
    """What the layer did before batches: count, then decide, each frame in turn."""
    for index, frame in enumerate(batch):
        decision = engine.judge_one(frame, state)
        if decision is not FORWARD:
            return index, decision
    return None


def _effective(state: ConnectionState) -> tuple[int, int, dict]:
    """The state as decisions see it: frame numbers, and each fault's counters (a fault's
    state is made on its first decision, fresh)."""
    faults = {uid: s.after_counts for uid, s in state.faults.items() if any(s.after_counts)}
    return state.client_frames_seen, state.server_frames_seen, faults


@settings(max_examples=300, deadline=None)
@given(rule=st.sampled_from(RULES), reads=conversations())
def test_first_fault_decides_exactly_as_frame_by_frame(rule, reads):
    by_batch, by_frame = RuleEngine(PROTOCOL, rule), RuleEngine(PROTOCOL, rule)
    batch_state, frame_state = ConnectionState(), ConnectionState()
    for (from_client, batch), (_, same) in zip(batches(reads), batches(reads), strict=True):
        got = by_batch.first_fault(batch, batch_state, from_client)
        expected = _frame_by_frame(by_frame, same, frame_state, from_client)
        assert got == expected
        assert _effective(batch_state) == _effective(frame_state)
        assert [f.shared for f in by_batch.faults] == [f.shared for f in by_frame.faults]


def _reference_dump(rows: list[tuple[int, bool, str]], limit: int) -> str:
    kept = rows[-limit:]
    lines = []
    if len(rows) > limit:
        lines.append(f"-1\trecorder\t{len(rows) - limit} frames dropped "
                     f"(ring buffer limit {limit})")
    for number, from_client, text in kept:
        escaped = (text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
                   .replace("\r", "\\r"))
        lines.append(f"{number}\t{'coordinator' if from_client else 'worker'}\t{escaped}")
    return "\n".join(lines)


@settings(max_examples=200, deadline=None)
@given(reads=conversations(), limit=st.sampled_from([1, 2, 5, 13, 40, 100_000]),
       connections=st.integers(1, 3))
def test_recorded_batches_dump_as_the_frames_would(reads, limit, connections):
    recorder = Recorder(limit=limit, messages=M)
    slots = [RecorderSlot() for _ in range(connections)]
    expected = []
    for index, (from_client, batch) in enumerate(batches(reads)):
        slot = slots[index % connections]
        recorder.record_batch(slot, batch)
        expected += [(slot.number, from_client, render_frame(f)) for f in batch
                     if f.type != "Terminate"]
    assert len(recorder) == min(limit, len(expected))
    assert recorder.dump() == _reference_dump(expected, limit)
    assert recorder.dump() == ""


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(0, 10**6), min_size=50, max_size=300),
       limit=st.sampled_from([1, 7, 100, 999]))
def test_a_long_bulk_stream_keeps_the_newest_frames_and_bounded_rows(cuts, limit):
    rows = b"".join(M["CopyData"].encode(data=b"%d\n" % i) for i in range(2000))
    session = PROTOCOL.new_session()
    recorder = Recorder(limit=limit, messages=M)
    slot = RecorderSlot()
    expected, largest_read = [], 0
    for data in cut(rows, cuts):
        batch = session.server.feed_batch(data)
        recorder.record_batch(slot, batch)
        expected += [(0, False, render_frame(f)) for f in batch]
        largest_read = max(largest_read, len(batch))
        held = sum(count for _, count in recorder._chunks) + recorder._rows_frames
        assert held <= limit + 2 * (recorder._chunk_frames + largest_read)  # bounded memory
    assert len(expected) == 2000
    assert recorder.dump() == _reference_dump(expected, limit)


def test_large_frames_keep_only_what_their_rendering_shows():
    big = M["CopyData"].encode(data=b"y" * (KEEP_FRAME_BYTES * 4))
    row = M["DataRow"].encode(values=[b"v" * (KEEP_FRAME_BYTES * 4)])
    small = M["CopyData"].encode(data=b"z")
    session = PROTOCOL.new_session()
    recorder = Recorder(messages=M)
    recorder.record_batch(RecorderSlot(), session.server.feed_batch(big * 2 + row))
    (_, _, key, payload), _, (_, _, row_key, cut) = list(recorder._rows)[:3]
    # a payload message: its field, cut to the start of its payload and its size (a cut copy
    # of its fields), never the frame's bytes
    assert key == "CopyData" and payload[0] == "data"
    assert b"y" * MAX_RENDERED_BYTES in payload and len(big) - 5 in payload
    assert sum(len(v) for v in payload if isinstance(v, bytes)) == MAX_RENDERED_BYTES
    # any other large message: a cut copy of its fields, rendered only by a dump
    assert row_key == "DataRow"
    assert sum(len(v) for v in _leaves(cut) if isinstance(v, bytes)) <= MAX_RENDERED_BYTES
    # a small run inside a large read keeps a copy of its own bytes, not the whole read
    session.server.feed_batch(big[:100])
    batch = session.server.feed_batch(big[100:] + small * 2)
    recorder.record_batch(RecorderSlot(), batch)
    run_row = list(recorder._rows)[-1]
    kept = [v for v in _leaves(run_row) if isinstance(v, bytes)]
    assert small * 2 in kept and max(map(len, kept)) < len(big)
    dump = recorder.dump()
    assert dump.count("CopyData(data=z)") == 2
    assert f"DataRow(values=[{'v' * MAX_RENDERED_BYTES}...({KEEP_FRAME_BYTES * 4} bytes)])" in dump


def _leaves(value):
    """Every scalar inside a nested tuple/list (a recorder row's cut copy)."""
    if isinstance(value, tuple | list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


@settings(max_examples=150, deadline=None)
@given(payloads=st.lists(st.one_of(
           st.binary(min_size=KEEP_FRAME_BYTES, max_size=3 * KEEP_FRAME_BYTES),
           st.text(min_size=KEEP_FRAME_BYTES // 2, max_size=KEEP_FRAME_BYTES).map(
               lambda t: (t * 3).encode("utf-8"))),
           min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 50_000), max_size=4))
def test_large_payload_frames_dump_exactly_as_rendered_whole(payloads, cuts):
    """Kept as the start of the payload and its size, the dump still shows what rendering the
    whole frame shows (cut mid-character, escapes and size mark included)."""
    frames = [M["CopyData"].encode(data=p) for p in payloads]
    session = PROTOCOL.new_session()
    recorder = Recorder(messages=M)
    slot = RecorderSlot()
    for data in cut(b"".join(frames), cuts):
        recorder.record_batch(slot, session.server.feed_batch(data))
    whole = [render_frame(f) for f in PROTOCOL.new_session().server.feed(b"".join(frames))]
    assert recorder.dump() == _reference_dump([(0, False, r) for r in whole], 100_000)


def test_terminate_in_a_run_is_left_out_like_a_single_one():
    session = PROTOCOL.new_session()
    session.client.feed(STARTUP)
    recorder = Recorder(messages=M)
    recorder.record_batch(RecorderSlot(), session.client.feed_batch(
        M["Sync"].encode() + M["Terminate"].encode()))
    assert recorder.dump() == "0\tcoordinator\tSync()"


# -- the agent seeing each frame inline (statement tracking, where()) ------------------------

TRACKING_RULES = [
    'conn.onExecute(query="^COMMIT").kill()',
    'conn.onExecute(query="^SELECT").after(2).kill()',
    'conn.onBind(query="^SELECT").after(1).kill()',
    'conn.onDescribe(query="COMMIT").kill()',
    'conn.onClose(query="^SELECT").kill()',
    'conn.where(application_name="^app$").onSync().after(1).kill()',
    'conn.where(application_name="^other$").onQuery().kill()',
]
STATEMENTS = ("", "s1")
CLIENT_POOL = [
    *(M["Parse"].encode(statement=name, query=query, parameter_types=[])
      for name in STATEMENTS for query in ("SELECT 1", "COMMIT")),
    *(M["Bind"].encode(portal="", statement=name, parameter_formats=[], parameters=[],
                       result_formats=[]) for name in STATEMENTS),
    M["Execute"].encode(portal="", max_rows=0),
    *(M[kind].encode(kind="S", name=name) for kind in ("Describe", "Close")
      for name in STATEMENTS),
    M["Sync"].encode(),
    M["Query"].encode(query="COMMIT"),
]
SERVER_POOL = [M["ReadyForQuery"].encode(status="I"),
               M["CommandComplete"].encode(command="SELECT 1")]


@st.composite
def sessions(draw: st.DrawFn) -> list[tuple[bool, bytes]]:
    """An extended-protocol session (statements parsed, bound, run, closed) cut into reads."""
    startup = M["StartupMessage"].encode(user="u", database="d", application_name="app")
    client = startup + b"".join(draw(st.lists(st.sampled_from(CLIENT_POOL), max_size=30)))
    server = b"".join(draw(st.lists(st.sampled_from(SERVER_POOL), max_size=8)))
    client_reads = cut(client, draw(st.lists(st.integers(0, 400), max_size=8)))
    server_reads = cut(server, draw(st.lists(st.integers(0, 60), max_size=3)))
    order = draw(st.permutations([True] * len(client_reads) + [False] * len(server_reads)))
    queues = {True: iter(client_reads), False: iter(server_reads)}
    return [(from_client, next(queues[from_client])) for from_client in order]


def _observed_frame_by_frame(engine: RuleEngine, batch: FrameBatch, state: ConnectionState,
                             from_client: bool):
    """What the layer does with a queued frame: the agent sees it (while it watches that
    side), then the faults judge it."""
    agent = state.agent
    for index, frame in enumerate(batch):
        if agent.watch_client if from_client else agent.watch_server:
            replacement = agent.observe(frame)
            assert replacement is None  # no error() substitutes here
        decision = engine.judge_one(frame, state)
        if decision is not FORWARD:
            return index, decision
    return None


@settings(max_examples=300, deadline=None)
@given(rule=st.sampled_from(TRACKING_RULES), reads=sessions())
def test_first_fault_observing_decides_exactly_as_frame_by_frame(rule, reads):
    by_batch, by_frame = RuleEngine(PROTOCOL, rule), RuleEngine(PROTOCOL, rule)
    batch_state = ConnectionState(agent=PROTOCOL.new_agent())
    frame_state = ConnectionState(agent=PROTOCOL.new_agent())
    for state, engine in ((batch_state, by_batch), (frame_state, by_frame)):
        state.agent.track_statements = engine.tracks_statements
    for (from_client, batch), (_, same) in zip(batches(reads), batches(reads), strict=True):
        agent = batch_state.agent
        observe = agent.watch_client if from_client else agent.watch_server
        got = by_batch.first_fault(batch, batch_state, from_client, observe)
        expected = _observed_frame_by_frame(by_frame, same, frame_state, from_client)
        assert got == expected
        assert _effective(batch_state) == _effective(frame_state)
        if got is not None:  # the layer stops here: the rest is queued, judged in turn
            return


# -- several faults: decide walks only the faults that may act on the frame's type -----------


class WalkingEveryFault(RuleEngine):
    """The reference: every live fault walked for every frame."""

    def _candidates_for(self, key):  # type: ignore[no-untyped-def]
        return self._live


SEVERAL_RULES = [
    *RULES[1:],
    'conn.fromServer().onDataRow().contains(b"7").after(1).kill()',
    'conn.onCommandComplete(command="NEVER").delay(5)',
    "conn.onReadyForQuery().times(1).killall()",
    'conn.onErrorResponse(code="XX").kill()',
]


@settings(max_examples=300, deadline=None)
@given(rules=st.lists(st.sampled_from(SEVERAL_RULES), min_size=1, max_size=5),
       reads=conversations())
def test_several_faults_decide_as_walking_every_fault(rules, reads):
    engines = (RuleEngine(PROTOCOL), WalkingEveryFault(PROTOCOL))
    for engine in engines:
        for number, rule in enumerate(rules):
            engine.set_rule_text(f'faults.add("f{number}"){rule.removeprefix("conn")}')
    states = (ConnectionState(), ConnectionState())
    for (from_client, batch), (_, same) in zip(batches(reads), batches(reads), strict=True):
        got = engines[0].first_fault(batch, states[0], from_client)
        expected = engines[1].first_fault(same, states[1], from_client)
        assert got == expected
        assert _effective(states[0]) == _effective(states[1])
        assert [f.shared for f in engines[0].faults] == [f.shared for f in engines[1].faults]
        if got is not None:
            return


REPEATED_POOL = [M["ReadyForQuery"].encode(status="I"),
                 M["CommandComplete"].encode(command="SELECT 1"),
                 M["CommandComplete"].encode(command="SELECT 2"),  # same type and length
                 M["DataRow"].encode(values=[b"1", None]),
                 M["DataRow"].encode(values=[b"2", None]),
                 M["DataRow"].encode(values=[b"x" * 700]),  # kept whole, past the cache's size
                 M["ErrorResponse"].encode(severity="ERROR", code="XX000", message="m")]


@settings(max_examples=60, deadline=None)
@given(picks=st.lists(st.integers(0, len(REPEATED_POOL) - 1), max_size=80),
       cuts=st.lists(st.integers(0, 3000), max_size=8), limit=st.sampled_from([3, 50, 1000]))
def test_a_dump_of_repeated_frames_renders_each_as_on_its_own(picks, cuts, limit):
    """A dump remembers the text of small frames it rendered: the same text as each frame
    rendered on its own, in runs and alone, with frames left out past the limit."""
    stream = b"".join(REPEATED_POOL[i] for i in picks)
    session = PROTOCOL.new_session()
    recorder = Recorder(limit=limit, messages=M)
    slot = RecorderSlot()
    expected = []
    for data in cut(stream, cuts):
        batch = session.server.feed_batch(data)
        recorder.record_batch(slot, batch)
        expected += [(0, False, render_frame(f)) for f in batch]
    assert recorder.dump() == _reference_dump(expected, limit)
