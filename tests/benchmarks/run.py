"""wirefault's side-by-side benchmark: the same workloads, directly and through each proxy.

    python tests/benchmarks/run.py [--quick] [--rounds N] [--only WORKLOAD,...]
                                   [--targets TARGET,...] [--toxiproxy PATH] [--json PATH]

One throwaway PostgreSQL serves every target: the server itself (direct), plain mitmdump,
wirefault with a rule that never fires, with allow(), with ten faults that never fire and
with a delay(0) that fires on every Query, HAProxy when installed, and Toxiproxy (without
and with a 0 ms latency toxic) when --toxiproxy gives its server binary.
For each workload, rounds are interleaved (A B C A B C ...) so the machine's drift cancels;
each measurement starts its target fresh, warms it up, measures, and stops it. The table
gives medians over the rounds and, for each figure, the median ratio to direct within the
same round. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR), str(BENCH_DIR.parent)]

from pgserver import PostgresUnavailable, running_server  # noqa: E402
from report import (  # noqa: E402
    ForeignLoadMonitor,
    cell,
    machine_info,
    machine_lines,
    markdown_table,
    paired_ratio,
    summarize,
)
from targets import (  # noqa: E402
    TARGETS,
    Target,
    ensure_haproxy,
    haproxy_version,
    started,
    stop_all,
    toxiproxy_build,
    toxiproxy_version,
)
from workloads import FULL, QUICK, WORKLOADS, Bench, Sizes, Workload, prepare  # noqa: E402

RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_JSON = RESULTS_DIR / "latest.json"
PAUSE_BETWEEN_MEASUREMENTS = 0.5
"""Lets the server reap the previous measurement's backends before the next one starts."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwind like Ctrl-C so every process is stopped."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark wirefault side by side with direct, mitmdump and HAProxy.")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: short durations, small sizes, 1 round (~1-2 min)")
    parser.add_argument("--rounds", type=int, help="rounds per workload (default 3; quick 1)")
    parser.add_argument("--only", metavar="WORKLOAD,...",
                        help="run only these: " + ",".join(w.name for w in WORKLOADS))
    parser.add_argument("--targets", metavar="TARGET,...",
                        help="measure only these: " + ",".join(t.name for t in TARGETS))
    parser.add_argument("--toxiproxy", metavar="PATH",
                        help="Toxiproxy's server binary (toxiproxy-server): measure the "
                             "toxiproxy targets (scripts/build-toxiproxy.sh builds one)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                        help="where to write the results (a .md table goes beside it)")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.toxiproxy is not None:
        if not (os.path.isfile(args.toxiproxy) and os.access(args.toxiproxy, os.X_OK)):
            parser.error(f"--toxiproxy: not an executable file: {args.toxiproxy}")
        args.toxiproxy = os.path.abspath(args.toxiproxy)
    return args


def _pick(names: str | None, known: tuple, what: str) -> list:
    if not names:
        return [item for item in known if not getattr(item, "on_request", False)]
    by_name = {item.name: item for item in known}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} "
                         f"(known: {', '.join(by_name)})")
    return [by_name[n] for n in wanted]


def label_values(sizes: Sizes) -> dict[str, str]:
    return {"frames": f"{sizes.memory_frames:,}", "half_frames": f"{sizes.memory_frames // 2:,}",
            "conns": str(sizes.connections), "stall": f"{sizes.stall_seconds:g}"}


def _short(value: dict[str, float], workload: Workload) -> str:
    first = workload.metrics[0]
    return f"{value.get(first.key, float('nan')):,.{first.digits}f} {first.unit}"


def eligible_targets(workload: Workload, targets: list[Target]) -> list[Target]:
    return [t for t in targets
            if (not workload.proxies_only or t.kind in ("wirefault", "serve", "mitmdump"))
            and (t.workloads is None or workload.name in t.workloads)]


def measure_all(bench: Bench, workloads: list[Workload], targets: list[Target], rounds: int,
                haproxy: str | None, samples: dict, toxiproxy: str | None = None) -> None:
    """Fill samples[workload][target][round] with each measurement's figures (or its error)."""
    for workload in workloads:
        eligible = eligible_targets(workload, targets)
        for round_number in range(1, rounds + 1):
            for target in eligible:
                time.sleep(PAUSE_BETWEEN_MEASUREMENTS)
                began = time.monotonic()
                try:
                    with started(target, bench.pg, haproxy, toxiproxy) as listener:
                        figures = workload.run(bench, listener)
                except Exception as exc:  # one failed measurement must not lose the run
                    figures = {"error": f"{type(exc).__name__}: {exc}"}
                    traceback.print_exc()
                took = time.monotonic() - began
                samples[workload.name][target.name][round_number] = figures
                shown = figures["error"] if "error" in figures else _short(figures, workload)
                print(f"[{workload.name} round {round_number}/{rounds}] {target.name:16} "
                      f"{shown}  ({took:.1f} s)", flush=True)


def summarize_workload(workload: Workload, per_target: dict[str, dict[int, dict]]) -> dict:
    direct = per_target.get("direct", {})
    summary: dict[str, dict] = {}
    for target_name, rounds in per_target.items():
        ok = [s for s in rounds.values() if "error" not in s]
        summary[target_name] = {}
        for metric in workload.metrics:
            value = summarize(ok, metric.key, metric.worst)
            ratio = (paired_ratio(rounds, direct, metric.key)
                     if metric.ratio and direct and target_name != "direct" else None)
            summary[target_name][metric.key] = {"value": value, "ratio_to_direct": ratio}
    return summary


