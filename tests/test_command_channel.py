"""CommandChannel on a real event loop and a real FIFO, with real client processes.

Most clients here are `sh` processes using blocking opens, the way PostgreSQL's COPY talks
to the FIFO. The channel process ticks every 5 ms; `test:ticks` shows the loop kept turning
while the channel waited for clients that never came.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fifo_helpers import ChannelProcess, fifo_dir, shell_exchange, wait_until

from wirefault.fifo_client import transport
from wirefault.proxy.command_channel import CommandChannel

REPLY_TIMEOUT = 1.0


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


# -- in-process: creation, close --------------------------------------------------------------


def test_creates_a_private_fifo_and_serves_a_client_thread(tmp_path: Path):
    path = tmp_path / "new.fifo"

    async def scenario() -> bytes:
        channel = CommandChannel(str(path), lambda text: text.upper() + "\n")
        channel.start()
        try:
            deadline = transport.Deadline(5)
            return await asyncio.to_thread(transport.exchange, str(path), b"hello\n", deadline)
        finally:
            channel.close()

    assert asyncio.run(scenario()) == b"HELLO\n"
    mode = os.stat(path).st_mode
    assert stat.S_ISFIFO(mode) and stat.S_IMODE(mode) == 0o600


def test_refuses_a_path_that_is_not_a_fifo(tmp_path: Path):
    path = tmp_path / "regular"
    path.write_text("keep me")

    async def scenario() -> None:
        CommandChannel(str(path), lambda text: "\n").start()

    with pytest.raises(FileExistsError, match="not a FIFO"):
        asyncio.run(scenario())
    assert path.read_text() == "keep me"


def test_close_releases_the_fifo(tmp_path: Path):
    path = tmp_path / "closing.fifo"

    async def scenario() -> bool:
        channel = CommandChannel(str(path), lambda text: "\n")
        channel.start()
        serving = channel.serving
        channel.close()
        channel.close()  # idempotent
        return serving and not channel.serving

    assert asyncio.run(scenario())
    # nobody reads the FIFO any more: a non-blocking writer is refused
    with pytest.raises(OSError) as info:
        os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    assert info.value.errno == 6  # ENXIO
