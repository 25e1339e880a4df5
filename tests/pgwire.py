"""PostgreSQL's wire protocol by hand, for tests that need exact control of what a client
writes and when (several messages in one write, a half-close, a slow reader)."""

from __future__ import annotations

import socket
import struct

STARTUP_USER = b"user\0postgres\0database\0postgres\0\0"


def startup_message() -> bytes:
    return struct.pack("!II", 8 + len(STARTUP_USER), 196608) + STARTUP_USER


def query_message(text: str) -> bytes:
    body = text.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def read_until_ready(sock: socket.socket) -> bytes:
    """Everything up to and including the next ReadyForQuery (ConnectionError on EOF)."""
    data = b""
    while True:
        offset = 0
        while offset + 5 <= len(data):
            kind = data[offset:offset + 1]
            (length,) = struct.unpack("!I", data[offset + 1:offset + 5])
            if offset + 1 + length > len(data):
                break
            offset += 1 + length
            if kind == b"Z":
                return data[:offset]
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the connection closed before ReadyForQuery")
        data += chunk


def open_session(port: int, timeout: float = 30) -> socket.socket:
    """A trust-authenticated session on 127.0.0.1:port, ready for a query."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(startup_message())
    read_until_ready(sock)
    return sock
