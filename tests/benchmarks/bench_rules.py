"""What the rules engine costs per frame, without sockets or an event loop.

    python tests/benchmarks/bench_rules.py [--transactions N] [--json PATH]

A recorded-style PostgreSQL session (start-up, then a mix of pgbench select-only queries,
TPC-B transactions in the simple protocol and extended-protocol selects as drivers send
them) is encoded with the catalogue's own encoders and cut into reads two ways: `bulk`,
8 KiB reads as a busy connection delivers them, and `exchange`, one read per request or
response, as a latency-bound client (pgbench -c 1) produces them. For each, per frame:
framing alone, framing + `RuleEngine.decide` with one non-matching `onQuery` regex filter,
decide alone, `Recorder.record` alone, and the whole per-frame path the proxy runs (framing +
record + decide), and the path the proxy runs per read: `feed_batch`, then
`RuleEngine.first_fault` and `Recorder.record_batch` over the batch, where runs of frames the
rule's first filter cannot match are skipped whole and recorded as one row. The target is
under 5 us per frame for framing + one onQuery filter. Last, what recording a bulk result of
binary rows costs per row on either side of the size up to which the recorder keeps a frame
whole (2 KiB): a larger row is kept as a cut copy of its values, which it must decode.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

from report import cpu_model  # a sibling module: run this file as a script

from wirefault.protocols import Frame, FrameBatch, ProtocolSpec, get
from wirefault.proxy.faults import FORWARD, ConnectionState
from wirefault.proxy.recorder import Recorder, RecorderSlot
from wirefault.proxy.rules import RuleEngine

POSTGRES: ProtocolSpec = get("postgres")
M = POSTGRES.messages
ARMED_RULE = 'conn.onQuery(query="^NEVER").kill()'
ONE_FAULT = ['faults.add("f0").onQuery(query="^NEVER").kill()']
TEN_FAULTS = [
    *(f'faults.add("f{i}").onQuery(query="^NEVER{i}").kill()' for i in range(4)),
    'faults.add("f4").onCommandComplete(command="^NEVER").delay(10)',
    'faults.add("f5").onErrorResponse(code="XX999").kill()',
    'faults.add("f6").onParse(query="^NEVER").drop()',
    'faults.add("f7").where(application_name="^never$").onExecute().kill()',
    'faults.add("f8").fromServer().onDataRow().contains(b"NEVER").drop()',
    'faults.add("f9").where(user="^nobody$").onSync().once().kill()',
]
"""Faults in force that never fire, on the types a session carries most."""
TARGET_US = 5.0

Exchange = tuple[bytes, bytes]
"""One request's bytes from the client and the whole response from the server."""


def _column(name: str, type_oid: int = 23, size: int = 4) -> dict[str, object]:
    return {"name": name, "table_oid": 16390, "column_number": 1, "type_oid": type_oid,
            "type_size": size, "type_modifier": -1, "format": 0}


def _simple(query: str, tag: str, rows: list[list[bytes]], columns: list[str],
            status: str = "I") -> Exchange:
    response = b""
    if columns:
        response += M["RowDescription"].encode(columns=[_column(c) for c in columns])
        response += b"".join(M["DataRow"].encode(values=row) for row in rows)
    response += M["CommandComplete"].encode(command=tag)
    response += M["ReadyForQuery"].encode(status=status)
    return M["Query"].encode(query=query), response


def startup() -> Exchange:
    client = M["StartupMessage"].encode(user="app", database="shop",
                                        parameters={"application_name": "pgbench"})
    server = M["AuthenticationOk"].encode()
    for name, value in (("server_version", "15.18"), ("server_encoding", "UTF8"),
                        ("client_encoding", "UTF8"), ("DateStyle", "ISO, MDY"),
                        ("TimeZone", "UTC"), ("integer_datetimes", "on"),
                        ("standard_conforming_strings", "on"), ("is_superuser", "off")):
        server += M["ParameterStatus"].encode(name=name, value=value)
    server += M["BackendKeyData"].encode(pid=4242, secret_key=b"\x01\x02\x03\x04")
    server += M["ReadyForQuery"].encode(status="I")
    return client, server


def select_only(rng: random.Random) -> list[Exchange]:
    aid = rng.randint(1, 100_000)
    return [_simple(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};", "SELECT 1",
                    [[str(rng.randint(-5000, 5000)).encode()]], ["abalance"])]


