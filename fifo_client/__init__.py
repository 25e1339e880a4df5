"""The wirefault client: talk to a running proxy through its command FIFO.

    >>> from wirefault.fifo_client import FaultProxy, conn, recorder
    >>> proxy = FaultProxy("/tmp/wirefault.fifo")                         # doctest: +SKIP
    >>> proxy.send(conn.onQuery(query="^COMMIT").after(2).kill())         # doctest: +SKIP
    ''
    >>> with proxy.fault(conn.onCommandComplete(command="^COPY").cancel(4242)):  # doctest: +SKIP
    ...     copy_some_rows()
    >>> rows = proxy.dump()                                               # doctest: +SKIP

Importing this package never imports mitmproxy.
"""

from __future__ import annotations

from .builder import Command, conn, recorder
from .client import DEFAULT_TIMEOUT, FaultProxy, TrafficRow, parse_dump
from .errors import CommandError, ProxyUnavailable, UnknownMethodError, WirefaultError

__all__ = [
    "DEFAULT_TIMEOUT",
    "Command",
    "CommandError",
    "FaultProxy",
    "ProxyUnavailable",
    "TrafficRow",
    "UnknownMethodError",
    "WirefaultError",
    "conn",
    "parse_dump",
    "recorder",
]
