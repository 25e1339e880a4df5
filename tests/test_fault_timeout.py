"""The options behind Toxiproxy's toxics, at the layer: reset(after_ms), drop(timeout_ms),
slice(..., variation): what goes out, what waits, what the timers do."""

from __future__ import annotations

from layer_driver import LayerDriver, of_type, sent
from mitmproxy.proxy import commands

from wirefault.proxy.relay_io import ResetConnections


def test_reset_after_ms_stops_its_direction_lets_the_other_flow_then_resets():
    d = LayerDriver("raw", 'faults.add("r").fromServer().reset(after_ms=250)')
    assert sent(d.from_client(b"query")) == b"query"
    out = d.from_server(b"reply")
    assert sent(out) == b""  # the first data of the stream is swallowed
    (timer,) = of_type(out, commands.RequestWakeup)
    assert timer.delay == 0.25 and not of_type(out, ResetConnections)
    assert sent(d.from_server(b"more")) == b""  # the stream carries nothing more
    assert sent(d.from_client(b"again")) == b"again"  # the other direction flows
    d.runtime.engine.remove("r")  # removed or not, the reset comes (as Toxiproxy's)
    d.runtime.faults_changed()
    out = d.wakeup(timer)
    assert of_type(out, ResetConnections) and of_type(out, commands.CloseConnection)
    assert sent(out) == b""


def test_reset_without_after_ms_resets_at_once():
    d = LayerDriver("raw", 'faults.add("r").fromClient().reset()')
    out = d.from_client(b"x")
    assert of_type(out, ResetConnections) and not of_type(out, commands.RequestWakeup)


def test_drop_timeout_drops_its_stream_and_closes_after_silence():
    d = LayerDriver("raw", 'faults.add("t").fromServer().drop(timeout_ms=300)')
    assert sent(d.from_client(b"query")) == b"query"
    out = d.from_server(b"reply")
    assert sent(out) == b""
    (first,) = of_type(out, commands.RequestWakeup)
    assert first.delay == 0.3
    out = d.from_server(b"more")  # each dropped frame starts the countdown again
    (second,) = of_type(out, commands.RequestWakeup)
    assert not of_type(d.wakeup(first), commands.CloseConnection)
    assert sent(d.from_client(b"still")) == b"still"
    out = d.wakeup(second)
    assert of_type(out, commands.CloseConnection) and sent(out) == b""


def test_drop_timeout_zero_never_closes_on_time_but_removing_it_closes():
    d = LayerDriver("raw", 'faults.add("t").fromServer().drop(timeout_ms=0)')
    out = d.from_server(b"reply")
    assert sent(out) == b"" and not of_type(out, commands.RequestWakeup)
    d.runtime.engine.set_rule_text('faults.add("other").contains(b"zzz").kill()')
    d.runtime.faults_changed()  # another fault changing leaves it be
    assert not of_type(d.clock.delivered.get(d.client.id, []), commands.CloseConnection)
    d.runtime.engine.remove("t")
    d.runtime.faults_changed()
    assert of_type(d.clock.delivered[d.client.id], commands.CloseConnection)


def test_drop_timeout_replaced_starts_again_with_its_new_timeout():
    d = LayerDriver("raw", 'faults.add("t").fromServer().drop(timeout_ms=0)')
    d.from_server(b"reply")
    d.runtime.engine.set_rule_text('faults.add("t").fromServer().drop(timeout_ms=200)')
    d.runtime.faults_changed()
    out = d.clock.delivered[d.client.id]
    assert not of_type(out, commands.CloseConnection)
    (timer,) = of_type(out, commands.RequestWakeup)
    assert timer.delay == 0.2
    assert of_type(d.wakeup(timer), commands.CloseConnection)


def test_plain_drop_is_unchanged():
    d = LayerDriver("raw", 'faults.add("t").fromServer().drop()')
    out = d.from_server(b"reply")
    assert sent(out) == b"" and not of_type(out, commands.RequestWakeup)
    d.runtime.engine.remove("t")
    d.runtime.faults_changed()
    assert not d.clock.delivered.get(d.client.id)
    assert sent(d.from_server(b"next")) == b"next"


def test_slice_with_variation_cuts_seeded_pieces_each_followed_by_the_delay():
    def run(seed):
        d = LayerDriver("raw", f'faults.add("s", seed={seed}).fromServer()'
                        f'.slice(10, 5, variation=4)')
        data = bytes(range(100))
        out = d.from_server(data)
        pieces = [c.data for c in of_type(out, commands.SendData)]
        while timers := of_type(out, commands.RequestWakeup):
            out = d.wakeup(timers[0])
            pieces += [c.data for c in of_type(out, commands.SendData)]
            if not of_type(out, commands.SendData):
                break
        assert b"".join(pieces) == data
        return [len(p) for p in pieces]

    lengths = run(1)
    assert lengths == run(1) and len(lengths) >= 7 and all(n <= 14 for n in lengths)
    assert any(run(seed) != lengths for seed in (2, 3, 4))
