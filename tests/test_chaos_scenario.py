"""`wirefault chaos` scenarios with managed processes, process faults and checks that run
while the run goes on: what the reader accepts (to the dataclasses the runner gets), how it
says no (file:line:column: key: problem, every problem in one pass), and the schedule of
process faults, down to its JSON form for the run log and --replay."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wirefault.fifo_client import chaos_scenario
from wirefault.fifo_client.chaos_scenario import (
    CheckSpec,
    FaultSpec,
    Interval,
    ProcessSpec,
    ProgressSpec,
    ProxySpec,
    ReadySpec,
    Scenario,
    ScenarioErrors,
    load_scenario,
)
from wirefault.fifo_client.chaos_schedule import Schedule, Window, build_schedule

FULL = """\
seed: 7
duration: 40
on_failure: stop
run_dir: runs/
processes:
  sink:
    command: [python, -m, peers.sink, --listen, "127.0.0.1:7200", --port, 7200]
    cwd: work
    env: {PYTHONPATH: ../tests, WORKERS: 3, VERBOSE: true}
    ready: {port: 7200, timeout: 10}
    restart: [python, -m, peers.sink, --resume]
    log: logs/sink.log
    keep_logs: 2
  worker:
    command: exec python -m peers.worker > /dev/null
    ready: {pattern: "listening on \\\\d+"}
  source:
    command: [python, source.py]
    ready: {command: [nc, -z, 127.0.0.1, "7100"], timeout: 5}
  idle:
    command: sleep 100
    ready: {port: 7300, host: 127.0.0.2}
proxies:
  link: {fifo: link.fifo, protocol: wallaroo}
faults:
  - name: crash-sink
    process: sink
    action: crash
    every: [2, 4]
    start_after: 1
    times: 5
    down: [0.2, 1.0]
  - {name: stop-worker, process: worker, action: stop, every: 3, down: 0}
  - {process: source, action: pause, start_after: 5}
  - {name: kill, proxy: link, command: conn.onNotify().kill(), armed: 0.5, every: [1, 2]}
checks:
  - name: prefix
    run: python check_prefix.py input.txt out.txt
    every: 2
  - {name: final, run: cmp in out, timeout: 10, retry_for: 3}
  - name: acked
    progress: {file: source.log, pattern: "acked", within: 300}
  - progress: {process: worker, pattern: " done$", within: 5}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return path


