"""`wirefault chaos` with managed processes: process faults on the scenario clock, checks
while it runs (`every`, `progress`), on_failure pause and stop, a process that dies by
itself, Ctrl-C and SIGTERM, the run directory, `--replay`.

The managed processes are small Python scripts; the tests wait for what the run shows (its
exit, a line of its JSON timeline) and then look at the processes through /proc."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from proxy_helpers import gone, kill_what_runs_left, proc_state
from proxy_helpers import wait_for as wait_until
from test_chaos_runner import WIREFAULT, echoes_text, raw_echo_proxy, run_main, write

from wirefault.fifo_client import chaos

PY = sys.executable

TICKER = """\
import time
print("ready", flush=True)
n = 0
while True:
    n += 1
    print(f"tick {n}", flush=True)
    time.sleep(0.05)
"""

BREAKER = """\
import pathlib, time
print("ready", flush=True)
time.sleep(0.3)
pathlib.Path("broken").touch()
while True:
    time.sleep(1)
"""

ACKER = """\
import time
print("ready", flush=True)
with open("acks.txt", "a") as acks:
    for n in range(10):
        acks.write(f"acked {n}\\n")
        acks.flush()
        time.sleep(0.05)
while True:
    time.sleep(1)
"""


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted(path.parent for path in tmp_path.glob("**/run.jsonl"))


def run_log(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "run.jsonl").read_text().splitlines()]


def pids_started(events: list[dict[str, Any]]) -> dict[str, list[int]]:
    pids: dict[str, list[int]] = {}
    for event in events:
        if event["event"] in ("started", "restarted"):
            pids.setdefault(event["process"], []).append(event["pid"])
    return pids


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path: Path) -> Iterator[None]:
    """Whatever a test leaves (a paused world, a failed assertion midway), its processes
    and watchdogs are killed afterwards."""
    yield
    kill_what_runs_left(tmp_path)


def scenario(tmp_path: Path, body: str, **scripts: str) -> Path:
    for name, text in scripts.items():
        (tmp_path / f"{name}.py").write_text(text)
    return write(tmp_path, body)


def ticker(name: str = "w") -> str:
    return f"  {name}: {{command: [{PY}, ticker.py], ready: {{pattern: ready, timeout: 20}}}}\n"


PROCESS_LINE = re.compile(r"^\+ +\d+\.\d{3}s  (\S+) +(\S+)(  \((.*)\))?$")


# -- process faults on the clock ------------------------------------------------------------


def test_process_faults_crash_restart_and_pause_on_the_schedule(tmp_path: Path) -> None:
    path = scenario(tmp_path, f"""\
seed: 5
duration: 2.4
on_failure: stop
processes:
{ticker()}faults:
  - {{name: crash-w, process: w, action: crash, every: 0.8, start_after: 0.3, times: 2,
     down: 0.1}}
  - {{name: pause-w, process: w, action: pause, start_after: 1.9, down: 0.2}}
checks:
  - {{name: ticking, progress: {{process: w, pattern: tick, within: 1.5}}}}
  - {{name: alive, run: 'true', every: 0.5}}
