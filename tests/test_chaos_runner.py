"""`wirefault chaos`: scenario validation, the seeded schedule, output shapes and exit codes,
the last against a real proxy (raw protocol, in front of a small TCP echo server). The
`must_fire` runs and stdout going away are in test_chaos_must_fire.py."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_helpers import RunningProxy, running_proxy

from wirefault.fifo_client import FaultProxy, builder, chaos, chaos_schedule
from wirefault.proxy import dsl

WIREFAULT = Path(sys.executable).parent / "wirefault"

RANDOM_SCENARIO = """\
seed: {seed}
duration: 30
proxies:
  alpha: {{fifo: /tmp/never-a.fifo, protocol: wallaroo}}
  beta: {{fifo: /tmp/never-b.fifo}}
faults:
  - name: kill-notify
    proxy: alpha
    command: conn.onNotify().kill()
    armed: 0.5
    every: [1.0, 3.0]
  - name: reset-messages
    proxy: alpha
    command: conn.onMessage().after(3).reset()
    armed: 1.5
    every: [2, 4]
  - name: delay
    proxy: beta
    command: conn.connect_delay(300)
    armed: 0.4
    every: [0.5, 2.5]
    start_after: 1
"""


def write(tmp_path: Path, text: str, name: str = "scenario.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = chaos.main([str(arg) for arg in argv], out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def schedule_for(tmp_path: Path, seed: int, text: str = RANDOM_SCENARIO) -> chaos.Schedule:
    return chaos.build_schedule(chaos.load_scenario(write(tmp_path, text.format(seed=seed))))


# -- the schedule ---------------------------------------------------------------------------


def test_same_seed_gives_the_same_schedule(tmp_path: Path) -> None:
    first = schedule_for(tmp_path, 7)
    second = schedule_for(tmp_path, 7)
    assert first == second
    assert len(first.windows) > 10
    dry_runs = [run_main(tmp_path / "scenario.yaml", "--dry-run", "--json")[1] for _ in range(2)]
    assert dry_runs[0] == dry_runs[1]


def test_the_schedule_is_the_same_in_a_fresh_interpreter(tmp_path: Path) -> None:
    path = write(tmp_path, RANDOM_SCENARIO.format(seed=11))
    command = [sys.executable, "-m", "wirefault.fifo_client.chaos", str(path), "--dry-run"]
    outputs = {subprocess.run(command, capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": str(hash_seed)}).stdout
               for hash_seed in (1, 2)}
    assert len(outputs) == 1
    assert outputs.pop() == run_main(path, "--dry-run")[1]


def test_different_seeds_give_different_schedules(tmp_path: Path) -> None:
    arms = {seed: [w.arm for w in schedule_for(tmp_path, seed).windows] for seed in (1, 2, 3)}
    assert len({tuple(times) for times in arms.values()}) == 3


def test_seed_option_overrides_the_scenario(tmp_path: Path) -> None:
    path = write(tmp_path, RANDOM_SCENARIO.format(seed=1))
    overridden = run_main(path, "--dry-run", "--seed", "2")[1]
    write(tmp_path, RANDOM_SCENARIO.format(seed=2))
    assert overridden == run_main(path, "--dry-run")[1]
    assert overridden.startswith("schedule: seed 2,")


@pytest.mark.parametrize("seed", range(25))
def test_windows_arm_at_their_drawn_times_and_stay_within_duration(
        tmp_path: Path, seed: int) -> None:
    schedule = schedule_for(tmp_path, seed)
    for proxy in ("alpha", "beta"):
        windows = schedule.for_proxy(proxy)
        assert windows, proxy
        for window in windows:
            assert 0 <= window.arm < window.disarm <= schedule.duration
    assert [w.arm for w in schedule.windows] == sorted(w.arm for w in schedule.windows)
    names = [w.name for w in schedule.windows]
    assert len(set(names)) == len(names)
    assert all(builder.FAULT_NAME.fullmatch(name) for name in names)


def test_windows_on_one_proxy_overlap_and_none_is_postponed(tmp_path: Path) -> None:
    schedule = schedule_for(tmp_path, 3)
    overlapping = [(before.fault, after.fault) for before, after
                   in itertools.combinations(schedule.for_proxy("alpha"), 2)
                   if after.arm < before.disarm and before.arm < after.disarm]
    assert ("kill-notify", "reset-messages") in overlapping \
        or ("reset-messages", "kill-notify") in overlapping
    # Each fault's times are its own draws, whatever else is armed on its proxy.
    alone = RANDOM_SCENARIO.replace("""  - name: reset-messages
    proxy: alpha
    command: conn.onMessage().after(3).reset()
    armed: 1.5
    every: [2, 4]