def tpcb(rng: random.Random) -> list[Exchange]:
    aid, tid, delta = rng.randint(1, 100_000), rng.randint(1, 10), rng.randint(-5000, 5000)
    return [
        _simple("BEGIN;", "BEGIN", [], [], "T"),
        _simple(f"UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};",
                "UPDATE 1", [], [], "T"),
        _simple(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};", "SELECT 1",
                [[str(delta).encode()]], ["abalance"], "T"),
        _simple(f"UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};",
                "UPDATE 1", [], [], "T"),
        _simple("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES "
                f"({tid}, 1, {aid}, {delta}, CURRENT_TIMESTAMP);", "INSERT 0 1", [], [], "T"),
        _simple("END;", "COMMIT", [], []),
    ]


def extended_select(rng: random.Random) -> list[Exchange]:
    """An unnamed statement as psycopg or JDBC sends it: Parse, Bind, Describe, Execute, Sync."""
    customer = str(rng.randint(1, 50_000)).encode()
    rows = [[str(rng.randint(1, 10**6)).encode(), b"2024-01-0%d" % rng.randint(1, 9),
             b"%d.%02d" % (rng.randint(1, 999), rng.randint(0, 99))]
            for _ in range(rng.randint(1, 5))]
    client = (M["Parse"].encode(query="SELECT id, placed, total FROM orders "
                                      "WHERE customer_id = $1 ORDER BY placed DESC LIMIT 5")
              + M["Bind"].encode(parameters=[customer])
              + M["Describe"].encode(kind="P")
              + M["Execute"].encode()
              + M["Sync"].encode())
    server = (M["ParseComplete"].encode() + M["BindComplete"].encode()
              + M["RowDescription"].encode(columns=[_column("id"), _column("placed", 1082),
                                                    _column("total", 1700, -1)])
              + b"".join(M["DataRow"].encode(values=row) for row in rows)
              + M["CommandComplete"].encode(command=f"SELECT {len(rows)}")
              + M["ReadyForQuery"].encode(status="I"))
    return [(client, server)]


def session_exchanges(transactions: int, seed: int = 7) -> list[Exchange]:
    """Start-up, then `transactions` units: 60% select-only, 25% TPC-B, 15% extended."""
    rng = random.Random(seed)
    exchanges = [startup()]
    for _ in range(transactions):
        pick = rng.random()
        unit = select_only if pick < 0.60 else tpcb if pick < 0.85 else extended_select
        exchanges += unit(rng)
    return exchanges


Reads = tuple[list[bytes], list[bytes]]


def exchange_reads(exchanges: list[Exchange]) -> Reads:
    return [c for c, _ in exchanges], [s for _, s in exchanges]


def bulk_reads(exchanges: list[Exchange], size: int = 8192) -> Reads:
    client = b"".join(c for c, _ in exchanges)
    server = b"".join(s for _, s in exchanges)
    return ([client[i:i + size] for i in range(0, len(client), size)],
            [server[i:i + size] for i in range(0, len(server), size)])


# --- the measured loops -------------------------------------------------------------------

PerFrame = Callable[[Frame], object]


def feed_all(reads: Reads, per_frame: PerFrame | None) -> int:
    """Frame both directions read by read (each direction in turn, which is what the framers
    see: they are independent), handing every frame to `per_frame`."""
    session = POSTGRES.new_session()
    count = 0
    for framer, direction in ((session.client, reads[0]), (session.server, reads[1])):
        feed = framer.feed
        for data in direction:
            frames = feed(data)
            count += len(frames)
            if per_frame is not None:
                for frame in frames:
                    per_frame(frame)
    return count


PerBatch = Callable[[FrameBatch, bool], object]


def feed_batches(reads: Reads, per_batch: PerBatch | None) -> None:
    """`feed_all` as the proxy's layer frames: a batch per read."""
    session = POSTGRES.new_session()
    for framer, direction, from_client in ((session.client, reads[0], True),
                                           (session.server, reads[1], False)):
        feed_batch = framer.feed_batch
        for data in direction:
            batch = feed_batch(data)
            if per_batch is not None:
                per_batch(batch, from_client)


