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




LITERAL_ANCHORED = 1
LITERAL_FOLDED = 2
"""The flags of a literal test (`texts_pass`; made by `user_regex.literal_form`)."""


def literal_found(test: bytes, text: bytes) -> bool:
    """Whether a literal test (a flags byte, then the literal: lower case when folded) finds
    its literal in ASCII `text`: at its start when anchored, else anywhere; ASCII letters
    in either case when folded."""
    if not test:
        return True  # not a test: the read goes the general way
    flags, literal = test[0], test[1:]
    if flags & LITERAL_FOLDED:
        text = text.lower()  # bytes.lower() folds ASCII letters only
    if flags & LITERAL_ANCHORED:
        return text.startswith(literal)
    return literal in text


def texts_pass_python(data: bytes, types: bytes, ends: bytes, tests: tuple) -> bool:
    """`texts_pass` (see `_pg_scan.c`): whether every frame of a read of whole messages
    passes its test by type byte: None passes, False does not, a tuple of patterns passes
    when the frame's sole text (the body: text, then one NUL at its end) is ASCII and no
    pattern finds it (search() is not None, or `literal_found` for a literal test: bytes)."""
    start = 0
    for type_byte, end in zip(types, memoryview(ends).cast("q").tolist(), strict=True):
        test = tests[type_byte]
        if test is not None:
            if type(test) is not tuple or end - start < 6 or data[end - 1] != 0:
                return False
            raw = data[start + 5:end - 1]
            if 0 in raw or not raw.isascii():
                return False
            text = raw.decode("ascii")
            for pattern in test:
                if type(pattern) is bytes:
                    if literal_found(pattern, raw):
                        return False
                elif pattern.search(text) is not None:
                    return False
        start = end
    return True


try:
    from ._pg_scan_native import scan, texts_pass
except ImportError:  # built without a C compiler
    scan = scan_python
    texts_pass = texts_pass_python
    NATIVE = False
else:
    NATIVE = True
