"""Shared parts of the peers: framed connections, reconnect backoff, the command-line frame.

A `FrameStream` reads with the incremental framer of `wirefault.protocols.wallaroo` (the
direction chosen by which side of the TCP connection we are) and writes frames built by
`wallaroo.encode`. Every way a link can break (EOF, reset, a frame that breaks the
protocol, a peer that stays silent too long) surfaces as `LinkLost`, which is what the
peers' reconnect loops catch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from wirefault.protocols import OPAQUE, PROTOCOL_ERROR, Frame, wallaroo

VERSION = "wirefault-peers/1"
"""The `version` every peer sends in Hello and insists on (the spec asks for exact match)."""
READ_CHUNK = 64 * 1024

log = logging.getLogger("peers")


class LinkLost(Exception):
    """The connection is unusable: closed, reset, silent for too long or off-protocol."""


class FrameStream:
    """One TCP connection seen as Wallaroo frames."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, client: bool
    ) -> None:
        self.reader = reader
        self.writer = writer
        session = wallaroo.new_session()
        # A client reads what the server sends, and the other way round.
        self._framer = session.server if client else session.client
        self._ready: deque[Frame] = deque()

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float = 2.0) -> FrameStream:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError) as exc:
            raise LinkLost(f"cannot connect to {host}:{port}: {exc}") from None
        return cls(reader, writer, client=True)

    async def read_batch(self) -> list[Frame]:
        """The frames completed by the next read(s); [] at end of stream."""
        while not self._ready:
            try:
                data = await self.reader.read(READ_CHUNK)
            except OSError as exc:
                raise LinkLost(f"read failed: {exc}") from None
            if not data:
                return []
            for frame in self._framer.feed(data):
                if frame.type in (PROTOCOL_ERROR, OPAQUE):
                    raise LinkLost(f"protocol error: {frame.error}")
                self._ready.append(frame)
        batch = list(self._ready)
        self._ready.clear()
        return batch

    async def read(self) -> Frame | None:
        """The next frame; None at end of stream."""
        if not self._ready:
            batch = await self.read_batch()
            if not batch:
                return None
            self._ready.extend(batch)
        return self._ready.popleft()

    async def expect(self, *types: str, timeout: float) -> Frame:
        """The next frame, which must be one of `types` (LinkLost otherwise)."""
        try:
            frame = await asyncio.wait_for(self.read(), timeout)
        except TimeoutError:
            raise LinkLost(f"no {'/'.join(types)} within {timeout:g}s") from None
        if frame is None:
            raise LinkLost(f"closed while waiting for {'/'.join(types)}")
        if frame.type not in types:
            raise LinkLost(f"expected {'/'.join(types)}, got {frame.render()}")
        return frame

    def send(self, name: str, **fields: Any) -> None:
        if self.writer.is_closing():
            raise LinkLost(f"cannot send {name}: connection closing")
        self.writer.write(wallaroo.encode(name, **fields))

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except OSError as exc:
            raise LinkLost(f"write failed: {exc}") from None

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.close()


class Backoff:
    """Reconnect delays doubling from `first` up to `cap` seconds."""

    def __init__(self, first: float = 0.02, cap: float = 0.2) -> None:
        self.first = first
        self.cap = cap
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    async def wait(self, stop: asyncio.Event | None = None) -> None:
        """Sleep the current delay (cut short when `stop` is set), then double it."""
        if stop is None:
            await asyncio.sleep(self.delay)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.delay)
        self.delay = min(self.delay * 2, self.cap)


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--stats", type=Path, help="write statistics as JSON here on exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every link event")
    return parser


def run_main(
    args: argparse.Namespace,
    body: Callable[[asyncio.Event], Awaitable[tuple[int, dict[str, Any]]]],
) -> int:
    """Run `body(stop)` until it returns; SIGINT/SIGTERM set `stop`. Writes the stats."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")

    async def main() -> tuple[int, dict[str, Any]]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        return await body(stop)

    status, stats = asyncio.run(main())
    if args.stats:
        args.stats.write_text(json.dumps(stats, indent=1, sort_keys=True))
    return status


def announce(name: str, server: asyncio.AbstractServer) -> None:
    """Tell whoever started us where we listen (the first stdout line)."""
    port = server.sockets[0].getsockname()[1]
    print(f"ready {port}", flush=True)
    log.info("%s listening on port %d", name, port)
