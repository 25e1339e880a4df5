"""The command language: parse `conn.onQuery(query="^COMMIT").after(2).kill()` safely.

A command is one Python-like expression rooted at `conn` or `recorder`. It is parsed with
`ast` and checked against a whitelist; nothing is ever evaluated. The result is plain data
(`Rule` or `RecorderCommand`) for the rules engine.

Columns in errors are 1-based character positions in the command as stripped by `parse`
(surrounding whitespace and one trailing `;` removed).

This module must not import mitmproxy: client code imports it to validate commands.
"""

from __future__ import annotations

import ast
import difflib
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NoReturn

from wirefault import protocols
from wirefault.protocols import ProtocolSpec

# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageFilter:
    """`on<Type>(field=regex, ...)`: a frame of `type` whose fields' text all match."""

    type: str
    fields: tuple[tuple[str, re.Pattern[str]], ...]


@dataclass(frozen=True)
class BytesMatch:
    """`matches(b"regex")`: `pattern.search` on the frame's raw bytes."""

    pattern: re.Pattern[bytes]


@dataclass(frozen=True)
class BytesContains:
    """`contains(b"needle")`: the frame's raw bytes contain `needle`."""

    needle: bytes


@dataclass(frozen=True)
class After:
    """`after(n)`: let `count` frames that pass the preceding filters through first."""

    count: int


Step = MessageFilter | BytesMatch | BytesContains | After


@dataclass(frozen=True)
class Action:
    """What to do when the steps are satisfied."""

    name: str
    pid: int | None = None
    delay_ms: float | None = None


@dataclass(frozen=True)
class Rule:
    """A `conn.*` command."""

    steps: tuple[Step, ...]
    action: Action
    text: str


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


# --- vocabulary ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    description: str


@dataclass(frozen=True)
class MethodSpec:
    """One method of the language, for error messages, docs and client builders."""

    name: str
    params: tuple[Param, ...]
    doc: str

    @property
    def signature(self) -> str:
        return f"{self.name}({', '.join(p.name for p in self.params)})"


def _vocabulary(*specs: MethodSpec) -> Mapping[str, MethodSpec]:
    return MappingProxyType({spec.name: spec for spec in specs})


FILTER_PREFIX = "on"
"""`on<MessageType>(field=regex, ...)` filters on a message type of the active protocol."""

FILTERS: Mapping[str, MethodSpec] = _vocabulary(
    MethodSpec("matches", (Param("pattern", "a bytes regex searched in the raw frame"),),
               "frames whose raw bytes match the regex"),
    MethodSpec("contains", (Param("needle", "bytes to find in the raw frame"),),
               "frames whose raw bytes contain the needle"),
    MethodSpec("after", (Param("n", "how many matching frames to let through (>= 0)"),),
               "let n frames that pass the preceding filters through first"),
)

ACTIONS: Mapping[str, MethodSpec] = _vocabulary(
    MethodSpec("allow", (), "let traffic through (clears the rule)"),
    MethodSpec("kill", (), "close both sides of the connection"),
    MethodSpec("reset", (), "reset the connection (TCP RST)"),
    MethodSpec("killall", (), "close this and every other proxied connection"),
    MethodSpec("cancel", (Param("pid", "process id of the backend to cancel (an integer > 0)"),),
               "send a cancel request for pid, then let the frame through"),
    MethodSpec("connect_delay",
               (Param("ms", "milliseconds to wait before connecting upstream (>= 0)"),),
               "delay every new connection to the server"),
)

RECORDER_COMMANDS: Mapping[str, MethodSpec] = _vocabulary(
    MethodSpec("dump", (), "print the recorded frames"),
    MethodSpec("reset", (), "forget the recorded frames"),
)

PROXY_COMMANDS: Mapping[str, MethodSpec] = _vocabulary(
    MethodSpec("ping", (), "answer (with an empty line) and change nothing"),
    MethodSpec("status", (), "one line: the connections the proxy relays, mitmproxy's "
                             "connection handlers, the event loop's tasks, and how many "
                             "frames the rule in force acted on"),
)

ROOTS = ("conn", "recorder", "proxy")
_ROOT_LIST = "'conn', 'recorder' or 'proxy'"
_MAX_PID = 2**31 - 1  # a cancel request carries the pid as a signed 32-bit integer
_ACTION_LIST = "allow(), kill(), reset(), killall(), cancel(pid) or connect_delay(ms)"


