"""The usual read: whole frames that no fault can act on, on a free lane the agent does
not watch (or skims), framed, counted and recorded without a batch
(`WirefaultLayer.relay_read` tries it before the general path, which frames a read afresh).

`python_whole_read(layer, from_client, data)` is the usual read in Python: the read when it
took it, else None with nothing changed. It also works out what the native reader only
looks up (the engine's tests for whole reads, the connection's recorder number), so the
native reader falls back to it, not straight to the general path.

`native_whole_reader(layer, from_client)` gives a function that takes a read and returns
it when it framed, counted and recorded it exactly as `WirefaultLayer.relay_read`'s Python
whole-read path would (whole frames of plain types, no fault able to act on any, a free
lane the agent does not watch, a small frame or a run of them for the recorder), or None,
having changed nothing, for `python_whole_read` to take it. None instead of a function when
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


def python_whole_read(layer: WirefaultLayer, from_client: bool, data: bytes) -> bytes | None:
    if from_client:
        feed_whole, lane = layer._feed_whole_client, layer.up
    else:
        feed_whole, lane = layer._feed_whole_server, layer.down
    whole = feed_whole(data) if feed_whole is not None else None  # None: not PostgreSQL's
    if whole is None or lane.slow or lane.queue:
        return None
    agent = layer.agent
    skimming = None
    if agent is not None and (agent.watch_client if from_client else agent.watch_server):
        if not (agent.skim_client if from_client else agent.skim_server):
            return None
        skimming = agent  # watched, but its tests tell whether it has anything to see
    types, ends, table = whole
    runtime = layer.runtime
    if not runtime.engine.passes_whole(data, types, ends, table, layer.rule_state,
                                       from_client, skimming):
        return None
    if from_client:
        layer.bytes_from_client += len(data)
    else:
        layer.bytes_from_server += len(data)
    runtime.recorder.record_whole(layer.slot, from_client, data, types, ends, table)
    return data
