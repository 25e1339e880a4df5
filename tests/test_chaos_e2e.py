"""End to end: a Wallaroo pipeline under seeded chaos still commits its input exactly once.

    source -> proxy A (wallaroo) -> worker -> proxy B (wallaroo) -> sink

The peers (tests/peers) run as processes; `wirefault chaos` (in-process, through `main`)
arms kills, resets and a connect delay on both links on a fixed schedule that pairs each
fault needing a reconnection (Notify, NotifyAck, connect_delay on link A) with a fault on
link B that forces one (the worker restarts its source whenever the sink link breaks).

Every fault has `must_fire`, so the runner keeps it armed until its proxy counts a frame
that fault acted on (its `fired` in `faults.list()`: each arming is a named fault), and arms
no later fault meanwhile (which keeps the pairs together): a busy machine makes the run
longer, not different. The source streams
slowly enough that the data outlasts the faults; the scenario's first check lets it finish
at full speed.

The test checks the firings independently, from the proxies' recorders, which the runner
never reads: a connection that is not the link's last one, was not ended by the worker's
Restart, and whose last recorded frame is the trigger (kill() and reset() record the
trigger and nothing after it). The connect_delay shows in the source's handshake times.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import select
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from peers.sink import SinkConfig, SinkStats, run_sink
from peers.wire import VERSION, FrameStream, LinkLost
from pgserver import free_port
from proxy_helpers import RunningProxy, running_proxy, wait_for
from test_peers_restart import write_input

from wirefault.fifo_client import FaultProxy, TrafficRow, chaos

TESTS_DIR = Path(__file__).resolve().parent
LINES = 10000
RATE = 500
"""Lines per second until the chaos is over: 20 s of data for about 8 s of faults."""
SEED = 20240611

# One 8 s round. On link A, faults triggered by (re)connections share their window with a
# link-B fault that breaks the sink link, which makes the worker restart the source, which
# reconnects (Hello, Notify) while the A fault is armed.
SCENARIO = """\
seed: {seed}
duration: 8
timeout: 5
proxies:
  source_link: {{fifo: {fifo_a}, protocol: wallaroo}}
  sink_link: {{fifo: {fifo_b}, protocol: wallaroo}}
faults:
  - {{name: notify-kill, proxy: source_link, command: conn.onNotify().kill(),
      start_after: 0.8, armed: 1.2, must_fire: 15}}
  - {{name: phase1-kill, proxy: sink_link, command: conn.onTwoPCPhase1().kill(),
      start_after: 1.0, armed: 0.5, must_fire: 15}}
  - {{name: data-kill, proxy: sink_link,
      command: 'conn.onMessage(stream_id="^1$").after(20).kill()',
      start_after: 2.2, armed: 0.5, must_fire: 15}}
  - {{name: message-reset, proxy: source_link, command: conn.onMessage().after(25).reset(),
      start_after: 2.9, armed: 0.5, must_fire: 15}}
  - {{name: notifyack-reset, proxy: source_link, command: conn.onNotifyAck().reset(),
      start_after: 3.6, armed: 1.2, must_fire: 15}}
  - {{name: reply-reset, proxy: sink_link, command: conn.onTwoPCReply().after(1).reset(),
      start_after: 3.8, armed: 0.5, must_fire: 15}}
  - {{name: ack-kill, proxy: source_link, command: conn.onAck().kill(),
      start_after: 5.2, armed: 0.5, must_fire: 15}}
  - {{name: sink-ack-reset, proxy: sink_link, command: conn.onAck().reset(),
      start_after: 5.8, armed: 0.4, must_fire: 15}}
  - {{name: connect-delay, proxy: source_link, command: conn.connect_delay(300),
      start_after: 6.3, armed: 1.4, must_fire: 15}}
  - {{name: phase2-kill, proxy: sink_link, command: conn.onTwoPCPhase2().kill(),
      start_after: 6.5, armed: 0.5, must_fire: 15}}
checks:
  - name: the source may finish at full speed
    run: kill -USR1 "$(cat source.pid)"
  - name: committed output equals input
    run: cmp -s input.txt output.txt
    retry_for: 120
