"""Start and stop real wirefault proxy processes for end-to-end tests, the demo and benchmarks."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fifo_helpers import fifo_dir, make_fifo
from pgserver import free_port

from wirefault.fifo_client import FaultProxy

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
MITMDUMP_SCRIPT = REPO / "proxy" / "mitmdump_script.py"


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"proxy exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"proxy did not listen on {port} within {timeout}s")


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS:")


def peak_rss_kib(pid: int) -> int:
    """The process's peak RSS so far (VmHWM)."""
    return _status_kib(pid, "VmHWM:")


@dataclass
class RunningProxy:
    port: int
    fifo: str
    process: subprocess.Popen
    log_path: str
    upstream_port: int
    extra: dict = field(default_factory=dict)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def rss_kib(self) -> int:
        return rss_kib(self.process.pid)

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


OTHER_PROXY = "WIREFAULT_TEST_PROXY_PATH"
"""A folder holding another checkout's `wirefault` package: the proxies the tests start run
that code (the clients stay this checkout's), to show a regression test failing there."""


def proxy_environment() -> dict[str, str]:
    env = dict(os.environ)
    if env.get(OTHER_PROXY):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env[OTHER_PROXY],
                                                          env.get("PYTHONPATH")]))
    return env


def _command(kind: str, port: int, upstream_port: int, fifo: str, protocol: str,
             rule: str | None, extra_args: list[str], reply_timeout: float) -> list[str]:
    if kind == "runner":
        cmd = [str(BIN / "wirefault"), "proxy", "--listen", f"127.0.0.1:{port}",
               "--upstream", f"127.0.0.1:{upstream_port}", "--protocol", protocol,
               "--fifo", fifo, "--fifo-reply-timeout", str(reply_timeout)]
        if rule:
            cmd += ["--rule", rule]
        return cmd + extra_args
    if kind == "mitmdump-citus":
        # Citus 13's harness, verbatim: no scheme in the reverse target, mitmproxy's default
        # (eager) connection strategy, every interface.
        return [str(BIN / "mitmdump"), "--rawtcp", "-p", str(port),
                "--mode", f"reverse:localhost:{upstream_port}", "-s", str(MITMDUMP_SCRIPT),
                "--set", f"fifo={fifo}", "--set", "flow_detail=0",
                "--set", "termlog_verbosity=warn", *extra_args]
    if kind == "mitmdump":
        cmd = [str(BIN / "mitmdump"), "--rawtcp", "-p", str(port), "--listen-host", "127.0.0.1",
               "--mode", f"reverse:tcp://127.0.0.1:{upstream_port}", "-s", str(MITMDUMP_SCRIPT),
               "--set", f"fifo={fifo}", "--set", f"protocol={protocol}",
               "--set", "flow_detail=0", "--set", "termlog_verbosity=warn",
               # as the runner does: lazy unless the server may speak first
               "--set", f"connection_strategy={'eager' if protocol == 'raw' else 'lazy'}",
               "--set", f"fifo_reply_timeout={reply_timeout}"]
        if rule:
            cmd += ["--set", f"slug={rule}"]
        return cmd + extra_args
    raise ValueError(kind)


