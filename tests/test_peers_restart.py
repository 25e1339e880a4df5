"""The Wallaroo peers survive SIGKILL: killed at seeded moments while the data streams and
started again, each resumes from its durable state, and the sink's output is the input,
byte for byte, nothing lost, duplicated or reordered.

    source -> worker -> sink      (real processes, fixed ports, no proxies)

What each keeps: the sink its output, `<output>.state` and its 2PC log `<output>.2pc`; the
worker nothing (it learns the committed points from the sink again); the source nothing of
its own (the worker's NotifyAck tells it where the sink's output ends). The moments are data
positions, not times: a kill waits for the sink's state file to report a seeded committed
offset, so a busy machine makes the run slower, not different.

The broken sink (`--ack-before-write`) confirms each commit before its data is written; the
same treatment must lose data every time, and `peers.check_output` must say where.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from peers import check_output
from peers.wire import VERSION, FrameStream
from pgserver import free_port
from proxy_helpers import wait_for

TESTS_DIR = Path(__file__).resolve().parent
LINES = 6000
RATE = 1500
"""Lines per second: four seconds of data, so every kill lands while it streams."""


def write_input(path: Path, seed: int, lines: int = LINES) -> bytes:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota"]
    data = "".join(f"{i:05d} {' '.join(rng.choices(words, k=rng.randrange(1, 9)))}\n"
                   for i in range(lines)).encode()
    path.write_bytes(data)
    return data




@dataclass
class Peer:
    """One peer as a restartable process: `python -m peers.NAME ARGS`, its own session."""

    name: str
    args: list[str]
    log: Path
    server: bool
    process: subprocess.Popen | None = None
    starts: int = 0
    kills: list[float] = field(default_factory=list)

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", f"peers.{self.name}", *self.args], cwd=TESTS_DIR,
                stdin=subprocess.DEVNULL, stderr=log,
                stdout=subprocess.PIPE if self.server else log, start_new_session=True)
        self.starts += 1
        if self.server:  # its first stdout line says it listens
            assert self.process.stdout is not None
            ready, _, _ = select.select([self.process.stdout], [], [], 15)
            line = self.process.stdout.readline().decode() if ready else ""
            if not line.startswith("ready "):
                self.stop()
                raise AssertionError(f"{self.name} did not start: {line!r}\n"
                                     f"{self.log.read_text()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None and self.alive(), f"{self.name} died by itself"
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.kills.append(time.monotonic())

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()
        return self.process.returncode


@dataclass
class Pipeline:
    workdir: Path
    peers: dict[str, Peer]

    @property
    def output(self) -> Path:
        return self.workdir / "output.txt"

    def committed(self) -> int:
        """The sink's durable committed offset for stream 1 (0 before the first commit)."""
        try:
            state = json.loads((self.workdir / "output.txt.state").read_text())
        except FileNotFoundError:
            return 0
        return state["committed"].get("1", 0)

    def ack_log(self) -> list[tuple[str, int]]:
        path = self.workdir / "acks.log"
        if not path.exists():
            return []
        return [(event, int(number)) for event, number in
                (line.split() for line in path.read_text().splitlines())]


@contextlib.contextmanager
def running_pipeline(workdir: Path, *, sink_flags: tuple[str, ...] = (),
                     rate: int = RATE) -> Iterator[Pipeline]:
    sink_port, worker_port = free_port(), free_port()
    peers = {
        "sink": Peer("sink", ["--listen", f"127.0.0.1:{sink_port}", "--output",
                              str(workdir / "output.txt"), "--stats",
                              str(workdir / "sink.stats.json"), *sink_flags],
                     workdir / "sink.log", server=True),
        "worker": Peer("worker", ["--listen", f"127.0.0.1:{worker_port}", "--sink",
                                  f"127.0.0.1:{sink_port}"], workdir / "worker.log",
                       server=True),
        "source": Peer("source", ["--connect", f"127.0.0.1:{worker_port}", "--file",
                                  str(workdir / "input.txt"), "--rate", str(rate),
                                  "--ack-log", str(workdir / "acks.log"),
                                  "--stats", str(workdir / "source.stats.json")],
                       workdir / "source.log", server=False),
    }
    try:
        for peer in peers.values():
            peer.start()
        yield Pipeline(workdir, peers)
    finally:
        for peer in reversed(peers.values()):
            peer.stop()


