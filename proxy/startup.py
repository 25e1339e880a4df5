"""`wirefault proxy`'s start-up contract: ready means ready, failure means exit.

`StartupCheck` is the last addon of the runner's master, so its `running` hook runs after
mitmproxy has tried to bind the listener and wirefault's addon has tried to open its
command channel. If either failed it prints one line naming the option and the problem and
stops the master (the runner then exits 2); otherwise it announces readiness: one line
`ready HOST:PORT fifo=PATH` on stdout and, with `--ready-file`, the same line in that file,
written atomically and removed again when the proxy stops.

Errors that mitmproxy or the addon log while starting are collected here instead of being
printed as log lines, so a failed start says exactly one thing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys

from mitmproxy import ctx

from . import mitm_internals
from .ports import explain_address_in_use

STARTUP_FAILED = 2


class _Collect(logging.Handler):
    """Keeps the ERROR records logged while starting; `hide` keeps them off the console."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.starting = True

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def hide(self, record: logging.LogRecord) -> bool:
        return not (self.starting and record.levelno >= logging.ERROR)


class StartupCheck:
    def __init__(self, prog: str, listen: tuple[str, int], fifo: str | None,
                 ready_file: str | None) -> None:
        self.prog = prog
        self.listen = listen
        self.fifo = fifo
        self.ready_file = ready_file
        self.exit_status = 0
        self._wrote_ready_file: str | None = None
        self._collect = _Collect()
        root = logging.getLogger()
        for handler in root.handlers:
            handler.addFilter(self._collect.hide)
        root.addHandler(self._collect)

    def running(self) -> None:
        problem = self._problem()
        self._collect.starting = False
        logging.getLogger().removeHandler(self._collect)
        if problem:
            self.fail(problem)
            return
        self._announce()

    def done(self) -> None:
        self._remove_ready_file()

    def fail(self, problem: str) -> None:
        print(f"{self.prog}: {problem}", file=sys.stderr, flush=True)
        self.exit_status = STARTUP_FAILED
        ctx.master.shutdown()

    def _problem(self) -> str | None:
        proxyserver = ctx.master.addons.get("proxyserver")
        host, port = self.listen
        for _, exc in mitm_internals.listen_failures(proxyserver):
            cause = getattr(exc, "__cause__", None) or exc
            if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                return (f"--listen {host}:{port}: address already in use: "
                        f"{explain_address_in_use(port)}")
            reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else cause
            return f"--listen {host}:{port}: cannot listen: {reason}"
        if not proxyserver.listen_addrs():
            return f"--listen {host}:{port}: the listener did not start"
        if self._collect.records:
            return self._collect.records[0].getMessage().splitlines()[0]
        return None

    def _announce(self) -> None:
        addresses = ctx.master.addons.get("proxyserver").listen_addrs()
        host, port = addresses[0][:2]
        line = f"ready {host}:{port} fifo={self.fifo or '-'}"
        if self.ready_file:
            try:
                self._write_ready_file(line)
            except OSError as exc:
                self.fail(f"--ready-file {self.ready_file}: {exc.strerror or exc}")
                return
        print(line, flush=True)

    def _write_ready_file(self, line: str) -> None:
        assert self.ready_file
        temporary = f"{self.ready_file}.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            f.write(line + "\n")
        os.replace(temporary, self.ready_file)  # a reader sees no file or the whole line
        self._wrote_ready_file = line

    def _remove_ready_file(self) -> None:
        if not (self.ready_file and self._wrote_ready_file):
            return
        with contextlib.suppress(OSError):
            with open(self.ready_file) as f:
                still_ours = f.read().strip() == self._wrote_ready_file
            if still_ours:
                os.unlink(self.ready_file)
        self._wrote_ready_file = None
