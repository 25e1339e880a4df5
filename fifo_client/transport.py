"""One command/reply exchange over the proxy's FIFO, bounded by a deadline.

Every wait is a `poll`/`select` with a timeout, and every open is non-blocking, so nothing
here can hang past the deadline however the proxy behaves. The steps, and why:

1. open the FIFO for writing with O_NONBLOCK, retrying on ENXIO (nothing reads the FIFO
   yet: the proxy is not running, or still busy replying to someone else);
2. write the command, then wait until the proxy has read all of it (FIONREAD on our end
   drops to 0) before closing. Closing earlier and opening our reply reader while the
   command is still in the pipe would let us read our own command back as the reply;
3. open the FIFO for reading with O_NONBLOCK and poll it: POLLIN while the reply arrives,
   POLLHUP once the proxy closed its writer. Linux reports POLLHUP to this reader only
   after a writer came and went since it opened, so `read() == b""` counts as end of reply
   only when POLLHUP was seen.

Callers serialise whole exchanges (see `exclusive_lock`: first come, first served): the
FIFO carries one conversation at a time.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import os
import select
import stat
import struct
import termios
import threading
import time
from collections.abc import AsyncIterator, Iterator

from .errors import ProxyUnavailable, WirefaultError

FIRST_DELAY = 0.0002
MAX_DELAY = 0.02
READ_CHUNK = 64 * 1024


def pause(seconds: float) -> None:
    """Wait without `time.sleep`: a `select` on no descriptors."""
    if seconds > 0:
        select.select([], [], [], seconds)


class Deadline:
    """A point in monotonic time shared by every step of one exchange."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def poll_ms(self) -> int:
        """The remaining time for `poll()`, in whole milliseconds, at least 1."""
        return max(1, int(self.remaining() * 1000) + 1)


class Backoff:
    """Waits growing from FIRST_DELAY to MAX_DELAY, never past the deadline."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline
        self.delay = FIRST_DELAY

    def wait(self) -> bool:
        """Wait a little; False (without waiting) once the deadline has passed."""
        if self.deadline.passed:
            return False
        pause(min(self.delay, self.deadline.remaining()))
        self.delay = min(self.delay * 2, MAX_DELAY)
        return True


def _unavailable(path: str, deadline: Deadline, why: str) -> ProxyUnavailable:
    return ProxyUnavailable(
        f"no proxy answered on FIFO {path} within {deadline.seconds:g} s ({why})", path)


# -- locking --------------------------------------------------------------------------------


def lock_path(fifo_path: str) -> str:
    """The sidecar file whose `flock` serialises clients of one FIFO."""
    return f"{fifo_path}.lock"


QUEUE_MAX_DELAY = 0.005
"""The longest wait between two looks at the queue: the next in line starts at most this
long after the previous holder finished."""
_FLOCK_STRUCT = struct.Struct("hhqqi4x")
"""Linux's `struct flock` (type, whence, start, length, pid), as F_OFD_* take it."""


@contextlib.contextmanager
def exclusive_lock(fifo_path: str, deadline: Deadline) -> Iterator[None]:
    """Hold an exclusive `flock` on `<fifo>.lock` (created if missing) for one exchange,
    after every client that asked for it earlier (first come, first served)."""
    path = lock_path(fifo_path)
    fd = _open_lock_file(path, fifo_path, deadline)
    try:
        ticket = _take_ticket(fd)
        _wait_for_turn(fd, ticket, path, fifo_path, deadline)
        backoff = Backoff(deadline)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # a client that takes no ticket (an older version)
                if not backoff.wait():
                    raise _unavailable(fifo_path, deadline,
                                       f"another client held {path} all along") from None
        yield
    finally:
        os.close(fd)  # releases the ticket and the lock: the next in line goes on


