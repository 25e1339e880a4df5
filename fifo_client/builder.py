"""A fluent builder for commands, checked as they are written.

    >>> from wirefault.fifo_client import conn, faults, recorder
    >>> str(conn.onQuery(query="^COMMIT").after(2).kill())
    'conn.onQuery(query="^COMMIT").after(2).kill()'
    >>> str(faults.add("slow-commit").onQuery(query="^COMMIT").delay(50))
    'faults.add("slow-commit").onQuery(query="^COMMIT").delay(50)'
    >>> str(recorder.dump())
    'recorder.dump()'
    >>> try:
    ...     conn.onQury
    ... except AttributeError as error:  # an UnknownMethodError, also a CommandError
    ...     print(error)
    unknown message type 'Qury' for protocol postgres; did you mean 'Query'?

Names are checked on attribute access against the protocol's message catalogue and the
command language's own `FILTERS`, `ACTIONS`, `FAULT_COMMANDS` and `RECORDER_COMMANDS`;
arguments are checked
when a filter is called; the finished command is checked by the proxy's own parser
(`wirefault.proxy.dsl.parse`), so errors read exactly like the proxy's.

Literals are written so that the parser reads them back identically: `str` in double
quotes where possible, `bytes` as `b"..."`, numbers as Python writes them.
"""

from __future__ import annotations

import math
import re
from types import ModuleType
from typing import Any

from .errors import CommandError, UnknownMethodError

DEFAULT_PROTOCOL = "postgres"
_PROBE_ACTION = ".kill()"
"""Appended to an unfinished chain to check its filters with the real parser."""
ROOTS = ("conn", "faults", "recorder")
FAULT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
"""What a fault's name may be (the proxy refuses any other)."""
_FAULT_COMMANDS = ("add", "remove", "clear", "list")
"""`faults.*` methods, when the parser predates its own `FAULT_COMMANDS`."""
_CONN_PREFIX = re.compile(r"\s*conn\s*(?=\.)")
_FAULTS_PREFIX = re.compile(r"\s*faults\s*\.")


def _dsl() -> ModuleType:
    # Imported on first use: importing the client stays cheap (and never needs mitmproxy).
    from wirefault.proxy import dsl

    return dsl


