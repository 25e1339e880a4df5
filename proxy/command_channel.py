"""The command FIFO, served on the proxy's asyncio loop without ever blocking it.

The protocol is the one Citus's failure-testing proxy speaks, so Citus's SQL helpers work
unchanged:

1. a client opens the FIFO for writing, writes one command, closes;
2. the proxy reads until end-of-file (every writer closed) and runs the handler;
3. the proxy opens the FIFO for writing and writes the reply, which the client reads until
   end-of-file; then the proxy goes back to step 1.

The handler returns the complete reply, written verbatim: "\\n" on success, the error line
plus "\\n" on failure, the recorder's COPY text rows for a dump (no bytes at all for an
empty dump, so `COPY ... FROM` the FIFO yields zero rows). It may instead return an
awaitable of that text (a large dump is rendered a slice at a time, not to hold the loop):
the channel reads no further command until the reply is written, so commands are still
answered one at a time, in order. A writer that
closes without writing anything gets no reply; a command that is not valid UTF-8 gets an
error line naming the offset, without reaching the handler.

The channel creates the FIFO when it is missing, with exactly the mode (and group) it was
given, and removes it (with the clients' `<fifo>.lock`) on close; a FIFO that was there
before is served as it is and left behind. `start()` raises ChannelError, one line, when
the FIFO cannot be had.

Linux FIFO facts this relies on:

- a read end opened with O_NONBLOCK is not reported readable (nor hung up) by epoll until a
  writer has come and gone, so the channel can keep one open while idle;
- a non-blocking open for writing fails with ENXIO while nobody has the FIFO open for
  reading, so waiting for the client's reply reader is a retry on a timer;
- both ends share one buffer while any end is open: the channel closes its read end before
  replying (or it would read its own reply) and reopens it only once the client has
  consumed the whole reply (FIONREAD on the write end is 0) or gone away (POLLERR). When it
  gives up on a client that keeps the FIFO open without reading, it reads the stale part
  of the reply away first, so it is never taken for the next command.

Clients must take turns (wirefault's client holds a lock file, the SQL helpers an advisory
lock): two exchanges at once on one FIFO would mix their bytes, and nothing in the FIFO
protocol can tell them apart.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import grp
import inspect
import logging
import os
import stat
from collections.abc import Awaitable, Callable

from wirefault.fifo_client.transport import lock_path, readers_gone, unread_bytes

READ_CHUNK = 64 * 1024
WRITE_CHUNK = 64 * 1024
MAX_COMMAND_BYTES = 1024 * 1024
"""Longer commands are discarded (and answered with an error) instead of buffered."""
FIRST_RETRY_DELAY = 0.0005
MAX_RETRY_DELAY = 0.02
REOPEN_DELAY = 1.0
"""Pause before retrying to open the read end after an unexpected error."""

DEFAULT_FIFO_MODE = 0o600

_default_logger = logging.getLogger(__name__)

Reply = str | Awaitable[str]
"""What a handler returns: the reply's text, or an awaitable of it."""


