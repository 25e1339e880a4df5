"""A fluent builder for commands, checked as they are written.

    >>> from wirefault.fifo_client import conn, recorder
    >>> str(conn.onQuery(query="^COMMIT").after(2).kill())
    'conn.onQuery(query="^COMMIT").after(2).kill()'
    >>> str(recorder.dump())
    'recorder.dump()'
    >>> try:
    ...     conn.onQury
    ... except AttributeError as error:  # an UnknownMethodError, also a CommandError
    ...     print(error)
    unknown message type 'Qury' for protocol postgres; did you mean 'Query'?

Names are checked on attribute access against the protocol's message catalogue and the
command language's own `FILTERS`, `ACTIONS` and `RECORDER_COMMANDS`; arguments are checked
when a filter is called; the finished command is checked by the proxy's own parser
(`wirefault.proxy.dsl.parse`), so errors read exactly like the proxy's.

Literals are written so that the parser reads them back identically: `str` in double
quotes where possible, `bytes` as `b"..."`, numbers as Python writes them.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from .errors import CommandError, UnknownMethodError

DEFAULT_PROTOCOL = "postgres"
_PROBE_ACTION = ".kill()"
"""Appended to an unfinished chain to check its filters with the real parser."""


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

    `str(command)` is its text. Start from `conn` (rules) or `recorder`; a rule is finished
    by its action (`kill()`, `cancel(pid)`, `allow()`, ...), after which nothing may follow.

    >>> str(conn.onCommandComplete(command="^COPY 3").cancel(4242))
    'conn.onCommandComplete(command="^COPY 3").cancel(4242)'
    >>> str(conn.for_protocol("raw").matches(b"CREATE INDEX").killall())
    'conn.matches(b"CREATE INDEX").killall()'
    """

    __slots__ = ("_final", "_links", "_protocol", "_root")

    def __init__(self, root: str, protocol: str = DEFAULT_PROTOCOL,
                 links: tuple[str, ...] = (), final: bool = False) -> None:
        if root not in ("conn", "recorder"):
            raise ValueError(f"commands start with 'conn' or 'recorder', not {root!r}")
        self._root = root
        self._protocol = protocol
        self._links = links
        self._final = final

    # -- public ----------------------------------------------------------------------------

    @property
    def protocol(self) -> str:
        """The protocol whose message types the `on<Type>` filters name."""
        return self._protocol

    @property
    def finished(self) -> bool:
        """True once the command ends with its action (or recorder command)."""
        return self._final

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
            raise UnknownMethodError(f"nothing may follow {self}: the action comes last")
        return _Method(self, name, final=self._is_final_name(name))

    # -- checking --------------------------------------------------------------------------

    def _names(self) -> list[str]:
        dsl = _dsl()
        if self._root == "recorder":
            return list(dsl.RECORDER_COMMANDS)
        return [*dsl.FILTERS, *dsl.ACTIONS, *dsl.filter_names(self._protocol)]

    def _is_final_name(self, name: str) -> bool:
        dsl = _dsl()
        if self._root == "recorder":
            if name in dsl.RECORDER_COMMANDS:
                return True
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
        try:
            dsl.parse(f"{self._root}.{name}()", self._protocol)
        except dsl.CommandError as exc:
            return UnknownMethodError(exc.message)
        return UnknownMethodError(f"unknown method {name!r}")

    def _check(self, text: str) -> None:
        dsl = _dsl()
        try:
            dsl.parse(text, self._protocol)
        except dsl.CommandError as exc:
            raise CommandError(str(exc), text) from None

    def _then(self, link: str, final: bool) -> Command:
        command = Command(self._root, self._protocol, (*self._links, link), final)
        # A finished command is checked whole; a filter is checked at once by finishing
        # the chain with a harmless action, so the error points at the call just made.
        command._check(str(command) if final else str(command) + _PROBE_ACTION)
        return command


class _Method:
    """`conn.onQuery` before it is called."""

    __slots__ = ("_command", "_final", "_name")

    def __init__(self, command: Command, name: str, final: bool) -> None:
        self._command = command
        self._name = name
        self._final = final

    def __call__(self, *args: Any, **kwargs: Any) -> Command:
        return self._command._then(render_call(self._name, args, kwargs), self._final)

    def __repr__(self) -> str:
        return f"<method {self._command}.{self._name}>"


conn = Command("conn")
"""The root of rules for the default protocol (postgres)."""
recorder = Command("recorder")
"""The root of recorder commands: `recorder.dump()`, `recorder.reset()`."""


def command_text(command: str | Command) -> str:
    """The text to send for a string or a builder (a builder must be finished)."""
    if isinstance(command, Command):
        return command.text()
    if not isinstance(command, str):
        raise TypeError(f"a command is a str or a builder Command, not {type(command).__name__}")
    return command


__all__ = ["DEFAULT_PROTOCOL", "Command", "command_text", "conn", "recorder", "render_literal"]
