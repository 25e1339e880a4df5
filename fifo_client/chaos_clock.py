"""The scenario clock: seconds since the run started, stopped while a must-fire fault waits.

A must-fire window that reaches its planned lift without having fired holds the clock
until it fires (or gives up). Every proxy arms its faults by this clock, so no fault is
armed anywhere meanwhile, and the faults meant to be armed together (one that needs a
reconnection, another on a second link that forces one) stay together however long the
wait. Faults already armed keep their armed time in real seconds: they are lifted on time
(so they cannot starve the waiting fault of its trigger), or wait to fire themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class ScenarioClock:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self._held_before = 0.0
        """Seconds the clock stood still in holds that are over."""
        self._hold_started: float | None = None
        self._holders = 0
        self._changed = asyncio.Event()
        """Set (then replaced) whenever a hold starts or ends."""

    def start(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        """Wall-clock seconds since the start, holds included (the timeline's `t`)."""
        return time.monotonic() - self.started

    def now(self) -> float:
        """Scenario seconds: wall-clock seconds since the start, minus the holds."""
        return self.elapsed() - self.held()

    def held(self) -> float:
        """Seconds the clock has stood still so far."""
        current = 0.0 if self._hold_started is None else time.monotonic() - self._hold_started
        return self._held_before + current

    def hold(self) -> None:
        self._holders += 1
        if self._holders == 1:
            self._hold_started = time.monotonic()
            self._signal()

    def release(self) -> None:
        self._holders -= 1
        if self._holders == 0 and self._hold_started is not None:
            self._held_before += time.monotonic() - self._hold_started
            self._hold_started = None
            self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, moment: float) -> None:
        """Return once the scenario clock reads `moment`."""
        while (remaining := moment - self.now()) > 0:
            changed = self._changed
            # While held, nothing but the release can bring `moment` closer.
            timeout = None if self._holders else remaining
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)
