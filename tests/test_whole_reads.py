"""The layer's usual read: whole frames no fault can act on, framed, counted and recorded
without a batch (`feed_whole`, `RuleEngine.passes_whole`, `Recorder.record_whole`).

Each piece is held to the path it shortcuts: the same decisions and counters as frame-by-
frame judging, the same dump as `record_batch`, and the native `texts_pass` the same as
its Python reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_driver import LayerDriver
from test_frame_batch import RULES, SEVERAL_RULES, STARTUP, _effective, _frame_by_frame
from test_postgres_protocol import CLIENT_TYPED, SERVER_TYPED, cut, message

from wirefault.protocols import _pg_scan
from wirefault.protocols.postgres import PROTOCOL
from wirefault.proxy import whole_read
from wirefault.proxy.faults import ConnectionState
from wirefault.proxy.recorder import Recorder, RecorderSlot
from wirefault.proxy.rules import RuleEngine
from wirefault.proxy.user_regex import compile_user_pattern, literal_form

M = PROTOCOL.messages
TEXTS = ["SELECT 1", "select 2", "COMMIT", "BEGIN", "", "NEVER", "a\u00e9b", "SELECT\u00ff"]
"""Query and CommandComplete texts, some that the rules below find, one not ASCII."""
TEXT_RULES = [
    'conn.onQuery(query="^SELECT").kill()',
    'conn.onQuery(query="^NEVER").kill()',
    'conn.onQuery(query="(?i)commit").after(1).kill()',
    'conn.onQuery(query="b").delay(5)',
    'conn.onQuery(query="^$").reset()',
    'conn.onCommandComplete(command="^COMMIT").kill()',
    'conn.where(application_name="x").onQuery(query="^SELECT").kill()',
    'conn.connectionProbability(0.5).onQuery(query="^BEGIN").kill()',
    'conn.onQuery(query="^BEGIN").times(1).killall()',
    'conn.onQuery().kill()',
]


def _text_frames(name: str, field: str) -> st.SearchStrategy[bytes]:
    return st.sampled_from(TEXTS).map(lambda text: M[name].encode(**{field: text}))


@st.composite
def conversations(draw: st.DrawFn) -> list[tuple[bool, bytes]]:
    """Both directions with the texts above among random frames, cut into reads and
    interleaved."""
    client_frames = st.one_of(message(CLIENT_TYPED).map(lambda m: m[1]),
                              _text_frames("Query", "query"))
    server_frames = st.one_of(message(SERVER_TYPED).map(lambda m: m[1]),
                              _text_frames("CommandComplete", "command"))
    client = STARTUP + b"".join(draw(st.lists(client_frames, max_size=12)))
    server = b"".join(draw(st.lists(server_frames, max_size=15)))
    # Often whole frames per read (the case under test), sometimes cut anywhere.
    client_reads = _reads(draw, client)
    server_reads = _reads(draw, server)
    order = draw(st.permutations([True] * len(client_reads) + [False] * len(server_reads)))
    queues = {True: iter(client_reads), False: iter(server_reads)}
    return [(from_client, next(queues[from_client])) for from_client in order]


def _reads(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    if draw(st.booleans()):
        return cut(stream, draw(st.lists(st.integers(0, 5000), max_size=6)))
    session = PROTOCOL.new_session()  # frame boundaries: one or a few frames per read
    framer = session.client if stream.startswith(STARTUP) else session.server
    frames = [f.data for f in framer.feed(stream)]
    reads, taken = [], 0
    while taken < len(frames):
        size = draw(st.integers(1, 3))
        reads.append(b"".join(frames[taken:taken + size]))
        taken += size
    return reads


def _judge_read(engine: RuleEngine, session, state: ConnectionState, from_client: bool,
                data: bytes):
    """What the layer does with a read: the usual way when it can, else the batch's."""
    framer = session.client if from_client else session.server
    whole = framer.feed_whole(data)
    if whole is not None:
        types, ends, table = whole
        if engine.passes_whole(data, types, ends, table, state, from_client):
            return None
    return engine.first_fault(framer.feed_batch(data), state, from_client)


def _engines(rules: list[str]) -> tuple[RuleEngine, RuleEngine]:
    engines = (RuleEngine(PROTOCOL), RuleEngine(PROTOCOL))
    for engine in engines:
        for number, rule in enumerate(rules):
            engine.set_rule_text(f'faults.add("f{number}"){rule.removeprefix("conn")}')
    return engines


