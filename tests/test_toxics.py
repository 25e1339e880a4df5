"""Each Toxiproxy toxic's fault command, and that the command language accepts it; the
attributes as Toxiproxy lists them; the slicer's cuts as Toxiproxy's algorithm makes them."""

from __future__ import annotations

import random

import pytest

from wirefault.proxy import dsl, faults
from wirefault.proxy.faults.slice import Slice, cut, pieces_of, toxiproxy_pieces
from wirefault.proxy.toxics import ToxicError, attributes_of, fault_command


def toxic(kind, attributes, stream="downstream", toxicity=1.0, name="t"):
    return {"name": name, "type": kind, "stream": stream, "toxicity": toxicity,
            "attributes": attributes}


@pytest.mark.parametrize(("kind", "attributes", "stream", "toxicity", "chain"), [
    ("latency", {"latency": 100, "jitter": 10}, "downstream", 1.0,
     ".fromServer().delay(100, jitter=10)"),
    ("latency", {"latency": 5}, "upstream", 0.25,
     ".fromClient().connectionProbability(0.25).delay(5, jitter=0)"),
    ("bandwidth", {"rate": 64}, "downstream", 1.0, ".fromServer().throttle(64000)"),
    ("bandwidth", {"rate": 0}, "downstream", 1.0, ".fromServer().delay(0)"),
    ("slow_close", {"delay": 300}, "upstream", 1.0, ".fromClient().slow_close(300)"),
    ("timeout", {"timeout": 500}, "downstream", 1.0, ".fromServer().drop(timeout_ms=500)"),
    ("timeout", {"timeout": 0}, "upstream", 1.0, ".fromClient().drop(timeout_ms=0)"),
    ("timeout", {}, "downstream", 1.0, ".fromServer().drop(timeout_ms=0)"),
    ("reset_peer", {"timeout": 0}, "upstream", 1.0, ".fromClient().reset()"),
    ("reset_peer", {"timeout": 250}, "downstream", 1.0, ".fromServer().reset(after_ms=250)"),
    ("slicer", {"average_size": 8, "size_variation": 2, "delay": 1500}, "downstream", 1.0,
     ".fromServer().slice(8, 1.5, variation=2)"),
    ("slicer", {"average_size": 0}, "downstream", 1.0, ".fromServer().slice(1, 0, variation=0)"),
    ("limit_data", {"bytes": 10}, "downstream", 1.0, ".fromServer().limit(10)"),
    ("wirefault", {"command": 'conn.onQuery(query="^COMMIT").kill()'}, "downstream", 1.0,
     '.onQuery(query="^COMMIT").kill()'),
    ("wirefault", {"command": '.contains(b"x").kill()'}, "upstream", 0.5,
     '.connectionProbability(0.5).contains(b"x").kill()'),
])
def test_each_toxic_is_one_named_fault(kind, attributes, stream, toxicity, chain):
    command = fault_command(toxic(kind, attributes, stream, toxicity))
    assert command == f'faults.add("toxic:t"){chain}'
    parsed = dsl.parse(command, "postgres")
    assert isinstance(parsed, dsl.FaultCommand) and parsed.name == "toxic:t"
    faults.build(parsed.rule.action)  # and the engine builds its fault


def test_the_new_options_build_their_faults():
    def built(text):
        return faults.build(dsl.parse(text, "raw").action)

    assert built("conn.reset()").decision is faults.RESET
    assert built("conn.reset(after_ms=250)").decision == faults.Decision(
        faults.Verdict.RESET, value=0.25)
    assert built("conn.drop()").decide(None, None, None) is faults.DROP
    assert built("conn.drop(timeout_ms=0)").decision == faults.Decision(
        faults.Verdict.DROP, value=0.0)
    assert built("conn.slice(4, 1)").variation is None
    assert built("conn.slice(4, 1, variation=2)").variation == 2


