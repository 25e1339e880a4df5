"""Toxiproxy's toxics as wirefault faults: each toxic is one named fault, `toxic:<name>`.

`fault_command(toxic)` is the whole mapping: a toxic's JSON (Toxiproxy 2.x: name, type,
stream, toxicity, attributes) in, one `faults.add(...)` command of the command language out.
The stream picks the direction (`upstream`, client to server: `fromClient()`; `downstream`,
server to client: `fromServer()`), a toxicity below 1 is `connectionProbability(p)` (Toxiproxy
draws once per connection too), and the type picks the action, on every frame of the stream:

| toxic | attributes | fault |
| --- | --- | --- |
| latency | latency, jitter (ms) | `delay(latency, jitter=jitter)` |
| bandwidth | rate (KB/s) | `throttle(rate * 1000)`; rate 0 is no limit, as Toxiproxy |
| slow_close | delay (ms) | `slow_close(delay)` |
| timeout | timeout (ms) | `hang(timeout)`; 0 is `hang()`: held until the toxic is removed |
| reset_peer | timeout (ms) | `reset()` at the stream's first frame (approximation below) |
| slicer | average_size, size_variation, delay (us) | `slice(average_size, delay / 1000)` |
| limit_data | bytes | `limit(bytes)` |
| wirefault | command | the command's chain, `conn.` or `.` first (ours) |

Approximations: `reset_peer` resets when the stream's first frame arrives, not `timeout` ms
after the connection opened (a connection on which nothing flows is not reset; the timeout
is kept in the toxic's attributes but not waited for); `slicer` writes pieces of exactly
`average_size` bytes (`size_variation` is kept, not applied); `timeout` holds both directions
(a wirefault `hang()` stops the connection, Toxiproxy's stops the stream). A `wirefault`
toxic's command says its own direction: the stream adds no `fromClient()`/`fromServer()`.
"""

from __future__ import annotations

from typing import Any

STREAMS = {"upstream": ".fromClient()", "downstream": ".fromServer()"}
FAULT_PREFIX = "toxic:"


class ToxicError(ValueError):
    """A toxic that cannot be mapped; `str()` is Toxiproxy's kind of message."""


def _int(attributes: dict[str, Any], key: str) -> int:
    value = attributes.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ToxicError(f"attribute {key} must be a number >= 0, got {value!r}")
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


ACTIONS = {
    "latency": lambda a: f".delay({_int(a, 'latency')}, jitter={_int(a, 'jitter')})",
    "bandwidth": lambda a: f".throttle({_int(a, 'rate') * 1000})" if _int(a, "rate")
    else ".delay(0)",
    "slow_close": lambda a: f".slow_close({_int(a, 'delay')})",
    "timeout": lambda a: f".hang({_int(a, 'timeout')})" if _int(a, "timeout") else ".hang()",
    "reset_peer": lambda a: ".reset()",
    "slicer": lambda a: f".slice({max(1, _int(a, 'average_size'))}, {_int(a, 'delay') / 1000:g})",
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
    attributes = toxic.get("attributes") or {}
    if kind != "wirefault":
        for key in attributes:
            _int(attributes, key)
    action = ACTIONS[kind](attributes)
    chain = "" if kind == "wirefault" else STREAMS[stream]
    if toxicity < 1:
        chain += f".connectionProbability({max(0.0, float(toxicity)):g})"
    return f'faults.add("{FAULT_PREFIX}{toxic["name"]}"){chain}{action}'