# The queue. Polling a plain `flock` is a race the waiter loses to a client that takes the
# lock back to back: it releases and retakes within microseconds, the waiter looks every
# 20 ms (seen: a command client waiting 30 s behind a run of long dumps). So each client
# first takes a ticket, the time it arrived in nanoseconds, as a shared byte-range lock at
# that offset of the lock file (an open-file-description lock: per open, so threads of one
# process queue too; released when the file is closed, so a client that dies leaves the
# queue), and waits until no ticket below its own remains. The `flock` still does the
# excluding; the tickets only decide who tries for it next.


def _ofd_lock(fd: int, command: int, lock_type: int, start: int, length: int) -> int:
    request = _FLOCK_STRUCT.pack(lock_type, os.SEEK_SET, start, length, 0)
    return _FLOCK_STRUCT.unpack(fcntl.fcntl(fd, command, request))[0]


def _take_ticket(fd: int) -> int:
    """A shared lock on one byte at offset now-in-ns (wall clock: shared by every process on
    the host, containers included; a clock step only reorders the queue once)."""
    ticket = time.time_ns()
    _ofd_lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, ticket, 1)  # shared: never refused
    return ticket


def _wait_for_turn(fd: int, ticket: int, path: str, fifo_path: str,
                   deadline: Deadline) -> None:
    delay = FIRST_DELAY
    # Any ticket in [0, ticket) conflicts with a write lock there: the earlier arrivals.
    while _ofd_lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, 0, ticket) != fcntl.F_UNLCK:
        if deadline.passed:
            raise _unavailable(fifo_path, deadline,
                               f"the clients queued before it on {path} held it all along")
        pause(min(delay, deadline.remaining()))
        delay = min(delay * 2, QUEUE_MAX_DELAY)


def _open_lock_file(path: str, fifo_path: str, deadline: Deadline) -> int:
    backoff = Backoff(deadline)
    while True:
        try:
            # flock needs no write access: read-only lets users share a lock file.
            # O_NOFOLLOW: a symlink planted in a shared directory would make O_CREAT
            # create (or this lock open) a file wherever it points.
            return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                           0o644)
        except FileNotFoundError:  # the FIFO's directory does not exist (yet)
            if not backoff.wait():
                raise _unavailable(fifo_path, deadline, "the FIFO does not exist") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise WirefaultError(f"lock file {path} is a symbolic link; refusing to "
                                     "follow it") from None
            raise WirefaultError(f"cannot open lock file {path}: {exc.strerror}") from None


@contextlib.contextmanager
def thread_lock(lock: threading.Lock, fifo_path: str, deadline: Deadline) -> Iterator[None]:
    """Hold `lock` (one per client object: flock does not exclude threads sharing it)."""
    if not lock.acquire(timeout=deadline.remaining()):
        raise _unavailable(fifo_path, deadline, "another thread kept the client busy")
    try:
        yield
    finally:
        lock.release()


# -- the exchange ---------------------------------------------------------------------------


class ForkGuard:
    """Keeps this process's FIFO exchanges and its forks apart.

    The FIFO protocol reads meaning into how many ends are open: the proxy takes the end of
    the command when every writer closed, and a client may write once the proxy reads. A
    child forked while an exchange is in flight holds copies of the exchange's descriptors
    until it execs (O_CLOEXEC or not), and that is enough to glue two commands together or
    to make a reply look unread. So exchanges (any number at once, in any threads) wait
    while a fork is under way, and a fork waits until no exchange is in flight; forks come
    first, so a stream of exchanges cannot starve them. `wirefault chaos` spawns every
    process under `forking()`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._exchanges = 0
        self._forks_waiting = 0
        self._forking = False

    @contextlib.contextmanager
    def exchange(self) -> Iterator[None]:
        with self._cond:
            while self._forking or self._forks_waiting:
                self._cond.wait()
            self._exchanges += 1
        try:
            yield
        finally:
            with self._cond:
                self._exchanges -= 1
                self._cond.notify_all()

    def _begin_fork(self) -> None:
        with self._cond:
            self._forks_waiting += 1
            try:
                while self._exchanges or self._forking:
                    self._cond.wait()
            finally:
                self._forks_waiting -= 1
            self._forking = True

    def _end_fork(self) -> None:
        with self._cond:
            self._forking = False
            self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def forking(self) -> AsyncIterator[None]:
        """Around a spawn on an event loop: waits (in a thread, so the loop goes on) for
        the exchanges in flight, then holds new ones off until the block ends."""
        await asyncio.to_thread(self._begin_fork)
        try:
            yield
        finally:
            self._end_fork()


FORKS = ForkGuard()


def exchange(fifo_path: str, command: bytes, deadline: Deadline) -> bytes:
    """Send `command`, return the proxy's whole reply (ProxyUnavailable at the deadline)."""
    with FORKS.exchange():
        writer = _open_writer(fifo_path, deadline)
        try:
            _write_all(writer, command, fifo_path, deadline)
            _wait_consumed(writer, fifo_path, deadline)
        finally:
            os.close(writer)
        return _read_reply(fifo_path, deadline)


