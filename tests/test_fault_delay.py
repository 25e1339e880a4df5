"""delay(ms, jitter=0) end to end: the frame and its direction wait, nothing else does.

Real PostgreSQL, real proxies in both launch modes (fault_e2e.py), psycopg and raw sockets.
Delays are measured as lower bounds only; what must not wait is shown by the order in
which things finish, with a margin of the whole delay.
"""

from __future__ import annotations

import select
import time

from fault_e2e import TIMER_SLACK, Harness, first_columns, read_replies
from fifo_helpers import wait_until
from pgwire import open_session, query_message
from proxy_helpers import running_proxy

from wirefault.fifo_client import FaultProxy
from wirefault.proxy.faults.base import chance

pytest_plugins = ["fault_e2e"]


def test_the_delayed_query_waits_and_another_connection_does_not(e2e: Harness):
    delayed = e2e.connect(autocommit=True)
    other = e2e.connect(autocommit=True)
    e2e.control.send('faults.add("slow").onQuery(query="DELAYED").delay(1000)')
    started = time.monotonic()
    held = e2e.in_thread(lambda: delayed.execute("SELECT 'DELAYED'").fetchone())
    e2e.wait_fired("slow")  # the Query is in the proxy's hands now
    assert other.execute("SELECT 2").fetchone() == (2,)
    # The other connection was answered while the delayed query was still held.
    assert not held.done()
    assert held.result(30) == ("DELAYED",)
    assert time.monotonic() - started >= 1.0 - TIMER_SLACK
    assert other.execute("SELECT 3").fetchone() == (3,)


def test_frames_behind_a_delayed_one_wait_and_keep_their_order(e2e: Harness):
    sock = e2e.session()
    e2e.control.send('faults.add("first").onQuery(query="FIRST").delay(400)')
    started = time.monotonic()
    # One write: the two queries behind the delayed one are in the proxy before it is sent.
    sock.sendall(query_message("SELECT 'FIRST'") + query_message("SELECT 'second'")
                 + query_message("SELECT 'third'"))
    replies = read_replies(sock, 3)
    assert time.monotonic() - started >= 0.4 - TIMER_SLACK
    assert first_columns(replies) == ["FIRST", "second", "third"]
    fault = e2e.fault("first")
    assert (fault.matched, fault.fired) == (1, 1)


def test_a_released_frame_is_not_judged_again(e2e: Harness):
    """Every Query is delayed, each exactly once: a frame released after its hold goes out
    without meeting the faults again (else it would be held for ever), and the frames that
    waited behind it are judged, and held, in their turn."""
    sock = e2e.session()
    e2e.control.send('faults.add("every").onQuery().delay(200)')
    started = time.monotonic()
    sock.sendall(query_message("SELECT 1") + query_message("SELECT 2")
                 + query_message("SELECT 3"))
    replies = read_replies(sock, 3)
    assert time.monotonic() - started >= 0.2 - TIMER_SLACK
    assert first_columns(replies) == ["1", "2", "3"]
    fault = e2e.fault("every")
    assert (fault.matched, fault.fired, fault.state) == (3, 3, "active")


def test_a_delay_counts_from_each_frames_arrival(e2e: Harness):
    """Latency, as Toxiproxy's latency toxic and netem mean it: twenty queries sent in one
    write each wait 300 ms from their own arrival, so the last answer comes about 300 ms
    after the write, not 20 x 300 ms (the wait behind the delayed frames counts)."""
    sock = e2e.session()
    e2e.control.send('faults.add("every").onQuery().delay(300)')
    started = time.monotonic()
    sock.sendall(b"".join(query_message(f"SELECT {n}") for n in range(20)))
    replies = read_replies(sock, 20)
    elapsed = time.monotonic() - started
    assert first_columns(replies) == [str(n) for n in range(20)]
    assert elapsed >= 0.3 - TIMER_SLACK
    assert elapsed < 20 * 0.3 / 2, elapsed  # one after another would take 6 s
    assert e2e.fault("every").fired == 20


