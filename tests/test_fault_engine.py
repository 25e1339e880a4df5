"""The fault engine without sockets: several faults in force, how they compose, their
counts and state, seeded randomness, where(), and the fired record."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_driver import LayerDriver, of_type, sent
from mitmproxy.proxy import commands
from test_frame_batch import _effective, _frame_by_frame, batches, conversations

from wirefault.protocols import Frame
from wirefault.protocols.postgres import PROTOCOL, PgAgent
from wirefault.proxy import dsl
from wirefault.proxy.faults import FORWARD, ConnectionState, Verdict
from wirefault.proxy.rules import RuleEngine

M = PROTOCOL.messages


def engine(*commands_: str, seed: int = 0) -> RuleEngine:
    e = RuleEngine(PROTOCOL, seed=seed)
    for text in commands_:
        e.set_rule_text(text)
    return e


def query(text: str) -> Frame:
    data = M["Query"].encode(query=text)
    return Frame("Query", data, (0, len(data)), True, M["Query"])


def server_frame(name: str, **fields) -> Frame:
    data = M[name].encode(**fields)
    return Frame(name, data, (0, len(data)), False, M[name])


FAULT_SETS = [
    ['faults.add("a").onQuery(query="^SELECT").delay(5)',
     'faults.add("b").onQuery(query="^SELECT 2").after(1).kill()'],
    ['faults.add("a").onDataRow().duplicate()', 'faults.add("b").onQuery().after(2).drop()'],
    ['faults.add("a").fromServer().after(3).throttle(1000)',
     'faults.add("b").onSync().once().reset()'],
    ['faults.add("a").onQuery(query="x").allow()', 'faults.add("b").contains(b"x").kill()'],
    ['faults.add("a").onReadyForQuery().after(2).killall()',
     'faults.add("b").onQuery(query="^NEVER").kill()'],
    ['faults.add("a", seed=3).onQuery().probability(0.5).drop()',
     'faults.add("b").onCommandComplete().times(2).delay(1)'],
]


@settings(max_examples=200, deadline=None)
@given(faults=st.sampled_from(FAULT_SETS), reads=conversations())
def test_with_several_faults_a_read_is_decided_exactly_as_frame_by_frame(faults, reads):
    """The run-skipping gate is the union of the faults' first filters: skipping never
    changes a decision, a count or a fault's state."""
    by_batch, by_frame = engine(*faults), engine(*faults)
    batch_state, frame_state = ConnectionState(number=1), ConnectionState(number=1)
    for (from_client, batch), (_, same) in zip(batches(reads), batches(reads), strict=True):
        got = by_batch.first_fault(batch, batch_state, from_client)
        expected = _frame_by_frame(by_frame, same, frame_state, from_client)
        assert got == expected
        assert _effective(batch_state) == _effective(frame_state)
        assert [f.shared for f in by_batch.faults] == [f.shared for f in by_frame.faults]


def test_faults_meet_a_frame_in_the_order_they_were_added_and_an_ending_stops_the_walk():
    e = engine('faults.add("slow").onQuery().delay(40)',
               'faults.add("dup").onQuery().duplicate(2)',
               'faults.add("gone").onQuery(query="^DROP").drop()',
               'faults.add("never").onQuery().kill()')
    j = e.decide(query("DROP me"), ConnectionState())
    assert j.hold == pytest.approx(0.04) and j.copies == 2
    assert j.end.verdict is Verdict.DROP
    assert j.fired == [("slow", "delay"), ("dup", "duplicate"), ("gone", "drop")]
    listed = {line.split()[0]: line for line in e.listing()}
    assert "fired=0" in listed["name=never"] and "matched=0" in listed["name=never"]


def test_conn_replaces_every_fault_and_conn_allow_clears_them():
    e = engine('faults.add("a").onQuery().kill()', 'faults.add("b").onSync().kill()')
    e.set_rule_text('conn.onQuery(query="^COMMIT").kill()')
    assert e.names() == ["conn"]
    e.set_rule_text("conn.allow()")
    assert e.names() == [] and e.decide(query("COMMIT"), ConnectionState()) is FORWARD


