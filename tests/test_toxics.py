"""Each Toxiproxy toxic's fault command, and that the command language accepts it."""

from __future__ import annotations

import pytest

from wirefault.proxy import dsl
from wirefault.proxy.toxics import ToxicError, fault_command


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
    ("timeout", {"timeout": 500}, "downstream", 1.0, ".fromServer().hang(500)"),
    ("timeout", {"timeout": 0}, "downstream", 1.0, ".fromServer().hang()"),
    ("reset_peer", {"timeout": 0}, "upstream", 1.0, ".fromClient().reset()"),
    ("slicer", {"average_size": 8, "size_variation": 2, "delay": 1500}, "downstream", 1.0,
     ".fromServer().slice(8, 1.5)"),
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


@pytest.mark.parametrize(("kind", "attributes", "message"), [
    ("poison", {}, "invalid toxic type"),
    ("latency", {"latency": -1}, "attribute latency must be a number >= 0, got -1"),
    ("latency", {"latency": "x"}, "attribute latency must be a number >= 0, got 'x'"),
    ("wirefault", {}, "a wirefault toxic needs the attribute command"),
    ("wirefault", {"command": "recorder.dump()"}, "attribute command must start with"),
])
def test_what_cannot_be_mapped_is_refused(kind, attributes, message):
    with pytest.raises(ToxicError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fault_command(toxic(kind, attributes))
