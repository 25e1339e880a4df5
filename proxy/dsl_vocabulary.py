"""The command language's vocabulary: every root, step, action and command, with its
parameters, for the parser's error messages, docs and client builders.

Plain data only: the parser (`wirefault.proxy.dsl`) decides what each method means and
re-exports every public name here. Like the parser, this module must not import mitmproxy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


class _NoDefault:
    """The type of `NO_DEFAULT`: a parameter without a default must be given."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT = _NoDefault()
"""`Param.default` of a required parameter (None is a real default: `hang(ms=None)`)."""


@dataclass(frozen=True)
class Number:
    """What a numeric parameter accepts: an `integer` or any finite number, from `low` to
    `high` (None: no upper bound); None too when that is the parameter's default."""

    integer: bool
    low: int
    high: int | None = None
    noun: str = "a number of milliseconds"
    """What a non-number is told to be."""


MS = Number(integer=False, low=0)
"""A duration in milliseconds, >= 0."""
FRACTION = Number(integer=False, low=0, high=1, noun="a number")
"""A probability."""


@dataclass(frozen=True)
class Param:
    name: str
    description: str
    default: object = NO_DEFAULT
    number: Number | None = None
    """Set for numeric parameters: the values the parser accepts."""

    @property
    def required(self) -> bool:
        return self.default is NO_DEFAULT

    @property
    def rendered(self) -> str:
        """As a signature writes it: `ms`, `jitter=0`, `code="XX000"`."""
        if self.required:
            return self.name
        default = self.default
        # Double quotes, as the command language writes strings (the defaults hold no quote).
        shown = f'"{default}"' if isinstance(default, str) else repr(default)
        return f"{self.name}={shown}"


def signature(name: str, params: tuple[Param, ...]) -> str:
    """`delay(ms, jitter=0)`."""
    return f"{name}({', '.join(p.rendered for p in params)})"


@dataclass(frozen=True)
class MethodSpec:
    """One method of the language, for error messages, docs and client builders.

    `alternatives` are further parameter lists the method accepts instead of `params`
    (`cancel(pid)` or `cancel(after_ms=100)`); `display` replaces the signature when the
    parameters are not positional (`where(user=regex, ...)` takes keywords only)."""

    name: str
    params: tuple[Param, ...]
    doc: str
    alternatives: tuple[tuple[Param, ...], ...] = ()
    display: str = ""

    @property
    def signature(self) -> str:
        return self.display or signature(self.name, self.params)

    @property
    def signatures(self) -> tuple[str, ...]:
        """Every form of the method: the signature, then one per alternative."""
        return (self.signature, *(signature(self.name, form) for form in self.alternatives))


def _vocabulary(*specs: MethodSpec) -> Mapping[str, MethodSpec]:
    return MappingProxyType({spec.name: spec for spec in specs})


def listing(signatures: list[str] | tuple[str, ...], last: str = "or") -> str:
    """`a(), b() or c()`."""
    if len(signatures) < 2:
        return "".join(signatures)
    return f"{', '.join(signatures[:-1])} {last} {signatures[-1]}"


FILTER_PREFIX = "on"
"""`on<MessageType>(field=regex, ...)` filters on a message type of the active protocol."""

WHERE_KEYS = ("user", "database", "application_name", "client")
"""`where()`'s keywords: StartupMessage parameters, then the client's address."""
STARTUP_KEYS = WHERE_KEYS[:3]
"""The `where()` keys a protocol offers only when its StartupMessage has such a field."""

_REGEX = "a regex searched in "

