"""`wirefault chaos` against real proxies: faults that must fire (`must_fire`), seen through
the proxy's own count of the frames its rule acted on, and a run whose stdout goes away.

The proxies are raw-protocol ones in front of TCP echo servers. A test that makes a fault
fire reads the timeline of the real CLI as it comes and sends its traffic once the event
it waits for shows, so the order of events never depends on how fast the machine is."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from proxy_helpers import RunningProxy
from test_chaos_runner import RANDOM_SCENARIO, WIREFAULT, echoes, raw_echo_proxy, run_main, write

from wirefault.fifo_client import FaultProxy, chaos


@pytest.fixture(scope="module")
def raw_proxy() -> Iterator[RunningProxy]:
    with raw_echo_proxy() as proxy:
        yield proxy


@pytest.fixture(scope="module")
def other_raw_proxy() -> Iterator[RunningProxy]:
    with raw_echo_proxy() as proxy:
        yield proxy


@contextlib.contextmanager
def chaos_cli(*args: str | Path, stdout: int = subprocess.PIPE) -> Iterator[subprocess.Popen]:
    """The real `wirefault chaos` command, killed and reaped if a test leaves it running."""
    process = subprocess.Popen([str(WIREFAULT), "chaos", *map(str, args)], stdout=stdout,
                               stderr=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()


def echo_scenario(proxy: RunningProxy, fault: str, duration: float) -> str:
    """A scenario of one fault (a YAML flow mapping) on `proxy`, named echo."""
    return f"""\
seed: 1
duration: {duration}
proxies:
  echo: {{fifo: {proxy.fifo}}}
faults:
  - {fault}
"""


def two_proxy_scenario(first: RunningProxy, second: RunningProxy, faults: str, *,
                       duration: float = 1) -> str:
    return f"""\
seed: 1
duration: {duration}
proxies:
  echo: {{fifo: {first.fifo}}}
  other: {{fifo: {second.fifo}, protocol: raw}}
faults:
{faults}"""


# -- must_fire -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ['conn.matches(b"^pi.g$").kill()',
                                     'conn.contains(b"ng").kill()'])
def test_a_must_fire_fault_on_raw_bytes_is_seen_firing(
        tmp_path: Path, raw_proxy: RunningProxy, command: str) -> None:
    path = write(tmp_path, echo_scenario(
        raw_proxy, f"{{name: hit, proxy: echo, command: '{command}', armed: 0.3, must_fire: 30}}",
        duration=0.5))
    lines: list[str] = []
    echoed_while_armed = []
    with chaos_cli(path) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if "  echo  armed " in line:
                echoed_while_armed.append(echoes(raw_proxy.port))  # the rule kills it
        status = process.wait()
        assert process.stderr is not None
        assert (status, process.stderr.read()) == (chaos.EXIT_PASS, ""), lines
    assert echoed_while_armed == [False]
    fired = [line for line in lines if "  fired " in line]
    assert len(fired) == 1, lines
    assert re.fullmatch(r"\+ +\d+\.\d{3}s  echo  fired +hit: " + re.escape(command)
                        + r"  \(acted on 1 frame\)", fired[0]), fired
    assert "1 faults armed (echo 1), 1 seen firing, " in lines[-2]
    assert lines[-1] == "verdict: pass (exit 0)"
    assert echoes(raw_proxy.port), "the proxy was left with a fault armed"


@pytest.mark.timeout(60)
def test_a_must_fire_fault_holds_the_clock_until_it_fired(
        tmp_path: Path, raw_proxy: RunningProxy, other_raw_proxy: RunningProxy) -> None:
    """`cut` waits past its lift at 1.5 s; `early`, armed before the wait, is lifted on time
    (3 s) during it; `later` (3.2 s on the scenario clock) is armed only once `cut` fired."""
    path = write(tmp_path, two_proxy_scenario(raw_proxy, other_raw_proxy, """\
  - {name: early, proxy: other, command: conn.onData().reset(), start_after: 0, armed: 3}
  - {name: cut, proxy: echo, command: conn.onData().kill(), start_after: 1, armed: 0.5,
     must_fire: 30}
  - {name: later, proxy: other, command: conn.onData().reset(), start_after: 3.2, armed: 0.2}
