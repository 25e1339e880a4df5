"""The floor of a Python relay: uvloop transports that hand each read to the other socket.

No framing, no rules, no recorder, no mitmproxy: what remains is the event loop and the
write/read syscalls. The benchmark's `python-floor` target runs it, so every run shows how
much of wirefault's cost is its own work per read and how much any relay on this runtime
pays (what a native read path on the same transports could at best reach).

    python floor_relay.py LISTEN_PORT UPSTREAM_PORT

Prints `ready` once it listens. Not a product: a measuring stick, loopback only.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class _Side(asyncio.Protocol):
    """One socket; reads go straight to `peer`'s transport (buffered until it exists)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:  # the client spoke before the upstream connection was made
            self.early.append(data)

    def eof_received(self) -> bool:
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()


class _Client(_Side):
    def __init__(self, upstream_port: int) -> None:
        super().__init__()
        self.upstream_port = upstream_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        upstream = _Side()
        upstream.peer = self
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: upstream, "127.0.0.1", self.upstream_port)
        except OSError:
            assert self.transport is not None
            self.transport.close()
            return
        self.peer = upstream
        assert upstream.transport is not None
        for data in self.early:
            upstream.transport.write(data)
        self.early.clear()


async def _serve(listen_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: _Client(upstream_port), "127.0.0.1", listen_port,
                             backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: floor_relay.py LISTEN_PORT UPSTREAM_PORT")
    uvloop.run(_serve(int(sys.argv[1]), int(sys.argv[2])))


if __name__ == "__main__":
    main()