def engine_with(rules: str | list[str]) -> RuleEngine:
    engine = RuleEngine(POSTGRES)
    for text in [rules] if isinstance(rules, str) else rules:
        engine.set_rule_text(text)
    return engine


def read_path(rule: str | list[str]) -> Callable[[], PerBatch]:
    """What the relay layer does per read: decide the batch, then record it."""
    def factory() -> PerBatch:
        engine = engine_with(rule)
        state = ConnectionState()
        recorder = Recorder()
        slot = RecorderSlot()

        def judge(batch: FrameBatch, from_client: bool) -> None:
            if engine.first_fault(batch, state, from_client) is not None:
                raise AssertionError("the never-firing rule fired")
            recorder.record_batch(slot, batch)
        return judge
    return factory


def frame_list(reads: Reads) -> list[Frame]:
    frames: list[Frame] = []
    feed_all(reads, frames.append)
    return frames


def best_seconds(runs: int, prepare: Callable[[], object], work: Callable[[object], object]
                 ) -> float:
    """The fastest of `runs` timings of work(prepare()); prepare is not timed. The garbage
    collector is paused while timing, as its pauses land on whichever loop runs then."""
    best = float("inf")
    for _ in range(runs):
        argument = prepare()
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            work(argument)
            best = min(best, time.perf_counter() - start)
        finally:
            gc.enable()
    return best


def armed_decider(rules: str | list[str] = ARMED_RULE) -> PerFrame:
    engine = engine_with(rules)
    state = ConnectionState()
    decide = engine.decide

    def judge(frame: Frame) -> None:
        if decide(frame, state) is not FORWARD:
            raise AssertionError(f"the never-firing rule fired on {frame!r}")

    return judge


def ten_faults_decider() -> PerFrame:
    return armed_decider(TEN_FAULTS)


def recorder_call() -> PerFrame:
    record = Recorder().record
    slot = RecorderSlot()
    return lambda frame: record(slot, frame)


def proxy_path() -> PerFrame:
    """What the relay layer does per frame: record, then decide."""
    record, decide = recorder_call(), armed_decider()

    def both(frame: Frame) -> None:
        record(frame)
        decide(frame)

    return both


def allow_decider() -> PerFrame:
    engine = RuleEngine(POSTGRES, "conn.allow()")
    state = ConnectionState()
    return lambda frame: engine.decide(frame, state)


def _each(per_frame_factory: Callable[[], PerFrame]) -> Callable[[object], None]:
    def work(frames: object) -> None:
        per_frame = per_frame_factory()
        for frame in frames:  # type: ignore[attr-defined]
            per_frame(frame)
    return work


def measure(reads: Reads, runs: int) -> dict[str, float]:
    """Microseconds per frame of each measured path over `reads`."""
    frames = frame_list(reads)
    count = len(frames)
    queries = [f for f in frames if f.type == "Query"]

    def fresh_frames() -> list[Frame]:
        return frame_list(reads)  # decide caches decoded fields on the frame: start anew

    def fresh_queries() -> list[Frame]:
        return [f for f in frame_list(reads) if f.type == "Query"]

    def us(seconds: float, n: int = count) -> float:
        return seconds / n * 1e6

    def feeding(factory: Callable[[], PerFrame] | None) -> float:
        return us(best_seconds(runs, lambda: None,
                               lambda _: feed_all(reads, factory() if factory else None)))

    def batching(factory: Callable[[], PerBatch] | None) -> float:
        return us(best_seconds(runs, lambda: None,
                               lambda _: feed_batches(reads, factory() if factory else None)))

    return {
        "frames": count,
        "query_share": len(queries) / count,
        "framing": feeding(None),
        "framing_decide": feeding(armed_decider),
        "framing_record_decide": feeding(proxy_path),
        "batch_framing": batching(None),
        "batch_path_armed": batching(read_path(ARMED_RULE)),
        "batch_path_allow": batching(read_path("conn.allow()")),
        "batch_path_1_fault": batching(read_path(ONE_FAULT)),
        "batch_path_10_faults": batching(read_path(TEN_FAULTS)),
        "decide": us(best_seconds(runs, fresh_frames, _each(armed_decider))),
        "decide_query_frame": us(best_seconds(runs, fresh_queries, _each(armed_decider)),
                                 len(queries)),
        "decide_allow": us(best_seconds(runs, fresh_frames, _each(allow_decider))),
        "decide_10_faults": us(best_seconds(runs, fresh_frames, _each(ten_faults_decider))),
        "record": us(best_seconds(runs, fresh_frames, _each(recorder_call))),
    }


