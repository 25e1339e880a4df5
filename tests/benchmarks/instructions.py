"""Instructions per transaction: the proxy's own user-space work, counted, not timed.

Timing a relay on a 2-core machine swings by 20% between rounds; counting the instructions
its process executes does not (callgrind counts them, whatever else the machine is doing;
two runs of the same build differ by ~2%). This is the check for "the hot path must not get
slower" on a busy machine, and it tells where a change's gain comes from.

For each target, the proxy runs under `valgrind --tool=callgrind` twice: once for `--short`
pgbench -S transactions (one client) and once for `--long`; the difference, divided by the
difference in transactions, is the steady-state cost of one transaction (start-up,
connecting and the first transactions cancel out). Kernel time is not counted: system
calls are the same for every relay (two reads and two writes per transaction).

    .venv/bin/python tests/benchmarks/instructions.py [--targets python-floor,wirefault-armed]

The recorder stays below its 100,000-frame limit in these runs, so the cost of dropping
its oldest rows (about a tenth of its work once full) is not in the figure.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: pgserver, helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pgserver import PostgresServer, running_server
from targets import TARGETS, Target, started, stop_all

DEFAULT_TARGETS = "python-floor,wirefault-allow,wirefault-armed,wirefault-10faults"
_TOTALS = re.compile(r"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


def _pgbench(pg: PostgresServer, port: int, transactions: int) -> None:
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(port), PGUSER=pg.user,
               PGDATABASE=pg.dbname, PGCONNECT_TIMEOUT="60")
    subprocess.run([pg.bin("pgbench"), "-n", "-S", "-c", "1", "-j", "1", "-t",
                    str(transactions)], env=env, check=True, capture_output=True,
                   timeout=600)


def instructions(target: Target, pg: PostgresServer, transactions: int) -> int:
    """The instructions the proxy executed from its start to its exit, with `transactions`
    transactions in between."""
    workdir = tempfile.mkdtemp(prefix="wirefault-instructions-")
    out = os.path.join(workdir, "callgrind.out")
    try:
        under = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}")
        with started(target, pg, under=under) as listener:
            _pgbench(pg, listener.port, transactions)
        with open(out) as f:
            found = _TOTALS.search(f.read())
        if not found:
            raise RuntimeError(f"no totals in {out}")
        return int(found.group(1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=DEFAULT_TARGETS,
                        help=f"comma-separated (default {DEFAULT_TARGETS})")
    parser.add_argument("--short", type=int, default=200)
    parser.add_argument("--long", type=int, default=2200)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("instructions.py: valgrind is not installed (apt-get install valgrind)")
    by_name = {t.name: t for t in TARGETS}
    wanted = [name.strip() for name in args.targets.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_name
               or by_name[name].kind not in ("wirefault", "serve", "floor", "mitmdump")]
    if unknown:
        sys.exit(f"instructions.py: not a Python proxy target: {', '.join(unknown)}")
    if args.long <= args.short:
        sys.exit("instructions.py: --long must be more than --short")
    try:
        with running_server() as pg:
            subprocess.run([pg.bin("pgbench"), "-i", "-q", "-s", "1", "-h", "127.0.0.1",
                            "-p", str(pg.port), "-U", pg.user, pg.dbname], check=True,
                           capture_output=True)
            print(f"| target | instructions per transaction (pgbench -S, 1 client, "
                  f"{args.long - args.short} transactions) |")
            print("|---|--:|")
            for name in wanted:
                short = instructions(by_name[name], pg, args.short)
                long = instructions(by_name[name], pg, args.long)
                print(f"| {name} | {(long - short) / (args.long - args.short):,.0f} |",
                      flush=True)
    finally:
        stop_all()


if __name__ == "__main__":
    main()
