"""Hostile load: thousands of concurrent connections through one proxy.

2,000 connections (FULL; 300 QUICK) are opened at once through one raw proxy to a small
asyncio echo server (its own process). Every connection exchanges a checksummed message
first, then all of them are open at the same moment (the proxy's fd count proves it: two
sockets each), then each exchanges more messages and closes. Nothing may fail or stall (no
answer within STALL seconds), the proxy stays up and answers its FIFO, and its descriptors
come back to what they were before the load.

Run directly, this module is the echo server: `python load_connections.py --echo` prints the
port it listens on and echoes every byte until its client closes.

The helpers at the top (descriptor counts, CPU, percentiles, the descriptor limit) are shared
by the other load parts (load_volume.py, load_soak.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent, HERE.parent / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from campaign import FULL, Row, Size, part  # noqa: E402

PART = "hostile load"
STALL = 30.0
"""A generous bound: an answer later than this is a stall (loopback answers take ms)."""


# -- shared helpers ---------------------------------------------------------------------------


def fd_count(pid: int, fifo: str | None = None) -> int:
    """The process's open descriptors, leaving out its command FIFO (the channel closes and
    reopens it around every command, so it comes and goes)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            if fifo is None or os.readlink(f"/proc/{pid}/fd/{fd}") != fifo:
                count += 1
    return count


