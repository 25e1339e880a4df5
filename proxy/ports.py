"""Why a listen port is taken: what the kernel's socket tables say about it.

A restart on the same port can fail with EADDRINUSE although nothing listens there any more.
SO_REUSEADDR (which the listener sets) lets a new listener share a port with the sockets the
old one accepted, even in TIME_WAIT, because they inherited the option. It does not help
against a socket whose *local* port is the listen port and which never had the option: an
outgoing connection that the kernel gave that port from the ephemeral range while nothing
listened there. Such a socket keeps the port for up to 60 s after it closes (TIME_WAIT).
Ports outside `ip_local_port_range` are never handed out that way.
"""

from __future__ import annotations

import collections
import contextlib
import socket

_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_STATE_NAMES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
    "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
    "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}
_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def ephemeral_range() -> tuple[int, int] | None:
    """The kernel's range of ports for outgoing connections, or None when unknown."""
    with contextlib.suppress(OSError, ValueError), open(_RANGE_FILE) as f:
        low, high = f.read().split()
        return int(low), int(high)
    return None


def sockets_on_port(port: int) -> collections.Counter[str]:
    """States of the TCP sockets whose local port is `port`, counted."""
    states: collections.Counter[str] = collections.Counter()
    for table in _TCP_TABLES:
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)  # the header
            for line in f:
                fields = line.split()
                if len(fields) < 4:
                    continue
                local_port = int(fields[1].rpartition(":")[2], 16)
                if local_port == port:
                    states[_STATE_NAMES.get(fields[3], fields[3])] += 1
    return states


def explain_address_in_use(port: int) -> str:
    """One clause saying what holds `port`, for the EADDRINUSE message."""
    states = sockets_on_port(port)
    if states["LISTEN"]:
        return "another process is listening there"
    held = ", ".join(f"{count} in {state}" for state, count in sorted(states.items()))
    span = ephemeral_range()
    if span and span[0] <= port <= span[1]:
        return (f"nothing listens, but sockets of outgoing connections hold it as their local "
                f"port ({held or 'gone by now'}): the port is inside the ephemeral range "
                f"{span[0]}-{span[1]}, from which the kernel gives ports to outgoing "
                f"connections, which keep them up to 60 s after closing; listen on a port "
                f"outside that range")
    return f"held by {held}" if held else "the kernel refused it"


def free_port(host: str) -> int:
    """A port nothing listens on at `host` now: what the kernel gives a socket bound to
    port 0. A proxy asked for port 0 listens there from the start, so its address stays the
    same across disable/enable, and two proxies asking for port 0 do not clash."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
