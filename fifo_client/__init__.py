"""The wirefault client: talk to a running proxy through its command FIFO.

    >>> from wirefault.fifo_client import FaultProxy, conn, faults, recorder
    >>> proxy = FaultProxy("/tmp/wirefault.fifo")                         # doctest: +SKIP
    >>> proxy.send(conn.onQuery(query="^COMMIT").after(2).kill())         # doctest: +SKIP
    ''
    >>> proxy.send(faults.add("slow").onQuery().delay(100))               # doctest: +SKIP
    ''
    >>> proxy.add_fault("flaky", "onQuery().probability(0.1).kill()")     # doctest: +SKIP
    >>> [(fault.name, fault.fired) for fault in proxy.faults()]           # doctest: +SKIP
    [('slow', 4), ('flaky', 0)]
    >>> with proxy.fault(conn.onCommandComplete(command="^COPY").cancel(4242)):  # doctest: +SKIP
    ...     copy_some_rows()
    >>> rows = proxy.dump()                                               # doctest: +SKIP

Importing this package never imports mitmproxy.
"""

from __future__ import annotations

from .builder import Command, conn, faults, recorder
from .client import DEFAULT_TIMEOUT, FaultInfo, FaultProxy, TrafficRow, parse_dump, parse_faults
from .errors import CommandError, ProxyUnavailable, UnknownMethodError, WirefaultError

__all__ = [
    "DEFAULT_TIMEOUT",
    "Command",
    "CommandError",
    "FaultInfo",
    "FaultProxy",
    "ProxyUnavailable",
    "TrafficRow",
    "UnknownMethodError",
    "WirefaultError",
    "conn",
    "faults",
    "parse_dump",
    "parse_faults",
    "recorder",
]
