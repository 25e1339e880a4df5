"""Incremental framing of a PostgreSQL connection, one framer per direction.

Framing only finds boundaries and names each frame (type byte, plus the state a few names
need); fields are decoded later, lazily, by `Frame.fields`. The hot loop reads each header
with one `struct.unpack_from` at an offset into the read, and slices each frame once.

The two framers of a session share the connection's state: the client's first message is
untyped; an SSLRequest / GSSENCRequest makes the server answer one byte; an accepted one makes
both directions encrypted (passed on opaque); the server's last Authentication request tells
which message a client 'p' is; after a CancelRequest the connection carries nothing else.
"""

from __future__ import annotations

import struct

from ._pg_messages import (
    AUTHENTICATION_BY_CODE,
    CATALOGUE,
    UNTYPED_BY_CODE,
    shared_type_bytes,
    typed_table,
)
from ._pg_scan import scan
from .base import BACKEND, FRONTEND, OPAQUE, PROTOCOL_ERROR, Frame, MessageSpec
from .batch import FrameBatch, FrameRun, Segment, TypeTable

DEFAULT_MAX_FRAME = 1 << 30
"""The largest frame (type byte and length included) framed by default: 1 GiB."""
MAX_STARTUP_PACKET = 10000
"""PostgreSQL refuses longer untyped startup packets (MAX_STARTUP_PACKET_LENGTH), so a
longer one is an error here too, before anything is buffered."""
TLS_HANDSHAKE_RECORD = 0x16
"""First byte of a TLS ClientHello: a client using direct TLS (PostgreSQL 17's
sslnegotiation=direct) starts with it instead of a startup packet."""

_HEADER = struct.Struct(">BI")
_INT32 = struct.Struct(">I")

# What a direction expects next.
_STARTUP = 0  # the client's untyped first message
_TYPED = 1  # typed messages
_ANSWER = 2  # the server's one-byte answer to SSLRequest / GSSENCRequest
_WAITING = 3  # the client awaits that answer: it must not send
_CLOSED = 4  # after a CancelRequest: nothing more
_OPAQUE = 5  # encrypted, or given up after a protocol error: reads passed on as they come

_AUTH_SASL, _AUTH_SASL_CONTINUE = 10, 11
_AUTH_GSS_FAMILY = frozenset({7, 8, 9})  # GSS, GSSContinue, SSPI: answered by GSSResponse

_FRONTEND_TABLE = TypeTable(typed_table(FRONTEND))
_BACKEND_TABLE = TypeTable(typed_table(BACKEND))
_FRONTEND_SHARED = shared_type_bytes(FRONTEND)  # 'p'
_BACKEND_SHARED = shared_type_bytes(BACKEND)  # 'R'
_ANSWERS = {
    "SSLRequest": (CATALOGUE["SSLResponse"], ord("S")),
    "GSSENCRequest": (CATALOGUE["GSSENCResponse"], ord("G")),
}


class _Violation(Exception):
    """The input breaks the protocol; the message explains how."""