def test_attributes_are_listed_as_toxiproxy_lists_them():
    assert attributes_of("latency", {"latency": 300}) == {"latency": 300, "jitter": 0}
    assert attributes_of("slicer", {"average_size": 5, "other": "x"}) == {
        "average_size": 5, "size_variation": 0, "delay": 0}
    assert attributes_of("wirefault", {"command": "conn.kill()", "x": 1}) == {
        "command": "conn.kill()"}


@pytest.mark.parametrize(("kind", "attributes", "message"), [
    ("poison", {}, "invalid toxic type"),
    ("latency", {"latency": -1}, "attribute latency must be a number >= 0, got -1"),
    ("latency", {"latency": "x"}, "attribute latency must be a number >= 0, got 'x'"),
    ("latency", {"latency": 1.5}, "attribute latency must be an integer, got 1.5"),
    ("wirefault", {}, "a wirefault toxic needs the attribute command"),
    ("wirefault", {"command": "recorder.dump()"}, "attribute command must start with"),
])
def test_what_cannot_be_mapped_is_refused(kind, attributes, message):
    with pytest.raises(ToxicError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fault_command(toxic(kind, attributes))


def go_chunk(start, end, average, variation, intn):
    """Toxiproxy's SlicerToxic.chunk (toxics/slicer.go), transcribed: the offsets."""
    if (end - start) - average <= variation:
        return [start, end]
    mid = start + (end - start) // 2
    if variation > 0:
        mid += intn(variation * 2) - variation
    return go_chunk(start, mid, average, variation, intn) + go_chunk(mid, end, average,
                                                                      variation, intn)


@pytest.mark.parametrize(("total", "average", "variation"), [
    (100, 10, 0), (100, 30, 0), (1000, 16, 5), (4096, 100, 40), (7, 3, 1), (5, 10, 2)])
def test_the_slicer_cuts_as_toxiproxy_does(total, average, variation):
    draws = random.Random(total * 31 + average)
    values = [draws.random() for _ in range(total)]
    taken = iter(values)

    def intn(n):  # Go's rand.Intn(n) from the same stream of draws
        return int(next(taken) * n)

    offsets = go_chunk(0, total, average, variation, intn)
    expected = [offsets[i + 1] - offsets[i] for i in range(0, len(offsets), 2)]
    lengths = toxiproxy_pieces(total, average, variation, lambda k: values[k])
    assert list(lengths) == expected
    assert sum(lengths) == total
    assert all(0 < n <= average + variation for n in lengths) or lengths == (total,)


def test_slicer_pieces_are_seeded_and_vary():
    frame = type("F", (), {"data": b"x" * 4000, "from_client": False})()
    conn = faults.ConnectionState(number=3, server_frames_seen=1)
    shared = faults.SharedState(name="toxic:s", seed=7)
    slicer = Slice(100, 1.0, variation=40)
    first = slicer.decide(frame, conn, shared).value
    assert slicer.decide(frame, conn, shared).value == first  # the same draws
    lengths, gap, trailing = first
    assert sum(lengths) == 4000 and gap == 0.001 and trailing
    assert len(set(lengths)) > 3 and all(0 < n <= 140 for n in lengths), lengths
    other = Slice(100, 1.0, variation=40).decide(frame, conn, faults.SharedState(
        name="toxic:s", seed=8)).value
    assert other[0] != lengths  # another seed cuts elsewhere
    # Pieces after each other, the last one followed by the delay too (Toxiproxy's way).
    outs = pieces_of(b"x" * 4000, first)
    assert all(g == 0.001 for _, g in outs)
    assert pieces_of(b"abcde", (2, 0.5, False)) == [(b"ab", 0.5), (b"cd", 0.5), (b"e", 0.0)]
    assert cut(b"abcdefg", (2, 2)) == [b"ab", b"cd", b"efg"]  # a longer frame: the rest
    assert cut(b"abc", (2, 2)) == [b"ab", b"c"]
