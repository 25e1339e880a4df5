"""The usual read of a PostgreSQL connection in native code, where it was built.

`native_whole_reader(layer, from_client)` gives a function that takes a read and returns
it when it framed, counted and recorded it exactly as `WirefaultLayer.relay_read`'s Python
whole-read path would (whole frames of plain types, no fault able to act on any, a free
lane the agent does not watch, a small frame or a run of them for the recorder), or None,
having changed nothing, for the Python path to take it. None instead of a function when
the module was not built (no C compiler) or the framer is not PostgreSQL's.

The C side (`_whole_read.c`) reads the same attributes the Python path does, of the
objects given here: the layer and its lane, the agent, the framer, the rules engine, the
recorder and the connection's slot and rule state. `tests/test_whole_reads.py` holds it to
the Python path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from wirefault.protocols import _pg_framer

from .recorder import KEEP_FRAME_BYTES, RUN_BYTES, SKIPPED_TYPES
from .rules import NOTHING_GATED, UNTESTABLE

if TYPE_CHECKING:
    from .layer import WirefaultLayer

try:
    from ._whole_read_native import WholeReader
except ImportError:  # built without a C compiler: the Python path does it all
    WholeReader = None

NATIVE = WholeReader is not None


def native_whole_reader(layer: WirefaultLayer, from_client: bool
                        ) -> Callable[[bytes], bytes | None] | None:
    framer = layer._client_framer if from_client else layer._server_framer
    if WholeReader is None or type(framer) is not _pg_framer.PgFramer:
        return None
    table = framer._table
    runtime = layer.runtime
    reader = WholeReader(layer, layer.up if from_client else layer.down, layer.agent, framer,
                         runtime.engine, runtime.recorder, layer.slot, layer.rule_state,
                         from_client, table, framer._max_length, _pg_framer._TYPED,
                         table.codes(SKIPPED_TYPES), KEEP_FRAME_BYTES, RUN_BYTES,
                         UNTESTABLE, NOTHING_GATED)
    return reader.read