class PgFramer:
    """Frames one direction of a PostgreSQL connection (see `base.Framer`)."""

    __slots__ = (
        "_answer_to",
        "_encrypted",
        "_max_frame",
        "_max_length",
        "_mode",
        "_need",
        "_pending",
        "_session",
        "_shared",
        "_table",
        "from_client",
    )

    def __init__(self, session: PgSession, from_client: bool, max_frame: int) -> None:
        self._session = session
        self.from_client = from_client
        self._max_frame = max_frame
        self._max_length = max_frame - 1  # the Int32 length excludes the type byte
        self._table = _FRONTEND_TABLE if from_client else _BACKEND_TABLE
        self._shared = _FRONTEND_SHARED if from_client else _BACKEND_SHARED
        self._mode = _STARTUP if from_client else _TYPED
        self._pending = bytearray()
        self._need = 0  # the pending frame's total size, 0 while its header is incomplete
        self._encrypted = False
        self._answer_to = ""

    @property
    def buffered(self) -> int:
        """Bytes held for a partial frame."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[Frame]:
        """The frames completed by this read, in order. Never raises."""
        return self.feed_batch(data).frames()

    def feed_batch(self, data: bytes) -> FrameBatch:
        """`feed`, with runs of ordinary messages kept compact (see `batch`)."""
        segments: list[Segment] = []
        if type(data) is not bytes:
            data = bytes(data)
        if self._pending:
            pos = self._resume(data, segments)
            if pos is None:
                return FrameBatch(segments)
        else:
            pos = 0
        if self._mode == _TYPED:  # the common case, without the general loop's calls
            pos = self._frame_typed(data, pos, segments)
            if pos == len(data):
                return FrameBatch(segments)
        self._frame_from(data, pos, segments)
        return FrameBatch(segments)

    def feed_whole(self, data: bytes) -> tuple[bytes, bytes, TypeTable] | None:
        """A read made only of whole messages of plain types, with nothing held before it:
        their type bytes and end offsets (as `scan` gives them) and the table naming them,
        the read framed (`feed_batch` would give these as one run, or one frame). None, and
        nothing changed, for any other read: the caller then feeds it."""
        if self._mode != _TYPED or self._pending or type(data) is not bytes:
            return None
        table = self._table
        stop, types, ends = scan(data, 0, table.plain, self._max_length)
        if stop != len(data) or not types:
            return None
        return types, ends, table

    # --- the common case ------------------------------------------------------------------

    def _frame_typed(self, data: bytes, pos: int, frames: list[Segment]) -> int:
        """Frames complete typed messages with a plain type byte from `pos`, as one run;
        stops at the first one needing more thought (partial, shared or unknown type, bad
        length)."""
        table = self._table
        stop, types, ends = scan(data, pos, table.plain, self._max_length)
        if len(types) > 1:
            frames.append(FrameRun(data, pos, stop, types, ends, table, self.from_client))
        elif types:  # one frame (a request, say): a Frame costs less than a run of one
            spec = table.specs[types[0]]
            frames.append(Frame(spec.name, data[pos:stop], (pos, stop), self.from_client, spec))
        return stop

    # --- everything else ------------------------------------------------------------------

    def _frame_from(self, data: bytes, pos: int, frames: list[Segment]) -> None:
        end_of_read = len(data)
        while pos < end_of_read:
            if self._mode == _TYPED:
                pos = self._frame_typed(data, pos, frames)
                if pos == end_of_read:
                    return
            try:
                pos = self._step(data, pos, frames)
            except _Violation as violation:
                self._fail(str(violation), data[pos:], (pos, end_of_read), frames)
                return

    def _step(self, data: bytes, pos: int, frames: list[Segment]) -> int:
        """Frames what comes at `pos` in the current mode; returns where to go on."""
        mode = self._mode
        if mode == _TYPED:
            return self._one_frame(data, pos, frames, 5)
        if mode == _STARTUP:
            if data[pos] == TLS_HANDSHAKE_RECORD:
                self._session.encrypt()
                return self._step(data, pos, frames)
            return self._one_frame(data, pos, frames, 4)
        if mode == _ANSWER:
            return self._answer(data, pos, frames)
        if mode == _OPAQUE:
            frames.append(Frame(OPAQUE, data[pos:], (pos, len(data)), self.from_client,
                                encrypted=self._encrypted))
            return len(data)
        if mode == _WAITING:
            raise _Violation(f"client sent data before the server answered its {self._answer_to}")
        raise _Violation("data after a CancelRequest, which ends the connection")

    def _one_frame(self, data: bytes, pos: int, frames: list[Segment], header: int) -> int:
        """One frame at `pos` (a `header`-byte header): framed, or kept until complete."""
        end_of_read = len(data)
        if end_of_read - pos < header:
            if header == 5:  # a bad type byte is known before the rest of the header
                self._check_type_byte(data[pos])
            self._hold(data[pos:], 0)
            return end_of_read
        total = self._declared_total(data, pos)
        end = pos + total
        if end > end_of_read:
            self._hold(data[pos:], total)
            return end_of_read
        self._complete(data[pos:end], (pos, end), frames)
        return end

    def _declared_total(self, buf: bytes | bytearray, pos: int) -> int:
        """The whole size of the frame whose header is at `pos`, once the header is checked."""
        if self._mode == _STARTUP:
            (length,) = _INT32.unpack_from(buf, pos)
            limit = min(self._max_frame, MAX_STARTUP_PACKET)
            if length < 8:
                raise _Violation(f"startup packet length {length} is below 8")
            if length > limit:
                raise _Violation(f"startup packet length {length} is over the limit {limit}")
            return length
        type_byte, length = _HEADER.unpack_from(buf, pos)
        self._check_type_byte(type_byte)
        if length < 4:
            raise _Violation(f"message length {length} is below 4")
        if length + 1 > self._max_frame:
            raise _Violation(f"message length {length} is over the limit {self._max_frame}")
        if type_byte == ord("R") and not self.from_client and length < 8:
            raise _Violation(f"Authentication message length {length} has no room for a code")
        return length + 1

    def _check_type_byte(self, type_byte: int) -> None:
        if self._table[type_byte] is None and type_byte not in self._shared:
            side = "client" if self.from_client else "server"
            raise _Violation(f"unknown message type byte {type_byte:#04x} "
                             f"({chr(type_byte)!r}) from the {side}")

    def _hold(self, partial: bytes, total: int) -> None:
        self._pending = bytearray(partial)
        self._need = total

    def _resume(self, data: bytes, frames: list[Segment]) -> int | None:
        """Completes the pending frame with this read; returns where framing goes on in
        `data`, or None when the read was used up (kept, or passed after an error)."""
        pending = self._pending
        used = 0
        try:
            if not self._need:
                header = 4 if self._mode == _STARTUP else 5
                used = min(header - len(pending), len(data))
                pending += data[:used]
                if len(pending) < header:
                    return None
                self._need = self._declared_total(pending, 0)
            take = min(self._need - len(pending), len(data) - used)
            pending += data[used:used + take]
            used += take
            if len(pending) < self._need:
                return None
            frame = bytes(pending)
            self._hold(b"", 0)
            self._complete(frame, (0, used), frames)
        except _Violation as violation:
            self._fail(str(violation), bytes(pending) + data[used:], (0, len(data)), frames)
            return None
        return used

    def _complete(self, frame: bytes, span: tuple[int, int], frames: list[Segment]) -> None:
        """Names a complete frame (mode-dependent) and follows what it does to the state."""
        if self._mode == _STARTUP:
            spec = self._session.client_first_message(frame)
        else:
            spec = self._table[frame[0]] or self._resolve_shared(frame)
        frames.append(Frame(spec.name, frame, span, self.from_client, spec))

    def _resolve_shared(self, frame: bytes) -> MessageSpec:
        if self.from_client:  # 'p': which one, only the authentication state tells
            return self._session.password_family_message()
        (code,) = _INT32.unpack_from(frame, 5)  # 'R': the code names the request
        spec = AUTHENTICATION_BY_CODE.get(code)
        if spec is None:
            raise _Violation(f"unknown authentication request code {code}")
        self._session.last_authentication = code
        return spec

    def _answer(self, data: bytes, pos: int, frames: list[Segment]) -> int:
        """The server's one-byte answer to SSLRequest / GSSENCRequest."""
        spec, accepted = _ANSWERS[self._answer_to]
        answer = data[pos]
        if answer == ord("E"):  # an ErrorResponse instead (e.g. too many connections)
            self._mode = _TYPED
            return pos
        if answer not in (accepted, ord("N")):
            raise _Violation(f"unexpected answer {bytes([answer])!r} to {self._answer_to}")
        frames.append(Frame(spec.name, data[pos:pos + 1], (pos, pos + 1), False, spec))
        if answer == accepted:
            self._session.encrypt()
        else:
            self._session.refused()
        return pos + 1

    def _fail(self, error: str, data: bytes, span: tuple[int, int], frames: list[Segment]) -> None:
        frames.append(Frame(PROTOCOL_ERROR, data, span, self.from_client, error=error))
        self._hold(b"", 0)
        self._mode = _OPAQUE
        self._encrypted = False