FILTERS: Mapping[str, MethodSpec] = _vocabulary(
    MethodSpec("matches", (Param("pattern", "a bytes regex searched in the raw frame"),),
               "frames whose raw bytes match the regex"),
    MethodSpec("contains", (Param("needle", "bytes to find in the raw frame"),),
               "frames whose raw bytes contain the needle"),
    MethodSpec("after", (Param("n", "how many matching frames to let through (>= 0)",
                            number=Number(integer=True, low=0)),),
               "let n frames that pass the preceding filters through first"),
    MethodSpec("fromClient", (), "frames sent by the client"),
    MethodSpec("fromServer", (), "frames sent by the server"),
    MethodSpec("times", (Param("n", "how many times the fault may fire (an integer >= 1)",
                            number=Number(integer=True, low=1)),),
               "fire at most n times in total on this proxy, then the fault is spent"),
    MethodSpec("once", (), "times(1): fire once, then the fault is spent"),
    MethodSpec("probability",
               (Param("p", "the chance each frame passes, from 0 to 1", number=FRACTION),),
               "let each frame reaching this step pass with probability p"),
    MethodSpec("connectionProbability",
               (Param("p", "the chance a connection is affected, from 0 to 1",
                      number=FRACTION),),
               "decide once per connection, with probability p, whether the fault applies"),
    MethodSpec("where",
               (Param("user", _REGEX + "the StartupMessage's user", None),
                Param("database", _REGEX + "the StartupMessage's database", None),
                Param("application_name", _REGEX + "the StartupMessage's application_name",
                      None),
                Param("client", _REGEX + 'the client\'s address "HOST:PORT"', None)),
               "connections whose startup parameters and client address match (at least one "
               "keyword; protocols without startup parameters take only client=)",
               display="where(user=regex, database=regex, application_name=regex, "
                       "client=regex)"),
)

ACTIONS: Mapping[str, MethodSpec] = _vocabulary(
    MethodSpec("allow", (), "let traffic through (clears the rule)"),
    MethodSpec("kill", (), "close both sides of the connection"),
    MethodSpec("reset", (Param("after_ms", "milliseconds from the frame to the reset; "
                                           "meanwhile this direction carries nothing (>= 0)",
                               0, MS),),
               "reset the connection (TCP RST); with after_ms, this direction stops at the "
               "frame and both sides are reset after_ms later (Toxiproxy's reset_peer)"),
    MethodSpec("killall", (), "close this and every other proxied connection"),
    MethodSpec("cancel", (Param("pid", "process id of the backend to cancel (an integer > 0)"),),
               "send a cancel request for pid, then let the frame through; without a pid "
               "(protocols that cancel backends, e.g. postgres): cancel the server's work "
               "on this connection after_ms later",
               alternatives=((Param("after_ms", "milliseconds to wait before cancelling "
                                                "(>= 0)", 100, MS),),)),
    MethodSpec("connect_delay",
               (Param("ms", "milliseconds to wait before connecting upstream (>= 0)",
                      number=MS),),
               "delay every new connection to the server"),
    MethodSpec("delay", (Param("ms", "milliseconds to hold the frame (>= 0)", number=MS),
                         Param("jitter", "up to this many more milliseconds, at random (>= 0)",
                               0, MS)),
               "hold the frame ms (plus up to jitter) milliseconds, then pass it on"),
    MethodSpec("drop", (Param("timeout_ms", "close the connection once this direction has "
                                            "been silent that long since the last frame dropped "
                                            "(0: never on time; None: a plain drop)", None, MS),),
               "swallow the frame: neither side sees it; with timeout_ms, Toxiproxy's timeout "
               "(removing the fault closes the connections it timed out)"),
    MethodSpec("duplicate", (Param("n", "how many extra copies to send (1 to 1000)", 1,
                                   Number(integer=True, low=1, high=1000)),),
               "send the frame, then n copies of it"),
    MethodSpec("error", (Param("code", "SQLSTATE: 5 characters, digits or upper-case letters",
                               "XX000"),
                         Param("message", "the error's text (None: a default one)", None),
                         Param("severity", "ERROR, FATAL or PANIC", "ERROR")),
               "answer the client with an error instead of passing the frame (postgres: "
               "code, message, severity; wallaroo: message only)"),
    MethodSpec("hang", (Param("ms", "milliseconds to stall (None: until the connection ends)",
                              None, MS),),
               "stop relaying this connection, for ms milliseconds or for good"),
    MethodSpec("throttle", (Param("bytes_per_second", "the rate to relay at (an integer >= 1)",
                                  number=Number(integer=True, low=1)),),
               "relay this direction at most bytes_per_second"),
    MethodSpec("slice", (Param("size", "bytes per piece (an integer >= 1)",
                               number=Number(integer=True, low=1)),
                         Param("delay_ms", "milliseconds after each piece (>= 0)", 0, MS),
                         Param("variation", "cut as Toxiproxy's slicer: halve the frame until "
                                            "pieces are at most size + variation bytes, each "
                                            "cut moved by a seeded draw within +-variation "
                                            "(an integer >= 0; None: pieces of exactly size)",
                               None, Number(integer=True, low=0))),
               "send the frame in pieces of size bytes, each followed by delay_ms"),
    MethodSpec("slow_close", (Param("ms", "milliseconds to wait before closing (>= 0)",
                                          number=MS),),
               "when the connection closes, wait ms milliseconds before closing the other side"),
    MethodSpec("limit", (Param("bytes", "how many bytes to relay before closing (an integer "
                                        ">= 0)", number=Number(integer=True, low=0)),),
               "close the connection once this many bytes have been relayed"),
)

