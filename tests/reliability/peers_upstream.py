"""Hostile peers, the upstream side: it refuses, resolves to nothing, accepts then resets,
dies mid-frame, stalls forever.

For each, the same client (a PostgreSQL startup message, then reading to the end) connects
directly to the bad upstream and through the proxy, in the same run, and must see what it
would see without the proxy within a documented bound:

- refused, unresolved: directly, connect() fails; through the proxy (which accepted it
  already) the connection is closed, within 2 s more than the direct attempt took (for a
  name, plus the resolver's 5 s retry of a lost query);
- reset: a reset or a close, within 2 s more;
- mid-frame: the close, within 2 s more (the half frame itself is not relayed: the proxy
  relays whole frames; the client sees the connection end either way);
- stall: the connection stays open, as directly (no timeout of the proxy's own), and once
  the client goes the proxy closes its upstream side too.

The proxy logs a failure to open the upstream once per connection, anything else at most
once per connection (its log is read), its open descriptors come back to where they were,
and it stays up. Under `wirefault serve` the five bad proxies share the process and the
loop with a good one, whose checksummed echo loop, run in a process of its own during the
storm, must stay within 2x its p50 latency alone (FULL; QUICK: within 10x or + 50 ms and no
round trip over 5 s, robust to a busy CI machine, see latency_rule.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from campaign import FULL, Row, Size, part
from fifo_helpers import wait_until
from peers_common import (
    FakeUpstream,
    HealthyLoop,
    Proc,
    fd_count,
    probe,
    proxy_process,
    ratio_ok,
    serve_process,
    settled_fds,
)
from pgserver import free_port

PART = "hostile peers"
UNRESOLVED = "wirefault-no-such-host.invalid"
"""A name that resolves to nothing anywhere (RFC 2606 reserves .invalid)."""
BOUND = 2.0
"""Seconds a proxied attempt may take beyond the direct one (refused, reset, ...)."""
RESOLVER_RETRY = 5.0
"""glibc's resolver waits 5 s (resolv.conf's default `timeout`) before it asks again when
a query got no answer: a lookup among many at once may take that, with or without the
proxy (seen here: 1 of 20 lookups through the proxy, after 20 direct ones)."""
STALL_WAIT = 1.0
"""How long a client waits on a stalled upstream before it gives up and closes."""
CASES = ("refused", "unresolved", "reset", "midframe", "stall")
EXPECTED = {"refused": {"closed", "reset"}, "unresolved": {"closed", "reset"},
            "reset": {"closed", "reset"}, "midframe": {"closed"}, "stall": {"open"}}
"""What a client may see through the proxy (directly: refused, unresolved, reset, closed
after 25 bytes, open)."""
LOGGED_ONCE = {"refused", "unresolved"}
"""Failures the proxy must log, one line per connection."""


def attempts(size: Size) -> int:
    return 200 if size == FULL else 20


class BadUpstreams:
    """The five bad upstreams: a port nothing listens on, a name that does not resolve,
    and one fake server per misbehaviour."""

    def __init__(self) -> None:
        self.fakes = {mode: FakeUpstream(mode) for mode in ("reset", "midframe", "stall")}
        self.dead_port = free_port()

    def address(self, case: str) -> tuple[str, int]:
        if case == "refused":
            return "127.0.0.1", self.dead_port
        if case == "unresolved":
            return UNRESOLVED, 5432
        return "127.0.0.1", self.fakes[case].port

    def close(self) -> None:
        for fake in self.fakes.values():
            fake.close()


WAVE = 20
"""Attempts made at once: 200 name lookups at once overwhelm a small resolver (each lost
query waits its 5 s retry, directly as through the proxy), which would time the resolver."""


def _many(count: int, attempt: Callable[[], tuple[str, bytes, float]]
          ) -> list[tuple[str, bytes, float]]:
    """`count` attempts, WAVE at a time (a stalled one waits STALL_WAIT: they overlap)."""
    results: list[tuple[str, bytes, float]] = []
    lock = threading.Lock()

    def one() -> None:
        outcome = attempt()
        with lock:
            results.append(outcome)

    for first in range(0, count, WAVE):
        threads = [threading.Thread(target=one) for _ in range(min(WAVE, count - first))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return results


def try_case(case: str, bad: BadUpstreams, proc: Proc, port: int, count: int,
             mode: str) -> Row:
    host, upstream_port = bad.address(case)
    wait = STALL_WAIT if case == "stall" else 30.0  # else long enough to time the close
    direct = _many(count, lambda: probe(upstream_port, host, wait))
    # a warm-up connection, ended before anything is counted (a slow lookup included)
    fds_before = settled_fds(proc.pid, lambda: probe(port, wait=0.2 if case == "stall" else wait))
    log_before = len(proc.log().splitlines())
    fake = bad.fakes.get(case)
    closed_before = fake.closed if fake else 0
    proxied = _many(count, lambda: probe(port, wait=wait))
    problems = []
    seen = sorted({outcome for outcome, _, _ in proxied})
    if not set(seen) <= EXPECTED[case]:
        problems.append(f"the client saw {'/'.join(seen)}")
    slowest_direct = max(seconds for _, _, seconds in direct)
    slowest = max(seconds for _, _, seconds in proxied)
    bound = BOUND + (RESOLVER_RETRY if case == "unresolved" else 0.0)
    if case != "stall" and slowest > slowest_direct + bound:
        problems.append(f"closed only after {slowest:.2f} s")
    if fake is not None and case == "stall" and not wait_until(
            lambda: fake.closed - closed_before >= count, 10):
        problems.append(f"{count - (fake.closed - closed_before)} upstream sides left open")
    if not wait_until(lambda: fd_count(proc.pid) <= fds_before, 10):
        problems.append(f"{fd_count(proc.pid) - fds_before} descriptors left open")
    new_lines = [line for line in proc.log().splitlines()[log_before:] if line.strip()]
    said = [line for line in new_lines if "cannot connect to upstream" in line]
    if case in LOGGED_ONCE and len(said) != count:
        problems.append(f"{len(said)} log lines for {count} failures")
    if len(new_lines) > count or any("Traceback" in line for line in new_lines):
        problems.append(f"{len(new_lines)} log lines for {count} connections")
    if not proc.alive():
        problems.append("the proxy exited")
    direct_seen = "/".join(sorted({outcome for outcome, _, _ in direct}))
    figure = (f"direct: {direct_seen} (slowest {slowest_direct * 1000:.0f} ms); proxied: "
              f"{'/'.join(seen)} (slowest {slowest * 1000:.0f} ms); {len(new_lines)} log "
              f"lines; fds {fds_before} -> {fd_count(proc.pid)}")
    return Row(PART, f"upstream {case}, {mode}", f"{count:,} connections",
               "; ".join(problems) or "nothing", figure, not problems)


def _one_mode(kind: str, size: Size, work: Path) -> list[Row]:
    bad = BadUpstreams()
    rows = []
    try:
        for case in CASES:
            with proxy_process(kind, bad.address(case), work) as proc:
                rows.append(try_case(case, bad, proc, proc.ports["proxy"], attempts(size),
                                     kind))
    finally:
        bad.close()
    return rows


@part("peers_upstream_runner")
def run_runner(size: Size, work: Path) -> list[Row]:
    return _one_mode("runner", size, work)


@part("peers_upstream_mitmdump")
def run_mitmdump(size: Size, work: Path) -> list[Row]:
    return _one_mode("mitmdump", size, work)


@part("peers_upstream_serve")
def run_serve(size: Size, work: Path) -> list[Row]:
    """Five bad proxies and a good one in one `wirefault serve`: every case, then the good
    proxy's healthy loop alone and during a storm of all five."""
    bad = BadUpstreams()
    healthy = HealthyLoop()
    seconds = 6.0 if size == FULL else 2.0
    try:
        proxies = {case: (*bad.address(case), "postgres") for case in CASES}
        proxies["good"] = ("127.0.0.1", healthy.echo_port, "raw")
        with serve_process(proxies, work) as proc:
            rows = [try_case(case, bad, proc, proc.ports[case], attempts(size), "serve")
                    for case in CASES]
            healthy.measure(proc.ports["good"], 0.5)  # warm-up
            alone = healthy.measure(proc.ports["good"], seconds)
            healthy.start(proc.ports["good"], seconds)
            storms = 0
            done = threading.Event()

            def storm() -> None:
                nonlocal storms
                while not done.is_set():
                    for case in CASES:
                        _many(5, lambda c=case: probe(proc.ports[c], wait=0.2))
                        storms += 5

            stormer = threading.Thread(target=storm)
            stormer.start()
            during = healthy.result()
            done.set()
            stormer.join()
            # alone again after: the machine's load drifts (other work shares its cores), so
            # the baseline is the slower of the two measurements around the storm
            after = healthy.measure(proc.ports["good"], seconds)
            alone = max(alone, after, key=lambda figures: figures["p50"])
            passed = ratio_ok(during, alone, size) and proc.alive()
            lost = "nothing" if passed else (
                f"{during['errors']} errors" if during["errors"] else "the loop slowed down")
            rows.append(Row(
                PART, "a healthy connection in the same serve process during all five",
                f"{during['n']:,} round trips, {storms:,} bad connections", lost,
                f"p50 {during['p50']} ms ({during['p50'] / alone['p50']:.2f}x alone "
                f"{alone['p50']} ms), p99 {during['p99']} ms (alone {alone['p99']} ms), "
                f"max {during.get('max', 0.0)} ms",
                passed))
    finally:
        healthy.close()
        bad.close()
    return rows