""", "")
    assert [w for w in schedule.windows if w.fault == "kill-notify"] == \
        [w for w in schedule_for(tmp_path, 3, alone).windows if w.fault == "kill-notify"]


def test_each_arming_is_a_named_fault_made_from_the_scenarios_rule(tmp_path: Path) -> None:
    windows = schedule_for(tmp_path, 2).windows
    first = next(w for w in windows if w.fault == "reset-messages")
    assert first.name == "reset-messages:1"
    assert first.command == "conn.onMessage().after(3).reset()"
    assert first.arm_command == 'faults.add("reset-messages:1").onMessage().after(3).reset()'
    assert first.lift_command == 'faults.remove("reset-messages:1")'
    second = [w for w in windows if w.fault == "reset-messages"][1]
    assert second.name == "reset-messages:2"
    assert dsl.parse(first.arm_command, "wallaroo").rule.steps == \
        dsl.parse(first.command, "wallaroo").steps


@pytest.mark.parametrize(("names", "bases"), [
    (["kill notify", "kill_notify"], ["kill_notify", "kill_notify.2"]),
    (["-dash", "_under", "é"], ["f-dash", "f_under", "f_"]),
    (["x" * 80], ["x" * chaos_schedule.NAME_BASE_CHARS]),
    (["a", "a.2", "a_"], ["a", "a.2", "a_"]),
])
def test_fault_names_on_the_proxy_are_valid_and_unique(
        names: list[str], bases: list[str]) -> None:
    specs = tuple(chaos.FaultSpec(name, "p", "conn.kill()", 1.0) for name in names)
    found = chaos_schedule.fault_name_bases(specs)
    assert [found[name] for name in names] == bases
    for base in found.values():
        assert builder.FAULT_NAME.fullmatch(f"{base}:{chaos.MAX_ARMINGS}")


def test_a_fault_gets_the_same_times_whatever_other_faults_exist(tmp_path: Path) -> None:
    only_delay = RANDOM_SCENARIO[:RANDOM_SCENARIO.index("  - name: kill-notify")] + \
        RANDOM_SCENARIO[RANDOM_SCENARIO.index("  - name: delay"):]
    assert schedule_for(tmp_path, 5, only_delay).windows == \
        tuple(schedule_for(tmp_path, 5).for_proxy("beta"))


def test_fixed_intervals_arm_on_the_grid_even_when_faults_overlap(tmp_path: Path) -> None:
    text = """\
seed: 1
duration: 10
proxies: {p: {fifo: x.fifo}}
faults:
  - {name: a, proxy: p, command: conn.onData().kill(), armed: 1.5, every: 4, start_after: 1}
  - {name: b, proxy: p, command: conn.onData().reset(), armed: 1, every: 4, start_after: 2}
  - {name: c, proxy: p, command: conn.connect_delay(5), armed: 1, start_after: 9.5}
  - {name: d, proxy: p, command: conn.connect_delay(5), armed: 1, start_after: 10}
"""
    schedule = chaos.build_schedule(chaos.load_scenario(write(tmp_path, text)))
    assert [(w.fault, w.arm, w.disarm, w.cut, w.name) for w in schedule.windows] == [
        ("a", 1, 2.5, False, "a:1"), ("b", 2, 3, False, "b:1"),
        ("a", 5, 6.5, False, "a:2"), ("b", 6, 7, False, "b:2"),
        ("a", 9, 10, True, "a:3"), ("c", 9.5, 10, True, "c:1"),
    ]
    assert [(w.fault, w.arm) for w in schedule.dropped] == [("d", 10)]


def test_times_caps_the_armings(tmp_path: Path) -> None:
    text = """\
seed: 1
duration: 100
proxies: {p: {fifo: x.fifo}}
faults:
  - {proxy: p, command: conn.onData().kill(), armed: 0.1, every: [1, 2], times: 3}
