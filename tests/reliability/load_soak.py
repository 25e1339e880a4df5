"""Hostile load: the soak. 10 minutes (FULL; 60 s QUICK; `WIREFAULT_SOAK_SECONDS=N` sets any
other length, `WIREFAULT_SOAK_TRACE=1` prints the RSS samples on stderr) of mixed psycopg
traffic on 50 connections through one proxy of `wirefault serve`, in front of a real
PostgreSQL, while 4 clients replace, add and remove faults every 100 ms (two over the
proxy's FIFO, two over the HTTP API: both channels reach the same proxy) and the recorder is
dumped every second.

The traffic: SELECTs, small transactions, COPY in and out, prepared statements, and marker
queries that the faults act on (a 1 ms delay, an injected 40001, a kill), so the faults fire
but the traffic mostly flows. Other faults act rarely (a seeded 0.1% probability) or never.
A marker query's outcome is expected either way: an armed fault may or may not be in force
when it arrives. Measured: the proxy's RSS every second (the slope after warm-up, by least
squares), its descriptors (back to the start's once the clients are gone), every query's
latency (a stall: no answer within STALL seconds), every command sent and answered.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent, HERE.parent / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from campaign import FULL, Row, Size, part  # noqa: E402
from load_connections import (  # noqa: E402
    PART,
    STALL,
    fd_count,
    percentile,
    raise_fd_limit,
    rss_kib,
    settled_fd_count,
    wait_for,
)

CONNECTIONS = 50
COMMAND_CLIENTS = 4
COMMAND_EVERY = 0.1
DUMP_EVERY = 1.0
DUMP_GAP = 0.1
"""Seconds the dumper leaves the FIFO to the command clients after a dump that ran late."""
SECONDS_VARIABLE = "WIREFAULT_SOAK_SECONDS"
"""Environment override of the soak's length in seconds (e.g. 120 to try FULL briefly)."""
FITTED_GROWTH_BOUND_KIB = 8 * 1024
"""RSS after warm-up is flat when the least-squares line over its samples rises less than
8 MiB over that window: 0.9 MiB a minute over FULL's 9 minutes, while a leak of 100 bytes
a query rises by several MiB a minute at this traffic (the line, not the samples: a dump
briefly adds a few MiB)."""
SHORT_WINDOW_GROWTH_BOUND_KIB = 24 * 1024
"""The same bound for a window under 3 minutes (QUICK's 30 s): the proxy's RSS climbs for
its first 40-50 s of this traffic, then holds (measured on 2 cores: 83 MiB at start, 112 MiB
at 50 s, 112-114 MiB for the next 3 minutes: its bounded logs filling, its allocator and
garbage collector reaching their steady state), so a short soak's window still holds the
end of that climb; what such a window can tell is a gross leak only."""
GROWTH_BOUND_KIB = 32 * 1024
"""And the last sample may not exceed the one at the end of warm-up by more than this."""

MARKERS = {"delay": "wf_soak_delay", "error": "wf_soak_error", "kill": "wf_soak_kill"}
CHAINS = (
    'onQuery(query="wf_soak_delay").delay(1)',
    'onQuery(query="wf_soak_error").error("40001")',
    'onQuery(query="wf_soak_kill").kill()',
    'onQuery().probability(0.001).delay(2)',
    'onCommandComplete(command="^COPY").delay(1)',
    'contains(b"\\xff\\xfe never").kill()',
    'onQuery(query="wf_soak_never").drop()',
)
"""What the command clients put in force: on a marker, rarely, or never."""


# -- the traffic ------------------------------------------------------------------------------