def _open_writer(path: str, deadline: Deadline) -> int:
    backoff = Backoff(deadline)
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            why = "the FIFO does not exist"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise WirefaultError(f"{path} is a symbolic link, not a FIFO; refusing to "
                                     "follow it") from None
            if exc.errno != errno.ENXIO:
                raise WirefaultError(f"cannot open FIFO {path}: {exc.strerror}") from None
            why = "nothing reads the FIFO"
        else:
            _check_is_fifo(fd, path)
            return fd
        if not backoff.wait():
            raise _unavailable(path, deadline, why)


def _check_is_fifo(fd: int, path: str) -> None:
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise WirefaultError(f"{path} is not a FIFO")


def _write_all(fd: int, data: bytes, path: str, deadline: Deadline) -> None:
    view = memoryview(data)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            pass
        except BrokenPipeError:
            raise _unavailable(path, deadline, "the proxy stopped reading") from None
        if view:
            if deadline.passed:
                raise _unavailable(path, deadline, "the proxy did not read the command")
            poller.poll(deadline.poll_ms())


def unread_bytes(fd: int) -> int:
    """Bytes in the pipe's buffer not yet read by anyone (works on the write end too)."""
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


def readers_gone(fd: int) -> bool:
    """True when the FIFO has no reader left: a write end then polls with POLLERR."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(mask & select.POLLERR for _, mask in poller.poll(0))


def _wait_consumed(fd: int, path: str, deadline: Deadline) -> None:
    backoff = Backoff(deadline)
    while unread_bytes(fd):
        if readers_gone(fd):
            raise _unavailable(path, deadline, "the proxy closed the FIFO unread")
        if not backoff.wait():
            raise _unavailable(path, deadline, "the proxy did not read the command")


def _read_reply(path: str, deadline: Deadline) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise _unavailable(path, deadline, "the FIFO disappeared") from None
    except OSError as exc:
        raise WirefaultError(f"cannot open FIFO {path}: {exc.strerror}") from None
    try:
        return _read_until_hangup(fd, path, deadline)
    finally:
        os.close(fd)


def _read_until_hangup(fd: int, path: str, deadline: Deadline) -> bytes:
    poller = select.poll()
    poller.register(fd, select.POLLIN)  # POLLHUP is always reported
    chunks: list[bytes] = []
    while True:
        events = poller.poll(deadline.poll_ms())
        hung_up = any(mask & select.POLLHUP for _, mask in events)
        if events and _drain(fd, chunks) and hung_up:
            return b"".join(chunks)
        if deadline.passed:
            raise _unavailable(path, deadline, "no complete reply")


def _drain(fd: int, chunks: list[bytes]) -> bool:
    """Read what is there; True when read() reported end of file."""
    while True:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return False
        if not chunk:
            return True
        chunks.append(chunk)


__all__ = ["Deadline", "exchange", "exclusive_lock", "lock_path", "pause", "thread_lock"]
