"""The seeded schedule of a `wirefault chaos` run, computed before anything is armed.

Each fault draws its intervals from its own `random.Random(f"{seed}/{name}")`, so adding a
fault leaves the others' times alone. Every arming is a named fault on its proxy
(`faults.add("<name>")...`, lifted with `faults.remove("<name>")`), so windows on one proxy
may overlap: each is armed at its own time, whatever else is in force there. A window
cannot outlast `duration` (cut short there), and one that cannot start before `duration` is
dropped.

The run arms each window at its `arm` time on the scenario clock, which a must-fire wait
stops (see `chaos_clock`), and lifts it `disarm - arm` real seconds later.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from .builder import fault_command, render_literal
from .chaos_scenario import FaultSpec, Scenario

NAME_BASE_CHARS = 48
"""Room left in a fault name (64 characters) for ":<arming>" and a disambiguating suffix."""
_NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9_.:-]")


@dataclass(frozen=True)
class Window:
    """One arming of a fault: armed at `arm`, lifted at `disarm` (seconds since start)."""

    proxy: str
    fault: str
    command: str
    """The scenario's command, as written (`conn.onQuery().kill()`)."""
    arm: float
    disarm: float
    name: str
    """The fault's name on the proxy, unique in the run: `<fault>:<arming number>`."""
    cut: bool = False
    """True when `duration` cut the window short."""
    must_fire: float | None = None
    """The fault's `must_fire`: the window stays armed past `disarm` until it fired."""

    @property
    def arm_command(self) -> str:
        """What arms it: the scenario's rule as a named fault, `faults.add(name)...`."""
        return fault_command(self.name, self.command)

    @property
    def lift_command(self) -> str:
        return f"faults.remove({render_literal(self.name)})"


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


def fault_name_bases(faults: tuple[FaultSpec, ...]) -> dict[str, str]:
    """Scenario fault name -> the start of its names on the proxies: the scenario's name
    with characters a fault name cannot hold replaced by '_', cut to NAME_BASE_CHARS, and
    made unique (with `.<position>`) when two faults would otherwise share it."""
    bases: dict[str, str] = {}
    taken: set[str] = set()
    for position, fault in enumerate(faults, 1):
        base = _NOT_IN_NAMES.sub("_", fault.name)[:NAME_BASE_CHARS]
        if not base[0].isalnum():  # names start with a letter or digit
            base = "f" + base[:NAME_BASE_CHARS - 1]
        unique, suffix = base, position
        while unique in taken:
            unique = f"{base[:NAME_BASE_CHARS - 7]}.{suffix}"
            suffix += len(faults)
        taken.add(unique)
        base = unique
        bases[fault.name] = base
    return bases


def build_schedule(scenario: Scenario, seed: int | None = None) -> Schedule:
    """Every window of the run, in arming order; the same seed gives the same schedule."""
    seed = scenario.seed if seed is None else seed
    bases = fault_name_bases(scenario.faults)
    planned: list[tuple[float, int, int, FaultSpec]] = []
    for order, fault in enumerate(scenario.faults):
        rng = random.Random(f"{seed}/{fault.name}")
        planned += [(round(t, 3), order, arming, fault) for arming, t in
                    enumerate(_arm_times(fault, rng, scenario.duration), 1)]
    windows: list[Window] = []
    dropped: list[Window] = []
    for moment, _, arming, fault in sorted(planned, key=lambda item: item[:2]):
        end = round(moment + fault.armed, 3)
        window = Window(fault.proxy, fault.name, fault.command, moment,
                        min(end, scenario.duration), f"{bases[fault.name]}:{arming}",
                        end > scenario.duration, fault.must_fire)
        (dropped if moment >= scenario.duration else windows).append(window)
    return Schedule(seed, scenario.duration, tuple(windows), tuple(dropped))