def filter_names(protocol: ProtocolSpec | str) -> list[str]:
    """The `on<Type>` filter names of every message type in the protocol's catalogue."""
    return [FILTER_PREFIX + name for name in _protocol(protocol).messages]


def _protocol(protocol: ProtocolSpec | str) -> ProtocolSpec:
    return protocols.get(protocol) if isinstance(protocol, str) else protocol


# --- entry point ---------------------------------------------------------------------------


Command = Rule | RecorderCommand | ProxyCommand


def parse(text: str, protocol: ProtocolSpec | str = "postgres",
          protected_pids: Mapping[int, str] | None = None) -> Command:
    """Parse one command; raise `CommandError` for anything not in the language.

    `protected_pids` maps process ids that `cancel(pid)` must refuse to what they are (the
    proxy passes its own pid and its parent's)."""
    spec = _protocol(protocol)
    command = _strip(text)
    _check_plain_text(command)
    source = _Source(command)
    tree = _parse_expression(command)
    root, links = _unwind(tree.body)
    return _Checker(source, spec, protected_pids or {}).command(root, links)


def _strip(text: str) -> str:
    command = text.strip()
    if command.endswith(";"):
        command = command[:-1].rstrip()
    return command


_FORBIDDEN_CHARACTERS = re.compile("[\r\n\0\ud800-\udfff]")
_FORBIDDEN_REASONS = {"\r": "a command must be on one line", "\n": "a command must be on one line",
                      "\0": "NUL character in command"}


def _check_plain_text(command: str) -> None:
    """Refuse what would make columns ambiguous or the parser choke before it can say where."""
    if not command:
        raise CommandError("empty command", 1)
    found = _FORBIDDEN_CHARACTERS.search(command)
    if found:
        reason = _FORBIDDEN_REASONS.get(found.group(), "invalid character (lone surrogate)")
        raise CommandError(reason, found.start() + 1)


def _parse_expression(command: str) -> ast.Expression:
    try:
        # String literals such as "min\(x\)" are normal here: the backslash is kept for the
        # regex, so the parser's invalid-escape warning is noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(command, mode="eval")
    except SyntaxError as exc:
        column = _clamp(exc.offset or 1, len(command))
        raise CommandError(f"syntax error: {exc.msg}", column) from None
    except (RecursionError, MemoryError):
        raise CommandError("command too deeply nested", 1) from None
    except ValueError as exc:  # e.g. characters the compiler refuses outright
        raise CommandError(f"syntax error: {exc}", 1) from None


def _clamp(column: int, length: int) -> int:
    return min(max(column, 1), length + 1)


def _one_line(message: str) -> str:
    return " ".join(message.splitlines())


# --- source positions ----------------------------------------------------------------------


class _Source:
    """Maps ast positions (UTF-8 byte offsets on line 1) to 1-based character columns."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.encoded = text.encode("utf-8")

    def column(self, byte_offset: int | None) -> int:
        if byte_offset is None:
            return 1
        chars = len(self.encoded[:byte_offset].decode("utf-8", "ignore"))
        return _clamp(chars + 1, len(self.text))

    def node_column(self, node: ast.AST) -> int:
        return self.column(getattr(node, "col_offset", None))

    def attribute_column(self, node: ast.Attribute) -> int:
        """Where the attribute's name starts (ast only gives the start of the whole chain)."""
        end = self.column(node.end_col_offset) - 1  # 0-based index just past the name
        start = end
        while start > 0 and ("a" + self.text[start - 1]).isidentifier():
            start -= 1
        return start + 1


# --- chain structure -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Link:
    """One `.name(args)` of the chain."""

    attribute: ast.Attribute
    call: ast.Call

    @property
    def name(self) -> str:
        return self.attribute.attr


def _unwind(body: ast.expr) -> tuple[ast.expr, list[ast.expr]]:
    """Split `root.a(...).b(...)` into the root and the nodes after it, leftmost first."""
    outer_first: list[ast.expr] = []
    node = body
    while True:
        if isinstance(node, ast.Call):
            outer_first.append(node)
            node = node.func
        elif isinstance(node, ast.Attribute | ast.Subscript):
            outer_first.append(node)
            node = node.value
        else:
            return node, outer_first[::-1]


