"""The command language's syntax: command text to an `ast` chain, and back to columns.

`parse` (in `dsl`) strips the command, refuses what cannot be parsed safely, parses it with
`ast` and unwinds `root.a(...).b(...)` into its root and links; `dsl_checker` then checks the
links against the vocabulary. `Source` maps ast positions to the 1-based character columns
errors report; `describe` and `suggestion` word those errors.

Imported lazily by `dsl.parse` (it needs `dsl.CommandError`), so `dsl` never imports it at
load time and there is no import cycle.
"""

from __future__ import annotations

import ast
import difflib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from wirefault.proxy.dsl import CommandError

# --- command text --------------------------------------------------------------------------


def strip_command(text: str) -> str:
    command = text.strip()
    if command.endswith(";"):
        command = command[:-1].rstrip()
    return command


_FORBIDDEN_CHARACTERS = re.compile("[\r\n\0\ud800-\udfff]")
_FORBIDDEN_REASONS = {"\r": "a command must be on one line", "\n": "a command must be on one line",
                      "\0": "NUL character in command"}


def check_plain_text(command: str) -> None:
    """Refuse what would make columns ambiguous or the parser choke before it can say where."""
    if not command:
        raise CommandError("empty command", 1)
    found = _FORBIDDEN_CHARACTERS.search(command)
    if found:
        reason = _FORBIDDEN_REASONS.get(found.group(), "invalid character (lone surrogate)")
        raise CommandError(reason, found.start() + 1)


def parse_expression(command: str) -> ast.Expression:
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


# --- source positions ----------------------------------------------------------------------


class Source:
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
class Link:
    """One `.name(args)` of the chain."""

    attribute: ast.Attribute
    call: ast.Call

    @property
    def name(self) -> str:
        return self.attribute.attr


def unwind(body: ast.expr) -> tuple[ast.expr, list[ast.expr]]:
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


def describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"name {node.id!r}"
    if isinstance(node, ast.Constant):
        return f"value {node.value!r}"
    return _NODE_WORDS.get(type(node), "an expression")


def suggestion(word: str, candidates: Sequence[str]) -> str:
    """`; did you mean 'x'?` for the closest candidate, or ''."""
    same_case = [c for c in candidates if c.lower() == word.lower()]
    close = same_case or difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


__all__ = [
    "Link",
    "Source",
    "check_plain_text",
    "describe",
    "parse_expression",
    "strip_command",
    "suggestion",
    "unwind",
]
