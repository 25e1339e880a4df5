"""The network side of a `wirefault chaos` run: arming and lifting faults on the proxies.

Every arming is a named fault on its proxy: the scenario's `conn.*` rule sent as
`faults.add("<fault>:<arming>")...` and lifted with `faults.remove(...)`, so several faults
are in force on one proxy at once. Each window runs on its own task, and each proxy's
exchanges take turns, so a slow proxy never delays another's faults. A fault with
`must_fire` stays armed past its planned lift until it fired, for at most `must_fire`
seconds since its arming, and meanwhile holds the scenario clock (`chaos_clock`) that every
proxy arms its faults by. The proxy counts each fault's firings: the runner polls that
count (the fault's `fired` in `faults.list()`) once the arming command returned, and the
fault fired when it is 1 or more. Just before lifting any arming it asks that count once
more, for the summary's "fired" column. The runner never reads a proxy's recorder, so all
it recorded during the run is still there afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .chaos_clock import ScenarioClock
from .chaos_report import FaultCount, Reporter, Tally, window_note
from .chaos_scenario import Scenario
from .chaos_schedule import Window
from .client import LIST_FAULTS, FaultProxy
from .errors import WirefaultError

WATCH_INTERVAL = 0.1
"""Seconds between two `faults.list()` polls of a proxy whose must-fire fault is armed."""

T = TypeVar("T")


class CannotStart(WirefaultError):
    """The run cannot begin: nothing was armed."""


class ProxyUnreachable(CannotStart):
    pass


class NetworkFaults:
    def __init__(self, scenario: Scenario, clock: ScenarioClock, reporter: Reporter,
                 tally: Tally) -> None:
        self.clock = clock
        self.reporter = reporter
        self.tally = tally
        self.clients = {name: FaultProxy(spec.target, timeout=scenario.timeout)
                        for name, spec in scenario.proxies.items()}
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._turns: dict[str, asyncio.Lock] = {}
        """Per proxy: its exchanges queue here, in order, each with its whole timeout
        (rather than in the client's thread lock, whose wait counts against it)."""

    def elapsed(self) -> float:
        return self.clock.elapsed()

    def count(self, window: Window) -> FaultCount:
        return self.tally.faults.setdefault(window.fault, FaultCount("network", window.proxy))

    async def preflight(self) -> None:
        """Every proxy must answer before anything is armed; all start from allow()."""
        for name, client in self.clients.items():
            try:
                await asyncio.to_thread(client.allow)
            except WirefaultError as exc:
                raise ProxyUnreachable(f"proxy {name}: {exc}") from None

    async def drive(self, window: Window) -> None:
        # The armed time is real seconds from the arming, whatever holds the clock: a fault
        # armed before a hold is lifted on time, it cannot starve the waiting one.
        lift_at = time.monotonic() + window.disarm - window.arm
        if not await self._send(window, window.arm_command, "armed", window.command,
                                window_note(window)):
            return  # nothing to lift: the proxy refused the fault
        self.tally.note_armed(window.proxy)
        count = self.count(window)
        count.applied += 1
        try:
            if window.must_fire is not None:
                await self._keep_armed_until_fired(window, lift_at)
            await asyncio.sleep(max(0.0, lift_at - time.monotonic()))
            frames = await self._frames(window)
        except asyncio.CancelledError:  # the run stopped: conn.allow() lifts it, uncounted
            count.unknown += 1
            raise
        await self._lift(window, frames)

    async def _lift(self, window: Window, frames: int | None) -> None:
        """`faults.remove(...)`; a lift the proxy did not take is tried once more, then the
        proxy is set back to conn.allow(): a fault must never stay armed past its window,
        against the schedule (the run then ends with the error)."""
        for _attempt in range(2):
            try:
                await self._call(window.proxy, self.clients[window.proxy].send,
                                 window.lift_command)
            except WirefaultError as exc:
                problem = str(exc)
                continue
            self.reporter.step("disarmed", self.elapsed(), window.proxy, window.fault,
                               window.lift_command, name=window.name, fired=frames)
            return
        try:
            await self._call(window.proxy, self.clients[window.proxy].allow)
            fallback = "the proxy was set back to conn.allow() (every fault on it removed)"
        except WirefaultError as exc:
            fallback = f"conn.allow() failed too: {exc}"
        self._error(window, window.lift_command,
                    f"could not lift the fault: {problem}; {fallback}")

    async def _call(self, proxy: str, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in a thread, after this proxy's earlier exchanges. A cancelled
        run still waits for it (in `lift_everything`), so no arming can land after the
        final conn.allow()."""
        async with self._turns.setdefault(proxy, asyncio.Lock()):
            future = asyncio.get_running_loop().run_in_executor(None, function, *args)
            self._in_flight.add(future)
            future.add_done_callback(self._in_flight.discard)
            return await asyncio.shield(future)

    async def _send(self, window: Window, command: str, event: str, shown: str,
                    note: str = "", **extra: Any) -> bool:
        """Send `command`; the timeline shows `shown` (the scenario's rule, for an arming)."""
        try:
            await self._call(window.proxy, self.clients[window.proxy].send, command)
        except WirefaultError as exc:
            self._error(window, shown, str(exc))
            return False
        self.reporter.step(event, self.elapsed(), window.proxy, window.fault, shown, note,
                           name=window.name, **extra)
        return True

    def _error(self, window: Window, command: str, problem: str) -> None:
        moment = self.elapsed()
        self.tally.errors.append(f"+{moment:.3f}s {window.proxy} {window.fault}: {problem}")
        self.reporter.step("error", moment, window.proxy, window.fault, command, problem,
                           name=window.name, error=problem)

    async def _frames(self, window: Window) -> int | None:
        """The frames this arming acted on, asked once just before its lift (None when
        the proxy cannot say: the lift that follows reports what went wrong, if anything)."""
        count = self.count(window)
        try:
            listed = await self._call(window.proxy, self.clients[window.proxy].faults)
        except WirefaultError:
            count.unknown += 1
            return None
        fault = next((info for info in listed if info.name == window.name), None)
        if fault is None:
            count.unknown += 1
            return None
        if fault.fired >= 1:
            count.fired += 1
            count.frames += fault.fired
        return fault.fired

    # -- must_fire -------------------------------------------------------------------------

    async def _keep_armed_until_fired(self, window: Window, lift_at: float) -> None:
        """Poll the proxy until the fault fired: until its planned lift (`lift_at`,
        monotonic), then holding the scenario clock, for at most `must_fire` seconds since
        the arming."""
        assert window.must_fire is not None
        deadline = time.monotonic() + window.must_fire
        holding = False
        try:
            while not await self._fired(window):
                now = time.monotonic()
                # Past its lift it waited, even when a slow poll also took it past its bound.
                if not holding and lift_at <= now and lift_at < deadline:
                    holding = True
                    self.clock.hold()
                    self.reporter.step("waiting", self.elapsed(), window.proxy, window.fault,
                                       window.command, "not fired yet: scenario clock held",
                                       name=window.name)
                if now >= deadline:
                    self._error(window, window.command,
                                f"did not fire within {window.must_fire:g}s of being armed")
                    return
                wake = min(deadline, now + WATCH_INTERVAL)
                if not holding:  # be there at the planned lift, to hold the clock on time
                    wake = min(wake, lift_at)
                await asyncio.sleep(wake - now)
        finally:
            if holding:
                self.clock.release()

    async def _fired(self, window: Window) -> bool:
        """Ask the proxy once: True when this arming's fault fired (its own count in
        `faults.list()`, whatever other faults do), or when the proxy cannot say (an error,
        or the fault is gone: nothing more can be seen)."""
        try:
            listed = await self._call(window.proxy, self.clients[window.proxy].faults)
        except WirefaultError as exc:
            self._error(window, LIST_FAULTS, str(exc))
            return True
        fault = next((info for info in listed if info.name == window.name), None)
        if fault is None:  # removed behind the run's back (conn.* or faults.* by hand)
            self._error(window, LIST_FAULTS, f"fault {window.name} is no longer on the "
                                             f"proxy: it can no longer be seen firing")
            return True
        if fault.fired < 1:
            return False
        self.tally.note_fired(window.proxy)
        frames = fault.fired
        self.reporter.step("fired", self.elapsed(), window.proxy, window.fault, window.command,
                           f"acted on {frames} frame{'' if frames == 1 else 's'}",
                           name=window.name, frames=frames)
        return True

    # -- the end ---------------------------------------------------------------------------

    async def lift_everything(self) -> None:
        """Leave no fault armed, whatever happened (a cancelled run included): let the
        exchanges still in flight finish, then conn.allow() everywhere."""
        if self._in_flight:
            await asyncio.wait(list(self._in_flight))
        for client in self.clients.values():
            with contextlib.suppress(WirefaultError):
                await asyncio.to_thread(client.allow)
        self.tally.held = self.clock.held()