@settings(max_examples=400, deadline=None)
@given(rules=st.lists(st.sampled_from(TEXT_RULES + RULES + SEVERAL_RULES), min_size=0,
                      max_size=4), reads=conversations())
def test_whole_reads_decide_exactly_as_frame_by_frame(rules, reads):
    fast, reference = _engines(rules)
    fast_session, reference_session = PROTOCOL.new_session(), PROTOCOL.new_session()
    fast_state, reference_state = ConnectionState(), ConnectionState()
    for from_client, data in reads:
        got = _judge_read(fast, fast_session, fast_state, from_client, data)
        framer = reference_session.client if from_client else reference_session.server
        expected = _frame_by_frame(reference, framer.feed_batch(data), reference_state,
                                   from_client)
        assert got == expected
        assert _effective(fast_state) == _effective(reference_state)
        assert [f.shared for f in fast.faults] == [f.shared for f in reference.faults]
        if got is not None:  # the layer stops here: the rest is queued, judged in turn
            return


def test_a_killall_that_fired_stops_whole_reads_on_every_connection():
    engine = RuleEngine(PROTOCOL, 'conn.onQuery(query="^BEGIN").killall()')
    session, other = PROTOCOL.new_session(), PROTOCOL.new_session()
    for s in (session, other):
        s.client.feed(STARTUP)
    row = M["DataRow"].encode(values=[b"1"])
    whole = other.server.feed_whole(row)
    assert whole is not None
    assert engine.passes_whole(row, *whole, ConnectionState(), False)
    begin = M["Query"].encode(query="BEGIN")
    assert engine.first_fault(session.client.feed_batch(begin), ConnectionState(), True)
    assert not engine.passes_whole(row, *whole, ConnectionState(), False)


def test_feed_whole_takes_only_reads_of_whole_plain_frames():
    session = PROTOCOL.new_session()
    assert session.client.feed_whole(STARTUP) is None  # not typed yet
    session.client.feed(STARTUP)
    query = M["Query"].encode(query="SELECT 1")
    types, ends, table = session.client.feed_whole(query + query)
    assert types == b"QQ" and table.specs[types[0]].name == "Query"
    assert memoryview(ends).cast("q").tolist() == [len(query), 2 * len(query)]
    assert session.client.feed_whole(query[:-1]) is None  # a partial frame
    assert session.client.feed_whole(bytearray(query)) is None
    session.client.feed(query[:3])  # something held: the general way
    assert session.client.feed_whole(query) is None
    assert session.client.buffered == 3


@settings(max_examples=200, deadline=None)
@given(reads=conversations(), limit=st.sampled_from([3, 40, 1000]))
def test_recorded_whole_reads_dump_as_their_batches(reads, limit):
    by_whole, by_batch = Recorder(limit=limit), Recorder(limit=limit)
    slots = (RecorderSlot(), RecorderSlot())
    sessions = (PROTOCOL.new_session(), PROTOCOL.new_session())
    for from_client, data in reads:
        whole_framer = sessions[0].client if from_client else sessions[0].server
        batch_framer = sessions[1].client if from_client else sessions[1].server
        whole = whole_framer.feed_whole(data)
        if whole is not None:
            by_whole.record_whole(slots[0], from_client, data, *whole)
        else:
            by_whole.record_batch(slots[0], whole_framer.feed_batch(data))
        by_batch.record_batch(slots[1], batch_framer.feed_batch(data))
    assert by_whole.dump() == by_batch.dump()
    assert len(by_whole) == len(by_batch)


# -- texts_pass: native and reference agree ----------------------------------------------

class _Finds:
    """A pattern stand-in: finds its needle."""

    def __init__(self, needle: str) -> None:
        self.needle = needle

    def search(self, text: str) -> object:
        return True if self.needle in text else None


@st.composite
def texts_inputs(draw: st.DrawFn):
    pieces = draw(st.lists(st.tuples(st.sampled_from(b"QCDX"),
                                     st.binary(max_size=12)), max_size=6))
    data, types, ends = b"", b"", []
    for type_byte, body in pieces:
        frame = bytes([type_byte]) + (len(body) + 4).to_bytes(4, "big") + body
        data += frame
        types += bytes([type_byte])
        ends.append(len(data))
    tests = [None] * 256
    for type_byte in b"QCD":
        tests[type_byte] = draw(st.sampled_from(
            [None, False, (), (_Finds("a"),), (_Finds("\x00"), _Finds("b"))]))
    from array import array
    return data, types, array("q", ends).tobytes(), tuple(tests)


