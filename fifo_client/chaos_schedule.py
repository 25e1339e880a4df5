"""The seeded schedule of a `wirefault chaos` run, computed before anything is armed.

Each fault draws its intervals from its own `random.Random(f"{seed}/{name}")`, so adding a
fault leaves the others' times alone. Every arming is a named fault on its proxy
(`faults.add("<name>")...`, lifted with `faults.remove("<name>")`), so windows on one proxy
may overlap: each is armed at its own time, whatever else is in force there. A window
cannot outlast `duration` (cut short there), and one that cannot start before `duration` is
dropped.

The run arms each window at its `arm` time on the scenario clock, which a must-fire wait
stops (see `chaos_clock`), and lifts it `disarm - arm` real seconds later.

A process fault's window is one application of its action: `arm` is when the process is
crashed, stopped or paused, `disarm` when it is restarted or resumed (`proxy` and `command`
are ""). Its `down` is drawn from the fault's own generator right after each arm time, so
network faults' windows are the same with or without process faults, and a fixed `down`
draws nothing. Its window is cut at `duration` like any other: the restart (or SIGCONT)
then happens at `duration` at the latest, so no run ends with a process left down.

`Schedule.to_json()` is what the run log records and `--replay` rebuilds from:

    {"seed": 7, "duration": 40.0,
     "windows": [WINDOW, ...],        # in arming order
     "dropped": [WINDOW, ...]}        # armings with no room before duration
    WINDOW = {"fault": "crash-sink", "name": "crash-sink:1", "arm": 2.345,
              "disarm": 2.9, "cut": false,
              "proxy": "", "command": "", "must_fire": null,     # network faults'
              "process": "sink", "action": "crash"}              # process faults' (else null)

`Schedule.from_json(data)` turns it back into an equal Schedule, ignoring further top-level
keys (the run log's schedule line adds `event`, `t`...); ValueError when `data` has another
shape.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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
    process: str | None = None
    """A process fault's process (then `proxy` and `command` are empty strings)."""
    action: str | None = None
    """A process fault's action: crash, stop or pause; `disarm - arm` is its drawn `down`."""

    @property
    def is_process_fault(self) -> bool:
        return self.process is not None

    @property
    def down(self) -> float:
        """A process fault's seconds between its action and the restart (or SIGCONT)."""
        return round(self.disarm - self.arm, 3)

    @property
    def arm_command(self) -> str:
        """What arms it: the scenario's rule as a named fault, `faults.add(name)...`
        (network faults)."""
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
        return [w for w in self.windows if w.proxy == proxy and not w.is_process_fault]

    def for_process(self, process: str) -> list[Window]:
        return [w for w in self.windows if w.process == process]

    def to_json(self) -> dict[str, Any]:
        """The schedule as JSON-ready data (the shape is in the module's docstring)."""
        return {"seed": self.seed, "duration": self.duration,
                "windows": [_window_json(w) for w in self.windows],
                "dropped": [_window_json(w) for w in self.dropped]}

    @classmethod
    def from_json(cls, data: Any) -> Schedule:
        """The Schedule `to_json()` gave `data` (further keys, such as the run log's
        `event` and `t`, are ignored); ValueError for anything else."""
        if not isinstance(data, dict) or not {"seed", "duration", "windows",
                                              "dropped"} <= set(data):
            raise ValueError("a schedule is {seed, duration, windows, dropped}")
        seed, duration = data["seed"], data["duration"]
        if isinstance(seed, bool) or not isinstance(seed, int) \
                or isinstance(duration, bool) or not isinstance(duration, int | float):
            raise ValueError("a schedule's seed is an integer, its duration a number")
        return cls(seed, float(duration), _windows_from_json(data["windows"]),
                   _windows_from_json(data["dropped"]))


_WINDOW_FIELDS = tuple(f.name for f in dataclasses.fields(Window))


def _window_json(window: Window) -> dict[str, Any]:
    return dataclasses.asdict(window)


def _windows_from_json(items: Any) -> tuple[Window, ...]:
    if not isinstance(items, list):
        raise ValueError("a schedule's windows are a list")
    windows = []
    for item in items:
        if not isinstance(item, dict) or set(item) != set(_WINDOW_FIELDS):
            raise ValueError(f"a window has the keys {', '.join(_WINDOW_FIELDS)}")
        window = Window(**item)
        for name in ("arm", "disarm"):
            value = getattr(window, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"a window's {name} is a number")
        for name in ("proxy", "fault", "command", "name"):
            if not isinstance(getattr(window, name), str):
                raise ValueError(f"a window's {name} is a string")
        windows.append(dataclasses.replace(window, arm=float(window.arm),
                                           disarm=float(window.disarm)))
    return tuple(windows)


def _arm_times(fault: FaultSpec, rng: random.Random, duration: float
               ) -> Iterator[tuple[float, float]]:
    """(arm time, down) per arming; `down` (process faults; else 0) is drawn right after
    its arm time, before the next interval."""
    def down() -> float:
        return fault.down.draw(rng) if fault.down is not None else 0.0

    if fault.every is None:
        moment = fault.start_after or 0.0
        yield moment, down()
        return
    moment = fault.start_after if fault.start_after is not None else fault.every.draw(rng)
    count = 0
    while moment < duration and (fault.times is None or count < fault.times):
        yield moment, down()
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
    planned: list[tuple[float, int, int, float, FaultSpec]] = []
    for order, fault in enumerate(scenario.faults):
        rng = random.Random(f"{seed}/{fault.name}")
        planned += [(round(t, 3), order, arming, down, fault) for arming, (t, down) in
                    enumerate(_arm_times(fault, rng, scenario.duration), 1)]
    windows: list[Window] = []
    dropped: list[Window] = []
    for moment, _, arming, down, fault in sorted(planned, key=lambda item: item[:2]):
        name = f"{bases[fault.name]}:{arming}"
        if fault.is_process_fault:
            end = round(moment + down, 3)
            window = Window("", fault.name, "", moment, min(end, scenario.duration), name,
                            end > scenario.duration, None, fault.process, fault.action)
        else:
            end = round(moment + fault.armed, 3)
            window = Window(fault.proxy or "", fault.name, fault.command or "", moment,
                            min(end, scenario.duration), name, end > scenario.duration,
                            fault.must_fire)
        (dropped if moment >= scenario.duration else windows).append(window)
    return Schedule(seed, scenario.duration, tuple(windows), tuple(dropped))
