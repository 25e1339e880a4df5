"""The healthy connection of the hostile-peers parts, in a process of its own.

Prints the port of its echo server (the good upstream), then for each stdin line
`PROXY_PORT SECONDS` runs a request/response loop through 127.0.0.1:PROXY_PORT for SECONDS
(64-byte messages numbered and checksummed, each answer checked) and prints one JSON line:
round trips, p50, p99 and max in ms, errors."""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time


def echo_server() -> int:
    server = socket.create_server(("127.0.0.1", 0), backlog=128)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            conn, _ = server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1]


def run_loop(port: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            deadline = time.monotonic() + seconds
            number = 0
            while time.monotonic() < deadline:
                body = number.to_bytes(8, "big") * 4
                message = body + hashlib.sha256(body).digest()  # 64 bytes
                started = time.perf_counter()
                sock.sendall(message)
                got = b""
                while len(got) < len(message):
                    chunk = sock.recv(len(message) - len(got))
                    if not chunk:
                        raise ConnectionError("closed")
                    got += chunk
                latencies.append(time.perf_counter() - started)
                if got != message:
                    errors += 1
                number += 1
    except OSError:
        errors += 1
    latencies.sort()

    def at(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 3) \
            if latencies else 0.0

    return {"n": len(latencies), "p50": at(0.5), "p99": at(0.99), "max": at(1.0),
            "errors": errors}


def main() -> None:
    print(echo_server(), flush=True)
    for line in sys.stdin:
        port, seconds = line.split()
        print(json.dumps(run_loop(int(port), float(seconds))), flush=True)


if __name__ == "__main__":
    main()