@pytest.mark.skipif(not _pg_scan.NATIVE, reason="built without a C compiler")
@settings(max_examples=500, deadline=None)
@given(inputs=texts_inputs())
def test_native_texts_pass_agrees_with_the_reference(inputs):
    assert _pg_scan.texts_pass(*inputs) is _pg_scan.texts_pass_python(*inputs)


@pytest.mark.skipif(not _pg_scan.NATIVE, reason="built without a C compiler")
def test_native_texts_pass_refuses_what_is_not_a_scan():
    data = M["Query"].encode(query="x")
    from array import array
    ends = array("q", [len(data) + 1]).tobytes()
    with pytest.raises(ValueError, match="ends outside data"):
        _pg_scan.texts_pass(data, b"Q", ends, (None,) * 256)
    with pytest.raises(TypeError, match="tuple of 256"):
        _pg_scan.texts_pass(data, b"Q", ends, (None,) * 3)


# -- the native usual read against the Python one, through real layers ---------------------

NATIVE_RULES = TEXT_RULES + RULES[:8] + [
    "conn.delay(5)",  # every frame through the lane's queue: slow lanes
    'conn.onParse(query="^NEVER").kill()',  # the agent watches the client
]


@pytest.mark.skipif(not whole_read.NATIVE, reason="built without a C compiler")
@settings(max_examples=150, deadline=None)
@given(rules=st.lists(st.sampled_from(NATIVE_RULES), max_size=3), reads=conversations(),
       limit=st.sampled_from([5, 100_000]))
def test_native_whole_reads_do_what_the_python_path_does(rules, reads, limit):
    drivers = [LayerDriver("postgres", limit=limit) for _ in range(2)]
    for driver in drivers:
        for number, rule in enumerate(rules):
            driver.runtime.engine.set_rule_text(
                f'faults.add("f{number}"){rule.removeprefix("conn")}')
    python = drivers[1].layer
    assert python._native_client is not None  # the native reader is on by default
    python._native_client = python._native_server = None
    for from_client, data in reads:
        outs = [driver.from_client(data) if from_client else driver.from_server(data)
                for driver in drivers]
        assert [_summary(out) for out in outs[0:1]] == [_summary(out) for out in outs[1:]]
        native, reference = (d.layer for d in drivers)
        assert (native.bytes_from_client, native.bytes_from_server) == \
            (reference.bytes_from_client, reference.bytes_from_server)
        assert _effective(native.rule_state) == _effective(reference.rule_state)
    assert drivers[0].runtime.recorder.dump() == drivers[1].runtime.recorder.dump()


def _summary(out: list) -> list:
    return [(type(c).__name__, getattr(c, "data", None)) for c in out]


# -- what a whole read is tested for: literals, needles, where(), a skimming agent -----------

@settings(max_examples=500, deadline=None)
@given(source=st.sampled_from(["^NEVER", "(?i)^COMMIT", "NEVER", "(?i)discard", "^", "",
                               "^a b", "(?i)^k", "^SELECT 1", "^INSERT INTO never"]),
       text=st.text(alphabet="abkKsSNEVRCOMITeledcatvrsx 12\n", max_size=14))
def test_a_literal_test_finds_what_its_pattern_finds(source, text):
    pattern = compile_user_pattern(source)
    literal = literal_form(pattern)
    assert literal is not None
    assert _pg_scan.literal_found(literal, text.encode()) is (pattern.search(text) is not None)


def test_only_literal_patterns_have_a_literal_form():
    for source in ["^NE.ER", "(?m)^X", "(?s)x", "a|b", "\u212a", "x$", "(?i:x)"]:
        assert literal_form(compile_user_pattern(source)) is None, source


def _statement(query: str, statement: str = "", portal: str = "") -> bytes:
    return (M["Parse"].encode(statement=statement, query=query)
            + M["Bind"].encode(portal=portal, statement=statement)
            + M["Execute"].encode(portal=portal) + M["Sync"].encode())


