"""CommandChannel on a real event loop and a real FIFO, with real client processes.

Most clients here are `sh` processes using blocking opens, the way PostgreSQL's COPY talks
to the FIFO. The channel process ticks every 5 ms; `test:ticks` shows the loop kept turning
while the channel waited for clients that never came.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from fifo_helpers import (
    POSTGRES_USER,
    ChannelProcess,
    fifo_dir,
    make_fifo,
    postgres_ids,
    run_as,
    shell_exchange,
    wait_until,
)

from wirefault.fifo_client import transport
from wirefault.proxy.command_channel import ChannelError, CommandChannel

REPLY_TIMEOUT = 1.0
PLAIN_USER = "nobody"


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def server(request) -> Iterator[ChannelProcess]:
    with fifo_dir() as directory, ChannelProcess(directory / "channel.fifo",
                                                 reply_timeout=REPLY_TIMEOUT,
                                                 loop=request.param) as process:
        yield process


def ask(server: ChannelProcess, command: str) -> str:
    result = shell_exchange(server.fifo, command)
    assert result.returncode == 0, (result, server.log()[-2000:])
    return result.stdout


def ticks(server: ChannelProcess) -> int:
    return int(ask(server, "test:ticks"))


def run_shell(script: str, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run(["timeout", str(timeout), "sh", "-c", script, "sh", *args],
                          capture_output=True, text=True, check=False)


class LogWatch:
    """The part of the channel's log written after this point."""

    def __init__(self, server: ChannelProcess) -> None:
        self.server = server
        self.start = len(server.log())

    def text(self) -> str:
        return self.server.log()[self.start:]


# -- serving ----------------------------------------------------------------------------------


def test_serves_commands_in_order_with_their_replies(server):
    for number in range(5):
        assert ask(server, f"test:echo {number}") == f"echo {number}\n"
    assert ask(server, "conn.allow()") == "\n"
    error = ask(server, "conn.onQury()")
    assert error.startswith("column 6: unknown message type 'Qury'") and error.endswith("?\n")


def test_a_reply_larger_than_the_pipe_buffer_arrives_whole(server):
    assert ask(server, "test:big 1000000") == "y" * 1_000_000


def test_an_empty_reply_is_just_end_of_file(server):
    assert ask(server, "test:silent") == ""


def test_a_blank_command_goes_to_the_handler(server):
    assert ask(server, "   ") == "column 1: empty command\n"


def test_handler_exception_is_a_one_line_reply_and_a_logged_traceback(server):
    log = LogWatch(server)
    assert ask(server, "test:raise") == "internal error: RuntimeError: boom\n"
    assert "Traceback" in log.text() and "RuntimeError: boom" in log.text()
    assert ask(server, "test:echo after") == "echo after\n"


# -- misbehaving clients ----------------------------------------------------------------------


def test_a_writer_that_writes_nothing_gets_no_reply(server):
    log = LogWatch(server)
    assert run_shell(': > "$1"', str(server.fifo)).returncode == 0
    started = time.monotonic()
    # Had the channel tried to reply, it would hold the FIFO for REPLY_TIMEOUT, or this
    # client would read that reply instead of its own.
    assert ask(server, "test:echo next") == "echo next\n"
    assert time.monotonic() - started < REPLY_TIMEOUT / 2
    assert "without writing" in log.text()


def test_a_client_that_never_reads_its_reply_is_given_up(server):
    log = LogWatch(server)
    before = ticks(server)
    assert run_shell('printf "test:echo lost\\n" > "$1"', str(server.fifo)).returncode == 0
    started = time.monotonic()
    assert ask(server, "test:echo next") == "echo next\n"  # never "echo lost"
    waited = time.monotonic() - started
    assert REPLY_TIMEOUT * 0.8 <= waited < REPLY_TIMEOUT + 3
    assert "no client read the reply to 'test:echo lost'" in log.text()
    # 5 ms ticks: a loop blocked for the wait would show (almost) none
    assert ticks(server) - before >= 0.1 * waited / 0.005


def test_a_reader_that_holds_the_fifo_without_reading_is_given_up(server):
    log = LogWatch(server)
    before = ticks(server)
    # The shell opens the FIFO for reading (blocking until the reply starts) and sleeps.
    holder = subprocess.Popen(
        ["timeout", "10", "sh", "-c", 'printf "test:big 1000000\\n" > "$1"; exec sleep 2 < "$1"',
         "sh", str(server.fifo)])
    try:
        assert wait_until(lambda: "no client read the reply to 'test:big" in log.text(),
                         REPLY_TIMEOUT + 5)
        # the holder still has the FIFO open: the channel serves the next command anyway
        assert holder.poll() is None
        assert ask(server, "test:echo next") == "echo next\n"
    finally:
        holder.wait(15)
    assert ticks(server) - before >= 0.1 * REPLY_TIMEOUT / 0.005


