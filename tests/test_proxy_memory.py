"""A long connection does not grow the proxy's memory once the recorder's ring is full."""

from __future__ import annotations

import os
import subprocess
import threading
import time

from proxy_helpers import running_proxy

QUERIES = 100_000


def test_100k_queries_on_one_connection_leave_memory_flat(pg):
    env = dict(os.environ, PGUSER=pg.user, PGHOST=pg.host, PGDATABASE=pg.dbname)
    subprocess.run([pg.bin("pgbench"), "-i", "-s", "1", "-q", "-p", str(pg.port)],
                   env=env, capture_output=True, check=True)
    with running_proxy(pg.port, rule='conn.onQuery(query="^COMMIT").kill()') as proxy:
        samples: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(proxy.rss_kib())
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            run = subprocess.run(
                [pg.bin("pgbench"), "-S", "-n", "-c", "1", "-t", str(QUERIES),
                 "-p", str(proxy.port)],
                env=env, capture_output=True, text=True, timeout=240,
            )
        finally:
            done.set()
            sampler.join()
        assert run.returncode == 0, run.stderr
        assert f"number of transactions actually processed: {QUERIES}/{QUERIES}" in run.stdout
        # 5 frames a query: the 100,000-frame ring is full after 20% of the run.
        settled = samples[len(samples) * 2 // 5]
        growth_kib = max(samples[len(samples) * 2 // 5:]) - settled
        assert len(samples) > 20
        assert growth_kib < 8 * 1024, (settled, max(samples), samples[::10])
