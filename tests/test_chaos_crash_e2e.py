"""End to end: `wirefault chaos` crashes a whole Wallaroo pipeline and checks it as it goes.

    source -> proxy source_link -> worker -> proxy sink_link -> sink

One scenario runs the three peers (tests/peers) as managed processes, SIGKILLs each of them
on its own seeded schedule (restarting it after a drawn down time) while network faults
fire on both links, checks every 2 s that the sink's output is a prefix of the input (so
far nothing lost, duplicated or reordered), watches the source's "acked" lines, and at the
end lets the source finish at full speed and checks the output equals the input, byte for
byte. Five seeds, each a separate run of about 20 s with at least 10 crashes, counted from
the run's own log (run.jsonl).

The same scenario with the broken sink (`--ack-before-write`, which confirms a commit
before writing it) and one crash, of the sink, must fail its prefix check soon after that
crash and pause the world: every managed process left stopped, exit status 1. The test then
uses the printed stop command.

The two proxies run outside the scenario, in one `wirefault serve` process, and the
scenario names them by API URL: the runner only arms faults on them. `wirefault chaos`
runs as a subprocess, as a user runs it.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pgserver import free_port
from proxy_helpers import gone, kill_what_runs_left, proc_state, stop_process
from proxy_helpers import wait_for as wait_until
from test_peers_restart import write_input

TESTS_DIR = Path(__file__).resolve().parent
WIREFAULT = Path(sys.executable).parent / "wirefault"
PY = sys.executable
DURATION = 15
RATE = 400
LINES = RATE * DURATION
"""At the nominal rate the data lasts the whole run; crashes only slow it down, so it still
streams when the last crash comes. The final checks let the rest go at full speed."""
SEEDS = [101, 202, 303, 404, 505]
MIN_CRASHES = 10

SCENARIO = """\
seed: {seed}
duration: {duration}
on_failure: pause
description: every peer of a Wallaroo pipeline crashed again and again; nothing lost
processes:
  sink:
    command: [{py}, -m, peers.sink, --listen, "127.0.0.1:{sink_port}", --output, output.txt,
              --stats, sink.stats.json{sink_flags}]
    env: {{PYTHONPATH: "{tests}"}}
    ready: {{pattern: "^ready ", timeout: 20}}
  worker:
    command: [{py}, -m, peers.worker, --listen, "127.0.0.1:{worker_port}",
              --sink, "127.0.0.1:{sink_link_port}"]
    env: {{PYTHONPATH: "{tests}"}}
    ready: {{pattern: "^ready ", timeout: 20}}
  source:
    command: [{py}, -m, peers.source, --connect, "127.0.0.1:{source_link_port}",
              --file, input.txt, --rate, "{rate}", --full-speed-file, full-speed,
              --ack-log, "-", --keep-running]
    env: {{PYTHONPATH: "{tests}"}}
# One fault per link must fire at each arming (must_fire holds the scenario clock until it
# did): on a busy machine, with every peer crashing, a half-second window may otherwise see
# no traffic at all, and the run would prove nothing about the links.
proxies:
  source_link: {{api: "{api}/proxies/source_link", protocol: wallaroo}}
  sink_link: {{api: "{api}/proxies/sink_link", protocol: wallaroo}}
faults:
{process_faults}
  - {{name: message-reset, proxy: source_link, command: conn.onMessage().after(25).reset(),
     start_after: 1.3, every: [2.5, 4], armed: 0.5}}
  - {{name: ack-kill, proxy: source_link, command: conn.onAck().kill(),
     start_after: 2.0, every: [3, 5], armed: 0.5, must_fire: 20}}
  - {{name: phase1-kill, proxy: sink_link, command: conn.onTwoPCPhase1().kill(),
     start_after: 1.5, every: [2.5, 4], armed: 0.5, must_fire: 20}}
  - {{name: data-kill, proxy: sink_link,
     command: 'conn.onMessage(stream_id="^1$").after(20).kill()',
     start_after: 2.7, every: [3, 5], armed: 0.5}}
