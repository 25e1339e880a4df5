"""How fast the PostgreSQL framer frames, and what decoding fields costs.

Run: python tests/benchmarks/bench_framing.py [--reads-of BYTES] [--transactions N]

The streams are pgbench-like (TPC-B transactions in the simple protocol, as `pgbench -M
simple` sends them), generated with the catalogue's own encoders and cut into reads of a
fixed size, as a proxy would receive them.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from construct import Construct

from wirefault.protocols import Frame, get
from wirefault.protocols._pg_messages import WIRE

POSTGRES = get("postgres")
M = POSTGRES.messages


def int4_column(name: str) -> dict[str, object]:
    return {"name": name, "table_oid": 16390, "column_number": 2, "type_oid": 23,
            "type_size": 4, "type_modifier": -1, "format": 0}


def tpcb_streams(transactions: int, seed: int = 1) -> tuple[bytes, bytes]:
    """The client's and the server's bytes for `transactions` TPC-B transactions."""
    rng = random.Random(seed)
    client, server = bytearray(), bytearray()
    ready_idle = M["ReadyForQuery"].encode(status="I")
    ready_in_tx = M["ReadyForQuery"].encode(status="T")
    for _ in range(transactions):
        aid, bid, tid, delta = (rng.randint(1, 100000), rng.randint(1, 1), rng.randint(1, 10),
                                rng.randint(-5000, 5000))
        statements = [
            ("BEGIN;", "BEGIN", None),
            (f"UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};",
             "UPDATE 1", None),
            (f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};", "SELECT 1",
             str(rng.randint(-99999, 99999)).encode()),
            (f"UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};",
             "UPDATE 1", None),
            (f"UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {bid};",
             "UPDATE 1", None),
            ("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES "
             f"({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP);", "INSERT 0 1", None),
            ("END;", "COMMIT", None),
        ]
        for index, (query, tag, value) in enumerate(statements):
            client += M["Query"].encode(query=query)
            if value is not None:
                server += M["RowDescription"].encode(columns=[int4_column("abalance")])
                server += M["DataRow"].encode(values=[value])
            server += M["CommandComplete"].encode(command=tag)
            server += ready_idle if index == len(statements) - 1 else ready_in_tx
    return bytes(client), bytes(server)


def reads(stream: bytes, size: int) -> list[bytes]:
    return [stream[i:i + size] for i in range(0, len(stream), size)]


def frame_all(
    client_reads: list[bytes], server_reads: list[bytes], use: Callable[[list[Frame]], object]
) -> int:
    """Frames both streams read by read, handing each read's frames to `use` and dropping
    them then, as a proxy does (keeping them all would measure the garbage collector)."""
    session = POSTGRES.new_session()
    count = 0
    for framer, stream_reads in ((session.client, client_reads), (session.server, server_reads)):
        for data in stream_reads:
            frames = framer.feed(data)
            use(frames)
            count += len(frames)
    return count


def decode_every(frames: list[Frame]) -> None:
    for frame in frames:
        if not frame.fields and frame.spec is not None and frame.spec.fields:
            raise AssertionError(f"{frame.type} did not decode: {frame.error}")


def best_of(runs: int, work: Callable[[], object]) -> float:
    """The fastest of `runs` timings of `work`, in seconds."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def framing_rate(client_reads: list[bytes], server_reads: list[bytes]) -> tuple[int, float]:
    frames = frame_all(client_reads, server_reads, len)
    return frames, frames / best_of(5, lambda: frame_all(client_reads, server_reads, len))


def decoding_rate(client_reads: list[bytes], server_reads: list[bytes]) -> float:
    frames = frame_all(client_reads, server_reads, decode_every)
    return frames / best_of(5, lambda: frame_all(client_reads, server_reads, decode_every))


def fields_cost_us(name: str, data: bytes, repeat: int = 200_000) -> float:
    """Microseconds for `Frame.fields` on a fresh frame (the frame's creation subtracted)."""
    spec = M[name]

    def create() -> None:
        for _ in range(repeat):
            Frame(name, data, (0, len(data)), True, spec)

    def create_and_decode() -> None:
        for _ in range(repeat):
            _ = Frame(name, data, (0, len(data)), True, spec).fields

    return (best_of(3, create_and_decode) - best_of(3, create)) / repeat * 1e6


def construct_parse_us(name: str, data: bytes, repeat: int = 20_000) -> tuple[float, float]:
    """Microseconds for construct's own parse of the body, interpreted and compiled: what
    the derived fast parser saves."""
    layout = WIRE[name].layout
    compiled = layout.compile()
    body = data[5:]

    def run(parser: Construct) -> float:
        return best_of(3, lambda: [parser.parse(body) for _ in range(repeat)]) / repeat * 1e6

    return run(layout), run(compiled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads-of", type=int, default=8192, help="bytes per read")
    parser.add_argument("--transactions", type=int, default=20_000)
    args = parser.parse_args()

    client, server = tpcb_streams(args.transactions)
    client = M["StartupMessage"].encode(user="bench", database="bench") + client
    client_reads, server_reads = reads(client, args.reads_of), reads(server, args.reads_of)
    frames, framed_per_s = framing_rate(client_reads, server_reads)
    decoded_per_s = decoding_rate(client_reads, server_reads)
    query = M["Query"].encode(query="SELECT abalance FROM pgbench_accounts WHERE aid = 4242;")
    command = M["CommandComplete"].encode(command="INSERT 0 1")

    print(f"stream: {args.transactions} TPC-B transactions, {frames} frames, "
          f"{len(client) + len(server)} bytes, reads of {args.reads_of} bytes")
    print(f"framing alone:        {framed_per_s:12,.0f} frames/s")
    print(f"framing + decode all: {decoded_per_s:12,.0f} frames/s")
    print(f"Query.fields:           {fields_cost_us('Query', query):6.2f} us")
    print(f"CommandComplete.fields: {fields_cost_us('CommandComplete', command):6.2f} us")
    interpreted, compiled = construct_parse_us("Query", query)
    print(f"(construct's own parse of the Query body: {interpreted:.2f} us, "
          f"compiled {compiled:.2f} us)")


if __name__ == "__main__":
    main()