""", ticker=TICKER)
    status, out, err = run_main(path)
    assert (status, err) == (chaos.EXIT_PASS, ""), out
    lines = out.splitlines()
    crashes = [line for line in lines if "  crash  " in line]
    assert len(crashes) == 2, out
    for number, line in enumerate(crashes, 1):
        assert re.fullmatch(rf"\+ +\d\.\d{{3}}s  crash      w  \(crash-w:{number}, pid \d+, "
                            r"down 0\.1s\)", line), line
    assert sum("  restarted  w  (pid " in line for line in lines) == 2, out
    assert any(re.fullmatch(r"\+ +\d\.\d{3}s  pause      w  \(pause-w:1, pid \d+, down 0\.2s\)",
                            line) for line in lines), out
    assert any("  resumed    w  (pid " in line for line in lines), out
    assert any(re.fullmatch(r"\+ +\d\.\d{3}s  check      alive  \(passed in \d\.\d\ds\)", line)
               for line in lines), out
    table = lines[lines.index("faults:") + 1:lines.index("faults:") + 4]
    assert table == ["  fault    target     applied  fired",
                     "  crash-w  process w        2  -",
                     "  pause-w  process w        1  -"]
    assert "summary: seed 5, 2.4s, 0 faults armed (none), 3 process faults applied, " \
           "0 errors, 2/2 checks passed" in lines
    assert "  check ticking: passed: " in out

    [run_dir] = run_dirs(tmp_path)
    events = run_log(run_dir)
    assert events[0]["event"] == "schedule" and events[0]["seed"] == 5
    assert [(w["fault"], w["arm"], w["action"]) for w in events[0]["windows"]] == [
        ("crash-w", 0.3, "crash"), ("crash-w", 1.1, "crash"), ("pause-w", 1.9, "pause")]
    kinds = [event["event"] for event in events]
    assert kinds[:4] == ["schedule", "started", "ready", "start"]
    assert all("t" in event for event in events)
    # Each crash kills the process the run started, and a new one takes its place.
    pids = pids_started(events)["w"]
    assert len(set(pids)) == 3
    crashed = [event["pid"] for event in events if event["event"] == "crash"]
    assert crashed == pids[:2]
    moments = [event["t"] for event in events if event["event"] == "crash"]
    assert moments[0] >= 0.3 and moments[1] >= 1.1
    assert all(gone(pid) for pid in pids), "a process outlived the run"
    assert sorted(p.name for p in run_dir.glob("w.log.*")) == ["w.log.1.gz", "w.log.2.gz"]
    assert (run_dir / "scenario.yaml").read_text() == path.read_text()


def test_dry_run_shows_process_windows_and_touches_nothing(tmp_path: Path) -> None:
    path = scenario(tmp_path, f"""\
seed: 2
duration: 3
processes:
{ticker()}faults:
  - {{name: stop-w, process: w, action: stop, every: 1, start_after: 0.5, down: 0.25}}
""", ticker=TICKER)
    status, out, err = run_main(path, "--dry-run")
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        "schedule: seed 2, duration 3s, 3 windows",
        "+   0.500s  stop       w  (stop-w:1, down 0.25s)",
        "+   0.750s  restart    w  (stop-w:1, down 0.25s)",
        "+   1.500s  stop       w  (stop-w:2, down 0.25s)",
        "+   1.750s  restart    w  (stop-w:2, down 0.25s)",
        "+   2.500s  stop       w  (stop-w:3, down 0.25s)",
        "+   2.750s  restart    w  (stop-w:3, down 0.25s)",
    ]
    assert not (tmp_path / "chaos-runs").exists()


def test_a_process_that_is_never_ready_stops_the_run_before_it_starts(tmp_path: Path) -> None:
    path = scenario(tmp_path, f"""\
seed: 1
duration: 5
processes:
{ticker()}  mute: {{command: [{PY}, -c, 'import time; time.sleep(60)'],
          ready: {{pattern: never, timeout: 0.5}}}}
""", ticker=TICKER)
    status, out, err = run_main(path)
    assert status == chaos.EXIT_BAD_RUN
    shown = [PROCESS_LINE.fullmatch(line).group(1, 2) for line in out.splitlines()]  # type: ignore[union-attr]
    assert shown == [("started", "w"), ("ready", "w"), ("started", "mute"), ("stopped", "w")]
    assert re.fullmatch(r"wirefault chaos: process mute: not ready within 0\.5s "
                        r"\(log: .*/mute\.log\)\n", err), err
    [run_dir] = run_dirs(tmp_path)
    assert all(gone(pid) for pids in pids_started(run_log(run_dir)).values() for pid in pids)


# -- failures -------------------------------------------------------------------------------


def test_a_failed_check_pauses_the_world_and_says_how_to_resume_it(tmp_path: Path) -> None:
    path = scenario(tmp_path, f"""\
seed: 1
duration: 60
processes:
{ticker("a")}  b: {{command: [{PY}, breaker.py], ready: {{pattern: ready}}}}
checks:
  - {{name: intact, run: 'test ! -e broken', every: 0.1}}