def test_times_limits_the_delays(e2e: Harness):
    conn = e2e.connect(autocommit=True)
    e2e.control.send('faults.add("once").onQuery(query="^SELECT").times(1).delay(300)')
    started = time.monotonic()
    assert conn.execute("SELECT 1").fetchone() == (1,)
    assert time.monotonic() - started >= 0.3 - TIMER_SLACK
    assert conn.execute("SELECT 2").fetchone() == (2,)
    fault = e2e.fault("once")
    assert (fault.fired, fault.state) == (1, "spent")


def test_a_delayed_server_frame_holds_the_reply(e2e: Harness):
    conn = e2e.connect(autocommit=True)
    e2e.control.send(
        'faults.add("late-row").fromServer().onDataRow().contains(b"late").delay(400)')
    started = time.monotonic()
    assert conn.execute("SELECT 'late'").fetchone() == ("late",)
    assert time.monotonic() - started >= 0.4 - TIMER_SLACK
    assert e2e.fault("late-row").fired == 1


# -- jitter ------------------------------------------------------------------------------------

MS, JITTER = 300, 300
"""delay(300, jitter=300): each delay is drawn in [0, 600] ms."""


def _seed(name: str, connection: int, wanted: range) -> int:
    """A seed whose jitter draw for this fault, on this connection's first query, falls in
    `wanted` (hundredths). The draw is the proxy's documented seeded function of (seed,
    fault, connection number, direction, frame number); on a raw session the Query is the
    client's frame 2, after the StartupMessage."""
    for seed in range(100_000):
        if int(chance(seed, name, "jitter", connection, True, 2) * 100) in wanted:
            return seed
    raise AssertionError("no seed found")


def test_jitter_is_drawn_from_the_seed(pg, fault_launch):
    """The same seed and traffic give the same delays: on a fresh proxy (connections
    numbered 1, 2 in the order they open) a seed drawing near the top waits at least
    ms + 0.9 * jitter, while a seed drawing near the bottom, started after it on another
    connection, is answered first. Jitter ignored, or not seeded, would fail one of the two
    (or both) almost always."""
    high = _seed("hi", 1, range(95, 100))
    low = _seed("lo", 2, range(0, 5))
    kind, extra = fault_launch
    with running_proxy(pg.port, kind=kind, extra_args=extra) as proxy:
        control = FaultProxy(proxy.fifo)
        control.send(f'faults.add("hi", seed={high}).onQuery(query="HIGH")'
                     f'.delay({MS}, jitter={JITTER})')
        control.send(f'faults.add("lo", seed={low}).onQuery(query="LOW")'
                     f'.delay({MS}, jitter={JITTER})')
        with open_session(proxy.port) as first, open_session(proxy.port) as second:
            started = time.monotonic()
            first.sendall(query_message("SELECT 'HIGH'"))
            second.sendall(query_message("SELECT 'LOW'"))
            assert first_columns(read_replies(second, 1)) == ["LOW"]
            readable, _, _ = select.select([first], [], [], 0)
            assert not readable, "the high draw was answered before the low one"
            assert first_columns(read_replies(first, 1)) == ["HIGH"]
            assert time.monotonic() - started >= (MS + 0.9 * JITTER) / 1000 - TIMER_SLACK
        assert [f.fired for f in control.faults()] == [1, 1]


def test_a_close_behind_a_delayed_frame_waits_for_it(e2e: Harness):
    """The client sends an INSERT and closes at once: the close keeps its place behind the
    delayed INSERT, which the server still gets (and runs) before it sees the close."""
    sock = e2e.session()
    e2e.control.send(f'faults.add("slow").onQuery(query="INSERT INTO {e2e.table}")'
                     '.delay(300)')
    sock.sendall(query_message(f"INSERT INTO {e2e.table} VALUES (1)"))
    sock.close()
    assert wait_until(lambda: e2e.values() == [1], timeout=30), e2e.values()