_NODE_WORDS: dict[type[ast.AST], str] = {
    ast.Lambda: "a lambda",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a comprehension",
    ast.BinOp: "an operator",
    ast.BoolOp: "an operator",
    ast.Compare: "a comparison",
    ast.UnaryOp: "an operator",
    ast.JoinedStr: "an f-string",
    ast.FormattedValue: "an f-string",
    ast.Subscript: "a subscript",
    ast.Call: "a nested call",
    ast.Starred: "a starred argument",
    ast.List: "a list",
    ast.Tuple: "a tuple",
    ast.Set: "a set",
    ast.Dict: "a dict",
    ast.IfExp: "a conditional expression",
    ast.NamedExpr: "an assignment expression",
    ast.Await: "an await",
    ast.Yield: "a yield",
    ast.YieldFrom: "a yield",
    ast.Slice: "a slice",
    ast.Attribute: "an attribute",
}


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"name {node.id!r}"
    if isinstance(node, ast.Constant):
        return f"value {node.value!r}"
    return _NODE_WORDS.get(type(node), "an expression")


def _suggestion(word: str, candidates: Sequence[str]) -> str:
    """`; did you mean 'x'?` for the closest candidate, or ''."""
    same_case = [c for c in candidates if c.lower() == word.lower()]
    close = same_case or difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# --- the checker ---------------------------------------------------------------------------

_Literal = int | float | str | bytes


