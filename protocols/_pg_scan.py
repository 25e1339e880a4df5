"""The walk over a run of ordinary PostgreSQL typed messages, native when it was built.

`scan(data, pos, plain, max_length) -> (stop, types, ends)`: from `pos`, every complete
message whose type byte is plain (`plain[type_byte]` nonzero: one message in this direction)
and whose length field lies in 4..max_length; stops at the first other one. `types` holds
each message's type byte, `ends` each message's end offset in `data` (native int64s, read
with `memoryview(ends).cast("q")`), `stop` where the walk stopped. `max_length` may be any
int: negative accepts no message, as 0 does, and beyond 2**32 - 1 every length.

The C version (`_pg_scan.c`, built by `pip install`) does in nanoseconds what costs about
0.3 microseconds per message here; `scan_python` is the same walk, used where no compiler
was available, and the reference the tests hold the native one to.
"""

from __future__ import annotations

import struct
from array import array

_HEADER = struct.Struct(">BI")


def scan_python(data: bytes, pos: int, plain: bytes, max_length: int
                ) -> tuple[int, bytes, bytes]:
    # Any int is a position or a limit, as in C; checking the types too (the framer's are
    # always bytes and int, which C checks) would cost this fallback a fifth per call.
    if not 0 <= pos <= len(data):
        raise ValueError("scan: pos is outside data")
    size = len(data)
    unpack = _HEADER.unpack_from
    types = bytearray()
    ends = array("q")
    while size - pos >= 5:
        type_byte, length = unpack(data, pos)
        if not plain[type_byte] or length < 4 or length > max_length:
            break
        end = pos + 1 + length
        if end > size:
            break
        types.append(type_byte)
        ends.append(end)
        pos = end
    return pos, bytes(types), ends.tobytes()


try:
    from ._pg_scan_native import scan
except ImportError:  # built without a C compiler
    scan = scan_python
    NATIVE = False
else:
    NATIVE = True