def render_literal(value: object) -> str:
    """The command-language spelling of an argument.

    >>> render_literal("^COMMIT"), render_literal(b"\\x00"), render_literal(4242)
    ('"^COMMIT"', 'b"\\\\x00"', '4242')
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str | bytes):
        raise TypeError(f"command arguments are str, bytes, int or float, not "
                        f"{type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"command arguments must be finite numbers, not {value!r}")
    if isinstance(value, str | bytes):
        return _quote(value)
    return repr(value)


def _quote(value: str | bytes) -> str:
    text = repr(value)
    prefix, body = ("b", text[1:]) if isinstance(value, bytes) else ("", text)
    quote_char = '"' if isinstance(value, str) else b'"'
    if body.startswith("'") and quote_char not in value:
        # repr chose single quotes and the value holds no quote of either kind (else repr
        # would have picked double quotes): swapping the delimiters changes nothing inside.
        body = f'"{body[1:-1]}"'
    return prefix + body


def render_call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """`.name(arg, key=value)` as the command language writes it."""
    parts = [render_literal(arg) for arg in args]
    for key, value in kwargs.items():
        if not key.isidentifier():
            raise TypeError(f"{key!r} is not a valid argument name")
        parts.append(f"{key}={render_literal(value)}")
    return f".{name}({', '.join(parts)})"


class Command:
    """A command being built, immutable: every call returns a new `Command`.

    `str(command)` is its text. Start from `conn` (the one rule that replaces every fault),
    `faults` (named faults: `faults.add(name)`, `remove(name)`, `clear()`, `list()`) or
    `recorder`; a rule or fault is finished by its action (`kill()`, `cancel(pid)`,
    `delay(ms)`, ...), after which nothing may follow.

    >>> str(conn.onCommandComplete(command="^COPY 3").cancel(4242))
    'conn.onCommandComplete(command="^COPY 3").cancel(4242)'
    >>> str(conn.for_protocol("raw").matches(b"CREATE INDEX").killall())
    'conn.matches(b"CREATE INDEX").killall()'
    """

    __slots__ = ("_fault", "_final", "_links", "_protocol", "_root")

    def __init__(self, root: str, protocol: str = DEFAULT_PROTOCOL,
                 links: tuple[str, ...] = (), final: bool = False,
                 fault: str | None = None) -> None:
        if root not in ROOTS:
            raise ValueError(f"commands start with 'conn', 'faults' or 'recorder', not {root!r}")
        self._root = root
        self._protocol = protocol
        self._links = links
        self._final = final
        self._fault = fault

    # -- public ----------------------------------------------------------------------------

    @property
    def protocol(self) -> str:
        """The protocol whose message types the `on<Type>` filters name."""
        return self._protocol

    @property
    def finished(self) -> bool:
        """True once the command ends with its action (or recorder or faults command)."""
        return self._final

    @property
    def root(self) -> str:
        """`conn`, `faults` or `recorder`."""
        return self._root

    @property
    def fault_name(self) -> str | None:
        """The name a `faults.add(name)...` command adds; None for every other command."""
        return self._fault

    @property
    def chain(self) -> str:
        """The steps and action, without what starts them (`conn`, `faults.add(...)`):
        `.onQuery(query="^COMMIT").kill()`. `CommandError` for a command that has none
        (`recorder.dump()`, `faults.list()`)."""
        if self._root == "conn":
            return "".join(self._links)
        if self._root == "faults" and self._is_chain():
            return "".join(self._links[1:])
        raise CommandError(f"{self} has no chain of steps and action")

    def for_protocol(self, name: str) -> Command:
        """The same root for another protocol: `conn.for_protocol("wallaroo")`."""
        if self._links:
            raise CommandError(f"for_protocol() goes right after '{self._root}', "
                               f"not after {self}")
        from wirefault import protocols

        protocols.get(name)  # ValueError naming the known protocols
        return Command(self._root, name)

    def text(self) -> str:
        """The finished command's text, checked by the proxy's parser.

        Raises `CommandError` for an unfinished command (e.g. no action yet).
        """
        text = str(self)
        if not self._final:
            self._check(text)
        return text

    def __str__(self) -> str:
        return self._root + "".join(self._links)

    def __repr__(self) -> str:
        return f"<Command {self} ({self._protocol})>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Command):
            return NotImplemented
        return (str(self), self._protocol) == (str(other), other._protocol)

    def __hash__(self) -> int:
        return hash((str(self), self._protocol))

    def __dir__(self) -> list[str]:
        return sorted({*object.__dir__(self), *self._names()})

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_") or not name.isidentifier():
            raise AttributeError(name)
        if self._final:
            if self._is_chain():
                raise UnknownMethodError(f"nothing may follow {self}: the action comes last")
            raise UnknownMethodError(f"nothing may follow {self}")
        return _Method(self, name, final=self._is_final_name(name))

    # -- checking --------------------------------------------------------------------------

    def _is_chain(self) -> bool:
        """Whether steps and an action come next (or came): `conn...`, `faults.add(...)...`."""
        return self._root == "conn" or (self._root == "faults" and bool(self._links)
                                        and self._links[0].startswith(".add("))

    def _names(self) -> list[str]:
        dsl = _dsl()
        if self._root == "recorder":
            return list(dsl.RECORDER_COMMANDS)
        if not self._is_chain():
            return list(_fault_commands())
        return [*dsl.FILTERS, *dsl.ACTIONS, *dsl.filter_names(self._protocol)]

    def _is_final_name(self, name: str) -> bool:
        dsl = _dsl()
        if self._root == "recorder":
            if name in dsl.RECORDER_COMMANDS:
                return True
        elif not self._is_chain():
            if name in _fault_commands():
                return name != "add"
        elif name in dsl.ACTIONS:
            return True
        elif name in dsl.FILTERS or self._is_message_filter(name):
            return False
        raise self._unknown(name)

    def _is_message_filter(self, name: str) -> bool:
        from wirefault import protocols

        prefix = _dsl().FILTER_PREFIX
        messages = protocols.get(self._protocol).messages
        return name.startswith(prefix) and name[len(prefix):] in messages

    def _unknown(self, name: str) -> UnknownMethodError:
        """The parser's own words for `name` (with its suggestion), without a column."""
        dsl = _dsl()
        # In the context the name was written in: after faults.add(...), a step or action.
        context = str(self) if self._root == "faults" and self._is_chain() else self._root
        try:
            dsl.parse(f"{context}.{name}()", self._protocol)
        except dsl.CommandError as exc:
            return UnknownMethodError(exc.message)
        return UnknownMethodError(f"unknown method {name!r}")

    def _check(self, text: str) -> None:
        dsl = _dsl()
        try:
            dsl.parse(text, self._protocol)
        except dsl.CommandError as exc:
            raise CommandError(str(exc), text) from None

    def _then(self, name: str, link: str, final: bool, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Command:
        fault = self._fault
        if self._root == "faults" and not self._links and name == "add":
            fault = _added_name(args, kwargs)
        command = Command(self._root, self._protocol, (*self._links, link), final, fault)
        # A finished command is checked whole; a filter is checked at once by finishing
        # the chain with a harmless action, so the error points at the call just made.
        command._check(str(command) if final else str(command) + _PROBE_ACTION)
        return command


def _fault_commands() -> tuple[str, ...]:
    vocabulary = getattr(_dsl(), "FAULT_COMMANDS", None)
    return tuple(vocabulary) if vocabulary is not None else _FAULT_COMMANDS


def _added_name(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The name `faults.add(...)` was called with (the parser checks it)."""
    name = args[0] if args else kwargs.get("name")
    return name if isinstance(name, str) else None


class _Method:
    """`conn.onQuery` before it is called."""

    __slots__ = ("_command", "_final", "_name")

    def __init__(self, command: Command, name: str, final: bool) -> None:
        self._command = command
        self._name = name
        self._final = final

    def __call__(self, *args: Any, **kwargs: Any) -> Command:
        return self._command._then(self._name, render_call(self._name, args, kwargs),
                                   self._final, args, kwargs)

    def __repr__(self) -> str:
        return f"<method {self._command}.{self._name}>"


conn = Command("conn")
"""The root of the rule that replaces every fault, for the default protocol (postgres)."""
faults = Command("faults")
"""The root of named faults: `faults.add("name")...`, `faults.remove("name")`,
`faults.clear()`, `faults.list()`."""
recorder = Command("recorder")
"""The root of recorder commands: `recorder.dump()`, `recorder.reset()`."""


def command_text(command: str | Command) -> str:
    """The text to send for a string or a builder (a builder must be finished)."""
    if isinstance(command, Command):
        return command.text()
    if not isinstance(command, str):
        raise TypeError(f"a command is a str or a builder Command, not {type(command).__name__}")
    return command


def check_fault_name(name: object) -> str:
    """`name` if it is a valid fault name, else `CommandError` (said before sending)."""
    if not isinstance(name, str) or not FAULT_NAME.fullmatch(name):
        raise CommandError(f"bad fault name {name!r}: a letter or digit, then up to 63 "
                           f"letters, digits, '_', '.', ':' or '-'")
    return name


def chain_text(chain: str | Command) -> str:
    """The steps and action of a fault, from a builder or from text, as `.step(...).action()`.

    Text may start with `conn` (`conn.onQuery().kill()`), with the dot (`.onQuery()...`) or
    with the first step (`onQuery()...`). A builder is a finished `conn...` or
    `faults.add(...)...` command.

    >>> chain_text('conn.onQuery(query="^COMMIT").kill()'), chain_text("kill()")
    ('.onQuery(query="^COMMIT").kill()', '.kill()')
    """
    if isinstance(chain, Command):
        if not chain.finished:
            chain.text()  # CommandError: the parser's words for what is missing
        return chain.chain
    if not isinstance(chain, str):
        raise TypeError(f"a fault's chain is a str or a builder Command, not "
                        f"{type(chain).__name__}")
    if _FAULTS_PREFIX.match(chain):
        raise CommandError(f"give the steps and action of the fault, without "
                           f"faults.*: {chain.strip()!r}")
    text = _CONN_PREFIX.sub("", chain, count=1).strip()
    if not text:
        raise CommandError("a fault needs its steps and action, e.g. onQuery().kill()")
    return text if text.startswith(".") else "." + text


def fault_command(name: str, chain: str | Command, seed: int | None = None) -> str:
    """The text of `faults.add(name[, seed=seed])` followed by `chain` (see `chain_text`).

    A `faults.add(...)` builder must add `name` itself; its own seed, if any, is kept.

    >>> fault_command("slow", "conn.onQuery().delay(50)")
    'faults.add("slow").onQuery().delay(50)'
    >>> fault_command("flaky", ".onQuery().probability(0.5).kill()", seed=7)
    'faults.add("flaky", seed=7).onQuery().probability(0.5).kill()'
    """
    check_fault_name(name)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"a fault's seed is an int, not {type(seed).__name__}")
    if isinstance(chain, Command) and chain.root == "faults":
        if chain.fault_name != name:
            raise CommandError(f"{chain} adds a fault named {chain.fault_name!r}, not {name!r}")
        if seed is not None:
            raise CommandError(f"{chain} gives its own faults.add(...): pass no seed")
        return chain.text()
    body = chain_text(chain)
    add = render_call("add", (name,), {} if seed is None else {"seed": seed})
    return f"faults{add}{body}"


__all__ = [
    "DEFAULT_PROTOCOL",
    "FAULT_NAME",
    "Command",
    "chain_text",
    "check_fault_name",
    "command_text",
    "conn",
    "fault_command",
    "faults",
    "recorder",
    "render_literal",
]
