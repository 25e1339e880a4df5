"""Start-up as a harness sees it: the real `wirefault proxy` and `mitmdump` processes.

Ready means ready (a `ready` line, a ready file, `wirefault wait-ready`), a failed start exits
2 with one line naming the option, a restart on the same port works, and nothing is left
behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fifo_helpers import wait_until
from pgserver import free_port
from proxy_helpers import BIN, MITMDUMP_SCRIPT, running_proxy, stop_process

from wirefault.fifo_client import CommandError, FaultProxy
from wirefault.fifo_client.transport import Deadline, exchange
from wirefault.proxy.ports import ephemeral_range

WIREFAULT = str(BIN / "wirefault")


def proxy_command(port: int, upstream: int, *extra: str) -> list[str]:
    return [WIREFAULT, "proxy", "--listen", f"127.0.0.1:{port}",
            "--upstream", f"127.0.0.1:{upstream}", *extra]


def run_start(command: list[str], timeout: float = 30) -> tuple[subprocess.CompletedProcess,
                                                               float]:
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    return result, time.monotonic() - started


@contextlib.contextmanager
def started(command: list[str]) -> Iterator[subprocess.Popen]:
    """A proxy process with piped output, stopped with SIGTERM at the end."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield process
    finally:
        stop_process(process)
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()


def ready_line(process: subprocess.Popen) -> str:
    """The first line the process prints: its ready line (or "" if it died first)."""
    assert process.stdout is not None
    return process.stdout.readline().strip()


# -- failed starts ------------------------------------------------------------------------------


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


BAD_STARTS = {
    # name: (extra arguments, what the one line must say)
    "bad rule": (["--rule", "conn.onQury().kill()"],
                 "wirefault proxy: argument --rule: column 6: unknown message type 'Qury' "
                 "for protocol postgres; did you mean 'Query'?"),
    "negative kill grace": (["--kill-grace", "-1"], "argument --kill-grace: must be"),
    "reply timeout 0": (["--fifo-reply-timeout", "0"], "argument --fifo-reply-timeout:"),
    "recorder limit 0": (["--recorder-limit", "0"], "argument --recorder-limit: must be >= 1"),
    "negative max frame": (["--max-frame", "-1"], "argument --max-frame: must be >= 0"),
    "one source label": (["--source-labels", "coordinator"], "argument --source-labels:"),
    "empty source label": (["--source-labels", "a,"], "argument --source-labels:"),
    "fifo is a regular file": (["--fifo", "{tmp}/regular"],
                               "/regular: exists and is a regular file, not a FIFO"),
    "fifo directory missing": (["--fifo", "{tmp}/missing/x.fifo"],
                               "/missing/x.fifo: its directory"),
    "ready file directory missing": (["--ready-file", "{tmp}/missing/ready"], "--ready-file"),
}


@pytest.mark.parametrize("case", list(BAD_STARTS))
def test_a_failed_start_exits_2_with_one_line(case, tmp_path, pg):
    extra, expected = BAD_STARTS[case]
    (tmp_path / "regular").write_text("not a FIFO")
    arguments = [a.format(tmp=tmp_path) for a in extra]
    result, _ = run_start(proxy_command(free_port(), pg.port, *arguments))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result
    assert len(lines) == 1 and expected in lines[0], lines
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert (tmp_path / "regular").read_text() == "not a FIFO"


def test_a_taken_port_exits_2_in_time_naming_the_listener(listening_port, pg):
    result, seconds = run_start(proxy_command(listening_port, pg.port))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"wirefault proxy: --listen 127.0.0.1:{listening_port}: address already in use: "
        "another process is listening there"]
    assert result.stdout == ""
    print(f"exit after {seconds:.2f} s")


