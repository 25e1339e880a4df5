"""The FIFO client's lock is first come, first served: a client that takes it back to back
cannot starve one that waits (seen before the queue: a command client lost every race for
30 s behind a run of long dumps), and a waiter that gives up leaves the queue."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest
from proxy_helpers import wait_for

from wirefault.fifo_client import ProxyUnavailable, transport


def queued_tickets(lock_file: Path) -> int:
    """How many tickets (open-file-description locks) the kernel holds on `lock_file`."""
    inode = os.stat(lock_file).st_ino
    with open("/proc/locks") as locks:
        return sum(1 for line in locks
                   if "OFDLCK" in line and line.split()[5].endswith(f":{inode}"))


class Holder(threading.Thread):
    """Takes the lock, holds it until told to let go, then at once asks for it again."""

    def __init__(self, fifo: str, order: list[str]) -> None:
        super().__init__(daemon=True)
        self.fifo, self.order = fifo, order
        self.holding = threading.Event()
        self.let_go = threading.Event()

    def run(self) -> None:
        with transport.exclusive_lock(self.fifo, transport.Deadline(30)):
            self.holding.set()
            self.let_go.wait(30)
        with transport.exclusive_lock(self.fifo, transport.Deadline(30)):
            self.order.append("holder again")


def waiter(fifo: str, order: list[str], seconds: float = 30) -> threading.Thread:
    def run() -> None:
        with transport.exclusive_lock(fifo, transport.Deadline(seconds)):
            order.append("waiter")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def holding(tmp_path: Path) -> tuple[str, list[str], Holder]:
    """A FIFO path, the order clients got the lock in, and a holder that has it now."""
    fifo = str(tmp_path / "proxy.fifo")
    order: list[str] = []
    holder = Holder(fifo, order)
    holder.start()
    assert holder.holding.wait(10)
    return fifo, order, holder


def test_a_waiting_client_goes_before_one_that_takes_the_lock_back_to_back(tmp_path):
    fifo, order, holder = holding(tmp_path)
    lock_file = Path(transport.lock_path(fifo))
    waiting = waiter(fifo, order)
    wait_for(lambda: queued_tickets(lock_file) == 2, 10, "the waiter's ticket")
    holder.let_go.set()
    holder.join(30)
    waiting.join(30)
    assert order == ["waiter", "holder again"]


def test_a_waiter_that_gives_up_leaves_the_queue(tmp_path):
    fifo, order, holder = holding(tmp_path)
    with pytest.raises(ProxyUnavailable, match="queued before it"), \
            transport.exclusive_lock(fifo, transport.Deadline(0.2)):
        pass
    assert queued_tickets(Path(transport.lock_path(fifo))) == 1  # the holder's only
    holder.let_go.set()
    holder.join(30)
    assert order == ["holder again"]


def test_a_client_without_a_ticket_still_excludes(tmp_path):
    """A plain `flock` (an older client) on the lock file is still respected."""
    fifo = str(tmp_path / "proxy.fifo")
    lock_file = transport.lock_path(fifo)
    fd = os.open(lock_file, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ProxyUnavailable, match=r"held .* all along"), \
                transport.exclusive_lock(fifo, transport.Deadline(0.2)):
            pass
    finally:
        os.close(fd)
    with transport.exclusive_lock(fifo, transport.Deadline(5)):
        pass