def test_adding_a_fault_of_the_same_name_replaces_it_in_place_with_fresh_state():
    e = engine('faults.add("a").onQuery().after(1).kill()', 'faults.add("b").onSync().kill()')
    conn = ConnectionState()
    assert e.decide(query("1"), conn) is FORWARD  # after(1) counted one
    e.set_rule_text('faults.add("a").onQuery().after(1).drop()')
    assert e.names() == ["a", "b"]
    assert e.decide(query("2"), conn) is FORWARD  # counting starts again
    assert e.decide(query("3"), conn).end.verdict is Verdict.DROP


def test_times_spends_a_fault_across_connections_and_it_stays_listed():
    e = engine('faults.add("twice").onQuery().times(2).drop()')
    results = [e.decide(query("q"), ConnectionState(number=n)) for n in (1, 2, 3)]
    assert [r is FORWARD for r in results] == [False, False, True]
    (line,) = e.listing()
    assert "matched=2 fired=2" in line and "state=spent" in line


def test_probability_is_seeded_by_fault_connection_and_frame():
    def pattern(seed: int, number: int = 1) -> list[bool]:
        e = engine('faults.add("p").onQuery().probability(0.3).drop()', seed=seed)
        conn = ConnectionState(number=number)
        return [e.judge_one(query(str(i)), conn) is not FORWARD for i in range(200)]

    assert pattern(7) == pattern(7)
    assert pattern(7) != pattern(8) and pattern(7) != pattern(7, number=2)
    assert 40 <= sum(pattern(7)) <= 80  # about 30% of 200


def test_connection_probability_is_decided_once_per_connection():
    e = engine('faults.add("c").connectionProbability(0.5).onQuery().drop()')
    for number in range(1, 30):
        conn = ConnectionState(number=number)
        fates = {e.judge_one(query(str(i)), conn) is FORWARD for i in range(10)}
        assert len(fates) == 1


def test_where_waits_for_the_startup_parameters_then_decides_once():
    e = engine('faults.add("w").where(application_name="^maintenance$").onQuery().kill()')
    matching, other = PgAgent(), PgAgent()
    for agent, name in ((matching, "maintenance"), (other, "pg_regress")):
        data = M["StartupMessage"].encode(user="u", database="d",
                                          parameters={"application_name": name})
        agent.observe(Frame("StartupMessage", data, (0, len(data)), True,
                            M["StartupMessage"]))
    assert e.decide(query("x"), ConnectionState(agent=matching)).end.verdict is Verdict.KILL
    assert e.decide(query("x"), ConnectionState(agent=other)) is FORWARD
    assert e.decide(query("x"), ConnectionState(agent=PgAgent())) is FORWARD  # not started


def test_where_client_matches_the_client_address():
    e = engine('faults.add("w").where(client=":5555$").onQuery().kill()')
    assert e.decide(query("x"), ConnectionState(client="10.0.0.1:5555")) is not FORWARD
    assert e.decide(query("x"), ConnectionState(client="10.0.0.1:5556")) is FORWARD


def test_every_firing_is_counted_and_logged(caplog):
    e = engine('faults.add("k").onQuery(query="^COMMIT").kill()')
    with caplog.at_level("INFO", logger="wirefault"):
        e.decide(query("COMMIT"), ConnectionState(number=4, client="127.0.0.1:40000"))
    assert e.fired_total == 1
    (firing,) = e.fired_log
    assert firing.line() == ("fired fault=k conn=4 client=127.0.0.1:40000 frame=Query "
                             "action=kill")
    assert "wirefault: fired fault=k conn=4" in caplog.text


def test_the_gate_is_the_union_of_first_filters_per_direction():
    e = engine('faults.add("a").onQuery().kill()',
               'faults.add("b").fromServer().onDataRow().kill()')
    assert e._gates == (frozenset({"Query"}), frozenset({"DataRow"}))
    e.set_rule_text('faults.add("c").after(3).kill()')
    assert e._gates == (None, None)


