"""One direction of a relayed connection: what waits to go out, and how it is shaped.

A lane is empty and unshaped almost always, and then the layer forwards a read as it came.
Otherwise what arrives waits in the lane's queue, in order, and leaves when the lane is free:
- frames not judged yet (they arrived while the lane was held);
- `Held` frames, judged already, waiting for their hold (delay, a pause, hang) to end, which
  go out without being judged again;
- `Out` bytes, judged and ready, paced by the lane's throttle, cut by its limit, and apart
  by a slice's gap;
- `Closed` markers: the source's close, passed on in order (later, with slow_close);
- `Arrived` markers: when the frames behind them arrived, which their delays count from.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from mitmproxy.connection import Connection
from mitmproxy.proxy import commands

from wirefault.protocols import Frame

from .rules import Judgement

THROTTLE_TICK = 0.05
"""A throttled lane writes at most this many seconds' worth of bytes at a time, so a large
frame is paced, not written at once and then waited for."""


class Held:
    """A judged frame that waits for a hold, then goes out as `judgement` says."""

    __slots__ = ("data", "frame", "judgement")

    def __init__(self, frame: Frame, judgement: Judgement, data: bytes) -> None:
        self.frame = frame
        self.judgement = judgement
        self.data = data


class Out:
    """Bytes ready to go; `gap` seconds pass before what follows them."""

    __slots__ = ("data", "gap")

    def __init__(self, data: bytes, gap: float = 0.0) -> None:
        self.data = data
        self.gap = gap


class Closed:
    """The source side closed; `waited` once slow_close has held it."""

    __slots__ = ("connection", "waited")

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.waited = False


class Arrived:
    """When the frames behind it arrived (the runtime's clock): a delay counts from a
    frame's arrival, so frames that waited behind a delayed one are not delayed again in
    full (latency, as Toxiproxy and netem mean it, not one delay after another)."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at


Item = Frame | Held | Out | Closed | Arrived


@dataclass(eq=False, slots=True)
class Lane:
    source: Connection
    dest: Connection
    from_client: bool
    queue: deque[Item]
    queued_bytes: int = 0
    hold: commands.RequestWakeup | None = None
    """A delay (or connect_delay) holds this lane."""
    busy: commands.RequestWakeup | None = None
    """Pacing: the throttle's next slot, a slice's gap, a slow close."""
    rate: float | None = None
    """throttle(): bytes per second."""
    next_free: float = 0.0
    """When the throttle lets the next byte out (the runtime's clock)."""
    limit: int | None = None
    """limit(): bytes the lane may still carry before the connection is closed."""
    reading_stopped: bool = False
    arrived: float | None = None
    """When the frames now judged from the queue arrived (their `Arrived` marker)."""
    slow: bool = False
    """Anything makes a read take the queue (see `WirefaultLayer._update_lanes`)."""

    @classmethod
    def between(cls, source: Connection, dest: Connection, from_client: bool) -> Lane:
        return cls(source, dest, from_client, deque())

    @property
    def shaped(self) -> bool:
        return self.rate is not None or self.limit is not None

    def clear(self) -> None:
        self.queue.clear()
        self.queued_bytes = 0

    def push_front(self, items: list[Item]) -> None:
        self.queue.extendleft(reversed(items))
        self.queued_bytes += sum(_size(item) for item in items)

    def push_back(self, items: list[Item]) -> None:
        self.queue.extend(items)
        self.queued_bytes += sum(_size(item) for item in items)

    def pop(self) -> Item:
        item = self.queue.popleft()
        self.queued_bytes -= _size(item)
        return item

    def take_piece(self, now: float) -> tuple[bytes, bool] | float:
        """The next piece of the `Out` at the front that may go now, and whether it was
        the last of it; or, when the throttle allows nothing yet, the seconds to wait."""
        item = self.queue[0]
        assert type(item) is Out
        data = item.data
        rate = self.rate
        if rate is None:
            self.pop()
            return data, True
        if self.next_free > now + 1e-4:
            return self.next_free - now
        most = max(1, int(rate * THROTTLE_TICK))
        if len(data) > most:
            piece, item.data = data[:most], data[most:]
            self.queued_bytes -= most
            whole = False
        else:
            self.pop()
            piece, whole = data, True
        # A timer that woke late is made up (the rate holds on average); after an idle
        # spell the lane starts from now, so it never bursts what it did not use.
        start = self.next_free if now - self.next_free < THROTTLE_TICK else now
        self.next_free = start + len(piece) / rate
        return piece, whole


def _size(item: Item) -> int:
    kind = type(item)
    return 0 if kind is Closed or kind is Arrived else len(item.data)  # type: ignore[union-attr]
