"""Toxiproxy's toxics as wirefault faults: each toxic is one named fault, `toxic:<name>`.

`fault_command(toxic)` is the whole mapping: a toxic's JSON (Toxiproxy 2.x: name, type,
stream, toxicity, attributes) in, one `faults.add(...)` command of the command language out.
The stream picks the direction (`upstream`, client to server: `fromClient()`; `downstream`,
server to client: `fromServer()`), a toxicity below 1 is `connectionProbability(p)` (Toxiproxy
draws once per connection too: `ToxicStub.Run`), and the type picks the action, on every
frame of the stream. What each toxic does is read from Toxiproxy's source (toxics/*.go,
link.go, toxic_collection.go, v2.12):

| toxic | attributes | fault |
| --- | --- | --- |
| latency | latency, jitter (ms) | `delay(latency, jitter=jitter)` |
| bandwidth | rate (KB/s) | `throttle(rate * 1000)`; rate 0: no limit (`delay(0)`) |
| slow_close | delay (ms) | `slow_close(delay)` |
| timeout | timeout (ms) | `drop(timeout_ms=timeout)` |
| reset_peer | timeout (ms) | `reset(after_ms=timeout)`; 0: `reset()` |
| slicer | average_size, size_variation, delay (us) | `slice(average_size, delay / 1000, ...)` |
| limit_data | bytes | `limit(bytes)` |
| wirefault | command | the command's chain, `conn.` or `.` first (ours) |

- latency: latency plus a draw in [-jitter, jitter), seeded.
- bandwidth: Toxiproxy's KB is 1000 bytes (it sleeps len * 1 ms / rate).
- timeout: the stream's data is dropped, the other direction flows; the connection is
  closed once `timeout` ms pass without data on the stream (each chunk dropped restarts
  Toxiproxy's timer; 0: never); removing the toxic closes the connections it timed out
  (its Cleanup), the dropped data being gone.
- reset_peer: the stream's first data is swallowed and the stream stops (the other
  direction flows); `timeout` ms later both sides are reset (RST), removed or not.
- slicer: `slice(average_size, delay / 1000, variation=size_variation)`: each frame is
  halved until pieces are at most average_size + size_variation bytes, each cut moved by a
  seeded draw in [-size_variation, size_variation); `delay` after each piece.
- limit_data: the stream carries that many bytes (the last chunk cut to fit), then the
  connection is closed (FIN).

Where wirefault still differs: a toxic acts from the first frame of its stream on, where
Toxiproxy's runs from the connection's start (or the toxic's addition): a `timeout` on a
stream on which nothing ever arrives does not close the connection, a `slow_close` holds a
close only once data has passed in its direction; `slow_close` then holds the close of
either side, Toxiproxy's only that of its stream's source; `reset_peer` always sends a RST,
where Toxiproxy sets SO_LINGER 0 only on connections opened while the toxic was there (one
added to a live connection closes it with a FIN). `latency` counts, as Toxiproxy does, each
frame's delay from its own arrival (`delay` does). A `wirefault` toxic's command says its
own direction: the stream adds no `fromClient()`/`fromServer()`.
"""

from __future__ import annotations

from typing import Any

STREAMS = {"upstream": ".fromClient()", "downstream": ".fromServer()"}
FAULT_PREFIX = "toxic:"

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "latency": ("latency", "jitter"),
    "bandwidth": ("rate",),
    "slow_close": ("delay",),
    "timeout": ("timeout",),
    "reset_peer": ("timeout",),
    "slicer": ("average_size", "size_variation", "delay"),
    "limit_data": ("bytes",),
    "wirefault": ("command",),
}
"""Each type's attributes, as Toxiproxy's toxic structs have them (its listing shows them
all, 0 when not given; other keys are ignored, as Go's JSON decoder ignores them)."""


class ToxicError(ValueError):
    """A toxic that cannot be mapped; `str()` is Toxiproxy's kind of message."""


def attributes_of(kind: str, given: dict[str, Any]) -> dict[str, Any]:
    """The toxic's attributes as Toxiproxy lists them: every one of its type, in order, the
    given value or 0 (a wirefault toxic: its command only); ToxicError for a bad value."""
    if kind not in ATTRIBUTES:
        raise ToxicError("invalid toxic type")
    if kind == "wirefault":
        return {"command": given.get("command")}
    return {key: _int(given, key) for key in ATTRIBUTES[kind]}


def _int(attributes: dict[str, Any], key: str) -> int:
    value = attributes.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ToxicError(f"attribute {key} must be a number >= 0, got {value!r}")
    if value != int(value):  # Toxiproxy's attributes are Go integers
        raise ToxicError(f"attribute {key} must be an integer, got {value!r}")
    return int(value)


def _wirefault(attributes: dict[str, Any]) -> str:
    command = attributes.get("command")
    if not isinstance(command, str) or not command.strip():
        raise ToxicError("a wirefault toxic needs the attribute command, a chain such as "
                         "conn.onQuery(query=\"^COMMIT\").kill()")
    command = command.strip()
    if command.startswith("conn."):
        return command[len("conn"):]
    if command.startswith("."):
        return command
    raise ToxicError(f"attribute command must start with conn. or .: {command!r}")


def _slicer(a: dict[str, Any]) -> str:
    # average_size 0 would make Toxiproxy recurse for ever: pieces are at least a byte.
    return (f".slice({max(1, _int(a, 'average_size'))}, {_int(a, 'delay') / 1000:g}, "
            f"variation={_int(a, 'size_variation')})")


ACTIONS = {
    "latency": lambda a: f".delay({_int(a, 'latency')}, jitter={_int(a, 'jitter')})",
    "bandwidth": lambda a: f".throttle({_int(a, 'rate') * 1000})" if _int(a, "rate")
    else ".delay(0)",
    "slow_close": lambda a: f".slow_close({_int(a, 'delay')})",
    "timeout": lambda a: f".drop(timeout_ms={_int(a, 'timeout')})",
    "reset_peer": lambda a: f".reset(after_ms={_int(a, 'timeout')})" if _int(a, "timeout")
    else ".reset()",
    "slicer": _slicer,
    "limit_data": lambda a: f".limit({_int(a, 'bytes')})",
    "wirefault": _wirefault,
}


def fault_command(toxic: dict[str, Any]) -> str:
    """The `faults.add("toxic:<name>")...` command of one toxic (already defaulted:
    name, type, stream, toxicity, attributes); ToxicError for a type or value it cannot
    map."""
    kind, stream, toxicity = toxic["type"], toxic["stream"], toxic["toxicity"]
    if kind not in ACTIONS:
        raise ToxicError("invalid toxic type")
    attributes = attributes_of(kind, toxic.get("attributes") or {})
    action = ACTIONS[kind](attributes)
    chain = "" if kind == "wirefault" else STREAMS[stream]
    if toxicity < 1:
        chain += f".connectionProbability({max(0.0, float(toxicity)):g})"
    return f'faults.add("{FAULT_PREFIX}{toxic["name"]}"){chain}{action}'
