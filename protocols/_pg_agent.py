"""The per-connection agent of PostgreSQL (see `base.ConnectionAgent`): the startup
parameters, the cancel key, the query behind each Bind / Execute / Describe / Close, and how
an injected `error()` is answered.

An injected ERROR on a client message must leave the server exactly as a real error would
(transaction block failed, the extended protocol skipping to the next Sync), which only the
server can do right. So the message is not forwarded: a substitute that makes the server
fail at once, with no side effect, goes instead, and the server's ErrorResponse to it is
rewritten into the injected one on its way back. Each substitute names a token unique to
the injection, which the server's error message repeats (in any language), so the error
rewritten is exactly the substitute's, never a real one that came first in a pipeline:

| triggering client message               | substitute sent        | the server answers   |
|-----------------------------------------|------------------------|----------------------|
| Query                                   | Query `<token>`        | 42601, ReadyForQuery |
| Parse, Bind, Describe, Execute, Close   | Describe S `<token>`   | 26000                |
| Sync                                    | that Describe, Sync    | 26000, ReadyForQuery |
| Flush                                   | that Describe, Flush   | 26000                |
| FunctionCall                            | that Describe, Sync    | 26000, ReadyForQuery |
| CopyData, CopyDone, CopyFail            | CopyFail `<token>`     | 57014 (+ RFQ simple) |

(FunctionCall is answered with its own ReadyForQuery, hence the Sync: a Describe alone
would leave its client waiting.) A substitute the server skips (it was already discarding
to a Sync after a real error) is never answered; its token is dropped once a later one is.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import Any

from ._pg_messages import CATALOGUE
from ._pg_statements import StatementTracker
from .base import OPAQUE, PROTOCOL_ERROR, ErrorPlan, Frame

DEFAULT_CODE = "XX000"
DEFAULT_SEVERITY = "ERROR"
CLOSING_SEVERITIES = frozenset({"FATAL", "PANIC"})
MAX_OUTSTANDING = 64
"""Injected errors awaiting the server's answer to their substitute; older ones are
forgotten (each awaits an answer to one message, so more means skipped substitutes)."""

_ERROR_RESPONSE = CATALOGUE["ErrorResponse"]
_CANCEL_REQUEST = CATALOGUE["CancelRequest"]
_QUERY = CATALOGUE["Query"]
_DESCRIBE = CATALOGUE["Describe"]
_COPY_FAIL = CATALOGUE["CopyFail"]
_SYNC = CATALOGUE["Sync"].encode()
_FLUSH = CATALOGUE["Flush"].encode()

_EXTENDED = frozenset({"Parse", "Bind", "Describe", "Execute", "Close"})
_COPY_IN = frozenset({"CopyData", "CopyDone", "CopyFail"})
_TRACKED = frozenset({"Parse", "Bind", "Close", "Query"})
SKIM_TESTS: Mapping[str, tuple[re.Pattern[str], ...] | None] = {
    "Parse": None, "Bind": None, "Close": None, "StartupMessage": None,
    # What StatementTracker.simple_query looks for (its pre-check, word by word).
    "Query": (re.compile("discard", re.IGNORECASE), re.compile("deallocate", re.IGNORECASE)),
}
"""`skim_tests`: what a skimming agent must still see (see `PgAgent._skim`)."""
_GIVE_UP = frozenset({OPAQUE, PROTOCOL_ERROR})


def error_response(code: str, message: str, severity: str) -> bytes:
    """An ErrorResponse with only these fields (S and V both `severity`, C, M)."""
    return _ERROR_RESPONSE.encode(severity=severity, severity_nonlocalized=severity,
                                  code=code, message=message)


def _names_at(data: bytes, count: int) -> list[str] | None:
    """The first `count` NUL-terminated strings of a typed message's body, decoded as the
    catalogue decodes text; None when the body is too short. Bind's portal and statement
    come first: reading them this way skips decoding its parameters."""
    names = []
    at = 5
    for _ in range(count):
        end = data.find(b"\0", at)
        if end < 0:
            return None
        names.append(data[at:end].decode("utf-8", "surrogateescape"))
        at = end + 1
    return names


class PgAgent:
    """One PostgreSQL connection's agent.

    The proxy must call `observe` on a frame before the faults judge that frame and after
    they judged the frames before it (frame by frame, not a whole read first), because a
    Bind or Parse changes what the next Execute's `query` says.
    """

    __slots__ = (
        "_client_gave_up",
        "_key",
        "_next_token",
        "_outstanding",
        "_parameters",
        "_pending_close",
        "_ready",
        "_salt",
        "_server_gave_up",
        "_tracker",
        "skim_client",
        "skim_server",
        "started",
        "transaction_status",
        "watch_client",
        "watch_server",
    )

    skim_tests = SKIM_TESTS

    def __init__(self) -> None:
        self.watch_client = True
        self.watch_server = True
        self.skim_client = False
        self.skim_server = False  # the server's frames are watched for errors to rewrite
        self.started = False
        self.transaction_status: str | None = None
        """The status byte of the last ReadyForQuery seen (I, T or E; None: none yet).
        Followed only while the server is watched."""
        self._parameters: dict[str, str] = {}
        self._key: tuple[int, Any] | None = None
        self._ready = False  # the first ReadyForQuery came: the startup is over
        self._tracker: StatementTracker | None = None
        self._pending_close: tuple[str, str] | None = None
        # token -> the ErrorResponse its substitute's error becomes, oldest first
        self._outstanding: dict[str, bytes] = {}
        self._salt = secrets.token_hex(4)
        self._next_token = 0
        self._client_gave_up = False
        self._server_gave_up = False

    # --- the proxy's switches ---------------------------------------------------------------

    @property
    def track_statements(self) -> bool:
        return self._tracker is not None

    @track_statements.setter
    def track_statements(self, on: bool) -> None:
        if on:
            if self._tracker is None:
                self._tracker = StatementTracker()
            self.watch_client = not self._client_gave_up
        else:
            # Statements seen so far would be stale once tracking resumes, so they go.
            self._tracker = None
            self._pending_close = None
            self.watch_client = not self.started and not self._client_gave_up
        self._skim()

    def _skim(self) -> None:
        """Whether the client's frames may go by unobserved (`skim_client`): while tracking,
        after the startup, with no Close waiting to be applied and no unnamed statement or
        portal (which the next Query would drop), `observe` changes nothing for a frame
        `SKIM_TESTS` lets by: only Parse, Bind and Close define or remove statements, and a
        Query removes more only by DISCARD or DEALLOCATE."""
        tracker = self._tracker
        self.skim_client = (tracker is not None and self.started
                            and not self._client_gave_up and self._pending_close is None
                            and not tracker.has_unnamed())

    # --- frames -----------------------------------------------------------------------------

    def observe(self, frame: Frame) -> bytes | None:
        if frame.from_client:
            self._observe_client(frame)
            self._skim()
            return None
        return self._observe_server(frame)

    def _observe_client(self, frame: Frame) -> None:
        kind = frame.type
        tracker = self._tracker
        if tracker is not None:
            if self._pending_close is not None:
                # Removed only now, so the faults judging the Close could still read its query.
                tracker.close(*self._pending_close)
                self._pending_close = None
            if kind in _TRACKED:
                self._track(tracker, frame, kind)
                return
        if kind == "StartupMessage":
            parameters = frame.fields.get("parameters") or {}
            self._parameters = dict(parameters)
            self.started = True
            self.watch_client = tracker is not None
        elif kind in _GIVE_UP:
            self._give_up(frame, client=True)

    def _track(self, tracker: StatementTracker, frame: Frame, kind: str) -> None:
        if kind == "Bind":
            names = _names_at(frame.data, 2)
            if names is not None:
                tracker.bind(names[0], names[1])
            return
        fields = frame.fields
        if kind == "Parse":
            if "query" in fields:
                tracker.parse(fields["statement"], fields["query"])
        elif kind == "Close":
            if "kind" in fields:
                self._pending_close = (fields["kind"], fields["name"])
        elif "query" in fields:  # Query
            tracker.simple_query(fields["query"])

    def _observe_server(self, frame: Frame) -> bytes | None:
        kind = frame.type
        if kind == "ReadyForQuery":
            data = frame.data
            if len(data) > 5:
                self.transaction_status = chr(data[5])
            if not self._ready:
                self._ready = True
                self.watch_server = bool(self._outstanding)
        elif kind == "ErrorResponse":
            if self._outstanding:
                return self._rewrite(frame)
        elif kind == "BackendKeyData":
            fields = frame.fields
            if "pid" in fields:
                self._key = (fields["pid"], fields["secret_key"])
        elif kind in _GIVE_UP:
            self._give_up(frame, client=False)
        return None

    def _rewrite(self, frame: Frame) -> bytes | None:
        """The injected ErrorResponse when `frame` answers a substitute; None otherwise."""
        message = frame.fields.get("message")
        if not message:
            return None
        outstanding = self._outstanding
        for token in outstanding:
            if token in message:
                break
        else:
            return None
        # The server answers in order, so the substitutes sent before this one were skipped.
        while True:
            first = next(iter(outstanding))
            reply = outstanding.pop(first)
            if first == token:
                break
        self.watch_server = not self._ready or bool(outstanding)
        return reply

    def _give_up(self, frame: Frame, client: bool) -> None:
        """Encrypted, or unframed after a protocol error: nothing more can be read there."""
        both = frame.encrypted
        if not self.started:
            self.started = True  # parameters stay as they are: where() decides on them now
        if client or both:
            self._client_gave_up = True
            self.watch_client = False
            self._tracker = None
            self._pending_close = None
            self.skim_client = False
        if not client or both:
            self._server_gave_up = True
            self.watch_server = False
            self._outstanding.clear()

    # --- what the faults ask ----------------------------------------------------------------

    def parameters(self) -> Mapping[str, str]:
        return self._parameters

    def derived_field(self, frame: Frame, name: str) -> str | None:
        tracker = self._tracker
        if tracker is None or name != "query":
            return None
        kind = frame.type
        if kind == "Execute":
            portal = frame.fields.get("portal")
            return None if portal is None else tracker.portal_query(portal)
        if kind == "Bind":
            names = _names_at(frame.data, 2)
            return None if names is None else tracker.statement_query(names[1])
        if kind in ("Describe", "Close"):
            fields = frame.fields
            target = fields.get("kind")
            if target == "S":
                return tracker.statement_query(fields["name"])
            if target == "P":
                return tracker.portal_query(fields["name"])
        return None

    def error_plan(self, frame: Frame, code: str | None, message: str | None,
                   severity: str | None) -> ErrorPlan:
        """How `error()` answers `frame` (see the module's docstring).

        FATAL and PANIC, a server frame, Terminate, anything before the startup is over (the
        first ReadyForQuery) and anything that is neither typed nor known: the client gets
        the ErrorResponse and the connection closes, the frame going nowhere. An encrypted
        stream cannot carry a plaintext reply: it only closes."""
        code = code or DEFAULT_CODE
        if message is None:
            message = f"wirefault: injected error {code}"
        severity = (severity or DEFAULT_SEVERITY).upper()
        if frame.encrypted:
            return ErrorPlan(to_server=b"", to_client=b"", close=True)
        reply = error_response(code, message, severity)
        if not frame.from_client or severity in CLOSING_SEVERITIES or not self._ready \
                or self._server_gave_up:
            return ErrorPlan(to_server=b"", to_client=reply, close=True)
        token = f"wirefault_injected_{self._salt}_{self._next_token}"
        substitute = _substitute(frame.type, token)
        if substitute is None:
            return ErrorPlan(to_server=b"", to_client=reply, close=True)
        self._next_token += 1
        if frame.type == "Close":
            self._pending_close = None  # the server keeps what this Close would have closed
            self._skim()
        outstanding = self._outstanding
        outstanding[token] = reply
        if len(outstanding) > MAX_OUTSTANDING:
            del outstanding[next(iter(outstanding))]
        self.watch_server = True
        return ErrorPlan(to_server=substitute, to_client=b"", close=False)

    def cancel_request(self) -> bytes | None:
        if self._key is None:
            return None
        pid, secret_key = self._key
        return _CANCEL_REQUEST.encode(pid=pid, secret_key=secret_key)


def _substitute(kind: str, token: str) -> bytes | None:
    """What goes to the server in place of a `kind` message so that it fails at once with
    an error naming `token`; None for the messages that have none."""
    if kind == "Query":
        # A lone identifier is a syntax error: raised before anything runs, even in a failed
        # transaction block, and it drops the unnamed statement and portal as a Query would.
        return _QUERY.encode(query=token)
    if kind in _EXTENDED:
        return _DESCRIBE.encode(kind="S", name=token)
    if kind == "Sync" or kind == "FunctionCall":
        return _DESCRIBE.encode(kind="S", name=token) + _SYNC
    if kind == "Flush":
        return _DESCRIBE.encode(kind="S", name=token) + _FLUSH
    if kind in _COPY_IN:
        # The server drops the CopyData / CopyDone the client goes on sending after it.
        return _COPY_FAIL.encode(message=token)
    return None