def test_a_full_scenario_loads_to_what_the_runner_gets(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    scenario = load_scenario(path)
    assert scenario == Scenario(
        path=path, seed=7, duration=40.0, timeout=5.0,
        proxies={"link": ProxySpec("link", str(tmp_path / "link.fifo"), "wallaroo")},
        faults=(
            FaultSpec("crash-sink", None, None, 0.0, Interval(2, 4), 1.0, 5, None,
                      "sink", "crash", Interval(0.2, 1.0)),
            FaultSpec("stop-worker", None, None, 0.0, Interval(3, 3), None, None, None,
                      "worker", "stop", Interval(0, 0)),
            FaultSpec("fault3", None, None, 0.0, None, 5.0, None, None,
                      "source", "pause", Interval(0, 0)),
            FaultSpec("kill", "link", "conn.onNotify().kill()", 0.5, Interval(1, 2)),
        ),
        checks=(
            CheckSpec("prefix", "python check_prefix.py input.txt out.txt", every=2.0),
            CheckSpec("final", "cmp in out", 10.0, 3.0),
            CheckSpec("acked", None,
                      progress=ProgressSpec("acked", 300.0, file=tmp_path / "source.log")),
            CheckSpec("check4", None, progress=ProgressSpec(" done$", 5.0, process="worker")),
        ),
        processes={
            "sink": ProcessSpec(
                "sink",
                ("python", "-m", "peers.sink", "--listen", "127.0.0.1:7200", "--port", "7200"),
                tmp_path / "work", {"PYTHONPATH": "../tests", "WORKERS": "3", "VERBOSE": "true"},
                ReadySpec(port=7200, timeout=10.0),
                ("python", "-m", "peers.sink", "--resume"), tmp_path / "logs" / "sink.log", 2),
            "worker": ProcessSpec("worker", "exec python -m peers.worker > /dev/null", tmp_path,
                                  {}, ReadySpec(pattern=r"listening on \d+")),
            "source": ProcessSpec("source", ("python", "source.py"), tmp_path, {},
                                  ReadySpec(command=("nc", "-z", "127.0.0.1", "7100"),
                                            timeout=5.0)),
            "idle": ProcessSpec("idle", "sleep 100", tmp_path, {},
                                ReadySpec(port=7300, host="127.0.0.2")),
        },
        on_failure="stop",
        run_dir=tmp_path / "runs",
    )
    assert list(scenario.processes) == ["sink", "worker", "source", "idle"], "start order"
    sink, worker = scenario.processes["sink"], scenario.processes["worker"]
    assert sink.restart_command == ("python", "-m", "peers.sink", "--resume")
    assert worker.restart_command == worker.command
    assert (worker.log, worker.keep_logs, worker.ready and worker.ready.timeout) == (None, 5, 30)
    assert [fault.is_process_fault for fault in scenario.faults] == [True, True, True, False]


def test_the_defaults_of_a_scenario_with_processes_only(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\nduration: 3\nprocesses:\n  p: {command: [sleep, 9]}\n")
    scenario = load_scenario(path)
    assert (scenario.proxies, scenario.faults, scenario.checks) == ({}, (), ())
    assert (scenario.on_failure, scenario.run_dir) == ("pause", None)
    assert scenario.processes == {"p": ProcessSpec("p", ("sleep", "9"), tmp_path, {})}
    assert build_schedule(scenario).windows == ()


def test_the_docstring_documents_every_key(tmp_path: Path) -> None:
    doc = chaos_scenario.__doc__ or ""
    for key in (*chaos_scenario.TOP_REQUIRED, *chaos_scenario.TOP_OPTIONAL,
                *chaos_scenario.PROCESS_KEYS, *chaos_scenario.READY_KINDS, "host",
                *chaos_scenario.PROCESS_FAULT_OPTIONAL, *chaos_scenario.PROCESS_FAULT_REQUIRED,
                *chaos_scenario.CHECK_KEYS, "within", "pattern", "file"):
        assert f"{key}:" in doc or f"{key} (" in doc or f" {key} " in doc, key


# -- errors ---------------------------------------------------------------------------------

BASE = """\
seed: 1
duration: 10
processes:
  sink:
    command: [sleep, 100]
    ready: {port: 7200}
faults:
  - name: crash
    process: sink
    action: crash
    every: [2, 3]
    down: [0.5, 1]
checks:
  - {name: acked, progress: {process: sink, pattern: ack, within: 5}}
"""


@pytest.mark.parametrize(("old", "new", "where", "message"), [
    ("seed: 1", "seed: 1\non_failure: halt", "2:13",
     "on_failure: expected pause or stop, got 'halt'"),
    ("seed: 1", "seed: 1\nrun_dir: [a]", "2:10",
     "run_dir: expected a non-empty string, got a list"),
    ("  sink:\n    command: [sleep, 100]", "  sink:\n    command: [sleep, 100]\n  sink:\n"
     "    command: x", "6:3", "processes.sink: duplicate key"),
    ("faults:\n", "  a/b: {command: x}\nfaults:\n", "7:3",
     "processes.a/b: process names use letters, digits, '_', '.', '-'"),
    ("command: [sleep, 100]", "command: []", "5:14",
     "processes.sink.command: expected an argv list or a shell string, got an empty list"),
    ("command: [sleep, 100]", "command: [sleep, [100]]", "5:22",
     "processes.sink.command[1]: expected a string, got a list"),
    ("command: [sleep, 100]", "command: ['', 100]", "5:15",
     "processes.sink.command[0]: the program to run is empty"),
    ("command: [sleep, 100]", "command: 5", "5:14",
     "processes.sink.command: expected an argv list or a shell string, got 5"),
    ("    ready: {port: 7200}", "    ready: {port: 7200}\n    keep_log: 2", "7:5",
     "processes.sink.keep_log: unknown key (expected command, cwd, env, ready, restart, log, "
     "keep_logs); did you mean 'keep_logs'?"),
    ("    ready: {port: 7200}", "    ready: {port: 7200}\n    env: [A]", "7:10",
     "processes.sink.env: expected a mapping of variable names to values, got a list"),
    ("    ready: {port: 7200}", "    ready: {port: 7200}\n    env: {A: ~}", "7:14",
     "processes.sink.env.A: expected a string, got None"),
    ("    ready: {port: 7200}", "    ready: {port: 7200}\n    env: {A=B: x}", "7:11",
     "processes.sink.env.A=B: variable names are non-empty strings without '='"),
    ("    ready: {port: 7200}", "    ready: {port: 7200}\n    keep_logs: 0", "7:16",
     "processes.sink.keep_logs: must be >= 1, got 0"),
    ("    ready: {port: 7200}", "    ready: {port: 7200}\n    restart: {}", "7:14",
     "processes.sink.restart: expected an argv list or a shell string, got a mapping"),
    ("{port: 7200}", "{timeout: 3}", "6:12",
     "processes.sink.ready: needs one of port, pattern or command"),
    ("{port: 7200}", "{port: 7200, command: 'true'}", "6:25",
     "processes.sink.ready.command: give one of port, pattern or command, not both port and "
     "command"),
    ("{port: 7200}", "{port: 70000}", "6:19", "processes.sink.ready.port: must be <= 65535"),
    ("{port: 7200}", "{pattern: x, host: h}", "6:25", "processes.sink.ready.host: only with port"),
    ("{port: 7200}", "{pattern: 'up (now'}", "6:22",
     "processes.sink.ready.pattern: column 4: bad regular expression: missing ), "
     "unterminated subpattern"),
    ("{port: 7200}", "{port: 7200, timeout: -1}", "6:34",
     "processes.sink.ready.timeout: must be > 0, got -1"),
    ("process: sink", "process: sinc", "9:14",
     "faults[0].process: no process named 'sinc'; processes: sink"),
    ("action: crash", "action: kill", "10:13",
     "faults[0].action: expected crash, stop or pause, got 'kill'"),
    ("    down: [0.5, 1]", "    down: [0.5, 1]\n    proxy: p", "13:5",
     "faults[0].proxy: a fault names either a proxy or a process, not both"),
    ("    down: [0.5, 1]", "    down: [0.5, 1]\n    command: conn.onAck().kill()", "13:5",
     "faults[0].command: a process fault has action: in place of command:"),
    ("    down: [0.5, 1]", "    down: [0.5, 1]\n    armed: 1", "13:5",
     "faults[0].armed: a process fault has down: in place of armed:"),
    ("    down: [0.5, 1]", "    down: [0.5, 1]\n    must_fire: 1", "13:5",
     "faults[0].must_fire: only network faults can be made to fire"),
    ("    down: [0.5, 1]", "    down: [0.5, 1]\n    evry: 1", "13:5",
     "faults[0].evry: unknown key (expected process, action, name, every, start_after, times, "
     "down); did you mean 'every'?"),
    ("    process: sink\n", "", "8:5", "faults[0].process: missing required key"),
    ("down: [0.5, 1]", "down: -1", "12:11", "faults[0].down: must be >= 0, got -1"),
    ("down: [0.5, 1]", "down: [1, 0.5]", "12:11", "faults[0].down: min 1 is above max 0.5"),
    ("down: [0.5, 1]", "down: [0.5, 2]", "12:11",
     "faults[0].down: its max 2 s is not shorter than every's minimum 2 s"),
    ("down: [0.5, 1]", "down: 3", "12:11",
     "faults[0].down: 3 s is not shorter than every's minimum 2 s"),
    ("    every: [2, 3]\n", "    times: 2\n", "11:5", "faults[0].times: needs every"),
    ("faults:\n", "proxies:\n  p: {fifo: p.fifo}\nfaults:\n"
     "  - {proxy: p, command: conn.onData().kill(), armed: 1, down: 1}\n", "10:57",
     "faults[0].down: only for process faults (with process: and action:)"),
    ("faults:\n", "faults:\n  - {proxy: p, command: conn.onData().kill(), armed: 1}\n", "8:13",
     "faults[0].proxy: no proxy named 'p'; the scenario declares no proxies"),
    ("{name: acked, progress:", "{name: acked, run: 'true', progress:", "14:32",
     "checks[0].progress: give either run or progress, not both"),
    ("{name: acked, progress:", "{name: acked, every: 1, progress:", "14:19",
     "checks[0].every: only with run (a progress check watches the whole run)"),
    ("{name: acked, progress:", "{name: acked, retry_for: 1, progress:", "14:19",
     "checks[0].retry_for: only with run (a progress check watches the whole run)"),
    ("{name: acked, progress: {process: sink, pattern: ack, within: 5}}",
     "{name: acked, run: 'true', every: 0}", "14:39", "checks[0].every: must be > 0, got 0"),
    ("process: sink, pattern", "file: log, process: sink, pattern", "14:41",
     "checks[0].progress.process: give either file or process, not both"),
    ("process: sink, pattern", "pattern", "14:29",
     "checks[0].progress.file: missing required key (file or process)"),
    ("{process: sink, pattern: ack,", "{process: sink,", "14:29",
     "checks[0].progress.pattern: missing required key"),
    ("process: sink, pattern", "process: sank, pattern", "14:39",
     "checks[0].progress.process: no process named 'sank'; processes: sink"),
    ("pattern: ack", "pattern: 'a[ck'", "14:54",
     "checks[0].progress.pattern: column 2: bad regular expression: unterminated character set"),
    ("within: 5", "within: soon", "14:67",
     "checks[0].progress.within: expected a number of seconds, got 'soon'"),
    ("within: 5", "within: 5, files: x", "14:70",
     "checks[0].progress.files: unknown key (expected pattern, within, file), or process in "
     "place of file; did you mean 'file'?"),
])
def test_bad_new_keys_name_the_line_column_and_key(
        tmp_path: Path, old: str, new: str, where: str, message: str) -> None:
    assert old in BASE
    path = write(tmp_path, BASE.replace(old, new, 1))
    with pytest.raises(ScenarioErrors) as caught:
        load_scenario(path)
    assert str(caught.value).startswith(f"{path}:{where}: {message}"), str(caught.value)
    assert len(caught.value.errors) == 1, "one problem, reported once: " + str(caught.value)


def test_a_scenario_needs_faults_or_processes(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 1\nduration: 2\nproxies:\n  p: {fifo: p.fifo}\n")
    with pytest.raises(ScenarioErrors) as caught:
        load_scenario(path)
    assert str(caught.value) == (f"{path}:1:1: faults: missing required key (a scenario "
                                 "needs faults, processes or both)")


def test_every_problem_of_the_new_sections_in_one_pass(tmp_path: Path) -> None:
    path = write(tmp_path, """\
seed: 7
duration: 10
on_failure: halt
processes:
  sink:
    command: [python, null]
    ready: {port: 7200, pattern: "("}
  ok: {command: 'true'}
faults:
  - {process: sinq, action: crash}
  - {process: ok, action: pause, armed: 1}
checks:
  - {progress: {file: f, pattern: a, within: 0}}
""")
    with pytest.raises(ScenarioErrors) as caught:
        load_scenario(path)
    assert str(caught.value).splitlines() == [f"{path}:{line}" for line in (
        "3:13: on_failure: expected pause or stop, got 'halt'",
        "6:23: processes.sink.command[1]: expected a string, got None",
        "7:25: processes.sink.ready.pattern: give one of port, pattern or command, not both "
        "port and pattern",
        "7:34: processes.sink.ready.pattern: column 1: bad regular expression: missing ), "
        "unterminated subpattern",
        "10:15: faults[0].process: no process named 'sinq'; processes: sink, ok",
        "11:34: faults[1].armed: a process fault has down: in place of armed:",
        "13:46: checks[0].progress.within: must be > 0, got 0",
    )]


def test_the_serve_config_reader_shares_the_machinery(tmp_path: Path) -> None:
    from wirefault.fifo_client.yaml_reader import ReaderErrors, YamlReader
    from wirefault.proxy import serve_config

    assert issubclass(serve_config._ConfigReader, YamlReader)
    assert issubclass(serve_config.ConfigError, ReaderErrors)
    assert chaos_scenario.ScenarioErrors is ReaderErrors


# -- the schedule of process faults --------------------------------------------------------

SCHEDULED = """\
seed: {seed}
duration: 30
processes:
  sink: {{command: [sleep, 100]}}
  worker: {{command: [sleep, 100]}}
proxies:
  link: {{fifo: link.fifo}}
faults:
  - {{name: kill, proxy: link, command: conn.onData().kill(), armed: 0.5, every: [1, 3]}}
  - {{name: crash-sink, process: sink, action: crash, every: [2, 4], down: [0.2, 1.5]}}
  - {{name: delay, proxy: link, command: conn.connect_delay(100), armed: 1, every: [2, 5]}}
  - {{name: pause-worker, process: worker, action: pause, every: 5, start_after: 1, times: 3,
     down: 0.5}}
"""


def schedule(tmp_path: Path, text: str, seed: int = 7) -> Schedule:
    return build_schedule(load_scenario(write(tmp_path, text.format(seed=seed))))


def test_process_fault_windows(tmp_path: Path) -> None:
    windows = schedule(tmp_path, SCHEDULED).windows
    crashes = [w for w in windows if w.fault == "crash-sink"]
    assert len(crashes) >= 6
    for number, window in enumerate(crashes, 1):
        assert (window.proxy, window.command, window.process, window.action, window.name) == \
            ("", "", "sink", "crash", f"crash-sink:{number}")
        assert 0.2 <= window.down <= 1.5 and window.disarm <= 30
        assert window.is_process_fault and window.must_fire is None
    assert len({w.down for w in crashes}) > 1, "down is drawn per application"
    pauses = [(w.arm, w.disarm, w.action) for w in windows if w.process == "worker"]
    assert pauses == [(1.0, 1.5, "pause"), (6.0, 6.5, "pause"), (11.0, 11.5, "pause")]
    assert [w.arm for w in windows] == sorted(w.arm for w in windows)
    network = [w for w in windows if not w.is_process_fault]
    assert {w.proxy for w in network} == {"link"}
    assert all(w.process is None and w.action is None for w in network)


def test_process_faults_are_seeded(tmp_path: Path) -> None:
    assert schedule(tmp_path, SCHEDULED, 7) == schedule(tmp_path, SCHEDULED, 7)
    assert schedule(tmp_path, SCHEDULED, 7) != schedule(tmp_path, SCHEDULED, 8)


def test_adding_process_faults_leaves_network_windows_alone(tmp_path: Path) -> None:
    without = "\n".join(line for line in SCHEDULED.splitlines()
                        if "process:" not in line and "down: 0.5" not in line) + "\n"
    assert "process" not in without.split("faults:")[1]
    for seed in (1, 7, 99):
        network = [w for w in schedule(tmp_path, SCHEDULED, seed).windows
                   if not w.is_process_fault]
        assert network == list(schedule(tmp_path, without, seed).windows)


def test_a_fixed_down_draws_nothing(tmp_path: Path) -> None:
    """The arm times of a process fault with a fixed (or no) `down` are those of the same
    fault with armed: a network fault's draws."""
    process = SCHEDULED.replace("down: [0.2, 1.5]", "down: 0.7")
    network = SCHEDULED.replace("process: sink, action: crash", "proxy: link, command: "
                                "conn.onData().reset(), armed: 0.1").replace(
        "every: [2, 4], down: [0.2, 1.5]", "every: [2, 4]")
    arms = [[w.arm for w in schedule(tmp_path, text).windows if w.fault == "crash-sink"]
            for text in (process, network)]
    assert arms[0] == arms[1]


def test_a_process_is_never_left_down_at_the_end(tmp_path: Path) -> None:
    text = """\
seed: 3
duration: 5
processes:
  sink: {command: [sleep, 100]}
faults:
  - {process: sink, action: stop, start_after: 4.5, down: 2}
  - {process: sink, action: crash, start_after: 6}
"""
    result = build_schedule(load_scenario(write(tmp_path, text)))
    assert result.windows == (Window("", "fault1", "", 4.5, 5.0, "fault1:1", True, None,
                                     "sink", "stop"),)
    assert [w.name for w in result.dropped] == ["fault2:1"]


def test_the_schedule_survives_json(tmp_path: Path) -> None:
    late = "  - {{name: late, process: sink, action: stop, start_after: 20}}\n"
    result = schedule(tmp_path, SCHEDULED.replace("duration: 30", "duration: 11") + late)
    assert result.dropped and any(w.cut for w in result.windows)
    text = json.dumps(result.to_json())
    again = Schedule.from_json(json.loads(text))
    assert again == result
    log_line = {"event": "schedule", "t": 0.0, **json.loads(text), "scenario": "x.yaml"}
    assert Schedule.from_json(log_line) == result, "the run log's line has further keys"
    data = json.loads(text)
    assert (data["seed"], data["duration"]) == (7, 11.0)
    crash = next(w for w in data["windows"] if w["fault"] == "crash-sink")
    assert set(crash) == {"proxy", "fault", "command", "arm", "disarm", "name", "cut",
                          "must_fire", "process", "action"}
    assert (crash["proxy"], crash["process"], crash["action"]) == ("", "sink", "crash")


def test_the_schedule_json_is_the_same_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """String seeds hash the same across interpreters (PYTHONHASHSEED does not matter)."""
    path = write(tmp_path, SCHEDULED.format(seed=5))
    code = ("import json, sys; from wirefault.fifo_client.chaos_scenario import load_scenario;"
            "from wirefault.fifo_client.chaos_schedule import build_schedule;"
            "print(json.dumps(build_schedule(load_scenario(sys.argv[1])).to_json()))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True,
                         capture_output=True, text=True, env={"PYTHONHASHSEED": "1"}).stdout
    assert Schedule.from_json(json.loads(out)) == build_schedule(load_scenario(path))


@pytest.mark.parametrize("data", [
    [], {"seed": 1}, {"seed": "1", "duration": 1, "windows": [], "dropped": []},
    {"seed": 1, "duration": 1, "windows": {}, "dropped": []},
    {"seed": 1, "duration": 1, "windows": [{"fault": "x"}], "dropped": []},
    {"seed": 1, "duration": 1, "dropped": [], "windows": [
        {"proxy": "", "fault": "f", "command": "", "arm": "1", "disarm": 2, "name": "f:1",
         "cut": False, "must_fire": None, "process": "p", "action": "crash"}]},
])
def test_a_schedule_of_another_shape_is_refused(data: object) -> None:
    with pytest.raises(ValueError, match=r"^a (schedule|window)"):
        Schedule.from_json(data)


def test_references_to_processes_when_there_are_none(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("processes:\n  sink:\n    command: [sleep, 100]\n"
                                        "    ready: {port: 7200}\n", ""))
    with pytest.raises(ScenarioErrors) as caught:
        load_scenario(path)
    assert str(caught.value).splitlines() == [
        f"{path}:5:14: faults[0].process: no process named 'sink'; the scenario declares no "
        "processes",
        f"{path}:10:39: checks[0].progress.process: no process named 'sink'; the scenario "
        "declares no processes"]


def test_a_copy_of_a_scenario_reads_its_paths_in_the_original_folder(tmp_path: Path) -> None:
    """What --replay does with a run directory's scenario.yaml."""
    original = load_scenario(write(tmp_path, FULL))
    copy = tmp_path / "chaos-runs" / "run1" / "scenario.yaml"
    copy.parent.mkdir(parents=True)
    copy.write_text(FULL)
    replayed = load_scenario(copy, folder=tmp_path)
    assert replayed.path == copy, "errors name the file read"
    assert replayed.processes == original.processes and replayed.proxies == original.proxies
    assert (replayed.run_dir, replayed.checks) == (original.run_dir, original.checks)
    assert load_scenario(copy).processes["worker"].cwd == copy.parent