FAULT_COMMANDS: Mapping[str, MethodSpec] = _vocabulary(
    MethodSpec("add", (Param("name", "the fault's name: a letter or digit, then up to 63 "
                                     "letters, digits, '_', '.', ':' or '-'"),
                       Param("seed", "seeds the fault's random choices (an integer >= 0)",
                             None, Number(integer=True, low=0))),
               "add a named fault, the chain of steps and action that follow (replaces a "
               "fault of that name)"),
    MethodSpec("remove", (Param("name", "the name of the fault to remove"),),
               "remove the fault of that name"),
    MethodSpec("clear", (), "remove every fault"),
    MethodSpec("list", (), "one line per fault: name, matched, fired, added, state, command"),
)

RECORDER_COMMANDS: Mapping[str, MethodSpec] = _vocabulary(
    MethodSpec("dump", (), "print the recorded frames"),
    MethodSpec("reset", (), "forget the recorded frames"),
)

PROXY_COMMANDS: Mapping[str, MethodSpec] = _vocabulary(
    MethodSpec("ping", (), "answer (with an empty line) and change nothing"),
    MethodSpec("status", (), "one line: the connections the proxy relays, mitmproxy's "
                             "connection handlers, the event loop's tasks, how many times "
                             "any fault fired since the proxy started (fired) and how many "
                             "faults are in force (faults)"),
)

FAULT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
"""A fault's name, whole (`fullmatch`)."""
SQLSTATE = re.compile(r"[0-9A-Z]{5}")
"""error(code=...), whole."""
SEVERITIES = ("ERROR", "FATAL", "PANIC")
"""error(severity=...), exactly as written."""
MAX_PID = 2**31 - 1  # a cancel request carries the pid as a signed 32-bit integer

ROOTS = ("conn", "faults", "recorder", "proxy")
ROOT_LIST = listing([repr(root) for root in ROOTS])
ACTION_LIST = listing([form for spec in ACTIONS.values() for form in spec.signatures])

__all__ = [
    "ACTIONS",
    "ACTION_LIST",
    "FAULT_COMMANDS",
    "FAULT_NAME",
    "FILTERS",
    "FILTER_PREFIX",
    "FRACTION",
    "MAX_PID",
    "MS",
    "NO_DEFAULT",
    "PROXY_COMMANDS",
    "RECORDER_COMMANDS",
    "ROOTS",
    "ROOT_LIST",
    "SEVERITIES",
    "SQLSTATE",
    "STARTUP_KEYS",
    "WHERE_KEYS",
    "MethodSpec",
    "Number",
    "Param",
    "listing",
    "signature",
]