def settled_fd_count(pid: int, fifo: str | None = None, timeout: float = 5.0) -> int:
    """The descriptor count once it holds still for 0.3 s (a start leaves some closing: the
    probe connection that saw the proxy listen, with its upstream side)."""
    samples = [fd_count(pid, fifo)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (len(samples) >= 4
                                                and len(set(samples[-4:])) == 1):
        time.sleep(0.1)
        samples.append(fd_count(pid, fifo))
    return samples[-1]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nofile_limit(pid: int) -> int:
    """The process's soft RLIMIT_NOFILE, as the kernel applies it."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise RuntimeError("no Max open files")


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft descriptor limit to `wanted` (within the hard one), so the
    processes it starts (the proxy, the servers) inherit it; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    """Poll `predicate` until it holds or `timeout` passes (for states with no event to wait
    on, such as a descriptor count)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


# -- the echo server --------------------------------------------------------------------------


async def _serve_echo() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    # a backlog that takes every connection the proxy opens at once
    server = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def echo_server() -> Iterator[tuple[int, int]]:
    """The echo server in a process of its own (so its work does not slow the clients)."""
    process = subprocess.Popen([sys.executable, __file__, "--echo"], stdout=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"echo server did not start: {line!r}")
        yield int(line), process.pid
    finally:
        process.terminate()
        process.wait(10)


# -- the load ---------------------------------------------------------------------------------


@dataclass
class Tally:
    connect_ms: list[float] = field(default_factory=list)
    round_trip_ms: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stalled: list[str] = field(default_factory=list)


def _message(rng: random.Random) -> bytes:
    """A message that checks itself: sha256 of the payload, then the payload."""
    payload = rng.randbytes(rng.randrange(16, 4096))
    return hashlib.sha256(payload).digest() + payload


class Client:
    def __init__(self, number: int, port: int, tally: Tally) -> None:
        self.number = number
        self.port = port
        self.tally = tally
        self.rng = random.Random(number)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _step(self, what: str, awaitable):  # type: ignore[no-untyped-def]
        try:
            return await asyncio.wait_for(awaitable, STALL)
        except TimeoutError:
            self.tally.stalled.append(f"connection {self.number}: {what}")
            raise
        except (OSError, asyncio.IncompleteReadError, AssertionError) as exc:
            self.tally.failed.append(f"connection {self.number}: {what}: {exc!r}")
            raise

    async def open(self) -> None:
        started = time.perf_counter()
        self.reader, self.writer = await self._step(
            "connect", asyncio.open_connection("127.0.0.1", self.port))
        self.tally.connect_ms.append((time.perf_counter() - started) * 1000)

    async def exchange(self) -> None:
        assert self.reader is not None and self.writer is not None
        message = _message(self.rng)
        started = time.perf_counter()
        self.writer.write(message)
        answer = await self._step("echo", self.reader.readexactly(len(message)))
        self.tally.round_trip_ms.append((time.perf_counter() - started) * 1000)
        digest, payload = answer[:32], answer[32:]
        await self._step("checksum", self._check(answer == message
                                                 and hashlib.sha256(payload).digest() == digest))

    @staticmethod
    async def _check(ok: bool) -> None:
        assert ok, "the echo differs from what was sent"

    async def close(self) -> None:
        assert self.reader is not None and self.writer is not None
        self.writer.write_eof()
        rest = await self._step("close", self.reader.read())  # the echo server closes too
        await self._step("close", self._check(rest == b""))
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def _phase(coroutines) -> None:  # type: ignore[no-untyped-def]
    # one failure is already counted in the tally; the others carry on
    await asyncio.gather(*coroutines, return_exceptions=True)


def load(port: int, count: int, rounds: int, pid: int, fifo: str | None = None
         ) -> tuple[Tally, dict[str, int]]:
    """`count` connections at once, `rounds` messages each; the fds and RSS of process `pid`
    (the proxy, or the echo server when measured directly) sampled while all are open."""
    tally = Tally()
    seen: dict[str, int] = {}

    async def main() -> None:
        clients = [Client(number, port, tally) for number in range(count)]

        async def first(client: Client) -> None:
            await client.open()
            await client.exchange()  # the upstream connection is open and carries bytes

        await _phase(first(client) for client in clients)
        alive = [client for client in clients if client.writer is not None]
        seen["peak_fds"] = fd_count(pid, fifo)
        seen["peak_rss"] = rss_kib(pid)

        async def rest(client: Client) -> None:
            for _ in range(rounds - 1):
                await client.exchange()
            await client.close()

        await _phase(rest(client) for client in alive)
        for client in clients:
            if client.writer is not None:
                client.writer.close()

    asyncio.run(main())
    return tally, seen


def still_echoes(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 5) as s:
        s.settimeout(5)
        s.sendall(b"still there?")
        return s.recv(64) == b"still there?"
    return False


def one_mode(kind: str, upstream: int, count: int, rounds: int, direct: Tally) -> Row:
    from proxy_helpers import running_proxy

    from wirefault.fifo_client import FaultProxy

    with running_proxy(upstream, kind=kind, protocol="raw") as proxy:
        pid, fifo = proxy.process.pid, proxy.fifo
        # what the proxy holds before the load, once it serves (its own files, listener)
        base_fds, base_rss = settled_fd_count(pid, fifo), rss_kib(pid)
        limit = nofile_limit(pid)
        started = time.monotonic()
        tally, seen = load(proxy.port, count, rounds, pid, fifo)
        seconds = time.monotonic() - started
        # the proxy closes its sides as the FINs arrive: wait until its count settles
        back = wait_for(lambda: fd_count(pid, fifo) <= base_fds, 30)
        # the recorder keeps the newest 100,000 frames by design: empty it, so that what
        # RSS shows next is the connections' own memory
        FaultProxy(fifo, timeout=10).reset_traffic()
        after_fds, after_rss = fd_count(pid, fifo), rss_kib(pid)
        # the same load again: memory a connection leaves behind would grow RSS as much again
        again, _ = load(proxy.port, count, rounds, pid, fifo)
        back = wait_for(lambda: fd_count(pid, fifo) <= base_fds, 30) and back
        FaultProxy(fifo, timeout=10).reset_traffic()
        after_fds, again_rss = fd_count(pid, fifo), rss_kib(pid)
        up = proxy.process.poll() is None and still_echoes(proxy.port)
        try:
            FaultProxy(fifo, timeout=10).status()
        except Exception:
            up = False
    opened = count - len(tally.failed) - len(tally.stalled)
    tally.failed += again.failed
    tally.stalled += again.stalled
    # The allocator keeps what the first wave needed; a leak would need as much again. The
    # bound is generous because each closed connection leaves ~100 objects in reference
    # cycles that only a full collection frees, and with the proxy's gc thresholds one runs
    # every few million allocations (every 2-3 waves of 2,000 here): RSS steps up when
    # one is due. Measured: after a full collection the allocated blocks are the same wave
    # after wave (345,994 to 345,997 over 7 waves of 2,000): nothing leaks.
    regrown = again_rss - after_rss > (after_rss - base_rss) / 2 + 8192
    concurrent = seen.get("peak_fds", 0) >= base_fds + 2 * opened
    # Connecting waits for no one but the kernel: a listen backlog too short for the burst
    # shows as SYNs dropped and resent a second later. Bound: twice the direct p99 + 0.5 s.
    connect_p99, direct_p99 = percentile(tally.connect_ms, .99), percentile(direct.connect_ms,
                                                                              .99)
    connect_ok = connect_p99 <= 2 * direct_p99 + 500
    lost = []
    if tally.failed:
        lost.append(f"{len(tally.failed)} failed (first: {tally.failed[0]})")
    if tally.stalled:
        lost.append(f"{len(tally.stalled)} stalled > {STALL:.0f} s (first: {tally.stalled[0]})")
    if not concurrent:
        lost.append(f"not all open at once (peak {seen.get('peak_fds')} fds)")
    if not connect_ok:
        lost.append(f"connect p99 {connect_p99:.0f} ms, direct {direct_p99:.0f} ms")
    if not back:
        lost.append(f"fds not back to {base_fds} (still {after_fds})")
    if regrown:
        lost.append(f"RSS grew again in the second wave: {mib(after_rss)} → {mib(again_rss)}")
    if not up:
        lost.append("the proxy is down or does not answer")
    exchanges = len(tally.round_trip_ms) + len(again.round_trip_ms)
    figure = (f"connect p50 {percentile(tally.connect_ms, .5):.1f} ms, p99 {connect_p99:.1f} "
              f"ms (direct {direct_p99:.1f} ms); round trip p50 "
              f"{percentile(tally.round_trip_ms, .5):.1f} ms, p99 "
              f"{percentile(tally.round_trip_ms, .99):.1f} ms, max "
              f"{max(tally.round_trip_ms, default=float('nan')):.0f} ms (direct p99 "
              f"{percentile(direct.round_trip_ms, .99):.1f} ms); proxy fds {base_fds} → "
              f"{seen.get('peak_fds')} → {after_fds} (limit {limit:,}), RSS {mib(base_rss)} → "
              f"{mib(seen.get('peak_rss', 0))} → {mib(after_rss)}, after a second wave "
              f"{mib(again_rss)}; {exchanges:,} checksummed echoes in two waves, the first "
              f"{seconds:.1f} s")
    return Row(PART, f"concurrent connections through one raw proxy ({kind}), each "
                     f"{rounds} checksummed echoes, two waves", f"2 x {count:,} connections",
               "; ".join(lost) or "nothing", figure, not lost)


@part("load_connections")
def run(size: Size, work: Path) -> list[Row]:
    count, rounds = (2000, 5) if size == FULL else (300, 3)
    # each connection costs the proxy two descriptors, the echo server one and this process
    # one: raise the soft limit the children inherit (the hard limit allows it everywhere
    # we run; what the proxy does with too low a limit is peers_fds's part)
    limit = raise_fd_limit(2 * count + 1024)
    if limit < 2 * count + 256:
        return [Row(PART, "concurrent connections", f"{count:,} connections",
                    f"descriptor limit {limit} too low for the test", "-", False)]
    with echo_server() as (upstream, echo_pid):
        direct, _ = load(upstream, count, rounds, echo_pid)  # the baseline, in this run
        if direct.failed or direct.stalled:
            return [Row(PART, "concurrent connections, direct", f"{count:,} connections",
                        f"the echo server alone lost {direct.failed[:1] + direct.stalled[:1]}",
                        "-", False)]
        return [one_mode(kind, upstream, count, rounds, direct)
                for kind in ("runner", "mitmdump")]


if __name__ == "__main__":
    if sys.argv[1:] == ["--echo"]:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_echo())
    else:
        from campaign import QUICK

        chosen = FULL if "--full" in sys.argv else QUICK
        for row in run(chosen, Path("/tmp")):
            print(row)
