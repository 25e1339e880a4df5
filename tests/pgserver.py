"""A throwaway PostgreSQL server for tests, the demo and the benchmarks.

initdb into a temporary directory, start on a free port with its Unix socket in that
directory. PostgreSQL refuses to run as root, so as root the server runs as the
unprivileged `postgres` account (Debian's package creates it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg

from wirefault.proxy.ports import ephemeral_range

SERVER_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries or the account to run them are missing."""


def find_bindir() -> str:
    """The directory holding initdb and postgres, newest version first."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
        reverse=True,
    )
    for bindir in candidates:
        if os.path.exists(os.path.join(bindir, "initdb")):
            return bindir
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, postgres) not found: "
        "install Debian's 'postgresql' package (apt-get install postgresql)"
    )


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range.

    A port the kernel may hand to outgoing connections can be taken by one while its server
    is down, and then a restart on it fails for up to a minute (proxy/ports.py explains).
    """
    span = ephemeral_range()
    low = span[0] if span else 32768
    for _ in range(100):
        port = random.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> str | None:
    """The account to run the server as: None for the current one, else `postgres`."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresUnavailable(
            "running as root, and PostgreSQL refuses to run as root; no unprivileged "
            f"'{SERVER_USER}' account exists to run it as (Debian's postgresql package "
            "creates one, or: useradd --system postgres)"
        ) from None
    return SERVER_USER


@dataclass
class PostgresServer:
    """A running server. `dsn()` connects over TCP to 127.0.0.1:`port`."""

    bindir: str
    basedir: str
    port: int
    user: str = "postgres"
    dbname: str = "postgres"
    run_as: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def datadir(self) -> str:
        return os.path.join(self.basedir, "data")

    @property
    def sockdir(self) -> str:
        return self.basedir

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def dsn(self, port: int | None = None, host: str | None = None, **extra: str) -> str:
        params = {
            "host": host or self.host,
            "port": str(port or self.port),
            "user": self.user,
            "dbname": self.dbname,
            "connect_timeout": "10",
            **extra,
        }
        return " ".join(f"{k}={v}" for k, v in params.items())

    def connect(self, port: int | None = None, **kwargs) -> psycopg.Connection:
        return psycopg.connect(self.dsn(port), **kwargs)

    def bin(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    def _popen_kwargs(self) -> dict:
        """Run as the server's account with that account's groups, as a packaged server runs
        (subprocess's `user=` alone would keep root's gid 0)."""
        if not self.run_as:
            return {}
        gid = pwd.getpwnam(self.run_as).pw_gid
        return {"user": self.run_as, "group": gid,
                "extra_groups": os.getgrouplist(self.run_as, gid)}

    def start(self, timeout: float = 30.0) -> None:
        log = open(os.path.join(self.basedir, "server.log"), "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                self.bin("postgres"),
                "-D", self.datadir,
                "-p", str(self.port),
                "-k", self.sockdir,
                "-c", "listen_addresses=127.0.0.1",
                "-c", "fsync=off",
                "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off",
                "-c", "max_connections=600",
                "-c", "shared_buffers=64MB",
                "-c", "log_min_messages=warning",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
            **self._popen_kwargs(),
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited at start:\n{self.log_tail()}")
            try:
                with self.connect():
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start:\n{self.log_tail()}") from None
                time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.basedir, "server.log")) as f:
            return "".join(f.readlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def create(port: int | None = None) -> PostgresServer:
    """initdb a new cluster in a fresh temporary directory (not started)."""
    bindir = find_bindir()
    run_as = _run_as()
    basedir = tempfile.mkdtemp(prefix="wirefault-pg-")
    os.chmod(basedir, 0o755)
    if run_as:
        entry = pwd.getpwnam(run_as)
        os.chown(basedir, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(bindir=bindir, basedir=basedir, port=port or free_port(),
                            run_as=run_as)
    result = subprocess.run(
        [server.bin("initdb"), "-D", server.datadir, "-U", server.user, "--auth=trust",
         "-E", "UTF8", "--locale=C", "--no-sync"],
        capture_output=True,
        text=True,
        cwd=basedir,
        **server._popen_kwargs(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
    return server


@contextlib.contextmanager
def running_server(port: int | None = None) -> Iterator[PostgresServer]:
    """A started throwaway server, stopped and removed on exit."""
    server = create(port)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.basedir, ignore_errors=True)