def test_a_reader_that_leaves_halfway_is_noticed(server):
    log = LogWatch(server)
    result = run_shell('printf "test:big 1000000\\n" > "$1"; exec head -c 1000 "$1"',
                       str(server.fifo))
    assert result.stdout == "y" * 1000
    started = time.monotonic()
    assert ask(server, "test:echo next") == "echo next\n"
    assert time.monotonic() - started < REPLY_TIMEOUT
    assert "closed the FIFO before reading the whole reply" in log.text()


def test_a_nonblocking_client_and_blocking_clients_interleave(server):
    deadline = transport.Deadline(5)
    assert transport.exchange(str(server.fifo), b"test:echo a\n", deadline) == b"echo a\n"
    assert ask(server, "test:echo b") == "echo b\n"
    assert transport.exchange(str(server.fifo), b"test:echo c\n", deadline) == b"echo c\n"


# -- bytes that are not text ------------------------------------------------------------------


def test_a_command_that_is_not_utf8_is_refused_naming_the_offset(server):
    handled_before = int(ask(server, "test:count"))
    command = b"conn.onQuery(query=\"caf\xe9\").kill()\n"
    reply = transport.exchange(str(server.fifo), command, transport.Deadline(5))
    offset = command.index(b"\xe9")
    assert reply == (f"command is not valid UTF-8 at byte offset {offset} "
                     "(0xe9: invalid continuation byte)\n").encode()
    # the handler never saw it (only the two counting commands did), and serving goes on
    assert int(ask(server, "test:count")) == handled_before + 1
    assert ask(server, "test:echo after") == "echo after\n"


def test_a_reply_utf8_cannot_encode_is_sent_escaped_and_serving_goes_on(server):
    log = LogWatch(server)
    reply = transport.exchange(str(server.fifo), b"test:surrogate\n", transport.Deadline(5))
    assert reply == b"bad \\udc80 reply\n"
    assert "not valid Unicode" in log.text()
    assert ask(server, "test:echo after") == "echo after\n"


# -- in-process: creating, refusing and removing the FIFO -------------------------------------

T = TypeVar("T")


def with_channel(path: Path, during: Callable[[], T] = lambda: None, **options) -> T:
    """Start a CommandChannel (handler: upper-case echo) on a fresh loop, run `during` in
    a thread while it serves (clients block), close it; returns what `during` returned."""
    async def scenario() -> T:
        channel = CommandChannel(str(path), lambda text: text.upper() + "\n", **options)
        channel.start()
        try:
            return await asyncio.to_thread(during)
        finally:
            channel.close()
            channel.close()  # idempotent

    return asyncio.run(scenario())


def locked_exchange(path: Path) -> bytes:
    """One exchange the way FaultProxy makes it, which creates `<fifo>.lock`."""
    deadline = transport.Deadline(5)
    with transport.exclusive_lock(str(path), deadline):
        return transport.exchange(str(path), b"hello\n", deadline)


def lock_file(path: Path) -> Path:
    return Path(transport.lock_path(str(path)))


def postgres_gid() -> int:
    ids = postgres_ids()
    if ids is None:
        pytest.skip("needs root and a postgres account")
    return ids[1]