class ChannelError(Exception):
    """The channel cannot have its FIFO; `str()` is one line naming the path and the problem."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return f"command FIFO {self.path}: {self.problem}"


def parse_fifo_mode(text: str) -> int:
    """Octal permission bits as text ("0660", "660", "0o660") -> 0o660; ValueError if not."""
    digits = text.strip().lower().removeprefix("0o")
    if not digits or len(digits) > 4 or any(c not in "01234567" for c in digits):
        raise ValueError(f"not an octal mode: {text!r}")
    mode = int(digits, 8)
    if mode > 0o777:
        raise ValueError(f"only permission bits (at most 0777): {text!r}")
    return mode


def resolve_group(group: str | int) -> int:
    """The gid of a group name (or number, as chown takes it); ValueError if unknown."""
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ValueError(f"no such group: {group!r}") from None


def fifo_mode_argument(text: str) -> str:
    """argparse type for --fifo-mode: the mode as 4 octal digits."""
    try:
        return f"{parse_fifo_mode(text):04o}"
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def fifo_group_argument(text: str) -> str:
    """argparse type for --fifo-group: a group that exists, checked at parse time."""
    try:
        resolve_group(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


_KINDS = {stat.S_IFREG: "a regular file", stat.S_IFDIR: "a directory",
          stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device",
          # never followed: in a shared directory anyone may plant one pointing anywhere
          stat.S_IFLNK: "a symbolic link"}


def _not_a_fifo(path: str, mode: int) -> ChannelError:
    kind = _KINDS.get(stat.S_IFMT(mode), "something else")
    return ChannelError(path, f"exists and is {kind}, not a FIFO")


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _can_read_and_write(path: str) -> bool:
    """Whether this process may open `path` both ways (the channel reopens it for replies)."""
    effective = os.access in os.supports_effective_ids
    return os.access(path, os.R_OK | os.W_OK, effective_ids=effective)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _not_utf8_reply(data: bytes, exc: UnicodeDecodeError) -> str:
    """The error line for a command that does not decode (the handler never sees it)."""
    return (f"command is not valid UTF-8 at byte offset {exc.start} "
            f"(0x{data[exc.start]:02x}: {exc.reason})\n")


class CommandChannel:
    """Serves commands arriving on a FIFO, one at a time, in order.

    Example (inside a running event loop)::

        channel = CommandChannel("/tmp/wirefault.fifo", lambda text: "\\n")
        channel.start()
        ...
        channel.close()
    """

    def __init__(
        self,
        path: str,
        handler: Callable[[str], Reply],
        reply_timeout: float = 10.0,
        logger: logging.Logger | None = None,
        mode: int = DEFAULT_FIFO_MODE,
        group: str | int | None = None,
    ) -> None:
        if not 0 <= mode <= 0o777:
            raise ValueError(f"mode must be permission bits (0 to 0o777), not {mode:#o}")
        self.path = os.fspath(path)
        self.handler = handler
        self.reply_timeout = reply_timeout
        self.logger = logger or _default_logger
        self.mode = mode
        """Permission bits of a FIFO the channel creates, exactly (the umask does not apply)."""
        self.group = group
        """Group (name or gid) of a FIFO the channel creates; None: the process's own."""
        self._created: tuple[int, int] | None = None
        """(st_dev, st_ino) of the FIFO this channel created, which close() removes."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._read_fd: int | None = None
        self._write_fd: int | None = None
        self._writer_registered = False
        self._command = bytearray()
        self._command_too_long = False
        self._reply = memoryview(b"")
        self._reply_for = ""
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = FIRST_RETRY_DELAY
        self._reply_deadline: asyncio.TimerHandle | None = None
        self._pending: asyncio.Future[str] | None = None
        """A deferred reply being made (the handler returned an awaitable)."""
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Create the FIFO if missing (`mode`, `group`) and start serving on `loop`.

        A FIFO that exists already is served as it is. ChannelError, with one line naming
        the path and the problem, when the FIFO cannot be had (the path is something else,
        its directory is missing, permission is denied, the group is unknown).

        Call it from code running on the loop (a coroutine, a callback, an addon hook);
        `loop` defaults to the running one.
        """
        if self._read_fd is not None or self._write_fd is not None:
            raise RuntimeError(f"{self!r} is already started")
        self._loop = loop or asyncio.get_running_loop()
        self._closed = False
        self._listen(self._claim_fifo())

    def close(self) -> None:
        """Stop serving, release every descriptor and timer, and remove the FIFO (and its
        client lock file) if this channel created it. Idempotent."""
        self._closed = True
        self._cancel_timers()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        self._stop_reading()
        self._close_writer()
        self._remove_created_fifo()

    @property
    def serving(self) -> bool:
        """True while waiting for a command (not closed, not delivering a reply)."""
        return self._read_fd is not None

    # -- having the FIFO -------------------------------------------------------------------

    def _claim_fifo(self) -> int:
        """The FIFO's read end, the FIFO created first if missing; ChannelError if neither."""
        gid = self._group_id()
        try:
            return self._create_fifo(gid)
        except FileExistsError:
            return self._open_existing_fifo(gid)

    def _group_id(self) -> int | None:
        if self.group is None:
            return None
        try:
            return resolve_group(self.group)
        except ValueError as exc:
            raise ChannelError(self.path, str(exc)) from None

    def _create_fifo(self, gid: int | None) -> int:
        """mkfifo, then set group and mode through the read end (so on this very inode).

        Created 0600 first: nobody else can open it before it has its group and mode, and
        fchmod sets `mode` exactly, whatever the umask. FileExistsError when the path exists.
        """
        try:
            os.mkfifo(self.path, 0o600)
        except FileExistsError:
            raise
        except OSError as exc:
            raise self._create_error(exc) from None
        fd = None
        try:
            fd = self._open_reader()
            identity = _identity(os.fstat(fd))
            if gid is not None:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, self.mode)
        except OSError as exc:
            self._undo_create(fd)
            raise self._setup_error(exc) from None
        if not _can_read_and_write(self.path):
            self._undo_create(fd)
            raise ChannelError(self.path, f"mode {self.mode:04o} would lock the proxy out of "
                                          "its own FIFO (it reopens it to read and to write)")
        self._created = identity
        return fd

    def _undo_create(self, fd: int | None) -> None:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(self.path)
        except OSError as exc:
            self.logger.warning("cannot remove command FIFO %s again: %s", self.path, exc)

    def _create_error(self, exc: OSError) -> ChannelError:
        directory = os.path.dirname(os.path.abspath(self.path))
        if exc.errno == errno.ENOENT:
            return ChannelError(self.path, f"its directory {directory} does not exist")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return ChannelError(self.path, f"permission denied creating it in {directory}")
        return ChannelError(self.path, f"cannot create it: {exc.strerror or exc}")

    def _setup_error(self, exc: OSError) -> ChannelError:
        if exc.errno == errno.EPERM and self.group is not None:
            return ChannelError(self.path, f"permission denied giving it to group "
                                           f"{self.group!r} (the proxy must run as root or "
                                           "as a member of that group)")
        return ChannelError(self.path, f"cannot set up the new FIFO: {exc.strerror or exc}")

    def _open_existing_fifo(self, gid: int | None) -> int:
        try:
            # lstat: a symlink planted in a shared directory could lead anywhere
            info = os.lstat(self.path)
        except OSError as exc:  # e.g. removed again since mkfifo saw it
            raise ChannelError(self.path, f"cannot open it: {exc.strerror or exc}") from None
        if not stat.S_ISFIFO(info.st_mode):
            raise _not_a_fifo(self.path, info.st_mode)
        if not _can_read_and_write(self.path):
            raise ChannelError(self.path, "permission denied: the proxy needs to read and "
                                          f"write it (mode {stat.S_IMODE(info.st_mode):04o})")
        try:
            fd = self._open_reader()
        except OSError as exc:
            raise self._open_error(exc) from None
        if _identity(os.fstat(fd)) != _identity(info):  # swapped since the lstat
            os.close(fd)
            raise ChannelError(self.path, "was replaced while the proxy opened it")
        self._warn_if_not_as_asked(info, gid)
        return fd

    def _warn_if_not_as_asked(self, info: os.stat_result, gid: int | None) -> None:
        """An existing FIFO is left as it is, but a mode or group other than the one asked
        for is worth a line: clients that were meant to open it may not be able to."""
        mode = stat.S_IMODE(info.st_mode)
        if mode != self.mode or (gid is not None and info.st_gid != gid):
            self.logger.warning(
                "command FIFO %s exists with mode %04o, group %d; left as it is (asked for "
                "mode %04o%s)", self.path, mode, info.st_gid, self.mode,
                "" if gid is None else f", group {gid}")

    def _remove_created_fifo(self) -> None:
        """Remove the FIFO this channel created, and the lock file its clients made, unless
        the path has been replaced since (then it belongs to someone else)."""
        created, self._created = self._created, None
        if created is None:
            return
        try:
            if _identity(os.lstat(self.path)) != created:
                return
        except OSError:
            return
        for path in (self.path, lock_path(self.path)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.logger.warning("cannot remove %s: %s", path, exc)

    # -- reading a command -----------------------------------------------------------------

    def _listen(self, fd: int | None = None) -> None:
        """Wait for the next command, on `fd` when the read end is already open."""
        if self._closed:
            if fd is not None:
                os.close(fd)
            return
        if fd is None:
            fd = self._open_read_end()
            if fd is None:
                return
        self._read_fd = fd
        self._command.clear()
        self._command_too_long = False
        self._loop_or_fail().add_reader(fd, self._on_readable)

    def _open_read_end(self) -> int | None:
        try:
            return self._open_reader()
        except FileNotFoundError:
            self.logger.warning("command FIFO %s disappeared; creating it again", self.path)
            return self._reclaim_fifo()
        except OSError as exc:
            self.logger.error("cannot open command FIFO %s: %s; retrying", self.path, exc)
            self._schedule(REOPEN_DELAY, self._listen)
        return None

    def _reclaim_fifo(self) -> int | None:
        try:
            return self._claim_fifo()
        except ChannelError as exc:
            self.logger.error("%s; retrying", exc)
            self._schedule(REOPEN_DELAY, self._listen)
            return None

    def _open_reader(self) -> int:
        # Non-blocking: never waits for a writer, and does not count as one. O_NOFOLLOW:
        # never through a symlink someone swapped in after the checks.
        return os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)

    def _open_error(self, exc: OSError) -> ChannelError:
        if exc.errno == errno.ELOOP:
            return _not_a_fifo(self.path, stat.S_IFLNK)
        return ChannelError(self.path, f"cannot open it: {exc.strerror or exc}")

    def _on_readable(self) -> None:
        fd = self._read_fd
        if fd is None:
            return
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self.logger.error("reading command FIFO %s failed: %s", self.path, exc)
            self._stop_reading()
            self._listen()
            return
        if chunk:
            self._collect(chunk)
            return
        # End of file: every writer has closed, the command is complete.
        self._stop_reading()
        self._dispatch()

    def _collect(self, chunk: bytes) -> None:
        if len(self._command) + len(chunk) > MAX_COMMAND_BYTES:
            self._command_too_long = True
            self._command.clear()
        if not self._command_too_long:
            self._command += chunk

    def _dispatch(self) -> None:
        if self._command_too_long:
            self._begin_reply(f"command longer than {MAX_COMMAND_BYTES} bytes\n", "<too long>")
            return
        data = bytes(self._command)
        self._command.clear()
        if not data:
            self.logger.debug("a writer closed the command FIFO without writing; ignored")
            self._listen()
            return
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            reply = _not_utf8_reply(data, exc)
            self.logger.warning("rejected a command: %s", reply.strip())
            self._begin_reply(reply, "<not UTF-8>")
            return
        try:
            reply = self.handler(text)
        except Exception as exc:  # a handler bug must not stop the channel
            reply = self._handler_failed(text, exc)
        if isinstance(reply, str):
            self._begin_reply(reply, text)
        elif inspect.isawaitable(reply):
            # Not reading meanwhile (the read end is closed): the next command waits.
            pending = asyncio.ensure_future(reply, loop=self._loop_or_fail())
            self._pending = pending
            pending.add_done_callback(lambda done: self._deferred_reply(done, text))
        else:
            self.logger.error("handler returned %r for %r, not a str", type(reply), text)
            self._begin_reply(f"internal error: handler returned {type(reply).__name__}\n",
                              text)

    def _deferred_reply(self, done: asyncio.Future[str], text: str) -> None:
        if done is not self._pending:  # closed meanwhile (or restarted): nobody to answer
            return
        self._pending = None
        if done.cancelled():
            reply = "internal error: the reply was cancelled\n"
        elif (exc := done.exception()) is not None:
            reply = self._handler_failed(text, exc)
        else:
            reply = done.result()
            if not isinstance(reply, str):
                self.logger.error("handler returned %r for %r, not a str", type(reply), text)
                reply = f"internal error: handler returned {type(reply).__name__}\n"
        self._begin_reply(reply, text)

    def _handler_failed(self, text: str, exc: BaseException) -> str:
        self.logger.error("command %r failed in the handler", text,
                          exc_info=(type(exc), exc, exc.__traceback__))
        return f"internal error: {type(exc).__name__}: {_one_line(str(exc))}\n"

    def _stop_reading(self) -> None:
        fd, self._read_fd = self._read_fd, None
        if fd is None:
            return
        if self._loop_usable():
            self._loop.remove_reader(fd)
        os.close(fd)

    # -- delivering the reply --------------------------------------------------------------

    def _begin_reply(self, reply: str, command: str) -> None:
        self._reply = memoryview(self._encode(reply, command))
        self._reply_for = command
        self._retry_delay = FIRST_RETRY_DELAY
        self._reply_deadline = self._loop_or_fail().call_later(
            self.reply_timeout, self._give_up)
        self._open_writer()

    def _encode(self, reply: str, command: str) -> bytes:
        try:
            return reply.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: escape them rather than fail
            self.logger.warning("the reply to %r is not valid Unicode; sent with the "
                                "characters UTF-8 cannot encode escaped", command)
            return reply.encode("utf-8", "backslashreplace")

    def _open_writer(self) -> None:
        self._retry = None
        try:
            self._write_fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
                                     | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.ENOENT):  # the client's reader is not there yet
                self._retry_later(self._open_writer)
                return
            self.logger.warning("cannot open command FIFO %s to reply: %s", self.path, exc)
            self._end_reply()
            return
        self._write_reply()

    def _write_reply(self) -> None:
        fd = self._write_fd
        if fd is None:
            return
        while self._reply:
            try:
                written = os.write(fd, self._reply[:WRITE_CHUNK])
            except BlockingIOError:
                self._watch_writable(fd)
                return
            except BrokenPipeError:
                self.logger.warning("the client of command %r closed the FIFO before reading "
                                    "the whole reply", self._reply_for)
                self._end_reply()
                return
            self._reply = self._reply[written:]
        self._unwatch_writable()
        self._retry_delay = FIRST_RETRY_DELAY
        self._wait_consumed()

    def _watch_writable(self, fd: int) -> None:
        if not self._writer_registered:
            self._loop_or_fail().add_writer(fd, self._write_reply)
            self._writer_registered = True

    def _unwatch_writable(self) -> None:
        if self._writer_registered and self._write_fd is not None and self._loop_usable():
            self._loop.remove_writer(self._write_fd)
        self._writer_registered = False

    def _wait_consumed(self) -> None:
        """Close the writer once the client has read everything (or has gone away)."""
        self._retry = None
        fd = self._write_fd
        if fd is None:
            return
        if unread_bytes(fd) == 0:
            self.logger.debug("replied to %r", self._reply_for)
            self._end_reply()
        elif readers_gone(fd):
            self.logger.warning("the client of command %r went away without reading the "
                                "reply", self._reply_for)
            self._end_reply()
        else:
            self._retry_later(self._wait_consumed)

    def _give_up(self) -> None:
        self._reply_deadline = None
        self.logger.warning("no client read the reply to %r within %g s; serving the next "
                            "command", self._reply_for, self.reply_timeout)
        self._end_reply()

    def _end_reply(self) -> None:
        self._cancel_timers()
        reader = self._discard_unread_reply()
        self._close_writer()
        self._reply = memoryview(b"")
        self._reply_for = ""
        self._listen(reader)

    def _discard_unread_reply(self) -> int | None:
        """After a client left part of its reply in the pipe (the pipe outlives us while
        it holds the FIFO open), read those bytes away so they are not taken for the next
        command. Returns the read end, opened while our writer kept the pipe, or None."""
        writer = self._write_fd
        if writer is None:
            return None
        stale = unread_bytes(writer)
        if not stale:
            return None
        try:
            reader = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
                             | os.O_NOFOLLOW)
        except OSError:
            return None
        # Only the bytes counted above: anything after them is somebody's next command.
        while stale > 0:
            try:
                chunk = os.read(reader, min(stale, READ_CHUNK))
            except BlockingIOError:
                break
            if not chunk:
                break
            stale -= len(chunk)
        self.logger.debug("discarded the unread part of the reply to %r", self._reply_for)
        return reader

    def _close_writer(self) -> None:
        self._unwatch_writable()
        fd, self._write_fd = self._write_fd, None
        if fd is not None:
            os.close(fd)

    # -- timers ----------------------------------------------------------------------------

    def _retry_later(self, callback: Callable[[], None]) -> None:
        """Retry `callback` soon, backing off from half a millisecond to MAX_RETRY_DELAY."""
        delay = self._retry_delay
        self._retry_delay = min(delay * 2, MAX_RETRY_DELAY)
        self._schedule(delay, callback)

    def _schedule(self, delay: float, callback: Callable[[], None]) -> None:
        if not self._closed:
            self._retry = self._loop_or_fail().call_later(delay, callback)

    def _cancel_timers(self) -> None:
        for handle in (self._retry, self._reply_deadline):
            if handle is not None:
                handle.cancel()
        self._retry = None
        self._reply_deadline = None

    def _loop_usable(self) -> bool:
        return self._loop is not None and not self._loop.is_closed()

    def _loop_or_fail(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("CommandChannel.start() was not called")
        return self._loop

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("serving" if self.serving else "replying")
        return f"<CommandChannel {self.path} {state}>"


__all__ = ["DEFAULT_FIFO_MODE", "MAX_COMMAND_BYTES", "ChannelError", "CommandChannel", "Reply",
           "fifo_group_argument", "fifo_mode_argument", "parse_fifo_mode", "resolve_group"]
