"""Raw bytes: no framing, each read is one frame of type `Data`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import BACKEND, FRONTEND, Frame, MessageSpec, ProtocolSpec
from .batch import FrameBatch

DEFAULT_MAX_FRAME = 1 << 30


def _decode_data(data: bytes) -> dict[str, Any]:
    return {"data": data}


def _encode_data(data: bytes = b"") -> bytes:
    return bytes(data)


DATA = MessageSpec(
    name="Data",
    directions=frozenset({FRONTEND, BACKEND}),
    fields=("data",),
    decode=_decode_data,
    encode=_encode_data,
    doc="The bytes of one read.",
)


class RawFramer:
    """Every non-empty read is one `Data` frame."""

    __slots__ = ("from_client",)

    def __init__(self, from_client: bool) -> None:
        self.from_client = from_client

    @property
    def buffered(self) -> int:
        return 0

    def feed(self, data: bytes) -> list[Frame]:
        if not data:
            return []
        return [Frame("Data", bytes(data), (0, len(data)), self.from_client, DATA)]

    def feed_batch(self, data: bytes) -> FrameBatch:
        return FrameBatch(self.feed(data))


@dataclass
class RawSession:
    client: RawFramer
    server: RawFramer


def new_session(max_frame: int | None = None) -> RawSession:
    return RawSession(RawFramer(True), RawFramer(False))


PROTOCOL = ProtocolSpec(
    name="raw",
    messages={"Data": DATA},
    new_session=new_session,
    default_max_frame=DEFAULT_MAX_FRAME,
    description="No framing: each TCP read is one Data frame.",
    client_speaks_first=False,  # anything may run over raw TCP, a server's greeting too
)
