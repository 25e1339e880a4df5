"""Hostile input, HTTP: malformed requests to a running `wirefault serve` API, over raw
sockets, while a well-behaved client keeps asking `GET /api/proxies`.

Each request is one of: bad JSON, a JSON value of the wrong type or with unknown keys,
an unknown route or method, a body larger than the server takes (declared, then sent in
part), a header larger than it takes, a request line that is no HTTP at all. Meanwhile a few
slow-loris connections trickle a header a byte at a time. Every malformed HTTP request must
get a 4xx answer (but a well-formed command to the commands route, answered 200 with its
error line, as documented); bytes that are no HTTP, and a header over the server's limit
(tornado closes the connection without an answer), may instead get the connection closed
(counted apart); bytes without an end of header (TLS-like) are no request yet: the server
holds them until its idle timeout, then closes (counted as held; FULL waits for the close);
the well-behaved client's median latency stays within 2x of its median alone in FULL
(measured in pauses between bursts of the flood, the lorises still trickling; plus 0.5 ms
of scheduling noise), within 10x or alone + 50 ms in QUICK, robust to a busy CI machine
(latency_rule.py); none of its requests fails, times out or takes over 5 s.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import random
import socket
import statistics
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from campaign import FULL, Row, Size, part
from latency_rule import latency_problems

from wirefault.proxy.http_api import IDLE_TIMEOUT

BODIES = [b"{", b"[1,2", b'{"command": 1}', b'{"command": null}', b"\xff\xfe", b"null",
          b'{"name": 5, "listen": [], "upstream": {}}', b'{"unknown": true}', b"1e999999",
          b'"' + b"a" * 5000, b'{"a":' * 5000, b'{"command": "conn.' + b"x" * 100 + b'"}']
PATHS = ["/api/proxies/pg/commands", "/api/proxies", "/api/proxies/pg", "/api/proxies/nope",
         "/api/proxies/pg/faults", "/nope", "/api/proxies/pg/faults/x", "/" + "a" * 3000,
         "/api/events?after=x", "/api/events?timeout=-1"]
METHODS = ["POST", "PATCH", "PUT", "DELETE", "GET", "BREW"]
VALID_ROUTES = {(method, path) for method in ("GET", "PATCH", "DELETE")
                for path in ("/api/proxies", "/api/proxies/pg", "/api/proxies/pg/faults")}
"""Requests without a body that are good ones (some would even remove the proxy): a "route"
request is drawn again when it is one of them."""
ANSWER_TIMEOUT = 30.0
BURST = 25
QUIET = 0.15


def malformed(rng: random.Random) -> tuple[str, bytes]:
    """(kind, raw request bytes)."""
    kind = rng.choice(["json", "json", "route", "huge body", "huge header", "not http"])
    path, method = rng.choice(PATHS), rng.choice(METHODS)
    if kind == "not http":
        return kind, rng.choice([rng.randbytes(rng.randint(1, 300)) + b"\r\n\r\n",
                                 b"\x16\x03\x01\x02\x00" + rng.randbytes(200),
                                 b"GET / HTTP/9.9\r\n\r\n", b"GET\r\n\r\n"])
    if kind == "huge header":
        return kind, (b"GET /api/proxies HTTP/1.1\r\nHost: x\r\nX-Big: "
                      + b"a" * 200_000 + b"\r\n\r\n")
    if kind == "huge body":
        declared = rng.choice((50 << 20, 1 << 30, 10**12))
        return kind, (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n"
                      f"Content-Type: application/json\r\n\r\n").encode() + b"{" * 65536
    body = rng.choice(BODIES) if kind == "json" else b""
    if kind == "json":
        method = rng.choice(["POST", "PATCH"])
        path = rng.choice(PATHS[:5])
    while kind == "route" and (method, path) in VALID_ROUTES:  # a good request: not ours
        path, method = rng.choice(PATHS), rng.choice(METHODS)
    return kind, (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                  f"Connection: close\r\n\r\n").encode() + body


def expects_200(request: bytes) -> bool:
    """A well-formed `{"command": "..."}` to the commands route: answered 200 with the FIFO's
    reply, the command's error line included (that route's documented behaviour)."""
    head, _, body = request.partition(b"\r\n\r\n")
    method, path = head.split()[:2]
    if method != b"POST" or not path.endswith(b"/commands"):
        return False
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("command"), str)


def answer(port: int, request: bytes) -> tuple[int | None, bytes]:
    """The status code the server answered (None when it closed without one, -1 when it
    said nothing in ANSWER_TIMEOUT) and the start of its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT) as sock:
        try:
            sock.sendall(request)
        except TimeoutError:
            return -1, b""
        except OSError:
            pass  # it closed on us mid-request (a body it refused): read what it said
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            return -1, data
        except ConnectionResetError:
            pass
    if not data.startswith(b"HTTP/1."):
        return None, data
    return int(data.split()[1]), data