@dataclass
class Kill:
    peer: str
    at: int
    """Committed offset to wait for before the kill."""
    down: float
    """Seconds the peer stays dead."""


def kill_plan(seed: int, size: int, peers: list[str], per_peer: int) -> list[Kill]:
    rng = random.Random(seed)
    order = peers * per_peer
    rng.shuffle(order)
    positions = sorted(rng.uniform(0.05, 0.8) * size for _ in order)
    return [Kill(name, int(at), round(rng.uniform(0.05, 0.9), 3))
            for name, at in zip(order, positions, strict=True)]


def play(pipeline: Pipeline, plan: list[Kill]) -> list[dict]:
    """Apply the plan; each kill waits for its offset and for a commit since the last
    restart (so it falls after the restarted peer took part again). The down time is how
    long the peer stays dead, which the others must ride out."""
    done = []
    last = -1
    for kill in plan:
        wait_for(lambda k=kill, floor=last: pipeline.committed() >= max(k.at, floor + 1), 60,
                 f"committed offset {kill.at} before killing {kill.peer}")
        for name, peer in pipeline.peers.items():
            assert peer.alive(), f"{name} died by itself: {peer.log.read_text()[-2000:]}"
        peer = pipeline.peers[kill.peer]
        peer.kill()
        last = pipeline.committed()
        acks_before = len(pipeline.ack_log())
        time.sleep(kill.down)  # how long it stays dead: part of the action, not a wait
        peer.start()
        done.append({"peer": kill.peer, "committed": last, "acks_before": acks_before})
    return done


def first_resume_after(pipeline: Pipeline, index: int) -> int:
    for event, number in pipeline.ack_log()[index:]:
        if event == "resume":
            return number
    raise AssertionError("no resume line after the restart")


@pytest.mark.timeout(120)
def test_every_peer_killed_three_times_the_output_is_still_the_input(tmp_path: Path) -> None:
    seed = 1414
    expected = write_input(tmp_path / "input.txt", seed)
    plan = kill_plan(seed, len(expected), ["sink", "worker", "source"], per_peer=3)
    started = time.monotonic()
    with running_pipeline(tmp_path) as pipeline:
        kills = play(pipeline, plan)
        source = pipeline.peers["source"]
        assert source.process is not None
        # The source exits by itself once the worker acknowledged the whole file.
        assert source.process.wait(60) == 0, source.log.read_text()[-3000:]
        assert pipeline.peers["worker"].alive() and pipeline.peers["sink"].alive()
        for restart in kills:
            if restart["peer"] == "source":
                # A restarted source resumes where the sink's output ended, not at 0.
                resumed = first_resume_after(pipeline, restart["acks_before"])
                assert resumed >= restart["committed"] > 0
        assert pipeline.peers["sink"].stop() == 0
        assert pipeline.peers["worker"].stop() == 0

    assert pipeline.output.read_bytes() == expected
    assert check_output.main(["--input", str(tmp_path / "input.txt"), "--output",
                              str(pipeline.output), "--complete"]) == 0
    assert ("done", len(expected)) in pipeline.ack_log()
    assert [event for event, _ in pipeline.ack_log()].count("acked") > 10
    stats = json.loads((tmp_path / "sink.stats.json").read_text())
    assert stats["lost_on_start"] == 0
    print(json.dumps({"seconds": round(time.monotonic() - started, 1), "kills": kills,
                      "sink": stats}))


@pytest.mark.timeout(120)
def test_a_sink_that_acks_before_writing_loses_data_and_is_caught(tmp_path: Path) -> None:
    seed = 2718
    expected = write_input(tmp_path / "input.txt", seed)
    plan = kill_plan(seed, len(expected), ["sink"], per_peer=3)
    with running_pipeline(tmp_path, sink_flags=("--ack-before-write",)) as pipeline:
        play(pipeline, plan)
        source = pipeline.peers["source"]
        assert source.process is not None
        # Everything was acknowledged: the source cannot tell what the sink lost.
        assert source.process.wait(60) == 0, source.log.read_text()[-3000:]
        assert ("done", len(expected)) in pipeline.ack_log()
        pipeline.peers["sink"].stop()

    actual = pipeline.output.read_bytes()
    assert len(actual) < len(expected)
    checker = subprocess.run(
        [sys.executable, "-m", "peers.check_output", "--input", str(tmp_path / "input.txt"),
         "--output", str(pipeline.output)], cwd=TESTS_DIR, capture_output=True, text=True)
    assert checker.returncode == 1
    assert checker.stdout.startswith(f"{pipeline.output}: output differs from input at byte ")
    assert len(checker.stdout.splitlines()) == 1
    assert "data lost" in pipeline.peers["sink"].log.read_text()


