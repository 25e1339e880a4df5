"""`FaultProxy`: send commands to a running wirefault proxy through its FIFO, or to a proxy
of `wirefault serve` through its HTTP API (`FaultProxy("http://127.0.0.1:8474/proxies/pg")`).

    >>> from wirefault.fifo_client import FaultProxy, conn
    >>> proxy = FaultProxy("/tmp/wirefault.fifo")                      # doctest: +SKIP
    >>> with proxy.fault(conn.onQuery(query="^COMMIT").kill()):        # doctest: +SKIP
    ...     run_the_transaction_and_watch_it_fail()
    >>> proxy.add_fault("slow", 'onQuery(query="^SELECT").delay(200)')  # doctest: +SKIP
    >>> [(f.name, f.fired, f.state) for f in proxy.faults()]           # doctest: +SKIP
    [('slow', 3, 'active')]
    >>> proxy.dump()[:1]                                               # doctest: +SKIP
    [TrafficRow(conn=0, source='coordinator', message='Query(query=BEGIN)')]

Safe to share between threads, and between processes using the same FIFO: each exchange
holds an exclusive `flock` on `<fifo>.lock` (and a thread lock), so commands never
interleave and nobody reads somebody else's reply. Over HTTP each call is one request
(`POST /api/proxies/NAME/commands`), which the server answers with the same reply text.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from . import http_transport, transport
from .builder import Command, check_fault_name, command_text, fault_command, render_literal
from .errors import CommandError, WirefaultError

DEFAULT_TIMEOUT = 10.0
DUMP = "recorder.dump()"
RESET = "recorder.reset()"
ALLOW = "conn.allow()"
PING = "proxy.ping()"
STATUS = "proxy.status()"
LIST_FAULTS = "faults.list()"
CLEAR_FAULTS = "faults.clear()"


@dataclass(frozen=True, slots=True)
class TrafficRow:
    """One recorded frame: the connection's number, `source` (by default `coordinator` for
    the client side, `worker` for the server side) and the frame's readable form.

    A first row with `conn == -1` and source `recorder` reports frames the ring buffer
    dropped.
    """

    conn: int
    source: str
    message: str


@dataclass(frozen=True, slots=True)
class FaultInfo:
    """One fault in force on the proxy, as `faults.list()` reports it.

    `matched`: frames that passed its filters (an `after()` or `probability()` may then
    have let them through); `fired`: times it acted; `added`: when it was added (UTC,
    millisecond precision); `state`: `active`, or `spent` once `times(n)` is used up;
    `command`: its whole `faults.add(...)` command.
    """

    name: str
    matched: int
    fired: int
    added: datetime
    state: str
    command: str


class FaultProxy:
    """A client of the proxy listening on `fifo_path`, or, when it is an `http://` or
    `https://` URL, of the proxy of `wirefault serve` it names:
    `http://HOST:PORT/proxies/NAME` (Toxiproxy's shape) or `http://HOST:PORT/api/proxies/NAME`.
    Both transports give the same replies, results and exceptions.

    `timeout` bounds each whole call (waiting for other clients, the proxy reading the
    command, and the reply; over HTTP, waiting for the server to listen and the proxy to
    exist); `ProxyUnavailable` is raised when it runs out. `token` (HTTP only; default
    `$WIREFAULT_API_TOKEN`) is sent as `Authorization: Bearer TOKEN`.

    >>> proxy = FaultProxy("/tmp/wirefault.fifo", timeout=5)          # doctest: +SKIP
    >>> proxy.send('conn.onQuery(query="^COMMIT").kill()')            # doctest: +SKIP
    ''
    >>> FaultProxy("http://127.0.0.1:8474/proxies/pg").faults()       # doctest: +SKIP
    []
    """

    def __init__(self, fifo_path: str, timeout: float = DEFAULT_TIMEOUT,
                 token: str | None = None) -> None:
        self.fifo_path = str(fifo_path)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._http: http_transport.HttpChannel | None = None
        if http_transport.is_api_url(self.fifo_path):
            self._http = http_transport.HttpChannel(self.fifo_path, token)
        elif token is not None:
            raise ValueError("token= is for an API URL (http://HOST:PORT/proxies/NAME), "
                             f"not a FIFO: {self.fifo_path!r}")

    def __repr__(self) -> str:
        return f"FaultProxy({self.fifo_path!r}, timeout={self.timeout!r})"

    def send(self, command: str | Command) -> str:
        """Send one command; return the reply without its final newline.

        The reply is the empty string when a rule was accepted, the COPY text rows for
        `recorder.dump()`. Raises `CommandError` with the proxy's message when it rejects
        the command, `ProxyUnavailable` when no proxy answers within the timeout.

        >>> proxy.send(conn.onCopyData().cancel(4242))                   # doctest: +SKIP
        ''
        """
        text = command_text(command)
        reply = self._exchange(text)
        if reply and not _is_dump(text):
            raise CommandError(reply, text)
        return reply

    def allow(self) -> None:
        """Let all traffic through again (`conn.allow()`, which removes every fault)."""
        self.send(ALLOW)

    def add_fault(self, name: str, chain: str | Command, seed: int | None = None) -> None:
        """Add (or replace) the fault `name`: `faults.add(name).<chain>`.

        `chain` is a builder (`conn.onQuery().kill()`, or `faults.add(name)...` itself) or
        text: `conn.onQuery().kill()`, `.onQuery().kill()` or `onQuery().kill()`. `seed`
        seeds its random steps (`probability`, `connectionProbability`, `delay` jitter).
        `CommandError` with the proxy's message when it refuses the fault.

        >>> proxy.add_fault("commit-kill", conn.onQuery(query="^COMMIT").kill())  # doctest: +SKIP
        """
        self.send(fault_command(name, chain, seed))

    def remove_fault(self, name: str) -> None:
        """Remove the fault `name` (`faults.remove(name)`); `CommandError` if there is none."""
        self.send(f"faults.remove({render_literal(check_fault_name(name))})")

    def clear_faults(self) -> None:
        """Remove every fault (`faults.clear()`)."""
        self.send(CLEAR_FAULTS)

    def faults(self) -> list[FaultInfo]:
        """The faults in force, in the order they were added (`faults.list()`).

        >>> [(f.name, f.matched, f.fired, f.state) for f in proxy.faults()]  # doctest: +SKIP
        [('slow', 12, 3, 'active')]
        """
        return parse_faults(self._exchange(LIST_FAULTS))

    def status(self) -> dict[str, int]:
        """What the proxy holds (`proxy.status()`): `connections` it relays, mitmproxy's
        `handlers`, the event loop's `tasks`, `fired` (how many times any fault fired since
        the proxy started) and `faults` (how many are in force).

        >>> proxy.status()                                               # doctest: +SKIP
        {'connections': 0, 'handlers': 0, 'tasks': 4, 'fired': 0, 'faults': 0}
        """
        return parse_status(self._exchange(STATUS))

    def wait_ready(self) -> None:
        """Return once a proxy answers on the FIFO (`proxy.ping()`, which changes nothing);
        `ProxyUnavailable` when none does within the timeout. The FIFO, and its directory,
        may appear while this waits. A proxy too old to know `proxy.ping()` answers with
        an error, which is an answer too."""
        with contextlib.suppress(CommandError):
            self.send(PING)

    def reset_traffic(self) -> None:
        """Forget the recorded traffic and restart connection numbers (`recorder.reset()`)."""
        self.send(RESET)

    def dump(self) -> list[TrafficRow]:
        """The frames recorded since the last dump or reset (`recorder.dump()`), in order.

        >>> [row.message for row in proxy.dump() if row.source == "coordinator"]  # doctest: +SKIP
        ['Query(query=BEGIN)', 'Query(query=COMMIT)']
        """
        return parse_dump(self._exchange(DUMP))

    @contextlib.contextmanager
    def fault(self, command: str | Command, name: str | None = None) -> Iterator[None]:
        """Apply a rule for the duration of a `with` block, then `conn.allow()`; with
        `name`, add it as that named fault instead (`add_fault`) and remove just that one
        afterwards, leaving other faults alone.

        The fault is lifted even when the block raises; if lifting it fails too, the
        block's exception propagates with a note saying so.

        >>> with proxy.fault(conn.onQuery(query="^COMMIT").kill()):    # doctest: +SKIP
        ...     cursor.execute("COMMIT")
        >>> with proxy.fault("onQuery().delay(100)", name="slow"):     # doctest: +SKIP
        ...     cursor.execute("SELECT 1")
        """
        if name is None:
            self.send(command)
            lift, lifting = self.allow, ALLOW
        else:
            self.add_fault(name, command)
            lifting = f"faults.remove({render_literal(name)})"

            def lift() -> None:
                self.remove_fault(name)
        try:
            yield
        except BaseException as exc:
            try:
                lift()
            except WirefaultError as restore_error:
                exc.add_note(f"wirefault: could not restore {lifting}: {restore_error}")
            raise
        lift()

    @property
    def url(self) -> str | None:
        """The proxy's API URL as given, None for a FIFO client."""
        return self.fifo_path if self._http is not None else None

    def _exchange(self, text: str) -> str:
        deadline = transport.Deadline(self.timeout)
        if self._http is not None:
            return _strip_final_newline(self._http.exchange(text, deadline))
        with transport.thread_lock(self._lock, self.fifo_path, deadline), \
                transport.exclusive_lock(self.fifo_path, deadline):
            reply = transport.exchange(self.fifo_path, (text + "\n").encode("utf-8"), deadline)
        return _strip_final_newline(reply.decode("utf-8", "replace"))


