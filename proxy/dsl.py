"""The command language: parse `conn.onQuery(query="^COMMIT").after(2).kill()` safely.

A command is one Python-like expression rooted at `conn`, `faults`, `recorder` or `proxy`.
It is parsed with `ast` and checked against a whitelist; nothing is ever evaluated. The
result is plain data (`Rule`, `FaultCommand`, `RecorderCommand` or `ProxyCommand`) for the
rules engine. The vocabulary (every method and its parameters) is in `dsl_vocabulary`.

Columns in errors are 1-based character positions in the command as stripped by `parse`
(surrounding whitespace and one trailing `;` removed).

This module must not import mitmproxy: client code imports it to validate commands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wirefault import protocols
from wirefault.protocols import ProtocolSpec
from wirefault.proxy.dsl_vocabulary import (
    ACTION_LIST,
    ACTIONS,
    FAULT_COMMANDS,
    FAULT_NAME,
    FILTER_PREFIX,
    FILTERS,
    MAX_PID,
    NO_DEFAULT,
    PROXY_COMMANDS,
    RECORDER_COMMANDS,
    ROOT_LIST,
    ROOTS,
    SEVERITIES,
    SQLSTATE,
    STARTUP_KEYS,
    WHERE_KEYS,
    MethodSpec,
    Number,
    Param,
    listing,
    signature,
)

if TYPE_CHECKING:  # user_regex imports re2: dsl stays light at import time
    from wirefault.proxy.user_regex import UserPattern

# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageFilter:
    """`on<Type>(field=regex, ...)`: a frame of `type` whose fields' text all match."""

    type: str
    fields: tuple[tuple[str, UserPattern], ...]


@dataclass(frozen=True)
class BytesMatch:
    """`matches(b"regex")`: `pattern.search` on the frame's raw bytes."""

    pattern: UserPattern


@dataclass(frozen=True)
class BytesContains:
    """`contains(b"needle")`: the frame's raw bytes contain `needle`."""

    needle: bytes


@dataclass(frozen=True)
class After:
    """`after(n)`: let `count` frames that pass the preceding filters through first."""

    count: int


@dataclass(frozen=True)
class FromSide:
    """`fromClient()` / `fromServer()`: frames sent by that side."""

    from_client: bool


@dataclass(frozen=True)
class Times:
    """`times(n)`, `once()`: the fault fires at most `count` times on the proxy in total."""

    count: int


@dataclass(frozen=True)
class Probability:
    """`probability(p)`: each frame reaching this step passes with probability `p`."""

    p: float


@dataclass(frozen=True)
class ConnectionProbability:
    """`connectionProbability(p)`: decided once per connection, with probability `p`."""

    p: float


@dataclass(frozen=True)
class Where:
    """`where(user=regex, ...)`: connections whose startup parameters (`user`, `database`,
    `application_name`) and client address `HOST:PORT` (`client`) all match."""

    fields: tuple[tuple[str, UserPattern], ...]


Step = (MessageFilter | BytesMatch | BytesContains | After | FromSide | Times | Probability
        | ConnectionProbability | Where)

CONNECTION_STEPS = (Where, Times, Probability, ConnectionProbability)
"""Steps that are not frame filters: the only ones `connect_delay()` may follow."""


@dataclass(frozen=True)
class Action:
    """What to do when the steps are satisfied.

    `cancel(pid)` sets `pid`, `connect_delay(ms)` sets `delay_ms`; every other action with
    parameters has them all in `options`, defaults filled in, in signature order."""

    name: str
    pid: int | None = None
    delay_ms: float | None = None
    options: tuple[tuple[str, object], ...] = ()

    def option(self, name: str, default: object = None) -> object:
        for key, value in self.options:
            if key == name:
                return value
        return default


@dataclass(frozen=True)
class Rule:
    """A `conn.*` command, or the chain of a `faults.add(...)` (`text`: the whole command)."""

    steps: tuple[Step, ...]
    action: Action
    text: str