# -- the sink's 2PC log across a real SIGKILL --------------------------------------------------


async def _worker_link(port: int) -> FrameStream:
    stream = await FrameStream.connect("127.0.0.1", port)
    stream.send("Hello", version=VERSION, cookie="", program_name="test", instance_name="t")
    return stream


async def _reply(stream: FrameStream, kind: str) -> dict:
    while True:
        frame = await stream.expect(kind, "Ack", "Ok", timeout=5)
        if frame.type == kind:
            return frame.fields


def test_a_prepared_transaction_outlives_a_killed_sink(tmp_path: Path) -> None:
    port = free_port()
    output = tmp_path / "out.txt"
    sink = Peer("sink", ["--listen", f"127.0.0.1:{port}", "--output", str(output)],
                tmp_path / "sink.log", server=True)

    async def prepare() -> None:
        stream = await _worker_link(port)
        stream.send("Notify", stream_id=1, stream_name="s", point_of_ref=0)
        await _reply(stream, "NotifyAck")
        stream.send("Message", stream_id=1, message_id=0, payload=b"one\n")
        stream.send("TwoPCPhase1", txn_id="w-1", ranges=[(1, 0, 4)])
        assert (await _reply(stream, "TwoPCReply"))["commit"] == 1
        stream.close()

    async def commit_after_restart() -> None:
        stream = await _worker_link(port)
        stream.send("ListUncommitted", rtag=3)
        assert (await _reply(stream, "ReplyUncommitted"))["txn_ids"] == ["w-1"]
        stream.send("TwoPCPhase2", txn_id="w-1", commit=1)
        assert (await _reply(stream, "TwoPCReply"))["commit"] == 1
        # The same id again with new data (a worker counting from 1 after a restart) must
        # not get a yes that commits nothing.
        stream.send("Notify", stream_id=1, stream_name="s", point_of_ref=0)
        assert (await _reply(stream, "NotifyAck"))["point_of_ref"] == 4
        stream.send("Message", stream_id=1, message_id=4, payload=b"two\n")
        stream.send("TwoPCPhase1", txn_id="w-1", ranges=[(1, 4, 8)])
        assert (await _reply(stream, "TwoPCReply"))["commit"] == 0
        stream.close()

    try:
        sink.start()
        asyncio.run(prepare())
        sink.kill()
        sink.start()
        asyncio.run(commit_after_restart())
    finally:
        sink.stop()
    assert output.read_bytes() == b"one\n"


# -- the checker ------------------------------------------------------------------------------


@pytest.mark.parametrize(("actual", "complete", "status", "line"), [
    (b"", False, 0, None),
    (b"ab\ncd", False, 0, None),
    (b"ab\ncd\n", True, 0, None),
    (b"ab\n", True, 1, "output is incomplete: 3 of 6 bytes (it stops in line 2)"),
    (b"ab\ncx\n", False, 1,
     "output differs from input at byte 4 (line 2): expected b'd\\n', got b'x\\n'"),
    (b"ab\ncd\ncd\n", False, 1,
     "output runs 3 bytes beyond the input's 6 (from line 3): b'cd\\n'"),
])
def test_check_output_says_where_output_and_input_part(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], actual: bytes, complete: bool,
        status: int, line: str | None) -> None:
    (tmp_path / "in").write_bytes(b"ab\ncd\n")
    (tmp_path / "out").write_bytes(actual)
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    assert check_output.main(argv + ["--complete"] * complete) == status
    printed = capsys.readouterr().out
    assert printed == ("" if line is None else f"{tmp_path / 'out'}: {line}\n")


def test_check_output_counts_a_missing_output_as_empty(tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(b"ab\n")
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "none")]
    assert check_output.main(argv) == 0
    assert check_output.main([*argv, "--complete"]) == 1