def test_listing_and_removal():
    e = engine('faults.add("a").onQuery().kill()')
    (line,) = e.listing()
    assert line.startswith("name=a matched=0 fired=0 added=20")
    assert line.endswith('state=active command=faults.add("a").onQuery().kill()')
    assert e.remove("a") and not e.remove("a")


# -- through the layer (sans-I/O) ---------------------------------------------------------


def test_delay_holds_only_its_direction_and_keeps_order():
    d = LayerDriver("raw", 'faults.add("d").fromClient().contains(b"slow").delay(50)')
    out = d.from_client(b"slow")
    (hold,) = of_type(out, commands.RequestWakeup)
    assert hold.delay == pytest.approx(0.05) and sent(out) == b""
    assert sent(d.from_client(b"after")) == b""  # behind the held frame
    assert sent(d.from_server(b"reply")) == b"reply"  # the other direction goes on
    assert sent(d.wakeup(hold), d.server) == b"slowafter"


def test_a_delay_and_a_later_kill_both_apply_in_that_order():
    d = LayerDriver("raw")
    d.runtime.engine.set_rule_text('faults.add("d").contains(b"x").delay(10)')
    d.runtime.engine.set_rule_text('faults.add("k").contains(b"x").kill()')
    out = d.from_client(b"x")
    (hold,) = of_type(out, commands.RequestWakeup)
    assert not of_type(out, commands.CloseTcpConnection)
    out = d.wakeup(hold)
    assert sent(out) == b"" and of_type(out, commands.CloseTcpConnection)


def test_duplicate_and_drop():
    d = LayerDriver("raw", 'faults.add("dup").contains(b"two").duplicate(1)')
    assert sent(d.from_client(b"two")) == b"twotwo"
    d.runtime.engine.set_rule_text('faults.add("dup").contains(b"two").drop()')
    assert sent(d.from_client(b"two")) == b""
    assert sent(d.from_client(b"three")) == b"three"


def test_slice_writes_pieces_apart_and_keeps_what_follows_behind():
    d = LayerDriver("raw", 'faults.add("s").contains(b"abc").slice(2, 10)')
    out = d.from_client(b"abcde")
    assert [c.data for c in of_type(out, commands.SendData)] == [b"ab"]
    (gap,) = of_type(out, commands.RequestWakeup)
    assert sent(d.from_client(b"zz")) == b""  # waits behind the pieces
    out = d.wakeup(gap)
    assert sent(out) == b"cd"
    out = d.wakeup(of_type(out, commands.RequestWakeup)[0])
    assert sent(out) == b"e" + b"zz"


def test_limit_passes_exactly_that_many_bytes_then_closes():
    d = LayerDriver("raw", 'faults.add("l").contains(b"go").limit(5)')
    out = d.from_client(b"go123456")
    assert sent(out) == b"go123"
    assert of_type(out, commands.CloseConnection)


def test_hang_holds_both_directions_until_its_fault_is_removed():
    d = LayerDriver("raw", 'faults.add("h").contains(b"stop").hang()')
    assert sent(d.from_client(b"stop")) == b""
    assert sent(d.from_server(b"reply")) == b"" and sent(d.from_client(b"more")) == b""
    assert not of_type(d.from_client(b""), commands.CloseConnection)
    d.runtime.engine.remove("h")
    d.runtime.faults_changed()
    out = d.clock.delivered[d.client.id]
    assert sent(out, d.server) == b"stopmore" and sent(out, d.client) == b"reply"


def test_throttle_paces_its_direction_by_the_runtime_clock():
    now = [100.0]
    d = LayerDriver("raw", 'faults.add("t").fromClient().throttle(100)')
    d.runtime.clock = lambda: now[0]
    out = d.from_client(b"x" * 12)
    assert sent(out) == b"x" * 5  # 50 ms worth at a time
    (pace,) = of_type(out, commands.RequestWakeup)
    assert pace.delay == pytest.approx(0.05)
    now[0] += 0.05
    assert sent(d.wakeup(pace)) == b"x" * 5


def test_error_on_raw_is_refused_by_the_parser():
    with pytest.raises(dsl.CommandError, match="error"):
        dsl.parse('faults.add("e").error("40001")', "raw")