def send_held(port: int, request: bytes) -> socket.socket:
    """Sends bytes with no end of header, which the server holds until its idle timeout
    (there is no request to answer yet): the socket is kept, and checked at the end."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT)
    with contextlib.suppress(OSError):
        sock.sendall(request)
    return sock


def held_state(sock: socket.socket) -> str:
    """"open" while the server still holds the connection, "closed" once it closed it
    (without an answer), else "answered"."""
    sock.setblocking(False)
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return "open"
    except OSError:
        return "closed"
    return "closed" if not data else "answered"


def slow_loris(port: int, stop: threading.Event, held: list[int]) -> None:
    """A client that sends its header a byte every 0.2 s, for as long as the flood lasts."""
    header = b"GET /api/proxies HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 10_000
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for byte in header:
            if stop.wait(0.2):
                break
            try:
                sock.send(bytes([byte]))
            except OSError:
                held.append(1)  # the server gave up on it
                return


def well_behaved(api: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(f"{api}/api/proxies", timeout=10) as reply:
        assert reply.status == 200 and json.load(reply)[0]["name"] == "pg"
    return time.perf_counter() - started


def keep_asking(api: str, started: Any, stop: Any, results: Any) -> None:
    """The well-behaved client (its own process): asks until `stop`, then puts (samples,
    failures) on `results`, each sample (perf_counter at its end, its latency)."""
    samples: list[tuple[float, float]] = []
    failures: list[str] = []
    for _ in range(20):  # warm up: connections, imports, caches
        well_behaved(api)
    started.set()
    while not stop.is_set():
        try:
            latency = well_behaved(api)
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
        else:
            samples.append((time.perf_counter(), latency))
    results.put((samples, failures))


def within(samples: list[tuple[float, float]], windows: list[tuple[float, float]]) -> list[float]:
    """The latencies of the samples that ran wholly inside one of `windows`."""
    out = []
    for end, latency in samples:
        start = end - latency
        if any(low <= start and end <= high for low, high in windows):
            out.append(latency)
    return out


@part("input-http")
def run(size: Size, work: Path) -> list[Row]:
    from pgserver import free_port
    from proxy_helpers import running_serve

    count = 10_000 if size == FULL else 500
    config = work / "serve.yaml"
    config.write_text(f"proxies:\n  - name: pg\n    listen: 127.0.0.1:{free_port()}\n"
                      f"    upstream: 127.0.0.1:{free_port()}\n")
    lost: list[str] = []
    codes: dict[str, dict[str, int]] = {}
    with running_serve(config) as serve:
        port = serve.port("api")
        # The well-behaved client runs in a process of its own: in this one it would wait
        # for the GIL behind the flood's and the lorises' threads, not for the server.
        context = multiprocessing.get_context("fork")
        flood, stop_asking = context.Event(), context.Event()
        results = context.Queue()
        asker = context.Process(target=keep_asking,
                                args=(serve.api, flood, stop_asking, results), daemon=True)
        asker.start()
        if not flood.wait(60):
            raise RuntimeError("the well-behaved client never started")
        stop, gave_up = threading.Event(), []
        lorises = [threading.Thread(target=slow_loris, args=(port, stop, gave_up), daemon=True)
                   for _ in range(20)]
        for loris in lorises:
            loris.start()
        rng = random.Random(15)
        held: list[socket.socket] = []
        # The flood comes in bursts of BURST requests with a pause of QUIET seconds before
        # each: the well-behaved client's round trips in the pauses are its baseline, so a
        # machine whose load changes during the run moves both alike.
        quiet: list[tuple[float, float]] = []
        flooded: list[tuple[float, float]] = []
        for index in range(count):
            if index % BURST == 0:
                if flooded:
                    flooded[-1] = (flooded[-1][0], time.perf_counter())
                pause = time.perf_counter()
                time.sleep(QUIET)
                quiet.append((pause, time.perf_counter()))
                flooded.append((time.perf_counter(), float("inf")))
            kind, request = malformed(rng)
            if b"\r\n\r\n" not in request:  # TLS-like bytes: no request to answer yet
                held.append(send_held(port, request))
                shown = "held"
                codes.setdefault(kind, {}).setdefault(shown, 0)
                codes[kind][shown] += 1
                continue
            status, said = answer(port, request)
            shown = "closed" if status is None else f"{status // 100}xx"
            codes.setdefault(kind, {}).setdefault(shown, 0)
            codes[kind][shown] += 1
            wanted = (200,) if kind == "json" and expects_200(request) else range(400, 500)
            if status == -1:
                lost.append(f"{kind}: no answer within {ANSWER_TIMEOUT:g} s to "
                            f"{request[:60]!r}")
            elif status is None and kind not in ("not http", "huge header"):
                lost.append(f"{kind}: closed without an answer")
            elif status is not None and status not in wanted:
                lost.append(f"{kind}: answered {status} to {request[:60]!r}: {said[-120:]!r}")
        flooded[-1] = (flooded[-1][0], time.perf_counter())
        stop_asking.set()
        samples, failures = results.get(timeout=60)
        alone, during = within(samples, quiet), within(samples, flooded)
        asker.join(10)
        stop.set()
        states = [held_state(sock) for sock in held]
        if size == FULL and held:  # the server must close them at its idle timeout
            deadline = time.monotonic() + IDLE_TIMEOUT + 15
            while "open" in states and time.monotonic() < deadline:
                time.sleep(1)
                states = [held_state(sock) for sock in held]
            if "open" in states:
                lost.append(f"{states.count('open')} held connections still open "
                            f"{IDLE_TIMEOUT + 15:g} s later")
        if "answered" in states:
            lost.append(f"{states.count('answered')} held connections got an answer")
        for sock in held:
            sock.close()
        alive = serve.process.poll() is None
    lost += failures[:3]
    if not alive:
        lost.append("wirefault serve exited")
    p50_alone = statistics.median(alone or [99.0])
    p50_during = statistics.median(during or [99.0])
    worst = max(during or [99.0])
    # FULL: the 2x; QUICK: no stall, median within 10x or + 50 ms (latency_rule)
    lost += latency_problems(size, p50_alone, p50_during, worst, "the well-behaved client")
    shown = "; ".join(f"{k}: " + ", ".join(f"{n} {c}" for c, n in sorted(v.items()))
                      for k, v in sorted(codes.items()))
    return [Row("hostile input", "malformed HTTP requests to the API (bad JSON, wrong types, "
                "unknown routes, huge bodies and headers, not HTTP) with 20 slow-loris "
                "clients", f"{count:,} requests", "; ".join(sorted(set(lost))[:4]) or "nothing",
                f"{shown}; well-behaved p50 {p50_alone * 1000:.2f} ms alone, "
                f"{p50_during * 1000:.2f} ms during ({p50_during / p50_alone:.2f}x), max "
                f"{worst * 1000:.1f} ms over {len(during)} requests ({len(alone)} alone)",
                not lost)]