def table_rows(workloads: list[Workload], summaries: dict, target_names: list[str],
               labels: dict[str, str]) -> list[list[str]]:
    rows = []
    for workload in workloads:
        summary = summaries.get(workload.name)
        if not summary:
            continue
        for metric in workload.metrics:
            label = metric.label.format(**labels)
            row = [workload.name, label if label == metric.unit else f"{label} ({metric.unit})"]
            for name in target_names:
                figure = summary.get(name, {}).get(metric.key)
                row.append(cell(figure["value"], figure["ratio_to_direct"], metric.digits)
                           if figure else "—")
            rows.append(row)
    return rows


def _clean(value: object) -> object:
    """JSON has no NaN: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def markdown_report(result: dict, table: str) -> str:
    harness = result["harness"]
    lines = [
        "# wirefault benchmark results",
        "",
        *machine_lines(result["machine"], result["load"]),
        *([f"- toxiproxy: {result['machine']['toxiproxy']}; "
           f"{result['machine']['toxiproxy_build']}"] if "toxiproxy" in result["machine"]
          else []),
        f"- run: {harness['rounds']} round(s){' (--quick)' if harness['quick'] else ''}, "
        f"pgbench {harness['sizes']['pgbench_seconds']} s per measurement, "
        f"COPY {harness['copy_mb']:.0f} MB, {harness['sizes']['connections']} connections, "
        f"{harness['sizes']['memory_frames']:,} frames for memory; "
        f"took {result['duration_s'] / 60:.1f} min",
        "",
        "Medians over the rounds; in brackets the median, over rounds, of the target's figure "
        "divided by direct's in the same round (for tps and MB/s below 1 is slower, for "
        "seconds and ms above 1 is slower). Memory is the proxy process's own.",
        "",
        table,
    ]
    if result["skipped_targets"]:
        lines += ["", *(f"- {name}: {why}" for name, why in result["skipped_targets"].items())]
    if result["notes"]:
        lines += ["", "Notes:", *(f"- {note}" for note in result["notes"])]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or (1 if args.quick else 3)
    workloads: list[Workload] = _pick(args.only, WORKLOADS, "workload")
    targets: list[Target] = _pick(args.targets, TARGETS, "target")
    skipped: dict[str, str] = {}
    haproxy, haproxy_note = None, "haproxy not measured"
    if any(t.kind == "haproxy" for t in targets):
        haproxy, haproxy_note = ensure_haproxy()
        if haproxy is None:
            skipped["haproxy"] = haproxy_note
            targets = [t for t in targets if t.kind != "haproxy"]
    if any(t.kind == "toxiproxy" for t in targets) and args.toxiproxy is None:
        skipped["toxiproxy"] = "toxiproxy not measured (no --toxiproxy PATH)"
        targets = [t for t in targets if t.kind != "toxiproxy"]
    samples = {w.name: {t.name: {} for t in eligible_targets(w, targets)} for w in workloads}
    monitor = ForeignLoadMonitor()
    interrupted = False
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="wirefault-bench-") as workdir, \
            running_server() as pg:
        machine = machine_info(pg.bin("postgres"),
                               haproxy_version(haproxy) if haproxy else haproxy_note)
        if args.toxiproxy:
            machine["toxiproxy"] = toxiproxy_version(args.toxiproxy)
            machine["toxiproxy_build"] = toxiproxy_build(args.toxiproxy)
        bench = Bench(pg, sizes, workdir)
        print(f"preparing: pgbench tables, {sizes.copy_rows:,} COPY rows ...", flush=True)
        prepare(bench)
        print(f"{len(workloads)} workload(s) x {rounds} round(s) x {len(targets)} target(s)",
              flush=True)
        monitor.start()
        try:
            measure_all(bench, workloads, targets, rounds, haproxy, samples, args.toxiproxy)
        except KeyboardInterrupt:
            interrupted = True
            print("\ninterrupted: stopping every process; partial results follow", flush=True)
        finally:
            monitor.stop()
            stop_all()
    summaries = {w.name: summarize_workload(w, samples[w.name]) for w in workloads}
    target_names = [t.name for t in targets]
    table = markdown_table(["workload", "figure", *target_names],
                           table_rows(workloads, summaries, target_names, label_values(sizes)))
    result = {
        "harness": {"rounds": rounds, "quick": args.quick, "sizes": vars(sizes),
                    "copy_mb": bench.copy_bytes / 1e6,
                    "order": "per workload, rounds interleaved: "
                             + ", ".join(t.name for t in targets) + ", then again"},
        "machine": machine,
        "load": monitor.summary(),
        "targets": [{"name": t.name, "description": t.description} for t in targets],
        "skipped_targets": skipped,
        "workloads": {
            w.name: {"description": w.description,
                     "metrics": [{"key": m.key, "label": m.label.format(**label_values(sizes)),
                                  "unit": m.unit} for m in w.metrics],
                     "samples": samples[w.name], "summary": summaries[w.name]}
            for w in workloads},
        "notes": bench.notes,
        "interrupted": interrupted,
        "duration_s": round(time.monotonic() - began, 1),
    }
    markdown = markdown_report(result, table)
    print()
    print(markdown)
    if interrupted:
        print("(interrupted: results not written)")
        return 130
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_clean(result), indent=2) + "\n")
    args.json.with_suffix(".md").write_text(markdown)
    print(f"written: {args.json} and {args.json.with_suffix('.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupted)
    try:
        return run(args)
    except PostgresUnavailable as exc:
        print(f"benchmark: {exc}", file=sys.stderr)
        return 2
    finally:
        with contextlib.suppress(Exception):
            stop_all()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