""", duration=4))
    FaultProxy(raw_proxy.fifo).dump()  # forget what earlier tests recorded
    events: list[dict[str, Any]] = []
    echoed_while_waiting = []
    with chaos_cli(path, "--json") as process:
        assert process.stdout is not None
        for line in process.stdout:
            events.append(json.loads(line))
            seen = {(event["event"], event.get("fault")) for event in events}
            if not echoed_while_waiting and {("waiting", "cut"), ("disarmed", "early")} <= seen:
                # Past `later`'s planned arming, had the clock not been held.
                time.sleep(0.5)
                echoed_while_waiting.append(echoes(raw_proxy.port))  # the kill fires on it
        status = process.wait()
    assert status == chaos.EXIT_PASS, process.stderr
    assert echoed_while_waiting == [False]
    seen_in_order = [(event["event"], event.get("fault")) for event in events]
    assert seen_in_order.index(("waiting", "cut")) < seen_in_order.index(("fired", "cut")) \
        < seen_in_order.index(("armed", "later"))
    fired = events[seen_in_order.index(("fired", "cut"))]
    assert fired["frames"] == 1
    summary = events[-1]
    assert (summary["fired"], summary["errors"]) == ({"echo": 1}, [])
    assert summary["held"] >= 0.5
    later = events[seen_in_order.index(("armed", "later"))]
    assert later["t"] - summary["held"] >= 3.2 - 0.002, "later was not armed on the clock"
    # the frame the fault acted on is marked with the proxy-side name the runner gave it
    assert [row.message for row in FaultProxy(raw_proxy.fifo).dump()] == [
        "Data(data=ping) [fault cut:1: kill]"], "the run read the recorder"
    assert echoes(raw_proxy.port) and echoes(other_raw_proxy.port)


def test_a_must_fire_fault_that_never_fires_is_an_error_naming_it(
        tmp_path: Path, raw_proxy: RunningProxy) -> None:
    path = write(tmp_path, echo_scenario(
        raw_proxy, "{name: cut, proxy: echo, command: conn.onData().kill(), armed: 0.2, "
                   "must_fire: 0.5}", duration=1))
    status, out, _ = run_main(path, "--json")
    events = [json.loads(line) for line in out.splitlines()]
    assert status == chaos.EXIT_BAD_RUN
    assert [event["event"] for event in events] == [
        "start", "armed", "waiting", "error", "disarmed", "summary"]
    problem = "did not fire within 0.5s of being armed"
    assert (events[3]["fault"], events[3]["error"]) == ("cut", problem)
    assert events[-1]["errors"] == [f"+{events[3]['t']:.3f}s echo cut: {problem}"]
    assert events[-1]["fired"] == {}
    assert echoes(raw_proxy.port), "the proxy was left with a fault armed"


# -- stdout going away -----------------------------------------------------------------------


def piped_into_head(lines: int, *args: str | Path) -> tuple[int, str, str]:
    """`wirefault chaos ARGS | head -n LINES`: the status of chaos, what head showed and
    what chaos wrote on stderr."""
    with chaos_cli(*args) as process:
        head = subprocess.Popen(["head", "-n", str(lines)], stdin=process.stdout,
                                stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None
        process.stdout.close()  # head holds the only read end now
        shown, _ = head.communicate(timeout=30)
        status = process.wait(timeout=30)
        assert process.stderr is not None
        return status, shown, process.stderr.read()


@pytest.mark.timeout(90)
def test_a_run_piped_into_head_stops_and_lifts_every_fault(
        tmp_path: Path, raw_proxy: RunningProxy, other_raw_proxy: RunningProxy) -> None:
    path = write(tmp_path, two_proxy_scenario(raw_proxy, other_raw_proxy, """\
  - {name: long, proxy: echo, command: conn.onData().kill(), start_after: 0.1, armed: 50}
  - {name: tick, proxy: other, command: conn.onData().reset(), start_after: 0.2, armed: 0.1,
     every: 0.2}
checks:
  - {name: never, run: touch check-ran}
""", duration=60))
    started = time.monotonic()
    status, shown, err = piped_into_head(1, path)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert status == chaos.EXIT_OUTPUT_CLOSED
    assert err == ("wirefault chaos: stdout was closed: stopped the run (no checks run); every "
                   "proxy was set back to conn.allow()\n")
    assert re.fullmatch(r"\+ +\d\.\d{3}s  echo   armed +long: conn\.onData\(\)\.kill\(\)\n",
                        shown), shown
    assert time.monotonic() - started < 50, "the run went on after its output was gone"
    assert echoes(raw_proxy.port), "the kill armed when the output went was left armed"
    assert not (tmp_path / "check-ran").exists()


def test_a_dry_run_piped_into_head_exits_141_without_a_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, RANDOM_SCENARIO.format(seed=1).replace("duration: 30",
                                                                  "duration: 3000"))
    status, shown, err = piped_into_head(1, path, "--dry-run")
    assert (status, err) == (chaos.EXIT_OUTPUT_CLOSED, "")
    assert shown.startswith("schedule: seed 1, duration 3000s, ")