def _strip_final_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def _is_dump(text: str) -> bool:
    """Whether the command's reply is data (not an error): recorder.dump(), proxy.status(),
    faults.list()."""
    from wirefault.proxy import dsl

    try:
        parsed = dsl.parse(text, "raw")  # these commands are the same for every protocol
    except dsl.CommandError:
        return False
    return (isinstance(parsed, dsl.RecorderCommand) and parsed.name == "dump") or \
        (isinstance(parsed, dsl.ProxyCommand) and parsed.name == "status") or \
        (isinstance(parsed, dsl.FaultCommand) and parsed.op == "list")


# -- faults.list() and proxy.status() ----------------------------------------------------------

_FAULT_FIELDS = ("name", "matched", "fired", "added", "state")
_LAST_FIELD = "command="


def parse_faults(reply: str) -> list[FaultInfo]:
    """Parse `faults.list()`'s reply: one line per fault, space-separated `key=value`,
    `command=` last (its value runs to the end of the line). Keys it does not know are
    skipped, so a newer proxy may say more.

    >>> parse_faults('name=slow matched=12 fired=3 added=2026-12-02T01:02:03.456Z '
    ...              'state=active command=faults.add("slow").onQuery().delay(50)')[0].fired
    3
    >>> parse_faults("")
    []
    """
    lines = reply.split("\n") if reply else []
    infos = []
    for line in lines:
        info = _fault_line(line)
        if info is None:
            if len(lines) == 1:  # a single line that is no fault: the proxy's error
                raise CommandError(line, LIST_FAULTS)
            raise WirefaultError(f"unexpected line in the reply to {LIST_FAULTS}: {line!r}")
        infos.append(info)
    return infos