ROWS = (
    ("framing", "framing alone"),
    ("framing_decide", "framing + decide (one onQuery filter, no match)"),
    ("framing_record_decide", "framing + record + decide, frame by frame"),
    ("batch_framing", "framing as batches (feed_batch)"),
    ("batch_path_armed", "the proxy's read path: batch framing + decide + record"),
    ("batch_path_allow", "the same with conn.allow()"),
    ("batch_path_1_fault", "the same with 1 named fault (faults.add)"),
    ("batch_path_10_faults", "the same with 10 faults in force"),
    ("decide", "decide alone, averaged over all frames"),
    ("decide_query_frame", "decide alone, per Query frame (decodes the query)"),
    ("decide_allow", "decide alone with conn.allow()"),
    ("decide_10_faults", "decide alone with 10 faults in force"),
    ("record", "Recorder.record alone"),
)


LARGE_ROW_SIZES = (2011, 2111)
"""Binary DataRows just under and just over the recorder's `KEEP_FRAME_BYTES`."""
LARGE_ROWS = 20_000


def large_row_us(size: int, runs: int) -> float:
    """Microseconds per row to frame and record `LARGE_ROWS` binary DataRows of `size`
    bytes, read 64 KiB at a time."""
    value = random.Random(size).randbytes(size - 11)  # type, length, count, value length
    stream = M["DataRow"].encode(values=[value]) * LARGE_ROWS
    reads = [stream[i:i + 65536] for i in range(0, len(stream), 65536)]

    def work(_: object) -> None:
        framer, recorder, slot = POSTGRES.new_session().server, Recorder(), RecorderSlot()
        for data in reads:
            recorder.record_batch(slot, framer.feed_batch(data))

    return best_seconds(runs, lambda: None, work) / LARGE_ROWS * 1e6


def table(results: dict[str, dict[str, float]]) -> str:
    modes = list(results)
    header = f"{'us per frame':58}" + "".join(f"{m:>12}" for m in modes)
    lines = [header, "-" * len(header)]
    for key, label in ROWS:
        lines.append(f"{label:58}" + "".join(f"{results[m][key]:12.3f}" for m in modes))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=20_000,
                        help="units of traffic in the session (default 20000)")
    parser.add_argument("--runs", type=int, default=5, help="timings per figure; best is kept")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    args = parser.parse_args(argv)

    exchanges = session_exchanges(args.transactions)
    results = {"bulk": measure(bulk_reads(exchanges), args.runs),
               "exchange": measure(exchange_reads(exchanges), args.runs)}
    stream_bytes = sum(len(c) + len(s) for c, s in exchanges)
    print(f"stream: {results['bulk']['frames']:,.0f} frames, {stream_bytes:,} bytes, "
          f"{results['bulk']['query_share']:.0%} of frames are Query; rule {ARMED_RULE}")
    print("bulk: 8 KiB reads; exchange: one read per request or response\n")
    print(table(results))
    worst = max(r["framing_decide"] for r in results.values())
    verdict = "meets" if worst < TARGET_US else "MISSES"
    print(f"\nframing + one onQuery filter: {worst:.2f} us per frame at worst: {verdict} the "
          f"{TARGET_US:g} us target")
    large_rows = {str(size): large_row_us(size, args.runs) for size in LARGE_ROW_SIZES}
    print("\nframing + recording binary DataRows, 64 KiB reads, us per row: "
          + ", ".join(f"{int(size):,} B {us:.3f}" for size, us in large_rows.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rule": ARMED_RULE, "target_us": TARGET_US,
                                         "date": datetime.datetime.now(datetime.UTC)
                                         .strftime("%Y-%m-%d %H:%M UTC"),
                                         "nproc": os.cpu_count(), "cpu_model": cpu_model(),
                                         "load_average_at_end": os.getloadavg(),
                                         "python": sys.version.split()[0],
                                         "stream_bytes": stream_bytes,
                                         "us_per_frame": results,
                                         "large_row_us": large_rows}, indent=2) + "\n")
    return 0 if worst < TARGET_US else 1


if __name__ == "__main__":
    sys.exit(main())