EXTENDED = [
    _statement("SELECT 2"), _statement("COMMIT", "s1", "p1"), _statement("SELECT 1", "s1"),
    M["Execute"].encode(portal="p1") + M["Sync"].encode(),
    M["Execute"].encode() + M["Sync"].encode(),
    M["Bind"].encode(portal="p1", statement="s1") + M["Execute"].encode(portal="p1"),
    M["Parse"].encode(query="SELECT 2") + M["Bind"].encode(),  # unnamed, not run yet
    M["Close"].encode(kind="P", name="p1"), M["Close"].encode(kind="S", name="s1"),
    M["Query"].encode(query="DEALLOCATE s1"), M["Query"].encode(query="discard ALL"),
    M["Query"].encode(query="SELECT 1"), M["Query"].encode(query="select 2"),
    M["Query"].encode(query="NEVER"),
]
"""Client reads that define, run and remove statements, and Queries that may or may not."""
SKIM_RULES = [
    # Derived fields (statements tracked); after() counts matches and lets the frames go.
    'conn.onExecute(query="^SELECT 2").after(1000).kill()',
    'conn.onExecute(query="(?i)^commit").after(1000).error("40001")',
    'conn.onExecute(query="^SELECT 1").after(2).kill()',
    'conn.fromClient().contains(b"NEVER").reset()',
    'conn.where(application_name="^x$").onQuery(query="^SELECT").kill()',
    'conn.where(application_name="^u").onQuery(query="(?i)^select 2").kill()',
    'conn.onQuery(query="^SELECT 1").after(2).kill()',
]


@settings(max_examples=150, deadline=None)
@given(rules=st.lists(st.sampled_from(SKIM_RULES), min_size=1, max_size=4),
       reads=st.lists(st.sampled_from(EXTENDED), max_size=16))
def test_whole_reads_with_statements_tracked_do_what_frame_by_frame_does(rules, reads):
    """Through real layers: the usual read (native and Python) against a layer that judges
    every read frame by frame. An Execute's query shows what the agent tracked, so a
    skipped observation that mattered changes what fires."""
    _same_through_three_layers(rules, reads)


@pytest.mark.parametrize("reads", [
    [EXTENDED[6], EXTENDED[11], EXTENDED[4]],  # the Query drops the unnamed portal
    [EXTENDED[1], EXTENDED[9], EXTENDED[5]],  # DEALLOCATE s1, then a Bind of s1
    [EXTENDED[1], EXTENDED[7], EXTENDED[11], EXTENDED[3]],  # a Close, then a Query
], ids=["unnamed", "deallocate", "close"])
def test_the_agent_sees_what_changes_its_statements(reads):
    """The cases a skimming agent must not miss, each of which changes what an Execute's
    query says (and so what `after()` counts)."""
    _same_through_three_layers([SKIM_RULES[0], SKIM_RULES[1], SKIM_RULES[2]], reads)
    matched = []
    for whole in (True, False):
        driver = LayerDriver("postgres", 'faults.add("q").onExecute(query="").after(99).kill()')
        if not whole:
            layer = driver.layer
            layer._native_client = layer._native_server = None
            layer._feed_whole_client = layer._feed_whole_server = None
        driver.from_client(M["StartupMessage"].encode(user="u", database="d"))
        driver.from_server(M["ReadyForQuery"].encode(status="I"))
        for data in reads:
            driver.from_client(data)
        matched.append(driver.runtime.engine.faults[0].shared.matched)
    assert matched[0] == matched[1]


def _same_through_three_layers(rules: list[str], reads: list[bytes]) -> None:
    added = [f'faults.add("f{number}"){rule.removeprefix("conn")}'
             for number, rule in enumerate(rules)]
    drivers = [LayerDriver("postgres", added[0]) for _ in range(3)]  # before the connection
    startup = M["StartupMessage"].encode(user="u", database="d", application_name="u1")
    for driver in drivers:
        for rule in added[1:]:
            driver.runtime.engine.set_rule_text(rule)
        driver.from_client(startup)
        driver.from_server(M["ReadyForQuery"].encode(status="I"))
    python, general = drivers[1].layer, drivers[2].layer
    python._native_client = python._native_server = None
    general._native_client = general._native_server = None
    general._feed_whole_client = general._feed_whole_server = None
    for data in reads:
        outs = [_summary(driver.from_client(data)) for driver in drivers]
        assert outs[0] == outs[2] and outs[1] == outs[2]
        states = [(_effective(d.layer.rule_state), [f.shared for f in d.runtime.engine.faults])
                  for d in drivers]
        assert states[0] == states[2] and states[1] == states[2]
