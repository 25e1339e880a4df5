"""The listeners a benchmark measures, each in front of the same throwaway PostgreSQL.

Every target is started fresh for each measurement and stopped right after, so no run
inherits another's state (a full recorder, a grown heap) and memory figures start clean.
Each process gets its own session (process group): stopping it signals the whole group,
and `stop_all` ends whatever is still running when the harness exits or is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pgserver import PostgresServer, free_port
from proxy_helpers import wait_for_port

VENV_BIN = Path(sys.executable).parent
NEVER_FIRING_RULE = 'conn.onQuery(query="^NEVER").kill()'
ALLOW_RULE = "conn.allow()"
DELAY0_RULE = "conn.onQuery().delay(0)"
TEN_NEVER_FIRING_FAULTS = (
    'faults.add("f01").onQuery(query="^NEVER").kill()',
    'faults.add("f02").onQuery(query="(?i)^COMMIT").error("40001")',
    'faults.add("f03").onQuery(query="^INSERT INTO never").delay(100)',
    'faults.add("f04").onParse(query="^NEVER").kill()',
    'faults.add("f05").onExecute(query="^COMMIT").kill()',
    'faults.add("f06").onCommandComplete(command="^NEVER").kill()',
    'faults.add("f07").onErrorResponse().kill()',
    'faults.add("f08").fromClient().contains(b"NEVER-IN-ANY-FRAME").reset()',
    'faults.add("f09").where(application_name="^never$").onQuery().kill()',
    'faults.add("f10").onCopyFail().kill()',
)
"""Ten faults that never fire on the benchmark's traffic, with different filters: Query text
(three regexes), Parse and Execute (statement tracking on), a server message's field, two
server or client types with no field, raw bytes of every client frame, a where()."""


@dataclass(frozen=True)
class Target:
    name: str
    kind: str
    """direct, mitmdump, wirefault, serve, floor, haproxy or toxiproxy."""
    rule: str | None = None
    faults: tuple[str, ...] = ()
    """wirefault: commands sent through its FIFO once it listens (after `rule`)."""
    latency_toxic: bool = False
    """toxiproxy: add a latency toxic of 0 ms (downstream, the API's default stream)."""
    description: str = ""
    protocol: str = "postgres"
    on_request: bool = False
    """Measured only when named in --targets (a diagnostic, not part of the standard run)."""
    workloads: tuple[str, ...] | None = None
    """Only these workloads measure this target (None: every workload)."""

    @property
    def has_proxy_process(self) -> bool:
        return self.kind != "direct"


TARGETS: tuple[Target, ...] = (
    Target("direct", "direct", description="the PostgreSQL server itself"),
    Target("mitmdump", "mitmdump",
           description="plain mitmdump --rawtcp reverse mode, no script (the mitmproxy floor)"),
    Target("wirefault-armed", "wirefault", NEVER_FIRING_RULE,
           description=f"wirefault with {NEVER_FIRING_RULE} (a rule that never fires)"),
    Target("wirefault-allow", "wirefault", ALLOW_RULE,
           description=f"wirefault with {ALLOW_RULE}"),
    Target("wirefault-raw", "wirefault", ALLOW_RULE, protocol="raw", on_request=True,
           description="wirefault with --protocol raw: the relay alone, no framing "
                       "(the ceiling of the Python relay)"),
    Target("wirefault-serve", "serve", NEVER_FIRING_RULE,
           description=f"wirefault serve, five proxies configured, the first used, with "
                       f"{NEVER_FIRING_RULE} (against wirefault-armed: the cost of many "
                       f"proxies in one process)"),
    Target("wirefault-10faults", "wirefault", TEN_NEVER_FIRING_FAULTS[0],
           faults=TEN_NEVER_FIRING_FAULTS[1:],
           workloads=("pgbench-1", "pgbench-8", "copy-out", "copy-in"),
           description="wirefault with 10 faults armed that never fire, different filters "
                       "(against wirefault-armed: the cost of more faults)"),
    Target("wirefault-delay0", "wirefault", DELAY0_RULE,
           workloads=("pgbench-1", "pgbench-8", "copy-out", "copy-in"),
           description=f"wirefault with {DELAY0_RULE}: a fault that fires on every "
                       f"transaction"),
    Target("python-floor", "floor", workloads=("pgbench-1", "pgbench-8"),
           description="a bare Python relay on uvloop transports, nothing per read but the "
                       "write (floor_relay.py): what any relay on wirefault's runtime pays"),
    Target("haproxy", "haproxy",
           description="HAProxy mode tcp, one thread (the relay reference)"),
    Target("toxiproxy", "toxiproxy",
           description="Toxiproxy's server (--toxiproxy PATH), one proxy, no toxic"),
    Target("toxiproxy-latency0", "toxiproxy", latency_toxic=True,
           description="Toxiproxy with a latency toxic of 0 ms (downstream)"),
)

SERVE_PROXIES = 5


@dataclass
class Listener:
    """A started target: where clients connect and, for proxies, the process to watch."""

    target: Target
    port: int
    pid: int | None


_running: dict[int, subprocess.Popen] = {}
"""Processes started here and not yet stopped, by pid."""


def _stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    _running.pop(process.pid, None)
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def stop_all() -> None:
    """Stop every process this module started that is still running."""
    for process in list(_running.values()):
        _stop(process, timeout=5.0)


def _log_tail(path: str, chars: int = 2000) -> str:
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        return f.read()[-chars:]
    return ""


@contextlib.contextmanager
def _process(command: list[str], port: int, workdir: str, env: dict[str, str] | None = None,
             start_timeout: float = 30.0, stop_timeout: float = 10.0
             ) -> Iterator[subprocess.Popen]:
    """Run `command` in its own session until it listens on `port`; stop it on exit."""
    log_path = os.path.join(workdir, "target.log")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    _running[process.pid] = process
    try:
        try:
            wait_for_port(port, process, timeout=start_timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{command[0]} did not start: {exc}\n{_log_tail(log_path)}") \
                from None
        yield process
    finally:
        _stop(process, stop_timeout)


def _mitmdump_command(port: int, upstream: int) -> list[str]:
    return [str(VENV_BIN / "mitmdump"), "--rawtcp", "-p", str(port),
            "--listen-host", "127.0.0.1", "--mode", f"reverse:tcp://127.0.0.1:{upstream}",
            "--set", "flow_detail=0", "--set", "termlog_verbosity=warn",
            "--set", "connection_strategy=lazy"]


def _serve_command(port: int, upstream: int, rule: str, workdir: str) -> list[str]:
    """`wirefault serve` with SERVE_PROXIES proxies to the same server; the first on `port`
    (the one measured) holds `rule`, the others are idle."""
    lines = ["proxies:"]
    ports = [port] + [free_port() for _ in range(SERVE_PROXIES - 1)]
    for index, listen in enumerate(ports):
        lines += [f"  - name: pg{index}", f"    listen: 127.0.0.1:{listen}",
                  f"    upstream: 127.0.0.1:{upstream}"]
        if index == 0:
            lines += ["    faults:", f"      - '{rule}'"]
    config = os.path.join(workdir, "proxies.yaml")
    with open(config, "w") as f:
        f.write("\n".join(lines) + "\n")
    return [sys.executable, "-m", "wirefault.proxy.serve", "--config", config, "--api", "none"]


def _wirefault_command(port: int, upstream: int, rule: str, protocol: str,
                       fifo: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "wirefault.proxy.runner", "--listen", f"127.0.0.1:{port}",
               "--upstream", f"127.0.0.1:{upstream}", "--protocol", protocol, "--rule", rule]
    return command + (["--fifo", fifo] if fifo else [])


def _arm(fifo: str, commands_: tuple[str, ...], expected: int) -> None:
    """Send `commands_` through the runner's FIFO and check that `expected` faults are in
    force."""
    from wirefault.fifo_client import FaultProxy

    proxy = FaultProxy(fifo, timeout=10)
    for command in commands_:
        reply = proxy.send(command)
        if reply:
            raise RuntimeError(f"{command}: {reply}")
    count = len(proxy.faults())
    if count != expected:
        raise RuntimeError(f"{count} faults in force, expected {expected}")


def _check_never_fired(fifo: str) -> None:
    """The faults armed through the FIFO are meant never to fire: a measurement in which
    one did is not one of this target."""
    from wirefault.fifo_client import FaultProxy

    fired = [f"{f.name} fired {f.fired}x" for f in FaultProxy(fifo, timeout=10).faults()
             if f.fired]
    if fired:
        raise RuntimeError(f"a fault meant never to fire fired: {', '.join(fired)}")


# --- Toxiproxy ----------------------------------------------------------------------------

TOXIPROXY_PROXY = "pg"


def _toxiproxy_api(api_port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{api_port}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no $http_proxy
    with opener.open(request, timeout=10) as response:
        return json.loads(response.read() or b"{}")


def configure_toxiproxy(api_port: int, port: int, upstream: int, latency_toxic: bool) -> None:
    """Through Toxiproxy's HTTP API: a proxy from `port` to `upstream`, and with
    `latency_toxic` a latency toxic of 0 ms (jitter 0) on its downstream."""
    _toxiproxy_api(api_port, "/proxies", {
        "name": TOXIPROXY_PROXY, "listen": f"127.0.0.1:{port}",
        "upstream": f"127.0.0.1:{upstream}", "enabled": True})
    if latency_toxic:
        toxic = _toxiproxy_api(api_port, f"/proxies/{TOXIPROXY_PROXY}/toxics", {
            "name": "latency0", "type": "latency", "stream": "downstream", "toxicity": 1.0,
            "attributes": {"latency": 0, "jitter": 0}})
        if toxic.get("attributes", {}).get("latency") != 0:
            raise RuntimeError(f"toxiproxy refused the latency toxic: {toxic}")


def toxiproxy_version(binary: str) -> str:
    result = subprocess.run([binary, "-version"], capture_output=True, text=True)
    return (result.stdout or result.stderr).strip().splitlines()[0] if (
        result.stdout or result.stderr).strip() else "unknown"


def toxiproxy_build(binary: str) -> str:
    """How the binary was built: BINARY.build.txt, written by scripts/build-toxiproxy.sh."""
    with contextlib.suppress(OSError), open(binary + ".build.txt") as f:
        return f.read().strip()
    return "build unknown (no " + os.path.basename(binary) + ".build.txt beside it; " \
           "scripts/build-toxiproxy.sh writes one)"


HAPROXY_CONFIG = """\
global
    maxconn 4096
    nbthread 1

defaults
    mode tcp
    maxconn 4096
    timeout connect 10s
    timeout client 1h
    timeout server 1h

frontend bench
    bind 127.0.0.1:{port}
    default_backend postgres

backend postgres
    server pg 127.0.0.1:{upstream}
"""


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None)


def ensure_haproxy() -> tuple[str | None, str]:
    """HAProxy's path and a note; installs Debian's package when root and it is missing."""
    found = haproxy_binary()
    if found:
        return found, "installed"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "haproxy not installed (not root, so not installed by the harness)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "haproxy"]
    for attempt in range(2):
        if attempt:  # an empty or stale package list is the usual reason the first try fails
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        found = haproxy_binary()
        if result.returncode == 0 and found:
            return found, "installed by the harness (apt-get install haproxy)"
    return None, f"haproxy skipped: apt-get install failed: {result.stderr.strip()[-300:]}"


def haproxy_version(binary: str) -> str:
    result = subprocess.run([binary, "-v"], capture_output=True, text=True)
    first = result.stdout.splitlines()[0] if result.stdout else "unknown"
    return first.split(" - ", 1)[0]  # drop the project's web address that follows


def target_command(target: Target, port: int, upstream: int, workdir: str,
                   fifo: str | None = None, haproxy: str | None = None) -> list[str]:
    """The command line that runs `target` on `port` in front of `upstream` (every kind
    but direct and toxiproxy, which is configured through its API once it runs)."""
    if target.kind == "mitmdump":
        return _mitmdump_command(port, upstream)
    if target.kind == "wirefault":
        return _wirefault_command(port, upstream, target.rule or ALLOW_RULE, target.protocol,
                                  fifo)
    if target.kind == "serve":
        return _serve_command(port, upstream, target.rule or ALLOW_RULE, workdir)
    if target.kind == "floor":
        return [sys.executable, str(Path(__file__).with_name("floor_relay.py")), str(port),
                str(upstream)]
    if target.kind == "haproxy":
        if haproxy is None:
            raise RuntimeError("haproxy is not installed")
        config = os.path.join(workdir, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(HAPROXY_CONFIG.format(port=port, upstream=upstream))
        return [haproxy, "-db", "-f", config]
    raise ValueError(f"unknown target kind {target.kind}")


@contextlib.contextmanager
def started(target: Target, pg: PostgresServer, haproxy: str | None = None,
            toxiproxy: str | None = None, under: tuple[str, ...] = ()) -> Iterator[Listener]:
    """`target` listening in front of `pg` until the block ends; with `under`, its command
    runs under that one (a profiler: starting and stopping get minutes, not seconds)."""
    if target.kind == "direct":
        yield Listener(target, pg.port, None)
        return
    port = free_port()
    workdir = tempfile.mkdtemp(prefix=f"wirefault-bench-{target.name}-")
    fifo = os.path.join(workdir, "wirefault.fifo") if target.faults else None
    try:
        if target.kind == "toxiproxy":
            if toxiproxy is None:
                raise RuntimeError("no toxiproxy binary (--toxiproxy PATH)")
            api_port = free_port()
            command = [toxiproxy, "-host", "127.0.0.1", "-port", str(api_port)]
            with _process(command, api_port, workdir,
                          env=dict(os.environ, LOG_LEVEL="warn")) as process:
                configure_toxiproxy(api_port, port, pg.port, target.latency_toxic)
                wait_for_port(port, process, timeout=30.0)
                yield Listener(target, port, process.pid)
            return
        command = [*under, *target_command(target, port, pg.port, workdir, fifo, haproxy)]
        slow = 10.0 if under else 1.0
        with _process(command, port, workdir, start_timeout=30.0 * slow,
                      stop_timeout=10.0 * slow) as process:
            if fifo:
                _arm(fifo, target.faults, expected=1 + len(target.faults))
            yield Listener(target, port, process.pid)
            if fifo:
                _check_never_fired(fifo)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of `pid`, in KiB."""
    wanted = {"VmRSS:": "rss", "VmHWM:": "hwm"}
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = wanted.get(line.split(":", 1)[0] + ":")
            if key:
                found[key] = int(line.split()[1])
    return found


def settle(seconds: float) -> None:
    """Let a proxy finish closing connections before its memory is read."""
    time.sleep(seconds)