"""
    windows = chaos.build_schedule(chaos.load_scenario(write(tmp_path, text))).windows
    assert len(windows) == 3
    assert windows[0].fault == "fault1"


# -- output shapes --------------------------------------------------------------------------

TIMELINE_LINE = re.compile(
    r"^\+ *\d+\.\d{3}s  (alpha|beta) +(armed +[\w-]+: conn\.\S+( +\(.*\))?"
    r"|disarmed +([\w-]+): faults\.remove\(\"\4:\d+\"\))$")


def test_dry_run_prints_one_line_per_arming_and_disarming(tmp_path: Path) -> None:
    path = write(tmp_path, RANDOM_SCENARIO.format(seed=3))
    status, out, err = run_main(path, "--dry-run")
    assert (status, err) == (0, "")
    header, *lines = out.splitlines()
    assert header.startswith("schedule: seed 3, duration 30s, ")
    windows = chaos.build_schedule(chaos.load_scenario(path)).windows
    assert len(lines) == 2 * len(windows)
    for line in lines:
        assert TIMELINE_LINE.match(line), line
    assert not any("postponed" in line for line in lines)


def test_dry_run_json_lines(tmp_path: Path) -> None:
    path = write(tmp_path, RANDOM_SCENARIO.format(seed=3))
    status, out, _ = run_main(path, "--dry-run", "--json")
    assert status == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert {event["event"] for event in events} == {"armed", "disarmed"}
    assert [event["t"] for event in events] == sorted(event["t"] for event in events)
    first = events[0]
    assert set(first) == {"event", "t", "proxy", "fault", "command", "name", "disarm", "cut",
                          "must_fire"}
    lift = {"event": "disarmed", "t": first["disarm"], "proxy": first["proxy"],
            "fault": first["fault"], "command": f'faults.remove("{first["name"]}")',
            "name": first["name"]}
    assert lift in events[1:]


# -- scenario errors ------------------------------------------------------------------------

BASE = """\
seed: 1
duration: 5
proxies:
  p: {fifo: x.fifo, protocol: wallaroo}
faults:
  - name: one
    proxy: p
    command: conn.onNotify().kill()
    armed: 0.5
    every: 1
"""


@pytest.mark.parametrize(("text", "line", "message"), [
    (BASE.replace("    every: 1", "    evry: 1"), 10,
     "faults[0].evry: unknown key (expected proxy, command, armed, name, every, "
     "start_after, times, must_fire); did you mean 'every'?"),
    (BASE.replace("    armed: 0.5\n", ""), 6, "faults[0].armed: missing required key"),
    (BASE.replace("armed: 0.5", "armed: soon"), 9,
     "faults[0].armed: expected a number of seconds, got 'soon'"),
    (BASE.replace("armed: 0.5", "armed: -1"), 9, "faults[0].armed: must be > 0, got -1"),
    (BASE.replace("every: 1", "every: [3, 1]"), 10, "faults[0].every: min 3 is above max 1"),
    (BASE.replace("every: 1", "every: [1, 2, 3]"), 10,
     "faults[0].every: expected seconds or [min, max]"),
    (BASE.replace("every: 1", "every: 0.5"), 9,
     "faults[0].armed: 0.5 s is not shorter than every's minimum 0.5 s"),
    (BASE.replace("proxy: p", "proxy: q"), 7, "faults[0].proxy: no proxy named 'q'; proxies: p"),
    (BASE.replace("onNotify()", "onNotfy()"), 8,
     "faults[0].command: column 6: unknown message type 'Notfy' for protocol wallaroo; "
     "did you mean 'Notify'?"),
    (BASE.replace("conn.onNotify().kill()", "recorder.dump()"), 8,
     "faults[0].command: expected a conn.* rule other than conn.allow()"),
    (BASE.replace("conn.onNotify().kill()", "conn.allow()"), 8,
     "faults[0].command: expected a conn.* rule other than conn.allow()"),
    (BASE.replace("seed: 1", "seed: true"), 1, "seed: expected an integer, got True"),
    (BASE.replace("duration: 5", "duration: 5\nduration: 6"), 3, "duration: duplicate key"),
    (BASE + "  - {name: one, proxy: p, command: conn.onAck().kill(), armed: 1}\n", 11,
     "faults[1].name: duplicate fault name 'one'"),
    (BASE.replace("    every: 1", "    times: 2"), 10, "faults[0].times: needs every"),
    (BASE.replace(", protocol: wallaroo", "").replace("onNotify()", "onNotfy()"), 8,
     "faults[0].command: column 6: unknown message type 'Notfy' for protocol wallaroo; "
     "did you mean 'Notify'? (no protocol given; checked against postgres, wallaroo, raw)"),
    (BASE.replace("conn.onNotify().kill()", "'conn.onNotify('"), 8,
     "faults[0].command: column 14: syntax error: '(' was never closed (protocol wallaroo)"),
    (BASE.replace("  p: {fifo: x.fifo, protocol: wallaroo}", "  p: {fifo: a}\n  p: {fifo: b}"), 5,
     "proxies.p: duplicate key"),
    (BASE.replace("  p: {fifo:", "  p q: {fifo:").replace("proxy: p\n", "proxy: p q\n"), 4,
     "proxies.p q: proxy names use letters, digits, '_', '.', '-'"),
    (BASE.replace("protocol: wallaroo", "protocol: mysql"), 4,
     "proxies.p.protocol: unknown protocol 'mysql'"),
    (BASE.replace("protocol: wallaroo", "protocol: wallaroo, record: p.copy"), 4,
     "proxies.p.record: unknown key (expected fifo, protocol)"),
    (BASE.replace("faults:", "checks:\n  - name: no run\nfaults:"), 6,
     "checks[0].run: missing required key"),
    (BASE.replace("proxy: p\n", "proxy: [p]\n"), 7,
     "faults[0].proxy: expected a non-empty string, got a list"),
    (BASE.replace("    every: 1", "    every: 1\n   bad: indent"), 11, "invalid YAML"),
    (BASE.replace("  - name: one", "  - name: one\n    - oops"), 7, "invalid YAML"),
    (BASE.replace("every: 1", "every: 0.00001").replace("armed: 0.5", "armed: 0.000001"), 10,
     "faults[0].every: would arm the fault more than 100000 times in 5 s"),
    (BASE.replace("seed: 1", "seed: !odd 1"), 1, "invalid YAML: could not determine a constructor"),
    ("", 1, "the scenario is empty"),
    ("- 1\n", 1, "expected a mapping, got a list"),
])
def test_bad_scenarios_name_the_line_and_key(
        tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, text)
    status, out, err = run_main(path, "--dry-run")
    assert (status, out) == (2, "")
    assert err.startswith(f"wirefault chaos: {path}:{line}:"), err
    assert message in err
    assert len(err.splitlines()) == 1, "a problem is reported once, with no follow-on errors"


MANY_ERRORS = """\
seed: x
duration: 5
timeot: 3
proxies:
  p: {fifo: x.fifo, protocol: wallaroo}
  q: {fifo: y.fifo, protocol: mysql}
