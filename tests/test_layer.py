"""The relay layer driven by scripted events: what each fault yields, frame by frame."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys

import pytest
from layer_driver import LayerDriver, of_type, sent
from mitmproxy.proxy import commands

from wirefault.proxy.relay_io import ResetConnections, SetReading


def query(text: str) -> bytes:
    body = text.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


STARTUP = struct.pack("!II", 8 + len(b"user\0u\0\0"), 196608) + b"user\0u\0\0"
READY = b"Z" + struct.pack("!I", 5) + b"I"


def pg_driver(rule: str | None = None, **options) -> LayerDriver:
    driver = LayerDriver("postgres", rule, **options)
    assert sent(driver.from_client(STARTUP), driver.server) == STARTUP
    return driver


def test_allow_forwards_whole_reads_in_both_directions():
    d = LayerDriver("raw")
    assert of_type(d.from_client(b"ping"), commands.SendData)[0].connection is d.server
    assert sent(d.from_server(b"pong"), d.client) == b"pong"


def test_kill_drops_the_trigger_and_everything_after_it():
    d = pg_driver('conn.onQuery(query="^COMMIT").kill()')
    read = query("BEGIN") + query("COMMIT") + query("SELECT 1")
    out = d.from_client(read)
    assert sent(out, d.server) == query("BEGIN")  # frames before the trigger still go
    half = of_type(out, commands.CloseTcpConnection)
    assert half and half[0].connection is d.server and half[0].half_close
    assert sent(d.from_server(READY)) == b""  # nothing more in either direction
    assert sent(d.from_client(query("SELECT 2"))) == b""


def test_kill_closes_the_other_side_when_the_killed_side_closes():
    d = pg_driver("conn.onQuery().kill()")
    out = d.from_client(query("x"))
    grace = of_type(out, commands.RequestWakeup)
    assert grace and grace[0].delay == 2.0
    assert of_type(out, commands.CloseConnection) == []  # the client waits for the server
    out = d.closed(d.server)
    assert [c.connection for c in of_type(out, commands.CloseConnection)] == [d.client]


def test_kill_closes_the_other_side_after_the_grace_period():
    d = pg_driver("conn.onQuery().kill()", kill_grace=0.5)
    grace = of_type(d.from_client(query("x")), commands.RequestWakeup)[0]
    assert grace.delay == 0.5
    out = d.wakeup(grace)
    assert {c.connection for c in of_type(out, commands.CloseConnection)} == {d.client, d.server}


def test_kill_toward_the_client_on_a_server_frame():
    d = pg_driver('conn.onCommandComplete(command="^INSERT").kill()')
    complete = b"C" + struct.pack("!I", 4 + 11) + b"INSERT 0 1\0"
    out = d.from_server(READY + complete)
    assert sent(out, d.client) == READY
    assert of_type(out, commands.CloseTcpConnection)[0].connection is d.client


def test_a_frame_split_across_reads_triggers_once_complete():
    d = pg_driver('conn.onQuery(query="^COMMIT").kill()')
    frame = query("COMMIT")
    for i in range(len(frame) - 1):
        assert d.from_client(frame[i:i + 1]) == []  # held until complete, nothing sent
    out = d.from_client(frame[-1:])
    assert of_type(out, commands.CloseTcpConnection)
    assert sent(out) == b""


def test_partial_frames_are_forwarded_once_complete():
    d = pg_driver()
    frame = query("SELECT 1")
    assert sent(d.from_client(frame[:3])) == b""
    assert sent(d.from_client(frame[3:] + frame[:2]), d.server) == frame
    assert sent(d.from_client(frame[2:]), d.server) == frame


def test_after_counts_frames_reaching_it_per_connection():
    rule = 'conn.onQuery(query="^SELECT").after(2).kill()'
    runtime = LayerDriver("postgres", rule).runtime
    one, two = LayerDriver(runtime=runtime), LayerDriver(runtime=runtime)
    for d in (one, two):
        d.from_client(STARTUP)
        for _ in range(2):
            assert sent(d.from_client(query("SELECT 1")), d.server) == query("SELECT 1")
        assert sent(d.from_client(query("BEGIN")), d.server) == query("BEGIN")  # not counted
    assert of_type(one.from_client(query("SELECT 1")), commands.CloseTcpConnection)
    assert of_type(two.from_client(query("SELECT 1")), commands.CloseTcpConnection)


def test_conn_after_n_kill_kills_at_frame_n_plus_one_in_either_direction():
    d = LayerDriver("raw", "conn.after(2).kill()")
    assert sent(d.from_client(b"1")) == b"1"
    assert sent(d.from_server(b"2")) == b"2"
    out = d.from_client(b"3")
    assert sent(out) == b"" and of_type(out, commands.CloseTcpConnection)


def test_a_new_rule_starts_its_counters_fresh():
    d = LayerDriver("raw", "conn.after(1).kill()")
    d.from_client(b"1")
    d.runtime.engine.set_rule_text("conn.after(1).kill()")
    assert sent(d.from_client(b"2")) == b"2"
    assert of_type(d.from_client(b"3"), commands.CloseTcpConnection)


def test_reset_aborts_the_connection():
    d = LayerDriver("raw", "conn.reset()")
    out = d.from_client(b"x")
    assert of_type(out, ResetConnections)
    assert sent(out) == b""
    assert {c.connection for c in of_type(out, commands.CloseConnection)} == {d.client, d.server}


def test_reset_comes_after_the_frames_before_the_trigger_in_the_same_read():
    d = pg_driver('conn.onQuery(query="TRIGGER").reset()')
    out = d.from_client(query("INSERT 1") + query("SELECT 'TRIGGER'"))
    kinds = [type(c) for c in out]
    assert kinds.index(commands.SendData) < kinds.index(ResetConnections)
    assert sent(out) == query("INSERT 1")


def test_a_hold_stops_reading_only_past_the_backlog_limit_and_resumes_after():
    d = LayerDriver("raw", "conn.connect_delay(10)")
    hold = of_type(d.from_client(b"first"), commands.RequestWakeup)[0]
    chunk = b"x" * 65536
    seen = [of_type(d.from_client(chunk), SetReading) for _ in range(6)]
    # the held frame counts: the 4th read takes the queue past 256 KiB
    assert [len(s) for s in seen] == [0, 0, 0, 1, 0, 0]
    assert seen[3][0].reading is False and seen[3][0].connection is d.client
    out = d.wakeup(hold)
    assert [c.reading for c in of_type(out, SetReading)] == [True]
    assert sent(out) == b"first" + chunk * 6


def test_killall_kills_other_connections_at_their_next_frame_until_replaced():
    runtime = LayerDriver("raw", 'conn.contains(b"boom").killall()').runtime
    a, b = LayerDriver(runtime=runtime), LayerDriver(runtime=runtime)
    assert sent(b.from_client(b"fine")) == b"fine"
    assert of_type(a.from_client(b"boom"), commands.CloseTcpConnection)
    assert of_type(b.from_server(b"anything"), commands.CloseTcpConnection)
    assert of_type(LayerDriver(runtime=runtime).from_client(b"new"), commands.CloseTcpConnection)
    runtime.engine.set_rule_text("conn.allow()")
    assert sent(LayerDriver(runtime=runtime).from_client(b"new")) == b"new"


def test_cancel_signals_then_holds_the_frame_and_keeps_order():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        d = LayerDriver("raw", f'conn.contains(b"x").cancel({child.pid})')
        out = d.from_client(b"x1")
        assert child.wait(timeout=5) == -signal.SIGINT
        assert [delay for delay, _ in d.clock.timers] == [pytest.approx(0.1)]
        assert sent(out) == b""
        assert sent(d.from_server(b"s")) == b""  # the connection is paused while held
        assert sent(d.from_client(b"c")) == b""
        out = d.clock.fire()[d.client.id]
        data = of_type(out, commands.SendData)
        # the triggering frame first; each direction in its order
        assert (data[0].connection, data[0].data) == (d.server, b"x1")
        assert sent(out, d.server) == b"x1c" and sent(out, d.client) == b"s"
    finally:
        if child.poll() is None:
            child.kill()


def test_cancel_pauses_every_connection_and_releases_them_in_order():
    older = LayerDriver("raw", "conn.contains(b\"x\").cancel(999999999)")
    runtime = older.runtime
    trigger = LayerDriver(runtime=runtime)
    assert sent(trigger.from_client(b"x")) == b""
    # The other connection forwards nothing: what it reads waits in its backlog.
    assert sent(older.from_server(b"o1")) == b""
    # A connection that starts now does not open its upstream until the pause ends.
    newcomer = LayerDriver(runtime=runtime)
    assert not of_type(newcomer.started, commands.OpenConnection)
    assert sent(newcomer.from_client(b"n1")) == b""
    released = runtime.test_clock.fire()
    assert list(released) == [trigger.client.id, older.client.id, newcomer.client.id]
    assert sent(released[trigger.client.id]) == b"x"
    assert sent(released[older.client.id], older.client) == b"o1"
    assert sent(released[newcomer.client.id], newcomer.server) == b"n1"
    assert sent(older.from_server(b"o2")) == b"o2"  # flowing again


def test_cancel_of_a_missing_process_still_forwards():
    d = LayerDriver("raw", "conn.cancel(999999999)")
    d.from_client(b"q")
    assert sent(d.clock.fire()[d.client.id]) == b"q"


def test_connect_delay_holds_only_the_first_client_frame():
    d = LayerDriver("raw", "conn.connect_delay(500)")
    out = d.from_client(b"first")
    hold = of_type(out, commands.RequestWakeup)[0]
    assert hold.delay == pytest.approx(0.5)
    assert sent(d.wakeup(hold)) == b"first"
    assert sent(d.from_client(b"second")) == b"second"


def test_close_during_a_hold_is_replayed_after_the_held_frames():
    d = LayerDriver("raw", "conn.connect_delay(10)")
    hold = of_type(d.from_client(b"first"), commands.RequestWakeup)[0]
    assert d.closed(d.client) == []
    out = d.wakeup(hold)
    assert sent(out) == b"first"
    assert of_type(out, commands.CloseTcpConnection)[0].connection is d.server


def test_recorder_sees_every_frame_with_direction_and_connection_number():
    runtime = pg_driver().runtime
    d = LayerDriver(runtime=runtime)
    d.from_client(STARTUP)
    d.from_client(query("SELECT 1"))
    d.from_server(READY)
    rows = runtime.recorder.dump().splitlines()
    assert rows[-2:] == ["1\tcoordinator\tQuery(query=SELECT 1)",
                         "1\tworker\tReadyForQuery(status=I)"]


def test_flows_option_fires_hooks_and_trims_messages():
    d = LayerDriver("raw", make_flows=True, max_flow_messages=3)
    assert d.layer.flow is not None
    for i in range(10):
        out = d.from_client(str(i).encode())
        assert [c for c in out if type(c).__name__ == "TcpMessageHook"]
        assert sent(out) == str(i).encode()
    assert len(d.layer.flow.messages) == 3


def test_no_blocking_calls_in_the_proxy_package():
    root = os.path.join(os.path.dirname(__file__), "..", "proxy")
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name)) as f:
                    assert "time.sleep(" not in f.read(), name
