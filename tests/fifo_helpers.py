"""Reusable parts for FIFO tests: FIFOs the PostgreSQL server can reach, and a real
`CommandChannel` served in a helper process.

Run as a script, this module is that helper process: a `CommandChannel` on a real event
loop (asyncio's or uvloop's) with a small handler that keeps the proxy's contract, plus a
task ticking every few milliseconds so tests can prove the loop never stalled:

    python tests/fifo_helpers.py --fifo /tmp/x.fifo [--reply-timeout 2] [--loop uvloop]

It prints `ready` once it serves. The handler answers like the proxy (it parses with
`wirefault.proxy.dsl`): "\\n" for an accepted rule or `recorder.reset()`, the parser's
error line, and for `recorder.dump()` one row per rule accepted since the last dump or
reset. Commands starting with `test:` drive the tests:

    test:echo TEXT   reply "echo TEXT" (a non-empty reply: the client raises CommandError)
    test:ticks       reply the number of loop ticks so far
    test:rule        reply "rule <the rule in force>"
    test:count       reply the number of commands handled so far (this one included)
    test:big N       reply N bytes of "y" (more than a pipe holds)
    test:silent      reply nothing at all (zero bytes, like an empty dump)
    test:surrogate   reply "bad \\udc80 reply" with a lone surrogate (UTF-8 cannot encode it)
    test:raise       the handler raises RuntimeError("boom")
    test:seed        record rows with tabs, newlines, backslashes, non-ASCII, a dropped-row note
"""

from __future__ import annotations

import contextlib
import os
import pickle
import pwd
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

TESTS_DIR = Path(__file__).resolve().parent
PROJECT_DIR = TESTS_DIR.parent
PYTHON = sys.executable
POSTGRES_USER = "postgres"

SEEDED_ROWS = [
    (-1, "recorder", "3 frames dropped (ring buffer limit 100)"),
    (0, "coordinator", "Query(query=SELECT 'a\tb')"),
    (0, "worker", "line one\nline two\r\\end é"),
    (1, "coordinator", ""),
]
"""The rows `test:seed` records, as the client must return them (unescaped)."""


# -- FIFOs ------------------------------------------------------------------------------------


def postgres_ids() -> tuple[int, int] | None:
    """uid/gid of the account the test PostgreSQL server runs as when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


@contextlib.contextmanager
def fifo_dir() -> Iterator[Path]:
    """A temporary directory anyone can traverse (the PostgreSQL server user included)."""
    path = Path(tempfile.mkdtemp(prefix="wirefault-fifo-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_fifo(path: Path, for_postgres: bool = False) -> Path:
    """Create a FIFO (mode 0600); with `for_postgres`, owned by the PostgreSQL server user
    so server-side COPY can open it (the proxy, as root, can open it anyway)."""
    os.mkfifo(path, 0o600)
    ids = postgres_ids() if for_postgres else None
    if ids:
        os.chown(path, *ids)
    return path


def blocked_in_fifo_open(pid: int) -> bool:
    """True while process `pid` sleeps in open() of a FIFO, waiting for the other end."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner"
    return False


def run_as(user: str, function: Callable[[], T]) -> T:
    """`function()` in a forked child running as `user` (uid, gid, no other groups), so a
    root test can see what a plain user gets. Its result or exception comes back here."""
    entry = pwd.getpwnam(user)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges for good, report, never return into pytest
        os.close(reader)
        try:
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            outcome: tuple[bool, object] = (True, function())
        except BaseException as exc:
            outcome = (False, exc)
        try:
            data = pickle.dumps(outcome)
        except Exception:
            data = pickle.dumps((False, RuntimeError(repr(outcome[1]))))
        with os.fdopen(writer, "wb") as report:
            report.write(data)
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as report:
        ok, value = pickle.load(report)
    os.waitpid(pid, 0)
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


# -- the channel process ----------------------------------------------------------------------