@dataclass
class Traffic:
    latencies_ms: list[float] = field(default_factory=list)
    operations: dict[str, int] = field(default_factory=dict)
    injected: dict[str, int] = field(default_factory=dict)
    """Marker queries a fault acted on, by marker."""
    unexpected: list[str] = field(default_factory=list)
    reconnects: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Worker(threading.Thread):
    def __init__(self, number: int, dsn: str, traffic: Traffic, stop: threading.Event) -> None:
        super().__init__(name=f"soak-worker-{number}", daemon=True)
        self.number = number
        self.dsn = dsn
        self.traffic = traffic
        self.stop = stop
        self.rng = random.Random(number)
        self.current: float | None = None
        """When the operation under way started (a watchdog's view of a stall)."""
        self.sequence = 0

    def run(self) -> None:
        import psycopg

        conn = None
        try:
            while not self.stop.is_set():
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True)
                kind = self.rng.choices(("select", "transaction", "copy", "prepared",
                                         "marker"), (4, 2, 1, 3, 1))[0]
                self.current = time.monotonic()
                try:
                    outcome = getattr(self, kind)(conn)
                except (psycopg.Error, AssertionError) as exc:
                    outcome = self._unexpected(kind, exc)
                elapsed = (time.monotonic() - self.current) * 1000
                self.current = None
                with self.traffic.lock:
                    self.traffic.latencies_ms.append(elapsed)
                    self.traffic.operations[outcome] = self.traffic.operations.get(outcome,
                                                                                   0) + 1
                if conn.closed or conn.broken:
                    conn = None
                    with self.traffic.lock:
                        self.traffic.reconnects += 1
        except Exception as exc:  # the connection itself could not be made
            with self.traffic.lock:
                self.traffic.unexpected.append(f"worker {self.number}: {exc!r}")
        finally:
            self.current = None
            if conn is not None:
                conn.close()

    def _unexpected(self, kind: str, exc: Exception) -> str:
        with self.traffic.lock:
            self.traffic.unexpected.append(f"worker {self.number} {kind}: {exc!r}")
        return "error"

    def _next(self) -> int:
        self.sequence += 1
        return self.sequence

    def select(self, conn) -> str:  # type: ignore[no-untyped-def]
        n = self._next()
        row = conn.execute("SELECT %s::int + 1, repeat('x', %s)", (n, n % 200)).fetchone()
        assert row == (n + 1, "x" * (n % 200)), row
        return "select"

    def transaction(self, conn) -> str:  # type: ignore[no-untyped-def]
        n = self._next()
        with conn.transaction():
            conn.execute("INSERT INTO soak (worker, n, payload) VALUES (%s, %s, %s)",
                         (self.number, n, f"row {n}"))
            count = conn.execute("SELECT count(*) FROM soak WHERE worker = %s AND n = %s",
                                 (self.number, n)).fetchone()[0]
            assert count == 1, count
        return "transaction"

    def copy(self, conn) -> str:  # type: ignore[no-untyped-def]
        n = self._next()
        rows = [(self.number, n * 100 + i, f"copied {i}\t\\ {n}") for i in range(20)]
        with conn.cursor() as cur:
            with cur.copy("COPY soak_copy (worker, n, payload) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            back = []
            with cur.copy("COPY (SELECT worker, n, payload FROM soak_copy WHERE worker = %s AND "
                          "n >= %s AND n < %s ORDER BY n) TO STDOUT",
                          (self.number, n * 100, n * 100 + 20)) as copy:
                back = [(int(w), int(m), p) for w, m, p in copy.rows()]
            assert back == rows, back[:2]
        return "copy"

    def prepared(self, conn) -> str:  # type: ignore[no-untyped-def]
        n = self._next()
        row = conn.execute("SELECT %s::bigint * 2, %s::text", (n, str(n)),
                           prepare=True).fetchone()
        assert row == (2 * n, str(n)), row
        return "prepared"

    def marker(self, conn) -> str:  # type: ignore[no-untyped-def]
        import psycopg

        name = self.rng.choice(sorted(MARKERS))
        try:
            row = conn.execute(f"SELECT '{MARKERS[name]}'").fetchone()
        except psycopg.errors.SerializationFailure:
            if name != "error":
                raise
            self._injected(name)
            return "marker"
        except psycopg.OperationalError:
            if name != "kill":
                raise
            self._injected(name)  # the proxy closed the connection: the worker reconnects
            return "marker"
        assert row == (MARKERS[name],), row
        return "marker"

    def _injected(self, name: str) -> None:
        with self.traffic.lock:
            self.traffic.injected[name] = self.traffic.injected.get(name, 0) + 1


# -- the command clients ----------------------------------------------------------------------


@dataclass
class Commands:
    sent: int = 0
    answered: int = 0
    errors: list[str] = field(default_factory=list)
    """Answers that were errors (none is expected: every command is valid, every name
    removed or replaced is one its client added), and calls that got no answer."""
    dumps: int = 0
    dumped_rows: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _call(commands: Commands, call) -> object:  # type: ignore[no-untyped-def]
    from wirefault.fifo_client import CommandError

    with commands.lock:
        commands.sent += 1
    try:
        result = call()
    except CommandError as exc:
        with commands.lock:
            commands.answered += 1
            commands.errors.append(f"error answer: {exc}")
        return None
    except Exception as exc:  # no answer in time, or the channel broke
        with commands.lock:
            commands.errors.append(f"no answer: {exc!r}")
        return None
    with commands.lock:
        commands.answered += 1
    return result


def command_client(number: int, target: str, commands: Commands,
                   stop: threading.Event) -> None:
    """Every 100 ms: add a fault, replace one of its own, or remove one of its own."""
    from wirefault.fifo_client import FaultProxy

    proxy = FaultProxy(target, timeout=STALL)
    rng = random.Random(1000 + number)
    mine: set[str] = set()
    serial = 0
    next_at = time.monotonic()
    while not stop.is_set():
        action = rng.choice(["add", "replace", "remove"] if mine else ["add"])
        if action == "add" and len(mine) >= 4:
            action = "replace"
        if action == "add":
            serial += 1
            name = f"c{number}-{serial}"
            mine.add(name)
        else:
            name = rng.choice(sorted(mine))
        if action == "remove":
            mine.discard(name)
            _call(commands, functools.partial(proxy.remove_fault, name))
        else:
            _call(commands, functools.partial(proxy.add_fault, name, rng.choice(CHAINS),
                                              seed=rng.randrange(1000)))
        next_at += COMMAND_EVERY
        stop.wait(max(0.0, next_at - time.monotonic()))
    for name in sorted(mine):
        _call(commands, functools.partial(proxy.remove_fault, name))


def dumper(fifo: str, commands: Commands, stop: threading.Event) -> None:
    from wirefault.fifo_client import FaultProxy

    proxy = FaultProxy(fifo, timeout=STALL)
    next_at = time.monotonic() + DUMP_EVERY
    while not stop.wait(max(0.0, next_at - time.monotonic())):
        # On a schedule, but a slow dump is followed by the next only DUMP_GAP later: on a
        # busy machine a dump takes seconds (QUICK saw 20 in 60 s), and back to back they
        # held the FIFO's lock all along, so a command client polling for it (20 ms apart
        # at most) found it free only by luck and gave up after STALL seconds.
        next_at += DUMP_EVERY
        # the reply's rows counted, not parsed: this process's 50 threads share one GIL
        text = _call(commands, functools.partial(proxy.send, "recorder.dump()"))
        next_at = max(next_at, time.monotonic() + DUMP_GAP)
        if text is not None:
            with commands.lock:
                commands.dumps += 1
                commands.dumped_rows += text.count("\n") + 1 if text else 0


# -- the proxy process ------------------------------------------------------------------------


QUICK_RECORDER_LIMIT = 20_000
"""Frames the proxy's recorder keeps in QUICK (FULL: the default, 100,000). A dump of a full
default recorder takes seconds on a busy machine, and the FIFO answers one command at a
time: behind a run of such dumps, a command client polling for the FIFO's lock can lose
every race for 30 s (seen: 2 of 1,700 in QUICK, 11 of 17,048 in FULL). FULL keeps the
default and reports it; QUICK, which runs in `make test`, keeps its dumps short."""


@contextlib.contextmanager
def serving(work: Path, upstream: int, *options: str):  # type: ignore[no-untyped-def]
    """`wirefault serve` with one postgres proxy (with a FIFO) and the HTTP API: (process,
    proxy port, FIFO, the proxy's API URL, the API's base URL)."""
    from pgserver import free_port
    from proxy_helpers import BIN

    fifo = work / "soak.fifo"
    config = work / "soak.yaml"
    config.write_text(f"proxies:\n  - name: soak\n    listen: 127.0.0.1:{free_port()}\n"
                      f"    upstream: 127.0.0.1:{upstream}\n    fifo: {fifo}\n")
    ready_file = work / "ready"
    log = open(work / "serve.log", "wb")  # noqa: SIM115 (closed below)
    # stdout and stderr to a file: a pipe nobody reads would block the proxy once full
    process = subprocess.Popen([str(BIN / "wirefault"), "serve", "--config", str(config),
                                "--api", "127.0.0.1:0", "--ready-file", str(ready_file),
                                *options],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        if not wait_for(lambda: ready_file.exists() or process.poll() is not None, 30):
            raise RuntimeError("wirefault serve did not get ready")
        if process.poll() is not None:
            raise RuntimeError(f"wirefault serve exited: {(work / 'serve.log').read_text()}")
        words = dict(w.split("=", 1) for w in ready_file.read_text().split()[1:])
        api = f"http://{words['api']}"
        yield process, int(words["soak"].rpartition(":")[2]), str(fifo), \
            f"{api}/proxies/soak", api
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def fired_total(api: str) -> int:
    with urllib.request.urlopen(f"{api}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("wirefault_faults_fired_total"):
                return int(float(line.rsplit(" ", 1)[1]))
    return -1


def slope_kib_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KiB) samples, in KiB a minute."""
    n = len(samples)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (r - mean_r) for t, r in samples) / spread * 60


def soak_seconds(size: Size) -> float:
    override = os.environ.get(SECONDS_VARIABLE)
    if override:
        return float(override)
    return 600.0 if size == FULL else 60.0


@part("load_soak")
def run(size: Size, work: Path) -> list[Row]:
    import psycopg
    from pgserver import running_server

    seconds = soak_seconds(size)
    # the proxy's RSS climbs for its first 40-50 s of this traffic, then holds (see
    # SHORT_WINDOW_GROWTH_BOUND_KIB): warm-up is a minute, or half a shorter run
    warm_up = min(60.0, seconds / 2)
    raise_fd_limit(4096)
    options = () if size == FULL else ("--recorder-limit", str(QUICK_RECORDER_LIMIT))
    with running_server() as pg, \
            serving(work, pg.port, *options) as (process, port, fifo, url, api):
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE soak (worker int, n bigint, payload text)")
            conn.execute("CREATE INDEX ON soak (worker, n)")
            conn.execute("CREATE TABLE soak_copy (worker int, n bigint, payload text)")
            conn.execute("CREATE INDEX ON soak_copy (worker, n)")
        pid = process.pid
        base_fds = settled_fd_count(pid, fifo)
        stop = threading.Event()
        traffic, commands = Traffic(), Commands()
        workers = [Worker(i, pg.dsn(port), traffic, stop) for i in range(CONNECTIONS)]
        others = [threading.Thread(target=command_client, daemon=True,
                                   args=(i, fifo if i < 2 else url, commands, stop))
                  for i in range(COMMAND_CLIENTS)]
        others.append(threading.Thread(target=dumper, args=(fifo, commands, stop),
                                       daemon=True))
        started = time.monotonic()
        for thread in workers + others:
            thread.start()
        samples: list[tuple[float, int]] = []
        peak_fds, stalled = base_fds, set()
        while (now := time.monotonic() - started) < seconds and process.poll() is None:
            samples.append((now, rss_kib(pid)))
            peak_fds = max(peak_fds, fd_count(pid, fifo))
            stalled |= {w.number for w in workers
                        if (began := w.current) is not None and time.monotonic() - began > STALL}
            time.sleep(1.0)
        stop.set()
        deadline = time.monotonic() + STALL  # one bound for all: a stall is already counted
        for thread in others + workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        stalled |= {w.number for w in workers if w.is_alive()}
        up = process.poll() is None
        fired = fired_total(api) if up else -1
        back = wait_for(lambda: fd_count(pid, fifo) <= base_fds, 30) if up else False
        after_fds = fd_count(pid, fifo) if up else -1
    if os.environ.get("WIREFAULT_SOAK_TRACE"):
        print("rss samples:", samples, file=sys.stderr)
    after_warm_up = [(t, r) for t, r in samples if t >= warm_up]
    slope = slope_kib_per_min(after_warm_up)
    warm_rss = after_warm_up[0][1] if after_warm_up else 0
    final_rss = samples[-1][1] if samples else 0
    lost = []
    if not up:
        lost.append("the proxy exited")
    if stalled:
        lost.append(f"{len(stalled)} connections stalled > {STALL:.0f} s")
    if traffic.unexpected:
        lost.append(f"{len(traffic.unexpected)} unexpected errors (first: "
                    f"{traffic.unexpected[0]})")
    if commands.errors or commands.answered != commands.sent:
        lost.append(f"commands: {commands.sent} sent, {commands.answered} answered, "
                    f"{len(commands.errors)} errors (first: {commands.errors[:1]})")
    if len(after_warm_up) < 5:
        lost.append("too few RSS samples after warm-up")
    window_min = (after_warm_up[-1][0] - after_warm_up[0][0]) / 60 if after_warm_up else 0
    fitted_bound = FITTED_GROWTH_BOUND_KIB if window_min >= 3 else SHORT_WINDOW_GROWTH_BOUND_KIB
    if slope * window_min > fitted_bound or final_rss > warm_rss + GROWTH_BOUND_KIB:
        lost.append(f"RSS grows: {slope:.0f} KiB/min, {warm_rss // 1024} → "
                    f"{final_rss // 1024} MiB")
    if not back:
        lost.append(f"fds not back to {base_fds} (still {after_fds})")
    if fired <= 0:
        lost.append("no fault ever fired")
    queries = len(traffic.latencies_ms)
    figure = (f"{queries:,} operations ({queries / seconds:,.0f}/s: "
              f"{', '.join(f'{k} {v:,}' for k, v in sorted(traffic.operations.items()))}), "
              f"latency p50 {percentile(traffic.latencies_ms, .5):.1f} ms, p99 "
              f"{percentile(traffic.latencies_ms, .99):.1f} ms, max "
              f"{max(traffic.latencies_ms, default=0):.0f} ms; faults fired {fired:,} "
              f"(markers hit: {json.dumps(traffic.injected, sort_keys=True)}, reconnects "
              f"{traffic.reconnects}); {commands.sent:,} commands, {commands.answered:,} "
              f"answered, {commands.dumps} dumps ({commands.dumped_rows:,} rows; one starts "
              f"each second, or 0.1 s after the last when it took longer); RSS "
              f"{samples[0][1] // 1024 if samples else 0} MiB, after warm-up "
              f"{warm_rss // 1024} → {final_rss // 1024} MiB, slope {slope:+.0f} KiB/min; "
              f"fds {base_fds} → peak {peak_fds} → {after_fds}")
    minutes = f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
    return [Row(PART, f"soak: mixed psycopg traffic on {CONNECTIONS} connections through one "
                      f"proxy of wirefault serve, {COMMAND_CLIENTS} clients changing faults "
                      f"every {COMMAND_EVERY * 1000:.0f} ms (FIFO and HTTP), the recorder "
                      f"dumped every {DUMP_EVERY:g} s", minutes, "; ".join(lost) or "nothing",
                figure, not lost)]


if __name__ == "__main__":
    from campaign import QUICK

    chosen = FULL if "--full" in sys.argv else QUICK
    for row in run(chosen, Path(os.environ.get("TMPDIR", "/tmp"))):
        print(row)