faults:
  - name: one
    proxy: p
    command: conn.onNotfy().kill()
    armed: soon
  - name: one
    proxy: r
    command: conn.onAck().kill()
    armed: 0.5
    every: [2, 1]
  - {proxy: q, command: conn.onQuery().kill(), armed: 1}
checks:
  - {name: no run}
"""


def test_a_bad_scenario_reports_every_problem_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, MANY_ERRORS)
    status, out, err = run_main(path)
    assert (status, out) == (chaos.EXIT_BAD_RUN, "")
    assert err.splitlines() == [f"wirefault chaos: {path}:{where}" for where in (
        "1:7: seed: expected an integer, got 'x'",
        "3:1: timeot: unknown key (expected seed, duration, proxies, faults, timeout, checks, "
        "description, processes, on_failure, run_dir); did you mean 'timeout'?",
        "6:31: proxies.q.protocol: unknown protocol 'mysql'; known: postgres, wallaroo, raw",
        "10:14: faults[0].command: column 6: unknown message type 'Notfy' for protocol "
        "wallaroo; did you mean 'Notify'? (protocol wallaroo)",
        "11:12: faults[0].armed: expected a number of seconds, got 'soon'",
        "12:11: faults[1].name: duplicate fault name 'one'",
        "13:12: faults[1].proxy: no proxy named 'r'; proxies: p, q",
        "16:12: faults[1].every: min 2 is above max 1",
        "19:5: checks[0].run: missing required key",
    )]


def test_must_fire_is_checked_against_armed_only(tmp_path: Path) -> None:
    path = write(tmp_path, """\
seed: 1
duration: 5
proxies:
  p: {fifo: x.fifo, protocol: wallaroo}
faults:
  - {proxy: p, command: conn.onAck().kill(), armed: 1, must_fire: 0.5}
  - {proxy: p, command: conn.onAck().kill(), armed: 1, must_fire: 1, start_after: 2}