class PgSession:
    """Both directions of one PostgreSQL connection, sharing the connection's state."""

    __slots__ = ("client", "last_authentication", "server")

    def __init__(self, max_frame: int | None = None) -> None:
        limit = DEFAULT_MAX_FRAME if max_frame is None else max_frame
        self.last_authentication: int | None = None
        """The code of the server's last Authentication request (None: none yet)."""
        self.client = PgFramer(self, True, limit)
        self.server = PgFramer(self, False, limit)

    def client_first_message(self, frame: bytes) -> MessageSpec:
        """Names the client's untyped message and moves both sides on accordingly."""
        (code,) = _INT32.unpack_from(frame, 4)
        name = UNTYPED_BY_CODE.get(code)
        if name is None:
            if code >> 16 != 3:
                raise _Violation(f"unsupported protocol version or request code {code}")
            self.client._mode = _TYPED
            return CATALOGUE["StartupMessage"]
        if name == "CancelRequest":
            self.client._mode = self.server._mode = _CLOSED
        else:  # SSLRequest, GSSENCRequest: the server answers one byte, the client waits
            self.client._mode, self.server._mode = _WAITING, _ANSWER
            self.client._answer_to = self.server._answer_to = name
        return CATALOGUE[name]

    def password_family_message(self) -> MessageSpec:
        """The message a client 'p' is, after the server's last Authentication request."""
        last = self.last_authentication
        if last == _AUTH_SASL:
            return CATALOGUE["SASLInitialResponse"]
        if last == _AUTH_SASL_CONTINUE:
            return CATALOGUE["SASLResponse"]
        if last in _AUTH_GSS_FAMILY:
            return CATALOGUE["GSSResponse"]
        return CATALOGUE["PasswordMessage"]

    def encrypt(self) -> None:
        """TLS or GSSAPI encryption starts: both directions become opaque."""
        for framer in (self.client, self.server):
            framer._hold(b"", 0)
            framer._mode = _OPAQUE
            framer._encrypted = True

    def refused(self) -> None:
        """The server refused encryption: the client sends its StartupMessage next."""
        self.client._mode = _STARTUP
        self.server._mode = _TYPED


def new_session(max_frame: int | None = None) -> PgSession:
    """A fresh connection's framers (max_frame None: 1 GiB)."""
    return PgSession(max_frame)