@pytest.mark.parametrize("by", ["name", "gid"])
def test_creates_the_fifo_with_exactly_the_mode_and_group_asked_whatever_the_umask(
        tmp_path: Path, by: str):
    gid = postgres_gid()
    path = tmp_path / "shared.fifo"
    umask = os.umask(0o077)  # would strip the group bits from a plain mkfifo(0660)
    try:
        info = with_channel(path, lambda: os.stat(path), mode=0o660,
                            group=POSTGRES_USER if by == "name" else gid)
    finally:
        os.umask(umask)
    assert stat.S_ISFIFO(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == gid


def test_creates_a_private_fifo_by_default_and_removes_it_and_the_lock_file_on_close(
        tmp_path: Path):
    path = tmp_path / "new.fifo"

    def during() -> tuple[bytes, int, bool]:
        reply = locked_exchange(path)
        return reply, stat.S_IMODE(os.stat(path).st_mode), lock_file(path).exists()

    assert with_channel(path, during) == (b"HELLO\n", 0o600, True)
    assert not path.exists() and not os.path.lexists(path)
    assert not lock_file(path).exists()


def test_close_leaves_a_fifo_it_did_not_create_as_it_was(tmp_path: Path, caplog):
    path = tmp_path / "theirs.fifo"
    os.mkfifo(path)
    os.chmod(path, 0o640)
    with caplog.at_level(logging.WARNING, logger="wirefault.proxy.command_channel"):
        assert with_channel(path, lambda: locked_exchange(path), mode=0o660) == b"HELLO\n"
    assert f"command FIFO {path} exists with mode 0640" in caplog.text
    assert "left as it is (asked for mode 0660)" in caplog.text
    info = os.stat(path)
    assert stat.S_ISFIFO(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o640
    assert lock_file(path).exists()
    # and the channel let go of it: nobody reads it, so a non-blocking writer is refused
    with pytest.raises(OSError) as refused:
        os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    assert refused.value.errno == errno.ENXIO


def test_close_leaves_a_fifo_someone_put_in_place_of_its_own(tmp_path: Path):
    path = tmp_path / "replaced.fifo"

    def replace() -> None:
        os.unlink(path)
        os.mkfifo(path)

    with_channel(path, replace)
    assert stat.S_ISFIFO(os.stat(path).st_mode)


# -- start() errors: one line naming the path and the problem ---------------------------------


def start_error(path: Path, **options) -> str:
    with pytest.raises(ChannelError) as info:
        with_channel(path, **options)
    message = str(info.value)
    assert "\n" not in message and info.value.path == str(path)
    return message


def test_refuses_a_regular_file_and_leaves_it_alone(tmp_path: Path):
    path = tmp_path / "regular"
    path.write_text("keep me")
    assert start_error(path) == (f"command FIFO {path}: exists and is a regular file, "
                                 "not a FIFO")
    assert path.read_text() == "keep me"


def test_refuses_a_directory(tmp_path: Path):
    assert start_error(tmp_path) == (f"command FIFO {tmp_path}: exists and is a directory, "
                                     "not a FIFO")


def test_reports_a_missing_directory(tmp_path: Path):
    path = tmp_path / "nowhere" / "wf.fifo"
    assert start_error(path) == (f"command FIFO {path}: its directory {tmp_path / 'nowhere'} "
                                 "does not exist")


def test_reports_an_unknown_group_and_creates_nothing(tmp_path: Path):
    path = tmp_path / "wf.fifo"
    assert start_error(path, group="nogroup2") == (f"command FIFO {path}: no such group: "
                                                   "'nogroup2'")
    assert not os.path.lexists(path)


@pytest.fixture
def plain_user_dir() -> Iterator[Path]:
    """A directory the `nobody` account may create files in, reachable from /."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    with fifo_dir() as directory:
        writable = directory / "open"
        writable.mkdir()
        os.chmod(writable, 0o777)
        yield writable


def test_a_plain_user_is_told_permission_denied_creating_in_a_directory_it_cannot_write(
        plain_user_dir: Path):
    os.chmod(plain_user_dir, 0o755)
    path = plain_user_dir / "wf.fifo"
    message = run_as(PLAIN_USER, lambda: start_error(path))
    assert message == f"command FIFO {path}: permission denied creating it in {plain_user_dir}"


def test_a_plain_user_is_told_permission_denied_for_a_fifo_it_cannot_open(
        plain_user_dir: Path):
    path = make_fifo(plain_user_dir / "root-only.fifo")  # root's, mode 0600
    message = run_as(PLAIN_USER, lambda: start_error(path))
    assert message == (f"command FIFO {path}: permission denied: the proxy needs to read and "
                       "write it (mode 0600)")


def test_a_group_the_user_is_not_in_is_refused_and_the_new_fifo_removed(plain_user_dir: Path):
    path = plain_user_dir / "wf.fifo"
    message = run_as(PLAIN_USER, lambda: start_error(path, group=POSTGRES_USER, mode=0o660))
    assert message == (f"command FIFO {path}: permission denied giving it to group "
                       f"'{POSTGRES_USER}' (the proxy must run as root or as a member of "
                       "that group)")
    assert not os.path.lexists(path)


def test_a_mode_that_locks_the_proxy_out_is_refused_and_the_new_fifo_removed(
        plain_user_dir: Path):
    path = plain_user_dir / "wf.fifo"
    message = run_as(PLAIN_USER, lambda: start_error(path, mode=0o220))
    assert message == (f"command FIFO {path}: mode 0220 would lock the proxy out of its own "
                       "FIFO (it reopens it to read and to write)")
    assert not os.path.lexists(path)