@dataclass(frozen=True)
class FaultCommand:
    """`faults.add("name").<steps>.<action>`, `faults.remove("name")`, `faults.clear()`,
    `faults.list()`."""

    op: str
    """"add", "remove", "clear" or "list"."""
    name: str | None
    """The fault's name (add, remove)."""
    rule: Rule | None
    """add: the steps and action (its text is the whole command)."""
    seed: int | None
    """add: `seed=N`, for the fault's random choices."""
    text: str
    name_column: int
    """1-based column of the name argument (0: none), for errors found when it runs, such
    as "no fault named 'x'"."""


@dataclass(frozen=True)
class RecorderCommand:
    """`recorder.dump()` or `recorder.reset()`."""

    name: str
    text: str


@dataclass(frozen=True)
class ProxyCommand:
    """`proxy.ping()` (is a proxy serving the channel?) or `proxy.status()` (what it holds);
    neither changes anything."""

    name: str
    text: str


class CommandError(ValueError):
    """A command that cannot be accepted; `str()` is one line: `column N: message`."""

    def __init__(self, message: str, column: int) -> None:
        self.message = _one_line(message)
        self.column = column
        super().__init__(f"column {column}: {self.message}")


# --- vocabulary (dsl_vocabulary holds it) ---------------------------------------------------

_ROOT_LIST = ROOT_LIST
_ACTION_LIST = ACTION_LIST
_MAX_PID = MAX_PID


def filter_names(protocol: ProtocolSpec | str) -> list[str]:
    """The `on<Type>` filter names of every message type in the protocol's catalogue."""
    return [FILTER_PREFIX + name for name in _protocol(protocol).messages]


def _protocol(protocol: ProtocolSpec | str) -> ProtocolSpec:
    return protocols.get(protocol) if isinstance(protocol, str) else protocol


# --- entry point ---------------------------------------------------------------------------


Command = Rule | RecorderCommand | ProxyCommand | FaultCommand


def parse(text: str, protocol: ProtocolSpec | str = "postgres",
          protected_pids: Mapping[int, str] | None = None) -> Command:
    """Parse one command; raise `CommandError` for anything not in the language.

    `protected_pids` maps process ids that `cancel(pid)` must refuse to what they are (the
    proxy passes its own pid and its parent's)."""
    # The machinery lives in dsl_syntax and dsl_checker. Both import the result types above
    # from this module, so they are imported here, on first use, not at load time.
    from wirefault.proxy.dsl_checker import Checker
    from wirefault.proxy.dsl_syntax import (
        Source,
        check_plain_text,
        parse_expression,
        strip_command,
        unwind,
    )

    spec = _protocol(protocol)
    command = strip_command(text)
    check_plain_text(command)
    source = Source(command)
    tree = parse_expression(command)
    root, links = unwind(tree.body)
    return Checker(source, spec, protected_pids or {}).command(root, links)


def _one_line(message: str) -> str:
    return " ".join(message.splitlines())


__all__ = [
    "ACTIONS",
    "ACTION_LIST",
    "CONNECTION_STEPS",
    "FAULT_COMMANDS",
    "FAULT_NAME",
    "FILTERS",
    "FILTER_PREFIX",
    "MAX_PID",
    "NO_DEFAULT",
    "PROXY_COMMANDS",
    "RECORDER_COMMANDS",
    "ROOTS",
    "ROOT_LIST",
    "SEVERITIES",
    "SQLSTATE",
    "STARTUP_KEYS",
    "WHERE_KEYS",
    "Action",
    "After",
    "BytesContains",
    "BytesMatch",
    "Command",
    "CommandError",
    "ConnectionProbability",
    "FaultCommand",
    "FromSide",
    "MessageFilter",
    "MethodSpec",
    "Number",
    "Param",
    "Probability",
    "ProxyCommand",
    "RecorderCommand",
    "Rule",
    "Step",
    "Times",
    "Where",
    "filter_names",
    "listing",
    "parse",
    "signature",
]