class _Checker:
    """Walks one command's chain against the whitelist and builds the result."""

    def __init__(self, source: _Source, protocol: ProtocolSpec,
                 protected_pids: Mapping[int, str]) -> None:
        self.source = source
        self.protocol = protocol
        self.protected_pids = protected_pids

    def fail(self, message: str, node: ast.AST) -> NoReturn:
        raise CommandError(message, self.source.node_column(node))

    def fail_at_name(self, message: str, link: _Link) -> NoReturn:
        raise CommandError(message, self.source.attribute_column(link.attribute))

    # structure

    def command(self, root: ast.expr, nodes: list[ast.expr]) -> Command:
        root_name = self.root(root)
        links = self.links(root_name, nodes)
        if root_name == "recorder":
            return RecorderCommand(self.control(root_name, RECORDER_COMMANDS, links),
                                   self.source.text)
        if root_name == "proxy":
            return ProxyCommand(self.control(root_name, PROXY_COMMANDS, links),
                                self.source.text)
        return self.rule(links)

    def root(self, root: ast.expr) -> str:
        if isinstance(root, ast.Name) and root.id in ROOTS:
            return root.id
        self.fail(f"{_describe(root)} is not allowed; commands start with {_ROOT_LIST}", root)

    def links(self, root_name: str, nodes: list[ast.expr]) -> list[_Link]:
        """Pair every `.name` with the call that must follow it, left to right."""
        links: list[_Link] = []
        index = 0
        while index < len(nodes):
            node = nodes[index]
            if not isinstance(node, ast.Attribute):
                self.unexpected_link(node, links[-1].name + "()" if links else root_name)
            self.check_attribute_name(node)
            following = nodes[index + 1] if index + 1 < len(nodes) else None
            if not isinstance(following, ast.Call):
                column = self.source.attribute_column(node)
                raise CommandError(f"{node.attr!r} must be called: write {node.attr}(...)",
                                   column)
            links.append(_Link(node, following))
            index += 2
        return links

    def unexpected_link(self, node: ast.expr, previous: str) -> NoReturn:
        """A call or subscript where `.method` was expected; point at its bracket."""
        inner = node.func if isinstance(node, ast.Call) else getattr(node, "value", node)
        column = self.source.column(getattr(inner, "end_col_offset", None))
        what = "a call" if isinstance(node, ast.Call) else _describe(node)
        raise CommandError(f"{what} is not allowed after {previous}; expected .method(...)",
                           column)

    def check_attribute_name(self, node: ast.Attribute) -> None:
        if node.attr.startswith("_"):
            column = self.source.attribute_column(node)
            raise CommandError(f"attribute {node.attr!r} is not allowed", column)

    # recorder, proxy

    def control(self, root_name: str, vocabulary: Mapping[str, MethodSpec],
                links: list[_Link]) -> str:
        """The name of the one method a `recorder.*` or `proxy.*` command calls."""
        names = ", ".join(spec.signature for spec in vocabulary.values())
        if not links:
            raise CommandError(f"{root_name} needs a command: {names}",
                               len(self.source.text) + 1)
        first = links[0]
        if first.name not in vocabulary:
            hint = _suggestion(first.name, list(vocabulary)) or f"; use {names}"
            self.fail_at_name(f"unknown {root_name} command {first.name!r}{hint}", first)
        self.bind(first, vocabulary[first.name].params)
        if len(links) > 1:
            self.fail_at_name(f"nothing may follow {root_name}.{first.name}()", links[1])
        return first.name

    # conn

    def rule(self, links: list[_Link]) -> Rule:
        steps: list[Step] = []
        for position, link in enumerate(links):
            if link.name in ACTIONS:
                action = self.action(link, has_filters=position > 0)
                if position + 1 < len(links):
                    self.fail_at_name(
                        f"nothing may follow the action {link.name}(); the action comes last",
                        links[position + 1])
                return Rule(tuple(steps), action, self.source.text)
            steps.append(self.step(link))
        raise CommandError(f"the command must end with an action: {_ACTION_LIST}",
                           len(self.source.text) + 1)

    def step(self, link: _Link) -> Step:
        name = link.name
        if name == "matches":
            return self.matches(link)
        if name == "contains":
            return self.contains(link)
        if name == "after":
            return After(self.after_count(link))
        if name.startswith(FILTER_PREFIX) and len(name) > len(FILTER_PREFIX):
            return self.message_filter(link)
        self.unknown_method(link)

    def unknown_method(self, link: _Link) -> NoReturn:
        name = link.name
        if name in RECORDER_COMMANDS:
            self.fail_at_name(f"{name}() is a recorder command: write recorder.{name}()", link)
        known = [*FILTERS, *ACTIONS, *filter_names(self.protocol)]
        hint = _suggestion(name, known) or (
            f"; filters: on<MessageType>(...), {', '.join(s.signature for s in FILTERS.values())}"
            f"; actions: {_ACTION_LIST}")
        self.fail_at_name(f"unknown method {name!r}{hint}", link)

    # filters

    def message_filter(self, link: _Link) -> MessageFilter:
        type_name = link.name[len(FILTER_PREFIX):]
        message = self.protocol.messages.get(type_name)
        if message is None:
            hint = _suggestion(type_name, list(self.protocol.messages))
            self.fail_at_name(f"unknown message type {type_name!r} for protocol "
                              f"{self.protocol.name}{hint}", link)
        if link.call.args:
            example = f"{message.fields[0]}=\"regex\"" if message.fields else ""
            self.fail(f"{link.name}() takes field=regex keyword arguments only, "
                      f"e.g. {link.name}({example})", link.call.args[0])
        fields = tuple(self.field_regex(type_name, message.fields, keyword)
                       for keyword in link.call.keywords)
        self.check_unique_fields(link.call.keywords)
        return MessageFilter(type_name, fields)

    def check_unique_fields(self, keywords: list[ast.keyword]) -> None:
        seen: set[str | None] = set()
        for keyword in keywords:
            if keyword.arg in seen:
                self.fail(f"field {keyword.arg!r} given twice", keyword)
            seen.add(keyword.arg)

    def field_regex(self, type_name: str, known: tuple[str, ...],
                    keyword: ast.keyword) -> tuple[str, re.Pattern[str]]:
        if keyword.arg is None:
            self.fail("'**' arguments are not allowed", keyword)
        if keyword.arg not in known:
            listing = f"fields: {', '.join(known)}" if known else "it has no fields"
            hint = _suggestion(keyword.arg, known)
            hint = f"{hint} {listing}" if hint else f"; {listing}"
            self.fail(f"{type_name!r} has no field {keyword.arg!r}{hint}", keyword)
        value = self.literal(keyword.value)
        if not isinstance(value, str):
            self.fail(f"{keyword.arg}= needs a str regex, got {value!r}", keyword.value)
        return keyword.arg, self.compile(value, keyword.value)

    def matches(self, link: _Link) -> BytesMatch:
        pattern, node = self.bytes_argument(link)
        return BytesMatch(self.compile(pattern, node))

    def contains(self, link: _Link) -> BytesContains:
        needle, _ = self.bytes_argument(link)
        return BytesContains(needle)

    def bytes_argument(self, link: _Link) -> tuple[bytes, ast.expr]:
        """The single bytes argument of matches()/contains(); str is taken as UTF-8."""
        param = FILTERS[link.name].params[0]
        node = self.bind(link, FILTERS[link.name].params)[param.name]
        value = self.literal(node)
        if isinstance(value, str):
            return value.encode("utf-8"), node
        if isinstance(value, bytes):
            return value, node
        self.fail(f"{link.name}({param.name}) needs bytes such as b\"...\", got {value!r}", node)

    def after_count(self, link: _Link) -> int:
        node = self.bind(link, FILTERS["after"].params)["n"]
        value = self.literal(node)
        if not _is_int(value) or value < 0:
            self.fail(f"after(n) needs an integer >= 0, got {value!r}", node)
        return value

    def compile(self, pattern: str | bytes, node: ast.AST) -> re.Pattern:
        try:
            return re.compile(pattern)
        except Exception as exc:  # re.error, OverflowError, RecursionError: all bad regexes
            self.fail(f"bad regex {pattern!r}: {exc}", node)

    # actions

    def action(self, link: _Link, has_filters: bool) -> Action:
        spec = ACTIONS[link.name]
        arguments = self.bind(link, spec.params)
        if link.name == "cancel":
            return Action("cancel", pid=self.pid(arguments["pid"]))
        if link.name == "connect_delay":
            if has_filters:
                self.fail_at_name("connect_delay() applies to every new connection and must "
                                  "come directly after 'conn', without filters", link)
            return Action("connect_delay", delay_ms=self.delay(arguments["ms"]))
        return Action(link.name)

    def pid(self, node: ast.expr) -> int:
        value = self.literal(node)
        if not _is_int(value) or not 0 < value <= _MAX_PID:
            self.fail(f"cancel(pid) needs an integer process id from 1 to {_MAX_PID}, "
                      f"got {value!r}", node)
        if value in self.protected_pids:
            self.fail(f"cancel({value}) would interrupt {self.protected_pids[value]}; give "
                      f"the pid of the process to cancel (e.g. pg_backend_pid())", node)
        return value

    def delay(self, node: ast.expr) -> float:
        value = self.literal(node)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(f"connect_delay(ms) needs a number of milliseconds, got {value!r}", node)
        if not math.isfinite(value) or value < 0:
            self.fail(f"connect_delay(ms) needs a finite number >= 0, got {value!r}", node)
        return float(value)

    # arguments

    def bind(self, link: _Link, params: tuple[Param, ...]) -> dict[str, ast.expr]:
        """Match the call's arguments to `params` (positional or by name), all required."""
        call = link.call
        signature = f"{link.name}({', '.join(p.name for p in params)})"
        names = [p.name for p in params]
        bound: dict[str, ast.expr] = {}
        for index, argument in enumerate(call.args):
            if isinstance(argument, ast.Starred):
                self.fail("'*' arguments are not allowed", argument)
            if index >= len(params):
                self.fail(f"too many arguments: {signature} takes {_count(len(params))}",
                          argument)
            bound[names[index]] = argument
        for keyword in call.keywords:
            if keyword.arg is None:
                self.fail("'**' arguments are not allowed", keyword)
            if keyword.arg not in names:
                self.fail(f"{signature} has no parameter {keyword.arg!r}", keyword)
            if keyword.arg in bound:
                self.fail(f"{signature} got {keyword.arg!r} twice", keyword)
            bound[keyword.arg] = keyword.value
        missing = [name for name in names if name not in bound]
        if missing:
            self.fail_at_name(f"{signature} needs {', '.join(missing)}", link)
        return bound

    def literal(self, node: ast.expr) -> _Literal:
        """The value of an int, float, str or bytes literal (or a negated number)."""
        if isinstance(node, ast.Constant) and _is_literal(node.value):
            return node.value
        if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
                and isinstance(node.operand, ast.Constant)
                and isinstance(node.operand.value, int | float)
                and not isinstance(node.operand.value, bool)):
            return -node.operand.value
        self.fail(f"{_describe(node)} is not allowed here; arguments must be literal strings, "
                  f"bytes or numbers", node)


def _count(arguments: int) -> str:
    if arguments == 0:
        return "no arguments"
    return "1 argument" if arguments == 1 else f"{arguments} arguments"


def _is_literal(value: object) -> bool:
    return isinstance(value, int | float | str | bytes) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = [
    "ACTIONS",
    "FILTERS",
    "FILTER_PREFIX",
    "PROXY_COMMANDS",
    "RECORDER_COMMANDS",
    "ROOTS",
    "Action",
    "After",
    "BytesContains",
    "BytesMatch",
    "Command",
    "CommandError",
    "MessageFilter",
    "MethodSpec",
    "Param",
    "ProxyCommand",
    "RecorderCommand",
    "Rule",
    "Step",
    "filter_names",
    "parse",
]