def _fault_line(line: str) -> FaultInfo | None:
    head, separator, command = line.partition(_LAST_FIELD)
    # `command=` must start a field: at the line's start or after a space.
    if not separator or (head and not head.endswith(" ")):
        return None
    fields: dict[str, str] = {}
    for item in head.split():
        key, equals, value = item.partition("=")
        if not equals:
            return None
        fields[key] = value
    if any(key not in fields for key in _FAULT_FIELDS):
        return None
    matched, fired = fields["matched"], fields["fired"]
    added = _utc_timestamp(fields["added"])
    if not (matched.isdigit() and fired.isdigit()) or added is None:
        return None
    return FaultInfo(fields["name"], int(matched), int(fired), added, fields["state"], command)


def _utc_timestamp(text: str) -> datetime | None:
    if not text.endswith("Z"):
        return None
    try:
        moment = datetime.fromisoformat(text[:-1])
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else None


def format_timestamp(moment: datetime) -> str:
    """`added` as the proxy writes it: `2026-12-02T01:02:03.456Z`."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_status(reply: str) -> dict[str, int]:
    """Parse `proxy.status()`'s reply, `connections=N handlers=N ...`, in its order.

    >>> parse_status("connections=1 handlers=1 tasks=5 fired=2 faults=1")["faults"]
    1
    """
    status: dict[str, int] = {}
    for item in reply.split():
        key, equals, value = item.partition("=")
        if not (key and equals and re.fullmatch(r"-?\d+", value)):
            raise CommandError(reply, STATUS)  # not a status line: the proxy's error
        status[key] = int(value)
    if not status:
        raise WirefaultError(f"empty reply to {STATUS}")
    return status


# -- COPY text format -----------------------------------------------------------------------

_COPY_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.DOTALL)
_COPY_LETTERS = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def copy_unescape(field: str) -> str:
    """Undo PostgreSQL's COPY text escapes (`\\\\`, `\\t`, `\\n`, `\\r`, octal, `\\x`...).

    >>> copy_unescape(r"a\\tb\\\\n")
    'a\\tb\\\\n'
    """

    def replace(match: re.Match[bytes]) -> bytes:
        octal, hexadecimal, other = match.groups()
        if octal:
            return bytes([int(octal, 8) & 0xFF])
        if hexadecimal:
            return bytes([int(hexadecimal, 16)])
        return _COPY_LETTERS.get(other, other)

    # Octal and hex escapes denote bytes, so unescape bytes and decode at the end.
    raw = _COPY_ESCAPE.sub(replace, field.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "backslashreplace")


def copy_escape(text: str) -> str:
    """Escape a value for COPY text format (the inverse of `copy_unescape`)."""
    return (text.replace("\\", "\\\\").replace("\t", "\\t")
            .replace("\n", "\\n").replace("\r", "\\r"))


def parse_dump(reply: str) -> list[TrafficRow]:
    """Parse `recorder.dump()`'s reply: `conn<TAB>source<TAB>message` rows, COPY-escaped.

    >>> parse_dump("0\\tcoordinator\\tQuery(query=SELECT 1)")
    [TrafficRow(conn=0, source='coordinator', message='Query(query=SELECT 1)')]
    """
    rows = []
    lines = reply.split("\n") if reply else []
    for line in lines:
        fields = line.split("\t")
        if len(fields) != 3 or not re.fullmatch(r"-?\d+", fields[0]):
            if len(lines) == 1:  # a single line that is no row: the proxy's error
                raise CommandError(line, DUMP)
            raise WirefaultError(f"unexpected line in the reply to {DUMP}: {line!r}")
        conn, source, message = fields
        rows.append(TrafficRow(int(conn), copy_unescape(source), copy_unescape(message)))
    return rows


def format_copy(rows: list[TrafficRow]) -> str:
    """Rows back in COPY text format, one per line (with a final newline when non-empty)."""
    return "".join(f"{row.conn}\t{copy_escape(row.source)}\t{copy_escape(row.message)}\n"
                   for row in rows)


__all__ = [
    "DEFAULT_TIMEOUT",
    "FaultInfo",
    "FaultProxy",
    "TrafficRow",
    "copy_escape",
    "copy_unescape",
    "format_copy",
    "format_timestamp",
    "parse_dump",
    "parse_faults",
    "parse_status",
]
