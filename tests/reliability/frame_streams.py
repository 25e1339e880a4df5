"""Hostile client streams for the frames part (input_frames.py): valid frames generated from
each protocol's catalogue, then mutated, and what a framer must make of them.

A hostile connection is: an opening that names it (`hostile-N`), a run of valid frames drawn
from a pool built with the catalogue's own encoders, then one mutation (a bad type byte, a
length below the minimum, a declared length over the frame cap, garbage, a truncated frame,
a shifted length, or none). What the proxy's recorder must show for it is what a fresh
framer of the same protocol makes of the same bytes fed at once (`expected_types`): the
proxy reads them in whatever pieces TCP gives, so the two agree only if framing does not
depend on how the stream was split.

Kept apart from input_frames.py so the hostile client's subprocess imports no proxy code
beyond the protocols.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

from wirefault import protocols
from wirefault.protocols import FRONTEND, PROTOCOL_ERROR
from wirefault.protocols import wallaroo as w

MAX_FRAME = 1 << 20
"""The frame cap the proxies of the part run with (`--max-frame`): a declared length past it
is a protocol error, one below it is buffered until the frame completes or the client goes."""

MUTATIONS = ("none", "type byte", "short length", "huge length", "garbage", "truncated",
             "long length", "shifted length")
"""What ends a hostile connection's stream; the first five of the mutated ones must show as a
ProtocolError (`MUST_FAIL`), the others as whatever the framer makes of them."""
MUST_FAIL = frozenset({"type byte", "short length", "huge length", "garbage"})

HEALTHY_NAME = "healthy-loop"
"""The healthy connection's name in its opening, which the upstream recognises."""


def _text(rng: random.Random) -> str:
    # mostly small, as real traffic is; 1 in 50 past the recorder's 2 KiB (its cut copies)
    size = 3000 if rng.random() < 0.02 else rng.choice((0, 1, 5, 12, 40, 40, 200))
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz é€'\"\\\t\n") for _ in range(size))


def _blob(rng: random.Random) -> bytes:
    draw = rng.random()  # 1 in 200 spans many reads; 1 in 50 is past 2 KiB
    size = 40_000 if draw < 0.005 else 3000 if draw < 0.02 else rng.choice((0, 1, 8, 40, 300))
    return rng.randbytes(size)


def _formats(rng: random.Random) -> list[int]:
    return [rng.randint(0, 1) for _ in range(rng.randint(0, 4))]


def _nullables(rng: random.Random) -> list[bytes | None]:
    return [None if rng.random() < 0.2 else rng.randbytes(rng.randint(0, 20))
            for _ in range(rng.randint(0, 5))]


_U32: Callable[[random.Random], int] = lambda rng: rng.getrandbits(32)  # noqa: E731
_PG_FIELDS: dict[str, Callable[[random.Random], Any]] = {
    "portal": _text, "statement": _text, "name": _text, "query": _text, "message": _text,
    "password": _text, "mechanism": _text, "data": _blob,
    "parameter_formats": _formats, "result_formats": _formats, "argument_formats": _formats,
    "parameters": _nullables, "arguments": _nullables,
    "kind": lambda rng: rng.choice("SP"), "max_rows": _U32, "function_oid": _U32,
    "result_format": lambda rng: rng.randint(0, 1),
    "parameter_types": lambda rng: [rng.getrandbits(32) for _ in range(rng.randint(0, 4))],
}
_PG_UNTYPED = frozenset({"StartupMessage", "SSLRequest", "GSSENCRequest", "CancelRequest"})
_PG_SKIPPED = frozenset({"Terminate", "GSSResponse", "SASLInitialResponse", "SASLResponse"})
"""Terminate: the recorder leaves it out; the 'p' family: one byte, named by the server's
authentication request, which a sink never sends (PasswordMessage stands for them)."""


def _pg_pool(rng: random.Random, size: int) -> list[bytes]:
    specs = [spec for name, spec in protocols.get("postgres").messages.items()
             if FRONTEND in spec.directions and name not in _PG_UNTYPED | _PG_SKIPPED]
    pool = []
    for _ in range(size):
        spec = rng.choice(specs)
        fields = {name: _PG_FIELDS[name](rng) for name in spec.fields}
        pool.append(spec.encode(**fields))
    return pool


def _w_text(rng: random.Random) -> str:
    return _text(rng)[:200]


def _w_u64(rng: random.Random) -> int:
    return rng.getrandbits(64)


def _w_fields(name: str, rng: random.Random) -> dict[str, Any]:
    if name == "Message":
        flags = rng.choice(w.LEGAL_FLAG_VALUES)
        return {"stream_id": rng.randint(1, 5), "flags": flags,
                "message_id": None if flags & w.Flag.EPHEMERAL else _w_u64(rng),
                "event_time": rng.getrandbits(63) if flags & w.Flag.EVENT_TIME else None,
                "key": _w_text(rng) if flags & w.Flag.KEY and not flags & w.Flag.BOUNDARY
                else None,
                "payload": None if flags & w.Flag.BOUNDARY else _blob(rng)}
    two_pc = {"stream_id": 0, "flags": 0, "message_id": _w_u64(rng)}
    shapes: dict[str, Callable[[], dict[str, Any]]] = {
        "Hello": lambda: {"version": _w_text(rng), "cookie": _w_text(rng),
                          "program_name": _w_text(rng), "instance_name": _w_text(rng)},
        "Notify": lambda: {"stream_id": _w_u64(rng), "stream_name": _w_text(rng),
                           "point_of_ref": _w_u64(rng)},
        "EosMessage": lambda: {"stream_id": _w_u64(rng),
                               "message_id": rng.choice((None, _w_u64(rng)))},
        "ListUncommitted": lambda: {**two_pc, "rtag": _w_u64(rng)},
        "TwoPCPhase1": lambda: {**two_pc, "txn_id": _w_text(rng), "ranges": [
            {"stream_id": _w_u64(rng), "start_por": _w_u64(rng), "end_por": _w_u64(rng)}
            for _ in range(rng.randint(0, 3))]},
        "TwoPCPhase2": lambda: {**two_pc, "txn_id": _w_text(rng), "commit": rng.randint(0, 1)},
    }
    return shapes[name]()