class ChannelProcess:
    """`python tests/fifo_helpers.py ...` running a CommandChannel on `fifo`."""

    def __init__(self, fifo: Path, reply_timeout: float = 2.0, loop: str = "asyncio",
                 protocol: str = "postgres") -> None:
        self.fifo = Path(fifo)
        self.reply_timeout = reply_timeout
        self.loop = loop
        self.protocol = protocol
        self.log_path = self.fifo.with_name(self.fifo.name + ".server.log")
        self.process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 20.0) -> ChannelProcess:
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [PYTHON, __file__, "--fifo", str(self.fifo), "--reply-timeout",
                 str(self.reply_timeout), "--loop", self.loop, "--protocol", self.protocol],
                stdout=subprocess.PIPE, stderr=log, text=True, cwd=PROJECT_DIR,
            )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"channel process did not start:\n{self.log()}")
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()
        return ""

    def __enter__(self) -> ChannelProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def shell_exchange(fifo: Path, command: str, timeout: float = 5.0) -> subprocess.CompletedProcess:
    """One exchange the way PostgreSQL's COPY does it: blocking opens, from `sh`.

    `printf > fifo` blocks until a reader exists; `cat fifo` blocks until the proxy opens
    its writer. `timeout` keeps a broken channel from hanging the test.
    """
    script = 'printf "%s\\n" "$1" > "$2" && exec cat "$2"'
    return subprocess.run(["timeout", str(timeout), "sh", "-c", script, "sh", command, str(fifo)],
                          capture_output=True, text=True, check=False)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0,
               interval: float = 0.01) -> bool:
    """Poll `predicate` until true or `timeout` (tests only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# -- the server side (run as a script) --------------------------------------------------------


class FakeProxyHandler:
    """The proxy's command contract, with a list standing in for the recorder."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.rule = "conn.allow()"
        self.rows: list[tuple[int, str, str]] = []
        self.commands = 0
        self.ticks = 0

    def __call__(self, text: str) -> str:
        from wirefault.proxy import dsl

        self.commands += 1
        if text.startswith("test:"):
            return self.test_command(text[len("test:"):])
        try:
            parsed = dsl.parse(text, self.protocol)
        except dsl.CommandError as exc:
            return f"{exc}\n"
        if isinstance(parsed, dsl.RecorderCommand):
            rows, self.rows = self.rows, []
            if parsed.name == "dump":
                return "".join(f"{c}\t{_escape(s)}\t{_escape(m)}\n" for c, s, m in rows)
            return "\n"
        self.rule = parsed.text
        self.rows.append((len(self.rows), "coordinator", parsed.text))
        return "\n"

    def test_command(self, text: str) -> str:
        name, _, argument = text.partition(" ")
        if name == "echo":
            return f"echo {argument}\n"
        if name == "ticks":
            return f"{self.ticks}\n"
        if name == "rule":
            return f"rule {self.rule}\n"
        if name == "count":
            return f"{self.commands}\n"
        if name == "big":
            return "y" * int(argument)
        if name == "silent":
            return ""
        if name == "surrogate":
            return "bad \udc80 reply\n"
        if name == "raise":
            raise RuntimeError("boom")
        if name == "seed":
            self.rows = list(SEEDED_ROWS)
            return "\n"
        return f"unknown test command {text!r}\n"


def _escape(text: str) -> str:
    return (text.replace("\\", "\\\\").replace("\t", "\\t")
            .replace("\n", "\\n").replace("\r", "\\r"))


async def _serve(args) -> None:
    import asyncio

    from wirefault.proxy.command_channel import CommandChannel

    handler = FakeProxyHandler(args.protocol)
    channel = CommandChannel(args.fifo, handler, reply_timeout=args.reply_timeout)
    channel.start()
    print("ready", flush=True)
    while True:  # runs until the test terminates us; proves the loop keeps turning
        await asyncio.sleep(0.005)
        handler.ticks += 1


def main() -> None:
    import argparse
    import asyncio
    import logging
    import signal

    parser = argparse.ArgumentParser()
    parser.add_argument("--fifo", required=True)
    parser.add_argument("--reply-timeout", type=float, default=2.0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--protocol", default="postgres")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(_serve(args))
    else:
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