""")
    status, _, err = run_main(path, "--dry-run")
    assert status == chaos.EXIT_BAD_RUN
    assert [line.split(": ", 3)[2:] for line in err.splitlines()] == [
        ["faults[0].must_fire", "0.5 s is shorter than armed (1 s)"]]


def test_any_rule_on_any_proxy_may_have_to_fire(tmp_path: Path) -> None:
    path = write(tmp_path, """\
seed: 1
duration: 5
proxies:
  anything: {fifo: y.fifo}
faults:
  - {proxy: anything, command: 'conn.matches(b"^pi").kill()', armed: 1, must_fire: 5}
  - {proxy: anything, command: 'conn.contains(b"ng").reset()', armed: 1, must_fire: 5,
     start_after: 2}
  - {proxy: anything, command: 'conn.connect_delay(100)', armed: 1, must_fire: 5,
     start_after: 4}
""")
    status, out, err = run_main(path, "--dry-run")
    assert (status, err) == (chaos.EXIT_PASS, "")
    assert out.count("(must fire within 5s)") == 3


def test_missing_scenario_file(tmp_path: Path) -> None:
    status, _, err = run_main(tmp_path / "absent.yaml")
    assert status == 2
    assert "absent.yaml: cannot read" in err


# -- against real proxies -------------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@contextlib.contextmanager
def raw_echo_proxy() -> Iterator[RunningProxy]:
    """A real raw-protocol proxy in front of a TCP echo server of its own."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with running_proxy(server.server_address[1], protocol="raw") as proxy:
            yield proxy
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def raw_proxy() -> Iterator[RunningProxy]:
    with raw_echo_proxy() as proxy:
        yield proxy