"""

# fault name -> (link, recorder label of the side that sent the trigger, row prefix)
FINGERPRINTS = {
    "notify-kill": ("source_link", "source", "Notify("),
    "notifyack-reset": ("source_link", "worker", "NotifyAck(success=1,"),
    "message-reset": ("source_link", "source", "Message(stream_id=1,"),
    "ack-kill": ("source_link", "worker", "Ack("),
    "phase1-kill": ("sink_link", "worker", "TwoPCPhase1("),
    "reply-reset": ("sink_link", "sink", "TwoPCReply("),
    "phase2-kill": ("sink_link", "worker", "TwoPCPhase2("),
    "data-kill": ("sink_link", "worker", "Message(stream_id=1,"),
    "sink-ack-reset": ("sink_link", "sink", "Ack("),
}


@dataclass
class Peer:
    name: str
    process: subprocess.Popen
    stats: Path
    log: Path

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def statistics(self) -> dict:
        return json.loads(self.stats.read_text())


def start_peer(name: str, args: list[str], workdir: Path) -> tuple[Peer, int | None]:
    """Start `python -m peers.<name>`; for servers, wait for `ready PORT` and return it."""
    stats, log = workdir / f"{name}.stats.json", workdir / f"{name}.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", f"peers.{name}", "--stats", str(stats), *args],
            cwd=TESTS_DIR, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL)
    peer = Peer(name, process, stats, log)
    if name == "source":
        return peer, None
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 15)
    line = process.stdout.readline().decode() if ready else ""
    if not line.startswith("ready "):
        peer.stop()
        raise RuntimeError(f"{name} did not start: {line!r} {log.read_text()}")
    return peer, int(line.split()[1])


@dataclass
class Pipeline:
    workdir: Path
    peers: dict[str, Peer]
    proxies: dict[str, RunningProxy]


@contextlib.contextmanager
def running_pipeline(workdir: Path) -> Iterator[Pipeline]:
    peers: dict[str, Peer] = {}
    try:
        with contextlib.ExitStack() as stack:
            peers["sink"], sink_port = start_peer(
                "sink", ["--output", str(workdir / "output.txt")], workdir)
            sink_link = stack.enter_context(running_proxy(
                sink_port, protocol="wallaroo", extra_args=["--source-labels", "worker,sink"]))
            peers["worker"], worker_port = start_peer(
                "worker", ["--sink", f"127.0.0.1:{sink_link.port}"], workdir)
            source_link = stack.enter_context(running_proxy(
                worker_port, protocol="wallaroo",
                extra_args=["--source-labels", "source,worker"]))
            peers["source"], _ = start_peer(
                "source", ["--connect", f"127.0.0.1:{source_link.port}", "--file",
                           str(workdir / "input.txt"), "--rate", str(RATE),
                           "--give-up-after", "90"], workdir)
            (workdir / "source.pid").write_text(str(peers["source"].process.pid))
            yield Pipeline(workdir, peers, {"source_link": source_link, "sink_link": sink_link})
    finally:
        for peer in reversed(list(peers.values())):
            peer.stop()




def by_connection(rows: list[TrafficRow]) -> dict[int, list[TrafficRow]]:
    connections: dict[int, list[TrafficRow]] = {}
    for row in rows:
        assert row.conn >= 0, f"the recorder dropped frames: {row.message}"
        connections.setdefault(row.conn, []).append(row)
    return connections


def killed_at(connections: dict[int, list[TrafficRow]], label: str, prefix: str) -> list[int]:
    """Connections cut right after a `prefix` frame from `label`, not by a Restart, and not
    the link's last connection (which ends when the run does)."""
    last = max(connections)
    return [number for number, rows in connections.items()
            if number != last
            and rows[-1].source == label and rows[-1].message.startswith(prefix)
            and not any(row.message.startswith("Restart(") for row in rows)]


@pytest.mark.timeout(240)
def test_pipeline_commits_input_exactly_once_under_chaos(tmp_path: Path) -> None:
    started = time.monotonic()
    expected = write_input(tmp_path / "input.txt", SEED, LINES)
    with running_pipeline(tmp_path) as pipeline:
        output = tmp_path / "output.txt"
        wait_for(lambda: output.exists() and output.stat().st_size > 0, 15,
                 "the first commit")
        scenario = tmp_path / "chaos.yaml"
        scenario.write_text(SCENARIO.format(seed=SEED,
                                            fifo_a=pipeline.proxies["source_link"].fifo,
                                            fifo_b=pipeline.proxies["sink_link"].fifo))
        timeline = io.StringIO()
        status = chaos.main([str(scenario), "--json"], out=timeline)
        events = [json.loads(line) for line in timeline.getvalue().splitlines()]

        source = pipeline.peers["source"]
        assert source.process.wait(30) == 0, source.log.read_text()
        rows = {name: FaultProxy(proxy.fifo).dump() for name, proxy in pipeline.proxies.items()}
        stats_source = source.statistics()
        exit_codes = {name: peer.stop() for name, peer in pipeline.peers.items()}

    assert status == chaos.EXIT_PASS, timeline.getvalue()
    assert output.read_bytes() == expected
    assert exit_codes == {"sink": 0, "worker": 0, "source": 0}

    every_fault = set(FINGERPRINTS) | {"connect-delay"}
    assert {event["fault"] for event in events if event["event"] == "armed"} == every_fault
    fired_events = [event for event in events if event["event"] == "fired"]
    assert {event["fault"] for event in fired_events} == every_fault
    assert all(event["frames"] >= 1 for event in fired_events)
    assert not [event for event in events if event["event"] == "error"]

    connections = {name: by_connection(link_rows) for name, link_rows in rows.items()}
    fired = {name: killed_at(connections[link], label, prefix)
             for name, (link, label, prefix) in FINGERPRINTS.items()}
    assert all(fired.values()), f"faults that never fired: {[n for n, c in fired.items() if not c]}"
    assert max(stats_source["handshake_seconds"]) >= 0.29, "connect_delay never held a Hello"
    assert stats_source["connections"] >= 1 + sum(
        len(fired[name]) for name, spec in FINGERPRINTS.items() if spec[0] == "source_link")

    stats_worker = json.loads((tmp_path / "worker.stats.json").read_text())
    stats_sink = json.loads((tmp_path / "sink.stats.json").read_text())
    report = {
        "seconds": round(time.monotonic() - started, 1),
        "clock_held": events[-1]["held"],
        "faults_over_at": max(event["t"] for event in events if event["event"] == "disarmed"),
        "checks": {event["name"]: event["seconds"] for event in events
                   if event["event"] == "check"},
        "fired": {name: len(numbers) for name, numbers in fired.items()},
        "connections": {name: len(conns) for name, conns in connections.items()},
        "source": {k: stats_source[k] for k in ("connections", "restarts", "messages_sent")},
        "worker": stats_worker,
        "sink": stats_sink,
    }
    print(json.dumps(report, sort_keys=True))
    # A killed commit decision leaves a prepared transaction that a later sink connection
    # finds with ListUncommitted and aborts.
    assert stats_worker["aborted_uncommitted"] >= 1 and stats_sink["aborts"] >= 1