def _wallaroo_pool(rng: random.Random, size: int) -> list[bytes]:
    names = [name for name, spec in w.MESSAGES.items() if FRONTEND in spec.directions]
    return [w.encode(name, **_w_fields(name, rng))
            for name in (rng.choice(names) for _ in range(size))]


def frame_pool(protocol: str, rng: random.Random, size: int = 1500) -> list[bytes]:
    """Valid client frames of `protocol`, each from a catalogue message's encoder (raw: the
    PostgreSQL ones, as bytes nobody frames)."""
    if protocol == "wallaroo":
        return _wallaroo_pool(rng, size)
    return _pg_pool(rng, size)


def opening(protocol: str, name: str) -> bytes:
    """The first bytes of a connection, naming it: a StartupMessage's user, a Hello's
    program_name, a raw line."""
    if protocol == "postgres":
        return protocols.get("postgres").messages["StartupMessage"].encode(
            user=name, database="reliability")
    if protocol == "wallaroo":
        return w.encode("Hello", version="v1", cookie="c", program_name=name,
                        instance_name="i")
    return f"{name}\n".encode()


def _pg_bad_type(rng: random.Random) -> int:
    return rng.choice(_PG_BAD_TYPES)


def mutated_tail(protocol: str, kind: str, frame: bytes, rng: random.Random) -> bytes:
    """The bytes that end a hostile stream: `frame` (a valid one) mutated by `kind`."""
    length_at = 1 if protocol == "postgres" else 0
    if kind == "none":
        return frame
    if kind == "truncated":  # the client goes mid-frame
        return frame[:rng.randint(1, len(frame) - 1)]
    if kind == "garbage":
        junk = rng.randbytes(rng.randint(1, 5000))
        first = _pg_bad_type(rng) if protocol == "postgres" else 0
        if protocol == "wallaroo":  # length 0 is always wrong for Wallaroo
            return b"\0\0\0\0" + junk
        return bytes([first]) + junk
    if kind == "type byte":
        if protocol == "postgres":
            return bytes([_pg_bad_type(rng)]) + frame[1:]
        return frame[:4] + bytes([rng.choice([t for t in range(256) if t not in _W_TAGS])]) \
            + frame[5:]
    if kind == "short length":
        bad = rng.randint(0, 3) if protocol == "postgres" else 0
        return frame[:length_at] + struct.pack(">I", bad) + frame[length_at + 4:]
    if kind == "huge length":
        bad = rng.choice((MAX_FRAME + 1, 0x7FFFFFFF, 0xFFFFFFFF))
        return frame[:length_at] + struct.pack(">I", bad) + frame[length_at + 4:]
    (length,) = struct.unpack_from(">I", frame, length_at)
    if kind == "long length":  # declared longer, within the cap: held until the client goes
        bad = min(length + rng.randint(1, 1 << 16), MAX_FRAME - 2)
    else:  # "shifted length": the next header is read from inside this frame
        bad = max(length - rng.randint(1, 8), 5)
    return frame[:length_at] + struct.pack(">I", bad) + frame[length_at + 4:]


def _pg_type_byte(spec: Any) -> int:
    return spec.encode(**{name: _PG_FIELDS[name](random.Random(0)) for name in spec.fields})[0]


_PG_KNOWN = {_pg_type_byte(spec) for spec in protocols.get("postgres").messages.values()
             if FRONTEND in spec.directions and spec.name not in _PG_UNTYPED}
_PG_BAD_TYPES = [b for b in range(256) if b not in _PG_KNOWN]
_W_TAGS = frozenset(w._BY_TAG)  # the tags the framer knows


def hostile_stream(protocol: str, index: int, pool: list[bytes], rng: random.Random,
                   frames: int) -> tuple[bytes, str, int]:
    """Connection `index`'s whole stream, its mutation and how many valid frames it holds."""
    kind = MUTATIONS[index % len(MUTATIONS)]
    body = [rng.choice(pool) for _ in range(frames)]
    tail = mutated_tail(protocol, kind, rng.choice(pool), rng)
    if protocol == "raw":
        kind = "none"  # no framing: nothing is malformed
    return opening(protocol, f"hostile-{index}") + b"".join(body) + tail, kind, frames


def expected_types(protocol: str, stream: bytes) -> list[tuple[str, str]]:
    """(type, error) of each client frame a fresh framer makes of `stream` fed at once,
    without the types the recorder leaves out; error is '' but for a ProtocolError."""
    session = protocols.get(protocol).new_session(MAX_FRAME)
    out = []
    for frame in session.client.feed(stream):
        if frame.type == "Terminate":
            continue
        out.append((frame.type, frame.error or "" if frame.type == PROTOCOL_ERROR else ""))
    return out


def run_length(types: list[tuple[str, str]]) -> list[list[Any]]:
    """[[type, error, count], ...]: a connection's expectation, compact."""
    out: list[list[Any]] = []
    for type_name, error in types:
        if out and out[-1][0] == type_name and out[-1][1] == error:
            out[-1][2] += 1
        else:
            out.append([type_name, error, 1])
    return out
