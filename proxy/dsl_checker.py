"""The command language's checker: walk a command's chain against the whitelist.

`Checker` takes the root and links `dsl_syntax` produced and builds the result types of
`dsl` (`Rule`, `FaultCommand`, `RecorderCommand`, `ProxyCommand`), refusing with a
`CommandError` anything the vocabulary in `dsl_vocabulary` does not allow. Arguments must be
literals; nothing is ever evaluated.

Imported lazily by `dsl.parse`, so `dsl` never imports it at load time and there is no
import cycle.
"""

from __future__ import annotations

import ast
import difflib
import math
import re
from collections.abc import Mapping
from typing import NoReturn

from wirefault.protocols import ProtocolSpec
from wirefault.proxy.dsl import (
    CONNECTION_STEPS,
    Action,
    After,
    BytesContains,
    BytesMatch,
    Command,
    CommandError,
    ConnectionProbability,
    FaultCommand,
    FromSide,
    MessageFilter,
    Probability,
    ProxyCommand,
    RecorderCommand,
    Rule,
    Step,
    Times,
    Where,
    filter_names,
)
from wirefault.proxy.dsl_syntax import Link, Source, describe, suggestion
from wirefault.proxy.dsl_vocabulary import (
    ACTION_LIST,
    ACTIONS,
    FAULT_COMMANDS,
    FAULT_NAME,
    FILTER_PREFIX,
    FILTERS,
    MAX_PID,
    PROXY_COMMANDS,
    RECORDER_COMMANDS,
    ROOT_LIST,
    ROOTS,
    SEVERITIES,
    SQLSTATE,
    STARTUP_KEYS,
    WHERE_KEYS,
    MethodSpec,
    Param,
    listing,
    signature,
)
from wirefault.proxy.user_regex import UserPattern, UserRegexError, compile_user_pattern

_SURROGATE = re.compile("[\ud800-\udfff]")

# --- the checker ---------------------------------------------------------------------------

_Literal = int | float | str | bytes | None


_NUMBER_STEPS: dict[str, type[After | Times | Probability | ConnectionProbability]] = {
    "after": After, "times": Times, "probability": Probability,
    "connectionProbability": ConnectionProbability}
_PLAIN_STEPS: dict[str, Step] = {
    "fromClient": FromSide(from_client=True), "fromServer": FromSide(from_client=False),
    "once": Times(1)}