""", ticker=TICKER, breaker=BREAKER)
    started = time.monotonic()
    result = subprocess.run([str(WIREFAULT), "chaos", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == chaos.EXIT_CHECK_FAILED, result
    assert time.monotonic() - started < 30, "the failure did not stop the run at once"
    lines = result.stdout.splitlines()
    assert any(re.fullmatch(r"\+ +\d+\.\d{3}s  check      intact  \(FAILED: exit 1 after 1 "
                            r"attempt\(s\)\)", line) for line in lines), result.stdout
    [run_dir] = run_dirs(tmp_path)
    state = json.loads((run_dir / "processes.json").read_text())
    assert state["left_paused"] is True
    pgids = {entry["name"]: entry["pgid"] for entry in state["processes"]}
    for pid in pgids.values():
        assert proc_state(pid) == "T", f"{pid} is not stopped"
    groups = f"-{pgids['a']} -{pgids['b']}"
    assert f"  resume them: kill -s CONT -- {groups}" in lines
    stop_line = f"  stop them:   kill -s TERM -- {groups} && kill -s CONT -- {groups}"
    assert stop_line in lines
    assert re.search(rf"^  a  pid {pgids['a']}  pgid {pgids['a']}  log {run_dir}/a\.log$",
                     result.stdout, re.M), result.stdout
    assert any(re.fullmatch(r"  failure: \+\d+\.\d{3}s check intact failed \(exit 1\)", line)
               for line in lines), result.stdout
    assert lines[-1] == "verdict: check failed (exit 1)"
    logged = run_log(run_dir)
    assert [event["event"] for event in logged][-1] == "summary"
    assert logged[-1]["paused"][0]["pgid"] == pgids["a"]
    # The printed command ends the world.
    subprocess.run(stop_line.split(":", 1)[1].strip(), shell=True, check=True)
    wait_until(lambda: all(gone(pid) for pid in pgids.values()), 10, "the stop command")
    wait_until(lambda: gone(state["watchdog_pid"]), 10, "the watchdog to go")


def test_on_failure_stop_and_a_process_that_dies_by_itself(tmp_path: Path) -> None:
    path = scenario(tmp_path, f"""\
