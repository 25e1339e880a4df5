"""The command FIFO, served on the proxy's asyncio loop without ever blocking it.

The protocol is the one Citus's failure-testing proxy speaks, so Citus's SQL helpers work
unchanged:

1. a client opens the FIFO for writing, writes one command, closes;
2. the proxy reads until end-of-file (every writer closed) and runs the handler;
3. the proxy opens the FIFO for writing and writes the reply, which the client reads until
   end-of-file; then the proxy goes back to step 1.

The handler is synchronous and returns the complete reply, written verbatim: "\\n" on
success, the error line plus "\\n" on failure, the recorder's COPY text rows for a dump (no
bytes at all for an empty dump, so `COPY ... FROM` the FIFO yields zero rows). A writer that
closes without writing anything gets no reply.

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

import asyncio
import errno
import logging
import os
import stat
from collections.abc import Callable

from wirefault.fifo_client.transport import readers_gone, unread_bytes

READ_CHUNK = 64 * 1024
WRITE_CHUNK = 64 * 1024
MAX_COMMAND_BYTES = 1024 * 1024
"""Longer commands are discarded (and answered with an error) instead of buffered."""
FIRST_RETRY_DELAY = 0.0005
MAX_RETRY_DELAY = 0.02
REOPEN_DELAY = 1.0
"""Pause before retrying to open the read end after an unexpected error."""

_default_logger = logging.getLogger(__name__)


def ensure_fifo(path: str, mode: int = 0o600) -> None:
    """Create the FIFO at `path` unless one exists; FileExistsError if something else does."""
    try:
        os.mkfifo(path, mode)
        return
    except FileExistsError:
        pass
    if not stat.S_ISFIFO(os.stat(path).st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a FIFO", path)




def _one_line(text: str) -> str:
    return " ".join(text.split())


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
        handler: Callable[[str], str],
        reply_timeout: float = 10.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.handler = handler
        self.reply_timeout = reply_timeout
        self.logger = logger or _default_logger
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
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Create the FIFO if missing (mode 0600) and start serving on `loop`.

        Call it from code running on the loop (a coroutine, a callback, an addon hook);
        `loop` defaults to the running one.
        """
        if self._read_fd is not None or self._write_fd is not None:
            raise RuntimeError(f"{self!r} is already started")
        self._loop = loop or asyncio.get_running_loop()
        self._closed = False
        ensure_fifo(self.path)
        self._listen()

    def close(self) -> None:
        """Stop serving and release every descriptor and timer. Idempotent."""
        self._closed = True
        self._cancel_timers()
        self._stop_reading()
        self._close_writer()

    @property
    def serving(self) -> bool:
        """True while waiting for a command (not closed, not delivering a reply)."""
        return self._read_fd is not None

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
            return os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            self.logger.warning("command FIFO %s disappeared; creating it again", self.path)
            self._recreate_and_listen()
        except OSError as exc:
            self.logger.error("cannot open command FIFO %s: %s; retrying", self.path, exc)
            self._schedule(REOPEN_DELAY, self._listen)
        return None

    def _recreate_and_listen(self) -> None:
        try:
            ensure_fifo(self.path)
        except OSError as exc:
            self.logger.error("cannot create command FIFO %s: %s; retrying", self.path, exc)
            self._schedule(REOPEN_DELAY, self._listen)
            return
        self._listen()

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
        text = data.decode("utf-8", "replace").strip()
        self._begin_reply(self._run_handler(text), text)

    def _run_handler(self, text: str) -> str:
        try:
            reply = self.handler(text)
        except Exception as exc:  # a handler bug must not stop the channel
            self.logger.exception("command %r failed in the handler", text)
            return f"internal error: {type(exc).__name__}: {_one_line(str(exc))}\n"
        if not isinstance(reply, str):
            self.logger.error("handler returned %r for %r, not a str", type(reply), text)
            return f"internal error: handler returned {type(reply).__name__}\n"
        return reply

    def _stop_reading(self) -> None:
        fd, self._read_fd = self._read_fd, None
        if fd is None:
            return
        if self._loop_usable():
            self._loop.remove_reader(fd)
        os.close(fd)

    # -- delivering the reply --------------------------------------------------------------

    def _begin_reply(self, reply: str, command: str) -> None:
        self._reply = memoryview(reply.encode("utf-8"))
        self._reply_for = command
        self._retry_delay = FIRST_RETRY_DELAY
        self._reply_deadline = self._loop_or_fail().call_later(
            self.reply_timeout, self._give_up)
        self._open_writer()

    def _open_writer(self) -> None:
        self._retry = None
        try:
            self._write_fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
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
            reader = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
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


__all__ = ["MAX_COMMAND_BYTES", "CommandChannel", "ensure_fifo"]
