"""The fired-fault log of every proxy, numbered, for the HTTP API's long-poll (`/api/events`).

Each proxy's `RuleEngine.on_fired` is pointed at `EventHub.record` (with the proxy's name):
a firing costs one append and, only when a request waits, waking it. Nothing is added to the
per-read path. Sequence numbers start at 1 and grow across all proxies of the process; the
hub keeps the newest `EVENT_LOG_SIZE` events.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .proxy_registry import ProxyRegistry
    from .rules import Firing

EVENT_LOG_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Event:
    sequence: int
    proxy: str
    firing: Firing

    def as_json(self) -> dict[str, Any]:
        f = self.firing
        return {"sequence": self.sequence, "proxy": self.proxy, "time": f.time,
                "fault": f.fault, "conn": f.connection, "client": f.client,
                "frame": f.frame, "action": f.action}


class EventHub:
    def __init__(self, registry: ProxyRegistry) -> None:
        self.registry = registry
        self.events: deque[Event] = deque(maxlen=EVENT_LOG_SIZE)
        self.last = 0
        """The sequence number of the newest event (0: none yet)."""
        self._wake: asyncio.Event | None = None
        self._closed = False
        self._hooked: dict[int, str] = {}

    def hook(self) -> None:
        """Point every proxy's engine at this hub (cheap: called on each API request, so
        proxies added by any route are hooked)."""
        for name, proxy in self.registry.proxies.items():
            engine = proxy.runtime.engine
            if self._hooked.get(id(engine)) != name or engine.on_fired is None:
                engine.on_fired = functools.partial(self.record, name)
                self._hooked[id(engine)] = name

    def unhook(self) -> None:
        for proxy in self.registry.proxies.values():
            proxy.runtime.engine.on_fired = None
        self._hooked.clear()

    def record(self, proxy: str, firing: Firing) -> None:
        self.last += 1
        self.events.append(Event(self.last, proxy, firing))
        if self._wake is not None:
            self._wake.set()
            self._wake = None

    def after(self, sequence: int, proxy: str | None = None,
              fault: str | None = None) -> list[Event]:
        """The events newer than `sequence`, oldest first, optionally of one proxy/fault."""
        if sequence >= self.last:
            return []
        found = []
        for event in reversed(self.events):
            if event.sequence <= sequence:
                break
            if (proxy is None or event.proxy == proxy) and \
                    (fault is None or event.firing.fault == fault):
                found.append(event)
        found.reverse()
        return found

    async def wait(self, sequence: int, timeout: float, proxy: str | None = None,
                   fault: str | None = None) -> list[Event]:
        """`after(...)` at once if there is any, else as soon as one fires, else [] after
        `timeout` seconds (or when the server stops)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.after(sequence, proxy, fault)
            remaining = deadline - time.monotonic()
            if found or remaining <= 0 or self._closed:
                return found
            sequence = max(sequence, self.last)  # what is skipped did not match
            if self._wake is None:
                self._wake = asyncio.Event()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return []

    def close(self) -> None:
        """Wake every waiting request (the server stops)."""
        self._closed = True
        if self._wake is not None:
            self._wake.set()
            self._wake = None
        self.unhook()
