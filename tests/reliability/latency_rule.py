"""The healthy connection's latency verdict, shared by the parts that run one beside a flood
(input_frames, input_http, peers_upstream).

FULL keeps the issue's criterion: the healthy loop's median during the flood within 2x of
the same loop alone, measured in the same run (plus half a millisecond of scheduling noise
on a median of a tenth of one). QUICK runs in `make test` on shared, busy CI machines,
where the other processes' load comes and goes within a run: there a 2x rule on a
sub-millisecond median fails on wall-clock luck (seen: 2.2x to 6x with the proxy doing
nothing wrong). So QUICK asserts what is robust to that and still catches what breaks a
user: the loop never fails and never gets a wrong answer (each part checks that itself),
never stalls (no round trip over STALL seconds), and its median stays within QUICK_FACTOR x
alone or alone + QUICK_SLACK, whichever is larger (a proxy that serialised the healthy
connection behind the flood would be far past both). The figures are reported either way.
"""

from __future__ import annotations

from campaign import FULL, Size

FULL_FACTOR = 2.0
"""The issue's bound on the median during the flood, against the same loop alone."""
FULL_SLACK = 0.0005
"""Seconds added in FULL: a median of 0.1 ms doubles on one context switch."""
QUICK_FACTOR = 10.0
QUICK_SLACK = 0.050
"""QUICK's bound on the median: QUICK_FACTOR x alone or alone + QUICK_SLACK seconds."""
STALL = 5.0
"""Seconds: a round trip longer than this is a stall, at either size (unless a part
passes a tighter bound of its own for FULL)."""


def median_bound(size: Size, alone: float) -> float:
    """The largest median (seconds) the healthy loop may show during the flood."""
    if size == FULL:
        return FULL_FACTOR * alone + FULL_SLACK
    return max(QUICK_FACTOR * alone, alone + QUICK_SLACK)


def latency_problems(size: Size, alone: float, during: float, worst: float,
                     what: str = "healthy loop", full_stall: float = STALL) -> list[str]:
    """What the healthy loop's latencies (seconds: its median alone and during the flood,
    its worst round trip during) break at `size`; empty when nothing."""
    problems = []
    if during > median_bound(size, alone):
        problems.append(f"{what} median {during / alone:.1f}x alone during the flood "
                        f"({during * 1000:.2f} ms, alone {alone * 1000:.2f} ms)")
    stall = full_stall if size == FULL else STALL
    if worst > stall:
        problems.append(f"{what} stalled {worst * 1000:.0f} ms (bound {stall:g} s)")
    return problems
