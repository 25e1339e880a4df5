"""FIFO exchanges and forks of one process kept apart (transport.ForkGuard): a child forked
while an exchange is in flight holds copies of its descriptors until it execs, which is
enough to glue two commands together on the proxy's side or make a reply look unread.

`wirefault chaos` exchanges in threads while its event loop spawns processes (restarts,
checks, ready probes): that is what this test does, against a real proxy, and no exchange
may fail. Without the guard about one exchange in 150 failed this way ('a command must be
on one line', 'the proxy stopped reading')."""

from __future__ import annotations

import asyncio
import threading

from pgserver import free_port
from proxy_helpers import running_proxy

from wirefault.fifo_client import FaultProxy
from wirefault.fifo_client.transport import FORKS

EXCHANGES = 600


def test_exchanges_in_threads_survive_spawns_on_the_loop() -> None:
    with running_proxy(free_port(), protocol="wallaroo") as proxy:
        client = FaultProxy(proxy.fifo, timeout=10)
        errors: list[str] = []
        done = threading.Event()

        def exchanges() -> None:
            try:
                for n in range(EXCHANGES // 3):
                    try:
                        client.send(f'faults.add("f:{n}").onAck().kill()')
                        assert [f.name for f in client.faults()] == [f"f:{n}"]
                        client.send(f'faults.remove("f:{n}")')
                    except Exception as exc:  # every failure counts, whatever it is
                        errors.append(f"{n}: {exc}")
            finally:
                done.set()

        async def spawn_until_done() -> int:
            spawned = 0
            while not done.is_set():
                async with FORKS.forking():
                    child = await asyncio.create_subprocess_exec("true")
                await child.wait()
                spawned += 1
            return spawned

        thread = threading.Thread(target=exchanges)
        thread.start()
        spawned = asyncio.run(spawn_until_done())
        thread.join()
        assert errors == []
        assert spawned > 20  # the forks really ran between the exchanges
        assert client.faults() == []