@contextlib.contextmanager
def running_proxy(
    upstream_port: int,
    kind: str = "runner",
    protocol: str = "postgres",
    rule: str | None = None,
    fifo: str | None = None,
    extra_args: list[str] | None = None,
    user: str | None = None,
    reply_timeout: float = 3.0,
) -> Iterator[RunningProxy]:
    """A proxy process in front of 127.0.0.1:upstream_port, stopped with SIGINT on exit."""
    tmp = tempfile.mkdtemp(prefix="wirefault-proxy-")
    os.chmod(tmp, 0o755)
    fifo = fifo or os.path.join(tmp, "wirefault.fifo")
    port = free_port()
    log_path = os.path.join(tmp, "proxy.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            _command(kind, port, upstream_port, fifo, protocol, rule, extra_args or [],
                     reply_timeout),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=proxy_environment(),
            **({"user": user} if user else {}),
        )
    proxy = RunningProxy(port, fifo, process, log_path, upstream_port)
    try:
        wait_for_port(port, process)
        FaultProxy(fifo, timeout=30).wait_ready()  # the command channel serves
        if process.poll() is not None:
            raise RuntimeError(f"proxy exited with {process.returncode}")
        yield proxy
    except Exception:
        print(proxy.log(), file=sys.stderr)
        raise
    finally:
        proxy.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def running_proxy_for_server_side_copy(upstream_port: int, **kwargs) -> Iterator[RunningProxy]:
    """A proxy whose FIFO the PostgreSQL server's own account can open (for the SQL helpers)."""
    with fifo_dir() as directory:
        fifo = make_fifo(directory / "proxy.fifo", for_postgres=True)
        with running_proxy(upstream_port, fifo=str(fifo), **kwargs) as running:
            yield running


def read_line(stream, timeout: float = 30.0) -> str:
    """One line of a child's output; '' at EOF or after `timeout` (then the test fails)."""
    import threading

    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL to its group if it does not exit within 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class RunningServe:
    process: subprocess.Popen
    ready: str
    """The ready line, `ready NAME=HOST:PORT ... api=HOST:PORT`."""
    words: dict[str, str] = field(default_factory=dict)
    """The ready line's NAME=ADDRESS words."""
    log_path: Path | None = None
    """Its stderr (a file, not a pipe: a pipe nobody reads would stop it once full)."""

    def log(self) -> str:
        """What it wrote on stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def port(self, name: str) -> int:
        return int(self.words[name].rpartition(":")[2])

    @property
    def api(self) -> str:
        return f"http://{self.words['api']}"


@contextlib.contextmanager
def running_serve(config: Path | None, *args: str) -> Iterator[RunningServe]:
    """A real `wirefault serve` process (its HTTP API on a free loopback port), up once its
    ready line came; stopped at the end."""
    argv = [str(BIN / "wirefault"), "serve", "--api", "127.0.0.1:0", *args]
    if config is not None:
        argv += ["--config", str(config)]
    with tempfile.TemporaryDirectory(prefix="wirefault-serve-") as folder:
        log_path = Path(folder) / "stderr.log"
        with log_path.open("w") as log:
            # stdout carries only the ready line.
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            ready = read_line(process.stdout).strip()
            assert ready, log_path.read_text() if process.poll() is not None else \
                "no ready line"
            words = dict(word.split("=", 1) for word in ready.split()[1:])
            yield RunningServe(process, ready, words, log_path)
        finally:
            stop_process(process)
            if process.stdout:
                process.stdout.close()


def proc_state(pid: int) -> str | None:
    """The process's state letter in /proc/PID/stat (R, S, T...), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def gone(pid: int) -> bool:
    """The process exited (a zombie counts: it runs no more)."""
    return proc_state(pid) in (None, "Z", "X")


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    """Poll `predicate` until it is true; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def kill_what_runs_left(folder: Path) -> None:
    """Kill every process and watchdog that chaos runs under `folder` recorded in their
    processes.json (a paused world, a test that failed midway): nothing outlives a test."""
    import json

    from wirefault.fifo_client.chaos_reaping import kill_recorded

    for state_file in folder.glob("**/processes.json"):
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(state_file.read_text())
            for entry in state.get("processes", []):
                if entry.get("pid"):
                    kill_recorded(entry)
            watchdog = state.get("watchdog_pid")
            if watchdog and not gone(watchdog):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(watchdog, signal.SIGKILL)


def listen_queue(port: int) -> int:
    """Connections waiting in the accept queue of the listener on 127.0.0.1:`port` (a
    listening socket's rx_queue in /proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                return int(fields[4].partition(":")[2], 16)
    return 0
