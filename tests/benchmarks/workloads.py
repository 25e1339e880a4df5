"""The workloads: each measures one target (a started listener) once and returns figures.

A workload is told the listener and a `Bench` with the server, the sizes of this run and the
data prepared once; it returns a flat dict of numbers. Workloads that pay for a warm-up
(imports, code paths, the allocator reaching its working size) run a short untimed pgbench
first.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from pgserver import PostgresServer
from pgwire_client import FRAMES_PER_QUERY, PipelinedClient
from targets import Listener, memory_kib, settle

PGBENCH_SCALE = 1
COPY_ROW_PAYLOAD = 200
"""Characters of filler per COPY row: rows of about 210 bytes, one CopyData frame each."""


@dataclass(frozen=True)
class Sizes:
    pgbench_seconds: int
    warmup_seconds: int
    copy_rows: int
    connections: int
    memory_frames: int
    stall_seconds: float = 10.0


FULL = Sizes(pgbench_seconds=10, warmup_seconds=2, copy_rows=500_000, connections=500,
             memory_frames=1_000_000)
QUICK = Sizes(pgbench_seconds=2, warmup_seconds=1, copy_rows=100_000, connections=100,
              memory_frames=100_000)


@dataclass
class Bench:
    """What every workload needs: the server, the sizes, and data prepared once."""

    pg: PostgresServer
    sizes: Sizes
    workdir: str
    copy_file: str = ""
    copy_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def env(self, port: int) -> dict[str, str]:
        return dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(port), PGUSER=self.pg.user,
                    PGDATABASE=self.pg.dbname, PGCONNECT_TIMEOUT="30")


def _copy_row(number: int) -> str:
    return f"{number}\t{'x' * COPY_ROW_PAYLOAD}\n"


def prepare(bench: Bench) -> None:
    """Once per run, on the server directly: pgbench's tables, the COPY table and its data."""
    pgbench = bench.pg.bin("pgbench")
    subprocess.run([pgbench, "-i", "-q", "-s", str(PGBENCH_SCALE)], env=bench.env(bench.pg.port),
                   check=True, capture_output=True)
    with bench.pg.connect(autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_copy")
        conn.execute("CREATE UNLOGGED TABLE bench_copy (id int, payload text)")
        conn.execute("VACUUM ANALYZE")
    bench.copy_file = os.path.join(bench.workdir, "copy-in.tsv")
    with open(bench.copy_file, "w") as f:
        for start in range(1, bench.sizes.copy_rows + 1, 10_000):
            stop = min(start + 10_000, bench.sizes.copy_rows + 1)
            f.write("".join(_copy_row(n) for n in range(start, stop)))
    bench.copy_bytes = os.path.getsize(bench.copy_file)


# --- pgbench ------------------------------------------------------------------------------

_TPS = re.compile(r"^tps = ([\d.]+) \((?:without|excluding) initial connection", re.M)
_LATENCY = re.compile(r"^latency average = ([\d.]+) ms", re.M)
_TRANSACTIONS = re.compile(r"number of transactions actually processed: (\d+)")
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds `pid` (all its threads) has used so far, from
    /proc/PID/stat (utime, stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far."""
    return sum(cpu_times(pid))


def pgbench(bench: Bench, port: int, seconds: int, clients: int, threads: int,
            proxy_pid: int | None = None) -> dict[str, float]:
    """pgbench -S against `port`; with `proxy_pid`, also that process's CPU time per
    transaction (a steadier figure than tps on a busy or small machine)."""
    command = [bench.pg.bin("pgbench"), "-n", "-S", "-T", str(seconds), "-c", str(clients),
               "-j", str(threads)]
    user_before, system_before = cpu_times(proxy_pid) if proxy_pid else (0.0, 0.0)
    result = subprocess.run(command, env=bench.env(port), capture_output=True, text=True,
                            timeout=seconds + 120)
    tps = _TPS.search(result.stdout)
    transactions = _TRANSACTIONS.search(result.stdout)
    if result.returncode != 0 or not tps or not transactions:
        raise RuntimeError(f"pgbench failed ({result.returncode}): {result.stderr[-500:]}")
    latency = _LATENCY.search(result.stdout)
    failed = _FAILED.search(result.stdout)
    figures = {"tps": float(tps.group(1)),
               "latency_ms": float(latency.group(1)) if latency else float("nan"),
               "failed": float(failed.group(1)) if failed else 0.0}
    if proxy_pid:
        user, system = cpu_times(proxy_pid)
        per_transaction = 1e6 / int(transactions.group(1))
        figures["proxy_user_us"] = (user - user_before) * per_transaction
        figures["proxy_sys_us"] = (system - system_before) * per_transaction
        figures["proxy_cpu_us"] = figures["proxy_user_us"] + figures["proxy_sys_us"]
    return figures


def warm_up(bench: Bench, listener: Listener) -> None:
    pgbench(bench, listener.port, bench.sizes.warmup_seconds, clients=2, threads=1)


def pgbench_1(bench: Bench, listener: Listener) -> dict[str, float]:
    warm_up(bench, listener)
    return pgbench(bench, listener.port, bench.sizes.pgbench_seconds, clients=1, threads=1,
                   proxy_pid=listener.pid)


def pgbench_8(bench: Bench, listener: Listener) -> dict[str, float]:
    warm_up(bench, listener)
    return pgbench(bench, listener.port, bench.sizes.pgbench_seconds, clients=8, threads=2,
                   proxy_pid=listener.pid)


# --- COPY ---------------------------------------------------------------------------------

_TIMING = re.compile(r"^Time: ([\d.]+) ms", re.M)


def _psql_timed(bench: Bench, port: int, sql: str, stdin_path: str | None = None) -> float:
    """Seconds psql reports for `sql` alone (start-up and connecting excluded)."""
    command = [bench.pg.bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null",
               "-c", "\\timing on", "-c", sql]
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        result = subprocess.run(command, env=bench.env(port), stdin=stdin, capture_output=True,
                                text=True, timeout=600)
    finally:
        if stdin_path:
            stdin.close()
    timing = _TIMING.search(result.stdout)
    if result.returncode != 0 or not timing:
        raise RuntimeError(f"psql failed ({result.returncode}): {result.stderr[-500:]}")
    return float(timing.group(1)) / 1000


COPY_REPEATS = 3
"""COPYs per measurement, the median kept: one 104 MB COPY takes about 0.3 s, short enough
for a scheduling accident on 2 cores to halve it."""


def _copy_figures(bench: Bench, seconds: list[float]) -> dict[str, float]:
    median = statistics.median(seconds)
    return {"mb_per_s": bench.copy_bytes / median / 1e6, "seconds": median,
            "mb": bench.copy_bytes / 1e6}


def copy_out(bench: Bench, listener: Listener) -> dict[str, float]:
    """COPY (SELECT ...) TO STDOUT through the target; psql writes the rows to /dev/null."""
    warm_up(bench, listener)
    sql = (f"COPY (SELECT g, repeat('x', {COPY_ROW_PAYLOAD}) "
           f"FROM generate_series(1, {bench.sizes.copy_rows}) g) TO STDOUT")
    return _copy_figures(bench, [_psql_timed(bench, listener.port, sql)
                                 for _ in range(COPY_REPEATS)])


def copy_in(bench: Bench, listener: Listener) -> dict[str, float]:
    """COPY bench_copy FROM STDIN through the target, psql sending the prepared file."""
    warm_up(bench, listener)
    seconds = []
    for _ in range(COPY_REPEATS):
        with bench.pg.connect(autocommit=True) as conn:  # untimed, directly
            conn.execute("TRUNCATE bench_copy")
        seconds.append(_psql_timed(bench, listener.port, "COPY bench_copy FROM STDIN",
                                   bench.copy_file))
        with bench.pg.connect() as conn:
            loaded = conn.execute("SELECT count(*) FROM bench_copy").fetchone()[0]
        if loaded != bench.sizes.copy_rows:
            raise RuntimeError(f"copy-in loaded {loaded} rows, expected "
                               f"{bench.sizes.copy_rows}")
    return _copy_figures(bench, seconds)


# --- many connections ---------------------------------------------------------------------

MANY_CONNS_QUERIES = (
    "SELECT 1",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 42",
    "SELECT count(*) FROM pgbench_branches",
)


async def _one_connection(dsn: str, queries: tuple[str, ...], all_connected: asyncio.Event,
                          connected: Callable[[], None]) -> float:
    """Connect, wait until every connection is open, run `queries`, close.
    Returns the seconds spent connecting and querying (the wait excluded)."""
    start = time.monotonic()
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    finally:
        connected()
    busy = time.monotonic() - start
    try:
        await all_connected.wait()
        start = time.monotonic()
        for query in queries:
            await (await conn.execute(query)).fetchall()
    finally:
        await conn.close()
    return busy + time.monotonic() - start


async def _many_connections(dsn: str, count: int, queries: tuple[str, ...],
                            timeout: float) -> tuple[list[float], list[str], float]:
    all_connected = asyncio.Event()
    settled = 0

    def connected() -> None:
        nonlocal settled
        settled += 1
        if settled == count:
            all_connected.set()

    started = time.monotonic()
    tasks = [asyncio.wait_for(_one_connection(dsn, queries, all_connected, connected), timeout)
             for _ in range(count)]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.monotonic() - started
    durations = [o for o in outcomes if isinstance(o, float)]
    errors = [f"{type(o).__name__}: {o}".strip() for o in outcomes if isinstance(o, BaseException)]
    return durations, errors, wall


def connection_storm(bench: Bench, port: int, count: int, queries: tuple[str, ...]
                     ) -> dict[str, float]:
    dsn = bench.pg.dsn(port=port, connect_timeout="60")
    durations, errors, wall = asyncio.run(_many_connections(dsn, count, queries, timeout=120))
    if errors:
        bench.notes.append(f"connection errors on port {port}: {sorted(set(errors))[:3]}")
    stall = bench.sizes.stall_seconds
    return {
        "ok": float(len(durations)),
        "failed": float(len(errors)),
        "stalled": float(sum(1 for d in durations if d > stall)),
        "wall_s": wall,
        "median_conn_s": statistics.median(durations) if durations else float("nan"),
        "slowest_conn_s": max(durations) if durations else float("nan"),
    }


def many_conns(bench: Bench, listener: Listener) -> dict[str, float]:
    warm_up(bench, listener)
    return connection_storm(bench, listener.port, bench.sizes.connections, MANY_CONNS_QUERIES)


# --- memory -------------------------------------------------------------------------------


def _mib(kib: int) -> float:
    return kib / 1024


def memory(bench: Bench, listener: Listener) -> dict[str, float]:
    """The proxy's RSS while one connection carries `memory_frames` frames (sampled at the
    half and at the end), then after `connections` connections come and go."""
    assert listener.pid is not None
    pid = listener.pid
    figures = {"idle_rss_mib": _mib(memory_kib(pid)["rss"])}
    half_queries = bench.sizes.memory_frames // FRAMES_PER_QUERY // 2
    started = time.monotonic()
    with PipelinedClient(listener.port, bench.pg.user, bench.pg.dbname) as client:
        for label in ("half", "full"):
            client.run_queries(half_queries)
            sample = memory_kib(pid)
            figures[f"{label}_rss_mib"] = _mib(sample["rss"])
            figures[f"{label}_hwm_mib"] = _mib(sample["hwm"])
    figures["frames_per_s"] = 2 * half_queries * FRAMES_PER_QUERY / (time.monotonic() - started)
    figures["growth_mib"] = figures["full_rss_mib"] - figures["half_rss_mib"]
    storm = connection_storm(bench, listener.port, bench.sizes.connections, ("SELECT 1",))
    figures["conns_failed"] = storm["failed"]
    settle(1.0)
    after = memory_kib(pid)
    figures["after_conns_rss_mib"] = _mib(after["rss"])
    figures["after_conns_hwm_mib"] = _mib(after["hwm"])
    return figures


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    ratio: bool = True
    """Whether the table shows a ratio to `direct` (not for figures direct does not have)."""
    worst: str | None = None
    """'max' or 'min': show the worst round instead of the median (failure counts)."""
    digits: int = 0


@dataclass(frozen=True)
class Workload:
    name: str
    run: Callable[[Bench, Listener], dict[str, float]]
    description: str
    metrics: tuple[Metric, ...]
    proxies_only: bool = False
    """Only for targets with a proxy process of ours to watch (wirefault, mitmdump)."""


def _mib_metric(key: str, label: str) -> Metric:
    return Metric(key, label, "MiB", ratio=False, digits=1)


_PROXY_CPU = (
    Metric("proxy_cpu_us", "proxy CPU per transaction", "us", ratio=False, digits=1),
    Metric("proxy_user_us", "proxy user CPU per transaction", "us", ratio=False, digits=1),
    Metric("proxy_sys_us", "proxy system CPU per transaction", "us", ratio=False, digits=1),
)

WORKLOADS: tuple[Workload, ...] = (
    Workload("pgbench-1", pgbench_1, "pgbench -S -c 1 -j 1: one client, latency-bound",
             (Metric("tps", "tps", "tps"), Metric("latency_ms", "latency", "ms", digits=3),
              *_PROXY_CPU)),
    Workload("pgbench-8", pgbench_8, "pgbench -S -c 8 -j 2: eight clients",
             (Metric("tps", "tps", "tps"), Metric("latency_ms", "latency", "ms", digits=3),
              *_PROXY_CPU)),
    Workload("copy-out", copy_out, "COPY (SELECT ...) TO STDOUT, psql to /dev/null",
             (Metric("mb_per_s", "throughput", "MB/s", digits=1),)),
    Workload("copy-in", copy_in, "COPY bench_copy FROM STDIN from a prepared file",
             (Metric("mb_per_s", "throughput", "MB/s", digits=1),)),
    Workload("many-conns", many_conns,
             "N concurrent connections, all open at once, each running 3 queries",
             (Metric("wall_s", "wall time", "s", digits=2),
              Metric("slowest_conn_s", "slowest connection", "s", digits=2),
              Metric("failed", "failed (worst round)", "conns", ratio=False, worst="max"),
              Metric("stalled", "stalled > {stall} s (worst round)", "conns", ratio=False,
                     worst="max"))),
    Workload("memory", memory,
             "proxy RSS while one connection carries N frames, then after N connections",
             (_mib_metric("idle_rss_mib", "RSS idle"),
              _mib_metric("half_rss_mib", "RSS at {half_frames} frames"),
              _mib_metric("full_rss_mib", "RSS at {frames} frames"),
              _mib_metric("growth_mib", "RSS growth, {half_frames} to {frames} frames"),
              _mib_metric("full_hwm_mib", "peak RSS (VmHWM) at {frames} frames"),
              _mib_metric("after_conns_rss_mib", "RSS after {conns} conns came and went"),
              _mib_metric("after_conns_hwm_mib", "peak RSS (VmHWM) at the end"),
              Metric("frames_per_s", "pipelined frames/s", "frames/s", ratio=False)),
             proxies_only=True),
)