seed: 1
duration: 60
on_failure: stop
processes:
{ticker("a")}  b: {{command: [{PY}, -c, 'import time; print("ready", flush=True);
                   time.sleep(0.3); raise SystemExit(3)'], ready: {{pattern: ready}}}}
checks:
  - {{name: final, run: touch final-ran}}
""", ticker=TICKER)
    status, out, err = run_main(path)
    assert (status, err) == (chaos.EXIT_CHECK_FAILED, ""), out
    lines = out.splitlines()
    assert any(re.fullmatch(r"\+ +\d+\.\d{3}s  exited     b  \(pid \d+, exit status 3\)", line)
               for line in lines), out
    assert any(re.fullmatch(r"  failure: \+\d+\.\d{3}s process b crashed by itself "
                            r"\(exit status 3\)", line) for line in lines), out
    assert lines[-1] == "verdict: failed (exit 1)"
    assert not (tmp_path / "final-ran").exists(), "checks ran after the run failed"
    [run_dir] = run_dirs(tmp_path)
    events = run_log(run_dir)
    assert all(gone(pid) for pids in pids_started(events).values() for pid in pids)
    assert any(event["event"] == "stopped" and event["process"] == "a" for event in events)
    assert not json.loads((run_dir / "processes.json").read_text())["left_paused"]


def test_a_progress_check_on_a_file_fails_when_the_lines_stop(tmp_path: Path) -> None:
    path = scenario(tmp_path, f"""\
seed: 1
duration: 60
on_failure: stop
processes:
  acker: {{command: [{PY}, acker.py], ready: {{pattern: ready}}}}
checks:
  - {{name: acked, progress: {{file: acks.txt, pattern: '^acked', within: 1}}}}
""", acker=ACKER)
    status, out, _ = run_main(path, "--json")
    assert status == chaos.EXIT_CHECK_FAILED
    events = [json.loads(line) for line in out.splitlines()]
    check = next(event for event in events if event["event"] == "check")
    assert check["passed"] is False and check["matches"] == 10
    assert check["progress"] == f"progress: /^acked/ in {tmp_path}/acks.txt every 1s"
    assert re.fullmatch(rf"no line matching '\^acked' in {tmp_path}/acks\.txt for 1s \(last "
                        r"one 1\.\d\ds ago, 10 before\)", check["output"]), check
    assert check["t"] >= 1
    failure = next(event for event in events if event["event"] == "failure")
    assert failure["check"] == "acked"
    assert events[-1]["failure"].endswith("check acked failed: " + check["output"])
    assert events[-1]["checks"] == {"passed": 0, "failed": 1}


# -- stopping it ----------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "status", "word"), [
    (signal.SIGINT, chaos.EXIT_INTERRUPTED, "interrupted"),
    (signal.SIGTERM, chaos.EXIT_TERMINATED, "terminated (SIGTERM)"),
])
def test_ctrl_c_and_sigterm_stop_every_process(
        tmp_path: Path, signum: int, status: int, word: str) -> None:
    path = scenario(tmp_path, f"""\
seed: 1
duration: 60
processes:
{ticker("a")}{ticker("b")}faults:
  - {{name: crash-a, process: a, action: crash, every: 0.3, down: 0.05}}
""", ticker=TICKER)
    with subprocess.Popen([str(WIREFAULT), "chaos", str(path), "--json"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as runner:
        try:
            assert runner.stdout is not None and runner.stderr is not None
            events = []
            for line in runner.stdout:
                events.append(json.loads(line))
                if events[-1]["event"] == "restarted":
                    runner.send_signal(signum)
                    break
            events += [json.loads(line) for line in runner.stdout]
            assert runner.wait(30) == status
            err = runner.stderr.read()
        finally:
            if runner.poll() is None:
                runner.kill()
    assert err == f"wirefault chaos: {word}; every proxy was set back to conn.allow() " \
                  "and every process was stopped\n"
    pids = pids_started(events)
    assert len(pids["a"]) >= 2 and len(pids["b"]) == 1
    crash = next(event for event in events if event["event"] == "crash")
    assert crash == {"event": "crash", "t": crash["t"], "process": "a", "fault": "crash-a",
                     "name": "crash-a:1", "pid": pids["a"][0], "down": 0.05}
    assert all(isinstance(event["t"], float) for event in events if "process" in event)
    assert all(gone(pid) for group in pids.values() for pid in group)
    assert {event["process"] for event in events if event["event"] == "stopped"} >= {"b"}
    [run_dir] = run_dirs(tmp_path)
    logged = run_log(run_dir)
    assert logged[-1]["event"] == word.split()[0]


def test_the_next_run_reaps_what_a_killed_runner_left(tmp_path: Path) -> None:
    """Runner and watchdog both SIGKILLed: the next run's start kills the leftovers."""
    path = scenario(tmp_path, f"""\
seed: 1
duration: 60
processes:
{ticker()}""", ticker=TICKER)
    with subprocess.Popen([str(WIREFAULT), "chaos", str(path), "--json"],
                          stdout=subprocess.PIPE, text=True) as runner:
        try:
            assert runner.stdout is not None
            for line in runner.stdout:
                if json.loads(line)["event"] == "start":
                    break
            [run_dir] = run_dirs(tmp_path)
            state = json.loads((run_dir / "processes.json").read_text())
            os.kill(state["watchdog_pid"], signal.SIGKILL)
            wait_until(lambda: gone(state["watchdog_pid"]), 10, "the watchdog to die")
            runner.kill()
        finally:
            if runner.poll() is None:
                runner.kill()
    [left] = [entry["pid"] for entry in state["processes"]]
    assert not gone(left)
    second = path.read_text().replace("duration: 60", "duration: 0.2")
    path.write_text(second)
    status, _, err = run_main(path)
    assert status == chaos.EXIT_PASS
    assert err == f"wirefault chaos: reaped w (pid {left}) left by run {run_dir}\n"
    wait_until(lambda: gone(left), 10, "the leftover to die")


# -- the run directory and --replay ---------------------------------------------------------

SHORT = f"""\
seed: 4
duration: 1
processes:
{ticker()}faults:
  - {{name: pause-w, process: w, action: pause, every: [0.2, 0.4], down: [0.05, 0.1]}}
"""


def test_run_dir_is_exact_and_a_used_one_is_refused(tmp_path: Path) -> None:
    path = scenario(tmp_path, SHORT, ticker=TICKER)
    given = tmp_path / "here" / "run1"
    status, out, _ = run_main(path, "--run-dir", given)
    assert status == chaos.EXIT_PASS, out
    assert (given / "run.jsonl").is_file() and (given / "w.log").is_file()
    assert f"run log: {given}/run.jsonl" in out.splitlines()
    status, out, err = run_main(path, "--run-dir", given)
    assert (status, out) == (chaos.EXIT_BAD_RUN, "")
    assert err == f"wirefault chaos: --run-dir {given}: already holds a run " \
                  f"({given}/run.jsonl); give a new directory\n"


def test_replay_runs_the_recorded_schedule_and_refuses_a_changed_one(tmp_path: Path) -> None:
    path = scenario(tmp_path, SHORT, ticker=TICKER)
    assert run_main(path, "--seed", "9")[0] == chaos.EXIT_PASS
    [first] = run_dirs(tmp_path)
    assert first.name.endswith("-seed9")
    path.write_text(SHORT.replace("seed: 4", "seed: 5"))  # the original may change
    status, out, err = run_main("--replay", first)
    assert (status, err) == (chaos.EXIT_PASS, ""), out
    second = next(d for d in run_dirs(tmp_path) if d != first)
    recorded, replayed = run_log(first)[0], run_log(second)[0]
    assert replayed["replay_of"] == str(first)
    assert (replayed["seed"], replayed["windows"]) == (9, recorded["windows"])
    assert recorded["windows"], "nothing was scheduled"
    assert (second / "scenario.yaml").read_text() == SHORT
    # A scenario that now draws other times is not run under the old run's name.
    (first / "scenario.yaml").write_text(SHORT.replace("[0.2, 0.4]", "[0.25, 0.4]"))
    status, out, err = run_main("--replay", first)
    assert (status, out) == (chaos.EXIT_BAD_RUN, "")
    assert re.fullmatch(rf"wirefault chaos: --replay {first}: the scenario no longer gives "
                        r"the recorded schedule \(windows\[0\] \(pause-w:1\): .*\); not run\n",
                        err), err
    assert len(run_dirs(tmp_path)) == 2


# -- processes and proxies on one clock -----------------------------------------------------


def test_network_and_process_faults_share_the_clock_and_the_table(tmp_path: Path) -> None:
    """`hit` kills frames starting with a, `miss` those starting with z; the test sends
    "apple" once both are armed: hit fires, miss never does, and the table says so."""
    with raw_echo_proxy() as proxy:
        path = scenario(tmp_path, f"""\
seed: 3
duration: 1.6
on_failure: stop
proxies:
  echo: {{fifo: {proxy.fifo}}}
processes:
{ticker()}faults:
  - {{name: hit, proxy: echo, command: 'conn.matches(b"^a").kill()', start_after: 0.1,
     armed: 1.2}}
  - {{name: miss, proxy: echo, command: 'conn.matches(b"^z").kill()', start_after: 0.1,
     armed: 1.2}}
  - {{name: crash-w, process: w, action: crash, start_after: 0.6, down: 0.1}}
""", ticker=TICKER)
        lines: list[str] = []
        echoed = []
        with subprocess.Popen([str(WIREFAULT), "chaos", str(path)], stdout=subprocess.PIPE,
                              text=True) as runner:
            try:
                assert runner.stdout is not None
                for line in runner.stdout:
                    lines.append(line.rstrip("\n"))
                    if not echoed and sum("  armed " in seen for seen in lines) == 2:
                        echoed.append(echoes_text(proxy.port, b"apple"))
                status = runner.wait(30)
            finally:
                if runner.poll() is None:
                    runner.kill()
        assert echoes_text(proxy.port, b"apple"), "a fault was left armed"
    assert status == chaos.EXIT_PASS, lines
    assert echoed == [False]
    events = [PROCESS_LINE.fullmatch(line) for line in lines]
    order = [(m.group(1), m.group(2)) for m in events if m]
    assert order.index(("crash", "w")) < order.index(("restarted", "w"))
    table = lines[lines.index("faults:") + 1:lines.index("faults:") + 5]
    assert table == ["  fault    target      applied  fired",
                     "  hit      proxy echo        1  1 (1 frame)",
                     "  miss     proxy echo        1  never fired",
                     "  crash-w  process w         1  -"]
    [run_dir] = run_dirs(tmp_path)
    lifts = {event["fault"]: event["fired"] for event in run_log(run_dir)
             if event["event"] == "disarmed"}
    assert lifts == {"hit": 1, "miss": 0}
    summary = run_log(run_dir)[-1]
    assert summary["faults"]["miss"] == {"kind": "network", "target": "echo", "applied": 1,
                                         "fired": 0, "frames": 0, "never_fired": True}