def echoes(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.settimeout(1)
            sock.sendall(b"ping")
            return sock.recv(16) == b"ping"
    except OSError:
        return False


def live_scenario(fifo: str, fault: str, checks: str = "") -> str:
    return f"""\
seed: 3
duration: 1.2
timeout: 3
proxies:
  echo: {{fifo: {fifo}}}
faults:
  - {{name: cut, proxy: echo, command: '{fault}', start_after: 0.2, armed: 0.6}}
{checks}"""


def test_a_run_arms_and_lifts_faults_on_a_real_proxy(
        tmp_path: Path, raw_proxy: RunningProxy) -> None:
    path = write(tmp_path, live_scenario(raw_proxy.fifo, "conn.onData().kill()", """\
checks:
  - {name: ok, run: 'test "$WIREFAULT_CHAOS_SEED" = 3'}
"""))
    recorder = FaultProxy(raw_proxy.fifo)
    recorder.dump()  # forget what earlier tests recorded
    results: list[bool] = []
    done = threading.Event()

    def ping_until_done() -> None:
        while not done.is_set():
            results.append(echoes(raw_proxy.port))
            time.sleep(0.05)

    pinger = threading.Thread(target=ping_until_done)
    pinger.start()
    try:
        status, out, err = run_main(path)
    finally:
        done.set()
        pinger.join()
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert re.fullmatch(r"\+ +\d\.\d{3}s  echo  armed +cut: conn\.onData\(\)\.kill\(\)",
                        lines[0]), lines
    assert re.fullmatch(r"\+ +\d\.\d{3}s  echo  disarmed +cut: faults\.remove\(\"cut:1\"\)",
                        lines[1]), lines
    # The final table: the kill fired on the pings, once per arming, on some frames.
    assert lines[2:4] == ["faults:", "  fault  target      applied  fired"]
    assert re.fullmatch(r"  cut    proxy echo        1  1 \(\d+ frames?\)", lines[4]), lines
    assert re.fullmatch(r"run log: .*/chaos-runs/\d{8}-\d{6}-seed3/run\.jsonl", lines[5])
    assert lines[6] == "summary: seed 3, 1.2s, 1 faults armed (echo 1), 0 errors, " \
                       "1/1 checks passed"
    assert lines[-1] == "verdict: pass (exit 0)"
    assert False in results, "no ping failed while the kill was armed"
    assert results[0] and results[-1]
    assert echoes(raw_proxy.port), "the proxy was left with a fault armed"
    pings = [row for row in recorder.dump() if row.message == "Data(data=ping)"]
    assert len(pings) >= len(results), "the run emptied the proxy's recorder"


def echoes_text(port: int, text: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.settimeout(1)
            sock.sendall(text)
            return sock.recv(64) == text
    except OSError:
        return False


def test_overlapping_faults_on_one_proxy_are_in_force_together(
        tmp_path: Path, raw_proxy: RunningProxy) -> None:
    """`apple` kills frames starting with a, from 0.1 s to 2.1 s; `banana` kills frames
    starting with b, from 0.4 s to 1.4 s: between 0.4 and 1.4 both are in force. The test
    looks while the JSON timeline says both are armed and neither lifted."""
    path = write(tmp_path, f"""\
seed: 1
duration: 2.5
proxies:
  echo: {{fifo: {raw_proxy.fifo}}}
faults:
  - {{name: apple, proxy: echo, command: 'conn.matches(b"^a").kill()', start_after: 0.1,
     armed: 2}}
  - {{name: banana, proxy: echo, command: 'conn.matches(b"^b").kill()', start_after: 0.4,
     armed: 1}}
""")
    seen: list[dict] = []
    during: dict[str, object] = {}
    with subprocess.Popen([str(WIREFAULT), "chaos", str(path), "--json"],
                          stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            seen.append(json.loads(line))
            armed = {event["fault"] for event in seen if event["event"] == "armed"}
            if not during and armed == {"apple", "banana"}:
                during["faults"] = [info.name for info in FaultProxy(raw_proxy.fifo).faults()]
                during["apple"] = echoes_text(raw_proxy.port, b"apple")
                during["banana"] = echoes_text(raw_proxy.port, b"banana")
                during["cherry"] = echoes_text(raw_proxy.port, b"cherry")
                during["lifted"] = [event["fault"] for event in seen
                                    if event["event"] == "disarmed"]
        status = process.wait(30)
    assert status == chaos.EXIT_PASS, seen
    assert during == {"faults": ["apple:1", "banana:1"], "apple": False, "banana": False,
                      "cherry": True, "lifted": []}
    order = [(event["event"], event.get("fault")) for event in seen]
    assert order[1:5] == [("armed", "apple"), ("armed", "banana"), ("disarmed", "banana"),
                          ("disarmed", "apple")]
    armed = [event for event in seen if event["event"] == "armed"]
    assert [(event["name"], event["command"]) for event in armed] == [
        ("apple:1", 'conn.matches(b"^a").kill()'), ("banana:1", 'conn.matches(b"^b").kill()')]
    assert FaultProxy(raw_proxy.fifo).faults() == []
    assert echoes_text(raw_proxy.port, b"apple") and echoes_text(raw_proxy.port, b"banana")


@pytest.mark.timeout(60)
def test_must_fire_watches_each_faults_own_count(tmp_path: Path, raw_proxy: RunningProxy) -> None:
    """Two must-fire faults in force together on one proxy: `apple` firing (the proxy's
    total goes to 1) does not make `banana` look fired; banana fires only when its own
    trigger comes."""
    path = write(tmp_path, f"""\
seed: 1
duration: 1
proxies:
  echo: {{fifo: {raw_proxy.fifo}}}
faults:
  - {{name: apple, proxy: echo, command: 'conn.matches(b"^a").kill()', start_after: 0.1,
     armed: 0.3, must_fire: 30}}
  - {{name: banana, proxy: echo, command: 'conn.matches(b"^b").kill()', start_after: 0.2,
     armed: 0.3, must_fire: 30}}
""")
    seen: list[dict] = []
    sent: list[str] = []
    with subprocess.Popen([str(WIREFAULT), "chaos", str(path), "--json"],
                          stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            seen.append(json.loads(line))
            events = {(event["event"], event.get("fault")) for event in seen}
            if not sent and {("armed", "apple"), ("armed", "banana")} <= events:
                sent.append("apple")
                assert not echoes_text(raw_proxy.port, b"apple")
            if sent == ["apple"] and ("fired", "apple") in events:
                time.sleep(0.3)  # three polls in which banana must not look fired
                sent.append("banana")
                assert not echoes_text(raw_proxy.port, b"banana")
        status = process.wait(30)
    assert status == chaos.EXIT_PASS, seen
    fired = [(event["fault"], event["name"], event["frames"]) for event in seen
             if event["event"] == "fired"]
    assert fired == [("apple", "apple:1", 1), ("banana", "banana:1", 1)]
    assert sent == ["apple", "banana"]
    assert seen[-1]["fired"] == {"echo": 2}


def test_json_timeline_and_a_failing_check(tmp_path: Path, raw_proxy: RunningProxy) -> None:
    path = write(tmp_path, live_scenario(raw_proxy.fifo, "conn.onData().reset()", """\
checks:
  - {name: passes, run: 'true'}
  - {name: fails, run: 'echo broken; exit 3'}
"""))
    status, out, _ = run_main(path, "--json")
    assert status == chaos.EXIT_CHECK_FAILED
    events = [json.loads(line) for line in out.splitlines()]
    assert [event["event"] for event in events] == [
        "start", "armed", "disarmed", "check", "check", "summary"]
    assert events[0] == {"event": "start", "seed": 3, "duration": 1.2, "proxies": ["echo"]}
    assert events[1]["command"] == "conn.onData().reset()"
    assert 0.2 <= events[1]["t"] < events[2]["t"] < 1.2
    assert events[4] | {"seconds": 0} == {
        "event": "check", "name": "fails", "run": "echo broken; exit 3", "passed": False,
        "status": 3, "seconds": 0, "attempts": 1, "output": "broken\n"}
    run_dir = events[5]["run_dir"]
    assert events[5] == {"event": "summary", "seed": 3, "duration": 1.2,
                         "armed": {"echo": 1}, "fired": {}, "held": 0.0, "errors": [],
                         "checks": {"passed": 1, "failed": 1},
                         "faults": {"cut": {"kind": "network", "target": "echo", "applied": 1,
                                            "fired": 0, "frames": 0, "never_fired": True}},
                         "run_dir": run_dir, "exit": 1}
    assert Path(run_dir).parent == tmp_path / "chaos-runs"
    logged = [json.loads(line) for line in (Path(run_dir) / "run.jsonl").read_text().splitlines()]
    assert logged[0]["event"] == "schedule"
    assert [{key: value for key, value in event.items() if key != "t"} for event in logged[1:]] \
        == [{key: value for key, value in event.items() if key != "t"} for event in events]
    assert all(isinstance(event["t"], float) for event in logged)


def test_a_check_is_retried_until_it_passes(tmp_path: Path, raw_proxy: RunningProxy) -> None:
    flag = tmp_path / "flag"
    path = write(tmp_path, live_scenario(raw_proxy.fifo, "conn.onData().kill()", """\
checks:
  - {name: eventually, run: 'test -f flag', retry_for: 5}
"""))
    timer = threading.Timer(1.8, flag.touch)
    timer.start()
    try:
        status, out, _ = run_main(path, "--json")
    finally:
        timer.cancel()
    check = [json.loads(line) for line in out.splitlines()][-2]
    assert status == 0
    assert check["passed"] and check["attempts"] > 1


def test_a_command_the_proxy_rejects_is_an_error(tmp_path: Path, raw_proxy: RunningProxy) -> None:
    # Valid for PostgreSQL, so it passes the local check; the raw proxy refuses it.
    path = write(tmp_path, live_scenario(raw_proxy.fifo, "conn.onQuery().kill()"))
    status, out, _ = run_main(path, "--json")
    events = [json.loads(line) for line in out.splitlines()]
    assert status == chaos.EXIT_BAD_RUN
    error = next(event for event in events if event["event"] == "error")
    assert error["fault"] == "cut"
    assert "unknown message type 'Query' for protocol raw" in error["error"]
    assert events[-1]["armed"] == {} and len(events[-1]["errors"]) == 1
    assert FaultProxy(raw_proxy.fifo).send("conn.allow()") == ""


def test_an_unreachable_proxy_stops_the_run_before_anything(tmp_path: Path) -> None:
    path = write(tmp_path, live_scenario(str(tmp_path / "nobody.fifo"),
                                         "conn.onData().kill()").replace("timeout: 3",
                                                                          "timeout: 0.3"))
    started = time.monotonic()
    status, out, err = run_main(path)
    assert status == chaos.EXIT_BAD_RUN
    assert out == ""
    assert "proxy echo: no proxy answered on FIFO" in err
    assert time.monotonic() - started < 3


def test_the_cli_dispatches_to_the_runner(tmp_path: Path) -> None:
    path = write(tmp_path, RANDOM_SCENARIO.format(seed=4))
    result = subprocess.run([str(WIREFAULT), "chaos", str(path), "--dry-run"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == run_main(path, "--dry-run")[1]
    bad = write(tmp_path, BASE.replace("seed: 1", "seed: x"), "bad.yaml")
    result = subprocess.run([str(WIREFAULT), "chaos", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{bad}:1:7: seed: expected an integer" in result.stderr
