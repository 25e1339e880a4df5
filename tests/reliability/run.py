"""wirefault's reliability campaign: hostile input, hostile peers, hostile load.

    python tests/reliability/run.py [--quick] [--only PART,...] [--json PATH]

Each part starts what it needs (a throwaway PostgreSQL, proxy processes, echo servers),
tries what its module says, and reports rows (campaign.Row). The table is printed as
Markdown; the JSON (default tests/reliability/results/latest.json, or none with --quick)
holds the rows and the machine they ran on. Exit status 1 when a row lost anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "benchmarks")]

from campaign import FULL, QUICK, Row, load_parts, markdown  # noqa: E402

RESULTS = HERE / "results" / "latest.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reliability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the short version (make test's)")
    parser.add_argument("--only", help="comma-separated part names")
    parser.add_argument("--json", type=Path, help=f"where the results go (default {RESULTS})")
    args = parser.parse_args(argv)
    parts = load_parts()
    chosen = list(parts) if not args.only else args.only.split(",")
    unknown = [name for name in chosen if name not in parts]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(parts)}")
    size = QUICK if args.quick else FULL
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    for name in chosen:
        started = time.monotonic()
        print(f"== {name} ({size})", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=f"wirefault-reliability-{name}-") as work:
            try:
                rows += parts[name](size, Path(work))
            except Exception:
                traceback.print_exc()
                rows.append(Row("-", name, "-", "the part crashed (traceback above)", "-",
                                False))
        seconds[name] = round(time.monotonic() - started, 1)
        print(f"   {seconds[name]} s", file=sys.stderr, flush=True)
    print(markdown(rows))
    target = args.json or (None if args.quick else RESULTS)
    if target is not None:
        import os

        from pgserver import find_bindir
        from report import machine_info  # tests/benchmarks/report.py

        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({
            "machine": machine_info(os.path.join(find_bindir(), "postgres"), "-"),
            "size": size, "seconds": seconds,
            "rows": [row.as_json() for row in rows]}, indent=2) + "\n")
        print(f"results: {target}", file=sys.stderr)
    return 0 if all(row.passed for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