def test_upstream_syntax_is_refused_with_one_line():
    result, _ = run_start([WIREFAULT, "proxy", "--listen", "9", "--upstream", "localhost"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "wirefault proxy: argument --upstream: not a port: 'localhost'"]


def test_a_port_held_by_an_outgoing_connection_is_explained(pg):
    """The cause of failed restarts: a closed outgoing connection that had the listen port
    as its local port keeps it in TIME_WAIT, and SO_REUSEADDR does not override that."""
    span = ephemeral_range()
    assert span, "no ip_local_port_range"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.socket()
        for port in range(span[0] + 1000, span[1]):
            with contextlib.suppress(OSError):
                client.bind(("127.0.0.1", port))
                break
        client.connect(server.getsockname())
        accepted, _ = server.accept()
        client.close()  # the client closes first: its side goes to TIME_WAIT
        accepted.close()
    result, _ = run_start(proxy_command(port, pg.port))
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.startswith(f"wirefault proxy: --listen 127.0.0.1:{port}: address already in use")
    assert "TIME_WAIT" in line and f"ephemeral range {span[0]}-{span[1]}" in line, line


def test_mitmdump_refuses_to_start_when_the_fifo_cannot_be_had(tmp_path, pg):
    regular = tmp_path / "regular"
    regular.write_text("x")
    result, _ = run_start([
        str(BIN / "mitmdump"), "--rawtcp", "-p", str(free_port()), "--listen-host", "127.0.0.1",
        "--mode", f"reverse:tcp://127.0.0.1:{pg.port}", "-s", str(MITMDUMP_SCRIPT),
        "--set", f"fifo={regular}", "--set", "termlog_verbosity=warn"])
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"fifo {regular}: exists and is a regular file, not a FIFO" in output, output
    assert "Traceback" not in output


# -- ready --------------------------------------------------------------------------------------


def test_ready_line_and_ready_file_then_both_gone_at_exit(tmp_path, pg):
    port, fifo, ready = free_port(), tmp_path / "p.fifo", tmp_path / "ready"
    with started(proxy_command(port, pg.port, "--fifo", str(fifo),
                               "--ready-file", str(ready))) as process:
        line = ready_line(process)
        assert line == f"ready 127.0.0.1:{port} fifo={fifo}"
        assert ready.read_text() == line + "\n"
        # Ready means serving: the listener accepts and the FIFO answers, at once.
        with psycopg.connect(pg.dsn(port), autocommit=True) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
        FaultProxy(str(fifo), timeout=2).send("conn.allow()")
        process.terminate()
        assert process.wait(10) == 0
    assert not ready.exists()
    assert not fifo.exists()  # the proxy created it, so it removed it
    assert not Path(f"{fifo}.lock").exists()


def test_wait_ready_returns_once_a_proxy_serves_and_2_when_none_does(tmp_path, pg):
    fifo = tmp_path / "later" / "p.fifo"  # not even its directory exists yet
    waiter = subprocess.Popen([WIREFAULT, "wait-ready", "--fifo", str(fifo), "--timeout", "60"],
                              stderr=subprocess.PIPE, text=True)
    try:
        (tmp_path / "later").mkdir()
        with started(proxy_command(free_port(), pg.port, "--fifo", str(fifo))) as process:
            assert ready_line(process).startswith("ready ")
            assert waiter.wait(60) == 0
    finally:
        if waiter.poll() is None:
            waiter.kill()
        waiter.wait()
    result = subprocess.run([WIREFAULT, "wait-ready", "--fifo", str(fifo), "--timeout", "0.3"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"no proxy answered on FIFO {fifo} within 0.3 s" in result.stderr


def test_restarting_on_one_port_right_after_a_burst_always_listens(tmp_path, pg):
    port = free_port()
    for round_number in range(20):
        with started(proxy_command(port, pg.port)) as process:
            line = ready_line(process)
            assert line == f"ready 127.0.0.1:{port} fifo=-", (round_number, line,
                                                              process.stderr.read())
            burst = [psycopg.connect(pg.dsn(port), autocommit=True) for _ in range(20)]
            for connection in burst:
                connection.execute("SELECT 1")
            process.terminate()  # with the burst's connections still open
            assert process.wait(10) == 0
            for connection in burst:
                with contextlib.suppress(psycopg.Error):
                    connection.close()


def test_a_refused_upstream_is_logged_once_per_attempt(tmp_path):
    dead = free_port()  # nothing listens there
    with started(proxy_command(free_port(), dead)) as process:
        line = ready_line(process)
        port = int(line.split()[1].rpartition(":")[2])
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"\0\0\0\x08\x04\xd2\x16\x2f")  # SSLRequest: the client speaks first
                assert s.recv(10) == b""  # the client's connection is closed
        process.terminate()
        process.wait(10)
        log = process.stderr.read()
    warnings = [w for w in log.splitlines() if "cannot connect to upstream" in w]
    assert len(warnings) == 3, log
    assert all(f"127.0.0.1:{dead}" in w and "WARNING" in w for w in warnings)


# -- commands a proxy must refuse -----------------------------------------------------------


@pytest.fixture
def proxy(pg):
    with running_proxy(pg.port) as running:
        yield running


def test_cancel_of_the_proxy_or_its_parent_is_refused(proxy):
    control = FaultProxy(proxy.fifo)
    for pid, what in ((proxy.process.pid, "the proxy itself"),
                      (os.getpid(), "the process that started the proxy")):
        with pytest.raises(CommandError, match=f"cancel\\({pid}\\) would interrupt {what}"):
            control.send(f'conn.onQuery().cancel({pid})')
    assert proxy.process.poll() is None


def test_a_command_that_is_not_utf8_is_rejected_and_the_rule_stays(proxy, pg):
    control = FaultProxy(proxy.fifo)
    control.send('conn.onQuery(query="^SELECT 2").kill()')
    reply = exchange(proxy.fifo, 'conn.onQuery(query="caf\xe9").kill()\n'.encode("latin-1"),
                     Deadline(10))
    assert b"not valid UTF-8" in reply, reply
    with psycopg.connect(pg.dsn(proxy.port), autocommit=True) as c, \
            pytest.raises(psycopg.OperationalError):
        c.execute("SELECT 2")  # the previous rule is still in force


def test_send_dash_reads_a_1_mb_command_from_stdin(proxy, pg):
    long_pattern = "x" * 1_000_000
    command = f'conn.onQuery(query="^{long_pattern}").kill()\n'
    result = subprocess.run([WIREFAULT, "send", "--fifo", proxy.fifo, "-"], input=command,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    with psycopg.connect(pg.dsn(proxy.port), autocommit=True) as c:
        assert c.execute("SELECT 3").fetchone() == (3,)  # the long rule does not match
    result = subprocess.run([WIREFAULT, "send", "--fifo", proxy.fifo, "-"],
                            input=b"conn.onQuery(query=\"caf\xe9\").kill()",
                            capture_output=True, timeout=60)
    assert result.returncode == 1
    assert b"not valid UTF-8 (byte 0xe9 at offset 23)" in result.stderr


# -- Citus's command line, verbatim -------------------------------------------------------------


def test_citus_mitmdump_command_line_relays_raw_tcp_and_kills_a_commit(pg):
    with pg.connect(autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS citus_cmdline (x int)")
        c.execute("TRUNCATE citus_cmdline")
    with running_proxy(pg.port, kind="mitmdump-citus") as proxy:
        FaultProxy(proxy.fifo).send('conn.onQuery(query="^COMMIT").kill()')
        with psycopg.connect(pg.dsn(proxy.port)) as c:
            c.execute("INSERT INTO citus_cmdline VALUES (1)")
            with pytest.raises(psycopg.OperationalError):
                c.commit()
        log = proxy.log()
    assert "relaying raw TCP" in log, log
    assert "TLS" not in log.replace("relaying raw TCP", ""), log
    with pg.connect(autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM citus_cmdline").fetchone() == (0,)


# -- cancel(pid) pauses the whole proxy ---------------------------------------------------------

SIGNAL_CATCHER = """
import signal, sys, time
def caught(*_):
    print(time.monotonic(), time.time(), flush=True)
    sys.exit(0)
signal.signal(signal.SIGINT, caught)
print("ready", flush=True)
time.sleep(60)
"""

LAUNCHES = {"runner": ("runner", []),
            "mitmdump-slow-path": ("mitmdump", ["--set", "fast_path=false"])}


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_cancel_holds_every_connection_until_the_hold_ends(launch, pg):
    kind, extra = LAUNCHES[launch]
    catcher = subprocess.Popen([sys.executable, "-c", SIGNAL_CATCHER], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert catcher.stdout.readline() == "ready\n"
        with running_proxy(pg.port, kind=kind, extra_args=extra) as proxy, \
                psycopg.connect(pg.dsn(proxy.port), autocommit=True) as trigger, \
                psycopg.connect(pg.dsn(proxy.port), autocommit=True) as other:
            FaultProxy(proxy.fifo).send(
                f'conn.onQuery(query="^SELECT .trigger.").cancel({catcher.pid})')
            cursor = trigger.cursor()
            sender = _in_thread(lambda: cursor.execute(
                "SELECT 'trigger', extract(epoch FROM statement_timestamp())::float8"
            ).fetchone())
            signalled_monotonic, signalled_wall = map(float, catcher.stdout.readline().split())
            # The hold is on: a query on the other connection waits for its end.
            answered = other.execute("SELECT 1").fetchone()
            done = time.monotonic()
            assert answered == (1,)
            trigger_row = sender.result(30)
        assert done - signalled_monotonic >= 0.09, done - signalled_monotonic
        # The signal landed before the server ran the triggering query.
        assert trigger_row[0] == "trigger" and trigger_row[1] >= signalled_wall
    finally:
        if catcher.poll() is None:
            catcher.kill()
        catcher.wait()


class _Result:
    def __init__(self) -> None:
        self.value: object = None
        self.error: BaseException | None = None
        self.done = False

    def result(self, timeout: float) -> object:
        assert wait_until(lambda: self.done, timeout=timeout)
        if self.error:
            raise self.error
        return self.value


def _in_thread(function) -> _Result:
    import threading

    outcome = _Result()

    def run() -> None:
        try:
            outcome.value = function()
        except BaseException as exc:
            outcome.error = exc
        outcome.done = True

    threading.Thread(target=run, daemon=True).start()
    return outcome


def test_sigterm_and_sigint_both_stop_the_runner_cleanly(tmp_path, pg):
    for signum in (signal.SIGTERM, signal.SIGINT):
        fifo = tmp_path / f"{signum}.fifo"
        with started(proxy_command(free_port(), pg.port, "--fifo", str(fifo))) as process:
            assert ready_line(process).startswith("ready ")
            process.send_signal(signum)
            assert process.wait(10) == 0
            assert "Traceback" not in process.stderr.read()
        assert not fifo.exists()