class Checker:
    """Walks one command's chain against the whitelist and builds the result."""

    def __init__(self, source: Source, protocol: ProtocolSpec,
                 protected_pids: Mapping[int, str]) -> None:
        self.source = source
        self.protocol = protocol
        self.protected_pids = protected_pids
        self.head = "'conn'"
        """What a chain's steps follow, for messages: 'conn' or faults.add(...)."""

    def fail(self, message: str, node: ast.AST) -> NoReturn:
        raise CommandError(message, self.source.node_column(node))

    def fail_at_name(self, message: str, link: Link) -> NoReturn:
        raise CommandError(message, self.source.attribute_column(link.attribute))

    def fail_at_end(self, message: str) -> NoReturn:
        raise CommandError(message, len(self.source.text) + 1)

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
        if root_name == "faults":
            return self.faults(links)
        return self.rule(links)

    def root(self, root: ast.expr) -> str:
        if isinstance(root, ast.Name) and root.id in ROOTS:
            return root.id
        self.fail(f"{describe(root)} is not allowed; commands start with {ROOT_LIST}", root)

    def links(self, root_name: str, nodes: list[ast.expr]) -> list[Link]:
        """Pair every `.name` with the call that must follow it, left to right."""
        links: list[Link] = []
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
            links.append(Link(node, following))
            index += 2
        return links

    def unexpected_link(self, node: ast.expr, previous: str) -> NoReturn:
        """A call or subscript where `.method` was expected; point at its bracket."""
        inner = node.func if isinstance(node, ast.Call) else getattr(node, "value", node)
        column = self.source.column(getattr(inner, "end_col_offset", None))
        what = "a call" if isinstance(node, ast.Call) else describe(node)
        raise CommandError(f"{what} is not allowed after {previous}; expected .method(...)",
                           column)

    def check_attribute_name(self, node: ast.Attribute) -> None:
        if node.attr.startswith("_"):
            column = self.source.attribute_column(node)
            raise CommandError(f"attribute {node.attr!r} is not allowed", column)

    # recorder, proxy, faults

    def control(self, root_name: str, vocabulary: Mapping[str, MethodSpec],
                links: list[Link]) -> str:
        """The name of the one method a `recorder.*`, `proxy.*` or `faults.*` command calls
        (`faults.add` is followed by its chain, which the caller checks)."""
        names = ", ".join(spec.signature for spec in vocabulary.values())
        if not links:
            self.fail_at_end(f"{root_name} needs a command: {names}")
        first = links[0]
        if first.name not in vocabulary:
            hint = suggestion(first.name, list(vocabulary)) or f"; use {names}"
            self.fail_at_name(f"unknown {root_name} command {first.name!r}{hint}", first)
        self.bind(first, vocabulary[first.name].params)
        if len(links) > 1 and not (root_name == "faults" and first.name == "add"):
            self.fail_at_name(f"nothing may follow {root_name}.{first.name}()", links[1])
        return first.name

    def faults(self, links: list[Link]) -> FaultCommand:
        op = self.control("faults", FAULT_COMMANDS, links)
        first = links[0]
        arguments = self.bind(first, FAULT_COMMANDS[op].params)
        name, column = self.fault_name(arguments["name"]) if "name" in arguments else (None, 0)
        if op != "add":
            return FaultCommand(op, name, None, None, self.source.text, column)
        seed = self.number(first, FAULT_COMMANDS["add"].params[1], arguments)
        if len(links) == 1:
            self.fail_at_end(f"faults.add(name) must be followed by a chain ending in an "
                             f"action: {ACTION_LIST}")
        self.head = "faults.add(...)"
        rule = self.rule(links[1:])
        return FaultCommand(op, name, rule, seed if seed is None else int(seed),
                            self.source.text, column)

    def fault_name(self, node: ast.expr) -> tuple[str, int]:
        value = self.literal(node)
        if not isinstance(value, str):
            self.fail(f"a fault name is a string such as \"slow\", got {value!r}", node)
        if not FAULT_NAME.fullmatch(value):
            self.fail(f"bad fault name {value!r}: a name is a letter or digit, then up to 63 "
                      f"letters, digits, '_', '.', ':' or '-'", node)
        return value, self.source.node_column(node)

    # chains: conn.* and faults.add(...).*

    def rule(self, links: list[Link]) -> Rule:
        steps: list[Step] = []
        for position, link in enumerate(links):
            if link.name in ACTIONS:
                action = self.action(link, list(zip(steps, links, strict=False)))
                if position + 1 < len(links):
                    self.fail_at_name(
                        f"nothing may follow the action {link.name}(); the action comes last",
                        links[position + 1])
                return Rule(tuple(steps), action, self.source.text)
            step = self.step(link)
            self.check_single(step, steps, link)
            steps.append(step)
        self.fail_at_end(f"the command must end with an action: {ACTION_LIST}")

    def check_single(self, step: Step, earlier: list[Step], link: Link) -> None:
        """times()/once() and connectionProbability() say how a whole fault behaves: once."""
        for kind, what in ((Times, "times(n) or once()"),
                           (ConnectionProbability, "connectionProbability(p)")):
            if isinstance(step, kind) and any(isinstance(s, kind) for s in earlier):
                self.fail_at_name(f"a chain may have only one {what}", link)

    def step(self, link: Link) -> Step:
        name = link.name
        # Checked before the `on` prefix: `once` starts with it too.
        if name in _NUMBER_STEPS:
            return _NUMBER_STEPS[name](self.only_number(link))
        if name in _PLAIN_STEPS:
            self.bind(link, ())
            return _PLAIN_STEPS[name]
        if name in ("matches", "contains", "where"):
            return {"matches": self.matches, "contains": self.contains,
                    "where": self.where}[name](link)
        if name.startswith(FILTER_PREFIX) and len(name) > len(FILTER_PREFIX):
            return self.message_filter(link)
        self.unknown_method(link)

    def unknown_method(self, link: Link) -> NoReturn:
        name = link.name
        if name in RECORDER_COMMANDS:
            self.fail_at_name(f"{name}() is a recorder command: write recorder.{name}()", link)
        if name in FAULT_COMMANDS:
            arguments = "..." if FAULT_COMMANDS[name].params else ""
            self.fail_at_name(f"{name}() is a faults command: write faults.{name}({arguments})",
                              link)
        known = [*FILTERS, *ACTIONS, *filter_names(self.protocol)]
        hint = suggestion(name, known) or (
            f"; filters: on<MessageType>(...), {', '.join(s.signature for s in FILTERS.values())}"
            f"; actions: {ACTION_LIST}")
        self.fail_at_name(f"unknown method {name!r}{hint}", link)

    # filters

    def message_filter(self, link: Link) -> MessageFilter:
        type_name = link.name[len(FILTER_PREFIX):]
        message = self.protocol.messages.get(type_name)
        if message is None:
            # `onc` is more likely once() than a message type `c`.
            close = difflib.get_close_matches(link.name, [*FILTERS, *ACTIONS], n=1, cutoff=0.8)
            hint = suggestion(type_name, list(self.protocol.messages)) or (
                f"; did you mean {close[0]!r}?" if close else "")
            self.fail_at_name(f"unknown message type {type_name!r} for protocol "
                              f"{self.protocol.name}{hint}", link)
        if link.call.args:
            example = f"{message.fields[0]}=\"regex\"" if message.fields else ""
            self.fail(f"{link.name}() takes field=regex keyword arguments only, "
                      f"e.g. {link.name}({example})", link.call.args[0])
        # Derived fields (a PostgreSQL Execute's query) are filtered on like the frame's own.
        derived = self.protocol.derived_fields.get(type_name, ())
        known = (*message.fields, *(f for f in derived if f not in message.fields))
        fields = tuple(self.field_regex(type_name, known, keyword)
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
                    keyword: ast.keyword) -> tuple[str, UserPattern]:
        if keyword.arg is None:
            self.fail("'**' arguments are not allowed", keyword)
        if keyword.arg not in known:
            listing_ = f"fields: {', '.join(known)}" if known else "it has no fields"
            hint = suggestion(keyword.arg, known)
            hint = f"{hint} {listing_}" if hint else f"; {listing_}"
            self.fail(f"{type_name!r} has no field {keyword.arg!r}{hint}", keyword)
        return keyword.arg, self.regex(keyword)

    def regex(self, keyword: ast.keyword) -> UserPattern:
        value = self.literal(keyword.value)
        if not isinstance(value, str):
            self.fail(f"{keyword.arg}= needs a str regex, got {value!r}", keyword.value)
        return self.compile(value, keyword.value)

    def matches(self, link: Link) -> BytesMatch:
        pattern, node = self.bytes_argument(link)
        return BytesMatch(self.compile(pattern, node))

    def contains(self, link: Link) -> BytesContains:
        needle, _ = self.bytes_argument(link)
        return BytesContains(needle)

    def bytes_argument(self, link: Link) -> tuple[bytes, ast.expr]:
        """The single bytes argument of matches()/contains(); str is taken as UTF-8."""
        param = FILTERS[link.name].params[0]
        node = self.bind(link, FILTERS[link.name].params)[param.name]
        value = self.literal(node)
        if isinstance(value, str):
            return value.encode("utf-8"), node
        if isinstance(value, bytes):
            return value, node
        self.fail(f"{link.name}({param.name}) needs bytes such as b\"...\", got {value!r}", node)

    def where(self, link: Link) -> Where:
        call = link.call
        startup = self.protocol.messages.get("StartupMessage")
        available = [k for k in STARTUP_KEYS if startup and k in startup.fields] + ["client"]
        keys = listing([f"{key}=" for key in available])
        if call.args:
            self.fail(f"where() takes key=regex keyword arguments only, e.g. "
                      f"where({available[0]}=\"regex\")", call.args[0])
        if not call.keywords:
            self.fail_at_name(f"where() needs at least one of {keys}", link)
        fields: list[tuple[str, UserPattern]] = []
        for keyword in call.keywords:
            key = keyword.arg
            if key is None:
                self.fail("'**' arguments are not allowed", keyword)
            if key not in WHERE_KEYS:
                hint = suggestion(key, available)
                self.fail(f"where() has no key {key!r}{hint}{' ' if hint else '; '}keys: "
                          f"{', '.join(available)}", keyword)
            if key not in available:
                self.fail(f"protocol {self.protocol.name} has no startup parameter {key!r}; "
                          f"where() takes only {keys} here", keyword)
            if any(key == seen for seen, _ in fields):
                self.fail(f"where() key {key!r} given twice", keyword)
            fields.append((key, self.regex(keyword)))
        return Where(tuple(fields))

    def compile(self, pattern: str | bytes, node: ast.AST) -> UserPattern:
        try:
            return compile_user_pattern(pattern)
        except UserRegexError as exc:
            column = self.pattern_column(pattern, exc.offset, node)
            where = "" if column is not None or exc.offset is None else \
                f" at offset {exc.offset} of the pattern"
            raise CommandError(f"regex {pattern!r} uses {exc.problem}{where}; patterns run "
                               f"in linear time, which rules that out",
                               column or self.source.node_column(node)) from None
        except Exception as exc:  # re.error, OverflowError, RecursionError: all bad regexes
            self.fail(f"bad regex {pattern!r}: {exc}", node)

    def pattern_column(self, pattern: str | bytes, offset: int | None,
                       node: ast.AST) -> int | None:
        """The command column of `offset` in the pattern, when the literal is written as
        the pattern itself (no escape that the string literal resolves); else None."""
        if offset is None:
            return None
        start = self.source.node_column(node)
        end = self.source.column(getattr(node, "end_col_offset", None))
        written = self.source.text[start - 1:end - 1]
        body = written.lstrip("rRbBuU")
        text = pattern.decode("latin-1") if isinstance(pattern, bytes) else pattern
        if len(body) < 2 or body[1:-1] != text:
            return None
        return start + len(written) - len(body) + 1 + offset

    # actions

    def action(self, link: Link, earlier: list[tuple[Step, Link]]) -> Action:
        name = link.name
        if name == "cancel":
            return self.cancel(link)
        if name == "error":
            return self.error(link)
        spec = ACTIONS[name]
        arguments = self.bind(link, spec.params)
        if name == "connect_delay":
            self.check_connection_steps(link, earlier)
            return Action("connect_delay", delay_ms=self.number(link, spec.params[0], arguments))
        return Action(name, options=tuple((param.name, self.number(link, param, arguments))
                                          for param in spec.params))

    def check_connection_steps(self, link: Link, earlier: list[tuple[Step, Link]]) -> None:
        """connect_delay() acts before any frame exists: no frame filter can precede it."""
        for step, step_link in earlier:
            if not isinstance(step, CONNECTION_STEPS):
                self.fail_at_name(
                    f"connect_delay() applies to every new connection and must come directly "
                    f"after {self.head}, without filters: only where(), times(), once(), "
                    f"probability() or connectionProbability() may precede it, not "
                    f"{step_link.name}()", link)

    def cancel(self, link: Link) -> Action:
        """`cancel(pid)`: that process; `cancel(after_ms=100)`: this connection's server."""
        spec = ACTIONS["cancel"]
        keywords = {keyword.arg: keyword for keyword in link.call.keywords}
        by_pid = bool(link.call.args) or "pid" in keywords
        after = keywords.get("after_ms")
        if after is not None and by_pid:
            self.fail("cancel() takes a pid or after_ms, not both", after)
        if by_pid or (after is None and not self.protocol.cancels_backends):
            return Action("cancel", pid=self.pid(self.bind(link, spec.params)["pid"]))
        if not self.protocol.cancels_backends:
            self.fail(f"cancel() without a pid needs a protocol that can cancel the server's "
                      f"work; this proxy's protocol {self.protocol.name} cannot", after)
        (form,) = spec.alternatives
        arguments = self.bind(link, form, " or ".join(spec.signatures))
        return Action("cancel", options=(("after_ms", self.number(link, form[0], arguments)),))

    def error(self, link: Link) -> Action:
        allowed = self.protocol.error_parameters
        if allowed is None:
            self.fail_at_name(f"error() needs a protocol with error messages; this proxy's "
                              f"protocol {self.protocol.name} has none", link)
        spec = ACTIONS["error"]
        # The protocol's own parameters, in signature order, are the positional ones.
        params = tuple(param for param in spec.params if param.name in allowed)
        for keyword in link.call.keywords:
            if keyword.arg not in allowed and any(p.name == keyword.arg for p in spec.params):
                takes = f"only {', '.join(p.name for p in params)}" if params else "nothing"
                self.fail(f"protocol {self.protocol.name} has no error {keyword.arg}: its "
                          f"error() takes {takes}", keyword)
        arguments = self.bind(link, params)
        code, message, severity = (self.error_value(param, arguments.get(param.name))
                                   for param in spec.params)
        return Action("error", options=(("code", code), ("message", message),
                                        ("severity", severity)))

    def error_value(self, param: Param, node: ast.expr | None) -> str | None:
        if node is None:
            assert param.default is None or isinstance(param.default, str)
            return param.default
        value = self.literal(node, allow_none=param.default is None)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(f"error({param.name}) needs a str, got {value!r}", node)
        if param.name == "code" and not SQLSTATE.fullmatch(value):
            upper = value.upper()
            hint = f"; did you mean {upper!r}?" if SQLSTATE.fullmatch(upper) else ""
            self.fail(f"error(code) needs a SQLSTATE: 5 digits or upper-case letters such as "
                      f"\"57014\", got {value!r}{hint}", node)
        if param.name == "severity" and value not in SEVERITIES:
            self.fail(f"error(severity) must be {listing([repr(s) for s in SEVERITIES])}, "
                      f"in upper case, got {value!r}{suggestion(value, SEVERITIES)}", node)
        if param.name == "message":
            # It goes out as a NUL-terminated UTF-8 string.
            if "\0" in value:
                self.fail("error(message) must not contain NUL characters", node)
            if _SURROGATE.search(value):
                self.fail("error(message) must not contain lone surrogates", node)
        return value

    def pid(self, node: ast.expr) -> int:
        value = self.literal(node)
        if not _is_int(value) or not 0 < value <= MAX_PID:
            self.fail(f"cancel(pid) needs an integer process id from 1 to {MAX_PID}, "
                      f"got {value!r}", node)
        if value in self.protected_pids:
            self.fail(f"cancel({value}) would interrupt {self.protected_pids[value]}; give "
                      f"the pid of the process to cancel (e.g. pg_backend_pid())", node)
        return value

    # arguments

    def only_number(self, link: Link) -> int | float:
        """The one required numeric argument of after(n), times(n), probability(p), ..."""
        (param,) = FILTERS[link.name].params
        value = self.number(link, param, self.bind(link, (param,)))
        assert value is not None
        return value

    def number(self, link: Link, param: Param,
               arguments: dict[str, ast.expr]) -> int | float | None:
        """A numeric argument checked against its `Param.number` (its default when left out)."""
        rule = param.number
        assert rule is not None, f"{link.name}({param.name}) is not numeric"
        label = f"{link.name}({param.name})"
        node = arguments.get(param.name)
        value = param.default if node is None else self.literal(
            node, allow_none=param.default is None)
        if value is None:
            return None
        at: ast.AST = node if node is not None else link.attribute
        if rule.integer:
            bounds = f">= {rule.low}" if rule.high is None else f"from {rule.low} to {rule.high}"
            if not _is_int(value) or value < rule.low or (
                    rule.high is not None and value > rule.high):
                self.fail(f"{label} needs an integer {bounds}, got {value!r}", at)
            return value
        if not isinstance(value, int | float):
            self.fail(f"{label} needs {rule.noun}, got {value!r}", at)
        try:
            number = float(value)
        except OverflowError:  # an integer literal too large for a float
            number = math.inf
        if not math.isfinite(number) or number < rule.low or (
                rule.high is not None and number > rule.high):
            bounds = (f"a finite number >= {rule.low}" if rule.high is None
                      else f"a number from {rule.low} to {rule.high}")
            self.fail(f"{label} needs {bounds}, got {value!r}", at)
        return number

    def bind(self, link: Link, params: tuple[Param, ...],
             shown: str | None = None) -> dict[str, ast.expr]:
        """Match the call's arguments to `params` (positional or by name); a parameter
        without a default must be given. `shown`: the signature errors name."""
        call = link.call
        shown = shown or signature(link.name, params)
        names = [p.name for p in params]
        bound: dict[str, ast.expr] = {}
        for index, argument in enumerate(call.args):
            if isinstance(argument, ast.Starred):
                self.fail("'*' arguments are not allowed", argument)
            if index >= len(params):
                at_most = "at most " if any(not p.required for p in params) else ""
                self.fail(f"too many arguments: {shown} takes {at_most}{_count(len(params))}",
                          argument)
            bound[names[index]] = argument
        for keyword in call.keywords:
            if keyword.arg is None:
                self.fail("'**' arguments are not allowed", keyword)
            if keyword.arg not in names:
                self.fail(f"{shown} has no parameter {keyword.arg!r}", keyword)
            if keyword.arg in bound:
                self.fail(f"{shown} got {keyword.arg!r} twice", keyword)
            bound[keyword.arg] = keyword.value
        missing = [p.name for p in params if p.required and p.name not in bound]
        if missing:
            self.fail_at_name(f"{shown} needs {', '.join(missing)}", link)
        return bound

    def literal(self, node: ast.expr, allow_none: bool = False) -> _Literal:
        """The value of an int, float, str or bytes literal (or a negated number); None
        too where that is the parameter's default (`hang(ms=None)`)."""
        if isinstance(node, ast.Constant) and (
                _is_literal(node.value) or (allow_none and node.value is None)):
            return node.value
        if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
                and isinstance(node.operand, ast.Constant)
                and isinstance(node.operand.value, int | float)
                and not isinstance(node.operand.value, bool)):
            return -node.operand.value
        self.fail(f"{describe(node)} is not allowed here; arguments must be literal strings, "
                  f"bytes or numbers", node)


def _count(arguments: int) -> str:
    if arguments == 0:
        return "no arguments"
    return "1 argument" if arguments == 1 else f"{arguments} arguments"


def _is_literal(value: object) -> bool:
    return isinstance(value, int | float | str | bytes) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = ["Checker"]