checks:
  - name: prefix
    run: PYTHONPATH={tests} {py} -m peers.check_output --input input.txt --output output.txt
    every: 2
  - name: acked
    progress: {{process: source, pattern: "^acked ", within: 10}}
  - name: full speed
    run: touch full-speed
  - name: complete
    run: >-
      PYTHONPATH={tests} {py} -m peers.check_output --input input.txt --output output.txt
      --complete
    retry_for: 30
"""


CRASH_EVERY_PEER = """\
  - {name: crash-sink, process: sink, action: crash, start_after: 1.0, every: [2, 3.2],
     down: [0, 0.8]}
  - {name: crash-worker, process: worker, action: crash, start_after: 1.7, every: [2, 3.2],
     down: [0, 0.8]}
  - {name: crash-source, process: source, action: crash, start_after: 2.4, every: [2, 3.2],
     down: [0, 0.8]}"""
CRASH_THE_SINK_ONCE = """\
  - {name: crash-sink, process: sink, action: crash, start_after: 1.0, down: [0, 0.8]}"""
"""For the broken sink one crash is enough (it loses what it confirmed last, every time),
and it leaves every peer up from then on, so the pause finds all three running."""


@contextlib.contextmanager
def running_links(workdir: Path, sink_port: int, worker_port: int) -> Iterator[dict[str, str]]:
    """`wirefault serve` with the two proxies, `source_link` in front of the worker and
    `sink_link` in front of the sink: its ready line's NAME=HOST:PORT words (and api=)."""
    config = workdir / "links.yaml"
    config.write_text(
        "proxies:\n"
        f"  - {{name: source_link, listen: '127.0.0.1:0', protocol: wallaroo, "
        f"upstream: '127.0.0.1:{worker_port}'}}\n"
        f"  - {{name: sink_link, listen: '127.0.0.1:0', protocol: wallaroo, "
        f"upstream: '127.0.0.1:{sink_port}'}}\n")
    with open(workdir / "serve.log", "wb") as log:
        serve = subprocess.Popen(
            [str(WIREFAULT), "serve", "--api", "127.0.0.1:0", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True)
    try:
        assert serve.stdout is not None
        readable, _, _ = select.select([serve.stdout], [], [], 30)
        ready = serve.stdout.readline().split() if readable else []
        assert ready[:1] == ["ready"], (workdir / "serve.log").read_text()
        yield dict(word.split("=", 1) for word in ready[1:])
    finally:
        stop_process(serve)
        serve.stdout.close()  # type: ignore[union-attr]


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


@contextlib.contextmanager
def pipeline_scenario(workdir: Path, seed: int, *, broken: bool = False) -> Iterator[Path]:
    """The two proxies running, the input written, the scenario file: its path. On the way
    out, whatever the run left (a paused world, a failed assertion midway) is killed."""
    write_input(workdir / "input.txt", seed, LINES)
    sink_port, worker_port = free_port(), free_port()
    try:
        with running_links(workdir, sink_port, worker_port) as links:
            path = workdir / "scenario.yaml"
            path.write_text(SCENARIO.format(
                seed=seed, duration=DURATION, py=PY, tests=TESTS_DIR, rate=RATE,
                sink_port=sink_port, worker_port=worker_port,
                sink_link_port=port_of(links["sink_link"]),
                source_link_port=port_of(links["source_link"]), api=f"http://{links['api']}",
                sink_flags=", --ack-before-write" if broken else "",
                process_faults=CRASH_THE_SINK_ONCE if broken else CRASH_EVERY_PEER))
            yield path
    finally:
        kill_what_runs_left(workdir)


def run_chaos(scenario: Path, run_dir: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run([str(WIREFAULT), "chaos", str(scenario), "--run-dir", str(run_dir)],
                            capture_output=True, text=True, timeout=120, cwd=scenario.parent)
    return result, time.monotonic() - started


def run_log(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "run.jsonl").read_text().splitlines()]


def counted(events: list[dict[str, Any]], kind: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in events:
        if event["event"] == kind:
            name = event.get("process") or event.get("fault") or ""
            counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.timeout(150)
@pytest.mark.parametrize("seed", SEEDS)
def test_crashing_every_peer_under_network_faults_loses_nothing(tmp_path: Path,
                                                                seed: int) -> None:
    run_dir = tmp_path / "run"
    with pipeline_scenario(tmp_path, seed) as scenario:
        result, seconds = run_chaos(scenario, run_dir)
    report = f"{result.stdout}\n{result.stderr}\n{(tmp_path / 'serve.log').read_text()}"
    assert result.returncode == 0, report
    assert result.stdout.splitlines()[-1] == "verdict: pass (exit 0)", report
    assert (tmp_path / "output.txt").read_bytes() == (tmp_path / "input.txt").read_bytes()
    assert seconds < 60, f"the run took {seconds:.1f}s"

    events = run_log(run_dir)
    crashed = counted(events, "crashed")
    assert sum(crashed.values()) >= MIN_CRASHES, crashed
    assert set(crashed) == {"sink", "worker", "source"}, crashed
    assert counted(events, "restarted") == crashed, "every crashed peer came back"
    assert not counted(events, "exited"), "a peer died by itself"
    summary = events[-1]
    assert summary["event"] == "summary" and summary["exit"] == 0
    applied = {name: fault["applied"] for name, fault in summary["faults"].items()
               if fault["kind"] == "process"}
    assert applied == {f"crash-{name}": count for name, count in crashed.items()}
    fired = {fault["target"]: 0 for fault in summary["faults"].values()
             if fault["kind"] == "network"}
    for fault in summary["faults"].values():
        if fault["kind"] == "network":
            fired[fault["target"]] += fault["fired"]
    assert all(fired.values()), f"no network fault fired on a link: {fired}"
    checks = {event["name"]: event for event in events if event["event"] == "check"}
    prefix_runs = [event for event in events
                   if event["event"] == "check" and event["name"] == "prefix"]
    assert len(prefix_runs) >= 5 and all(event["passed"] for event in prefix_runs)
    assert checks["complete"]["passed"]
    print(json.dumps({"seed": seed, "seconds": round(seconds, 1), "crashed": crashed,
                      "fired": fired, "complete_after": checks["complete"]["seconds"]}))


@pytest.mark.timeout(150)
def test_a_sink_that_acks_before_writing_is_caught_and_the_world_paused(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pipeline_scenario(tmp_path, SEEDS[0], broken=True) as scenario:
        result, seconds = run_chaos(scenario, run_dir)
        report = f"{result.stdout}\n{result.stderr}"
        assert result.returncode == 1, report
        lines = result.stdout.splitlines()
        assert lines[-1] == "verdict: check failed (exit 1)", report
        failure = [line for line in lines if line.startswith("  failure: ")]
        assert len(failure) == 1 and re.fullmatch(
            r"  failure: \+\d+\.\d{3}s check prefix failed \(exit 1\): output\.txt: output "
            r"differs from input at byte \d+ \(line \d+\): expected .*, got .*",
            failure[0]), report

        state = json.loads((run_dir / "processes.json").read_text())
        assert state["left_paused"] is True
        pgids = {entry["name"]: entry["pgid"] for entry in state["processes"]}
        assert set(pgids) == {"sink", "worker", "source"}
        for name, pid in pgids.items():
            assert proc_state(pid) == "T", f"{name} ({pid}) is not stopped"
        # The data lost was confirmed: the sink crashed, and its next incarnation says so.
        events = run_log(run_dir)
        assert counted(events, "crashed") == {"sink": 1}
        assert counted(events, "restarted") == {"sink": 1}
        assert "data lost" in (run_dir / "sink.log").read_text()

        stop = next(line for line in lines if line.startswith("  stop them:"))
        subprocess.run(stop.split(":", 1)[1].strip(), shell=True, check=True)
        wait_until(lambda: all(gone(pid) for pid in pgids.values()), 15, "the peers to stop")
        wait_until(lambda: gone(state["watchdog_pid"]), 15, "the watchdog to go")
    assert seconds < 60