# -- the sink's commit rules, which the chaos run above cannot aim at one by one ------------


Connect = Callable[[], Awaitable[FrameStream]]


async def _sink_exchange(output: Path, script: Callable[[Connect], Awaitable[None]]) -> SinkStats:
    """Run a sink in this loop, play `script` against it as a worker, return its stats."""
    stop = asyncio.Event()
    config = SinkConfig("127.0.0.1", free_port(), output)
    sink = asyncio.ensure_future(run_sink(config, stop))

    async def connect() -> FrameStream:
        for _ in range(100):
            with contextlib.suppress(LinkLost):
                stream = await FrameStream.connect("127.0.0.1", config.listen_port)
                stream.send("Hello", version=VERSION, cookie="", program_name="test",
                            instance_name="test")
                return stream
            await asyncio.sleep(0.02)
        raise AssertionError("the sink did not listen")

    try:
        await script(connect)
    finally:
        stop.set()
    return await sink


async def _reply(stream: FrameStream, kind: str) -> dict:
    while True:
        frame = await stream.expect(kind, "Ack", "Ok", timeout=5)
        if frame.type == kind:
            return frame.fields


def test_sink_commits_once_skips_what_it_has_and_refuses_holes(tmp_path: Path) -> None:
    output = tmp_path / "out.txt"

    async def script(connect: Connect) -> None:
        first = await connect()
        first.send("Notify", stream_id=1, stream_name="s")
        assert (await _reply(first, "NotifyAck"))["point_of_ref"] == 0
        first.send("Message", stream_id=1, message_id=0, payload=b"a\n")
        first.send("TwoPCPhase1", txn_id="t1", ranges=[(1, 0, 2)])
        assert (await _reply(first, "TwoPCReply"))["commit"] == 1
        first.close()  # t1 stays prepared, its fate unknown to a new connection

        second = await connect()
        second.send("ListUncommitted", rtag=9)
        assert (await _reply(second, "ReplyUncommitted"))["txn_ids"] == ["t1"]
        second.send("Notify", stream_id=1, stream_name="s")
        assert (await _reply(second, "NotifyAck"))["point_of_ref"] == 0
        for offset, line in ((0, b"a\n"), (2, b"bb\n")):
            second.send("Message", stream_id=1, message_id=offset, payload=line)
        second.send("TwoPCPhase1", txn_id="t2", ranges=[(1, 0, 5)])
        assert (await _reply(second, "TwoPCReply"))["commit"] == 1
        for txn in ("t1", "t2", "t2"):  # t2's second commit is a repeat: confirmed, not written
            second.send("TwoPCPhase2", txn_id=txn, commit=1)
            assert await _reply(second, "TwoPCReply") == {
                "stream_id": 0, "flags": 0, "message_id": 0, "txn_id": txn, "commit": 1}
        second.send("TwoPCPhase2", txn_id="never-prepared", commit=1)
        assert (await _reply(second, "TwoPCReply"))["commit"] == 0
        second.send("Message", stream_id=1, message_id=9, payload=b"hole\n")
        second.send("TwoPCPhase1", txn_id="t3", ranges=[(1, 9, 14)])
        assert (await _reply(second, "TwoPCReply"))["commit"] == 0
        second.close()

    stats = asyncio.run(_sink_exchange(output, script))
    assert output.read_bytes() == b"a\nbb\n"
    assert (stats.commits, stats.commits_repeated, stats.skipped_bytes, stats.votes_no) == \
        (2, 1, 2, 1)

    with output.open("ab") as tail:  # bytes written but never recorded as committed
        tail.write(b"torn")

    async def resume(connect: Connect) -> None:
        stream = await connect()
        stream.send("Notify", stream_id=1, stream_name="s")
        assert (await _reply(stream, "NotifyAck"))["point_of_ref"] == 5
        stream.close()

    asyncio.run(_sink_exchange(output, resume))
    assert output.read_bytes() == b"a\nbb\n"
