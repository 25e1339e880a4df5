"""The seeded schedule of a `wirefault chaos` run, computed before anything is armed.

Each fault draws its intervals from its own `random.Random(f"{seed}/{name}")`, so adding a
fault leaves the others' times alone. A proxy holds one rule at a time, so faults on the
same proxy never overlap: when a window would start while another is armed on that proxy,
it is postponed until that one is lifted (shown as "postponed"); a window cannot outlast
`duration` (cut short there), and one that cannot start before `duration` is dropped.

The run arms each window at its `arm` time on the scenario clock, which a must-fire wait
stops (see `chaos_clock`), and lifts it `disarm - arm` real seconds later.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from .chaos_scenario import FaultSpec, Scenario


@dataclass(frozen=True)
class Window:
    """One arming of a fault: armed at `arm`, lifted at `disarm` (seconds since start)."""

    proxy: str
    fault: str
    command: str
    planned: float
    arm: float
    disarm: float
    cut: bool = False
    """True when `duration` cut the window short."""
    must_fire: float | None = None
    """The fault's `must_fire`: the window stays armed past `disarm` until it fired."""

    @property
    def postponed(self) -> float:
        return round(self.arm - self.planned, 3)


@dataclass(frozen=True)
class Schedule:
    seed: int
    duration: float
    windows: tuple[Window, ...]
    dropped: tuple[Window, ...] = ()

    def for_proxy(self, proxy: str) -> list[Window]:
        return [w for w in self.windows if w.proxy == proxy]


def _arm_times(fault: FaultSpec, rng: random.Random, duration: float) -> Iterator[float]:
    if fault.every is None:
        yield fault.start_after or 0.0
        return
    moment = fault.start_after if fault.start_after is not None else fault.every.draw(rng)
    count = 0
    while moment < duration and (fault.times is None or count < fault.times):
        yield moment
        count += 1
        moment += fault.every.draw(rng)


def build_schedule(scenario: Scenario, seed: int | None = None) -> Schedule:
    """Every window of the run, in arming order; the same seed gives the same schedule."""
    seed = scenario.seed if seed is None else seed
    planned: list[tuple[float, int, FaultSpec]] = []
    for order, fault in enumerate(scenario.faults):
        rng = random.Random(f"{seed}/{fault.name}")
        planned += [(round(t, 3), order, fault)
                    for t in _arm_times(fault, rng, scenario.duration)]
    windows: list[Window] = []
    dropped: list[Window] = []
    free_at = dict.fromkeys(scenario.proxies, 0.0)
    for moment, _, fault in sorted(planned, key=lambda item: item[:2]):
        arm = max(moment, free_at[fault.proxy])
        end = round(arm + fault.armed, 3)
        window = Window(fault.proxy, fault.name, fault.command, moment, arm,
                        min(end, scenario.duration), end > scenario.duration, fault.must_fire)
        if arm >= scenario.duration:
            dropped.append(window)
            continue
        windows.append(window)
        free_at[fault.proxy] = window.disarm
    return Schedule(seed, scenario.duration, tuple(windows), tuple(dropped))
