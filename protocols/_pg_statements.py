"""What each prepared statement and portal of one PostgreSQL connection runs, from the
client's messages, so a fault can filter an Execute on the query it executes.

Only the protocol-level objects are followed: Parse defines a statement (by name; "" is the
unnamed one), Bind a portal over a statement, Close (kind S or P) removes one, and a simple
Query removes the unnamed statement and portal (the server drops them at every Query) plus
whatever its `DISCARD ALL` or `DEALLOCATE [PREPARE] name | ALL` statements remove.

Not followed, because only the server's replies or SQL semantics tell:
- SQL-level `PREPARE` / `EXECUTE` (their statements share the namespace, but an Execute
  message never runs them, so no filter needs them);
- whether a Parse or Bind failed (a failed one is recorded all the same);
- portals ending with their transaction (a stale portal is harmless: the server rejects an
  Execute of it, and the next Bind of that name replaces the entry);
- DISCARD / DEALLOCATE run inside functions, or a statement of a multi-statement Query that
  never ran because an earlier one failed.

Memory is bounded per connection: at most `MAX_ENTRIES` statements and as many portals, and
at most `MAX_CHARS` characters of query text in each map; the oldest entries go first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

MAX_ENTRIES = 10_000
"""Statements (and, separately, portals) kept per connection."""
MAX_CHARS = 16 * 1024 * 1024
"""Characters of query text kept per map per connection: a client preparing huge
statements under ever new names must not grow the proxy without bound."""

# A fast pre-check: most Query strings contain neither keyword, so they skip the lexer.
_MAYBE_DISCARD = re.compile(r"discard|deallocate", re.IGNORECASE)
_DISCARD_ALL = re.compile(r"\s*discard\s+all\s*", re.IGNORECASE)
_DEALLOCATE = re.compile(
    r'\s*deallocate\s+(?:prepare\s+)?(?:"(?P<quoted>(?:[^"]|"")+)"|(?P<plain>[^\s"]+))\s*',
    re.IGNORECASE,
)
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_IDENTIFIER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$")


class _BoundedMap:
    """A name -> query text map that forgets its oldest entries beyond its bounds."""

    __slots__ = ("_chars", "_items", "max_chars", "max_entries")

    def __init__(self, max_entries: int, max_chars: int) -> None:
        self._items: dict[str, str] = {}
        self._chars = 0
        self.max_entries = max_entries
        self.max_chars = max_chars

    def __len__(self) -> int:
        return len(self._items)

    def get(self, name: str) -> str | None:
        return self._items.get(name)

    def put(self, name: str, text: str) -> None:
        # Removing first moves a redefined name to the newest end, so eviction stays oldest
        # first by definition time.
        self.pop(name)
        self._items[name] = text
        self._chars += len(text)
        items = self._items
        while len(items) > self.max_entries or (self._chars > self.max_chars and len(items) > 1):
            self.pop(next(iter(items)))

    def pop(self, name: str) -> None:
        text = self._items.pop(name, None)
        if text is not None:
            self._chars -= len(text)

    def clear(self) -> None:
        self._items.clear()
        self._chars = 0


class StatementTracker:
    """The prepared statements and portals of one connection, by name, with the query text
    each runs (see the module's docstring for what is and is not followed)."""

    __slots__ = ("_portals", "_statements")

    def __init__(self, max_entries: int = MAX_ENTRIES, max_chars: int = MAX_CHARS) -> None:
        self._statements = _BoundedMap(max_entries, max_chars)
        self._portals = _BoundedMap(max_entries, max_chars)

    @property
    def statement_count(self) -> int:
        return len(self._statements)

    @property
    def portal_count(self) -> int:
        return len(self._portals)

    def parse(self, statement: str, query: str) -> None:
        """A Parse: `statement` now runs `query` (a later Parse of the name replaces it)."""
        self._statements.put(statement, query)

    def bind(self, portal: str, statement: str) -> None:
        """A Bind: `portal` now runs what `statement` runs (unknown statement: forgotten)."""
        query = self._statements.get(statement)
        if query is None:
            self._portals.pop(portal)
        else:
            self._portals.put(portal, query)

    def close(self, kind: str, name: str) -> None:
        """A Close of a statement (kind "S") or a portal ("P")."""
        if kind == "S":
            self._statements.pop(name)
        elif kind == "P":
            self._portals.pop(name)

    def simple_query(self, text: str) -> None:
        """A simple Query: the unnamed statement and portal go, and so does whatever its
        `DISCARD ALL` / `DEALLOCATE` statements remove."""
        self._statements.pop("")
        self._portals.pop("")
        if _MAYBE_DISCARD.search(text) is None:
            return
        for statement in split_statements(text):
            if _DISCARD_ALL.fullmatch(statement):
                self.clear()
                continue
            found = _DEALLOCATE.fullmatch(statement)
            if found is None:
                continue
            quoted = found.group("quoted")
            if quoted is not None:
                self._statements.pop(quoted.replace('""', '"'))
            elif found.group("plain").translate(_ASCII_LOWER) == "all":
                self._statements.clear()
            else:  # unquoted names fold to lower case (ASCII letters only, as the server does)
                self._statements.pop(found.group("plain").translate(_ASCII_LOWER))

    def has_unnamed(self) -> bool:
        """Whether the unnamed statement or the unnamed portal is defined."""
        return self._statements.get("") is not None or self._portals.get("") is not None

    def statement_query(self, statement: str) -> str | None:
        """The query text `statement` runs; None when unknown."""
        return self._statements.get(statement)

    def portal_query(self, portal: str) -> str | None:
        """The query text `portal` runs; None when unknown."""
        return self._portals.get(portal)

    def clear(self) -> None:
        self._statements.clear()
        self._portals.clear()


def split_statements(text: str) -> Iterator[str]:
    """The statements of a query string, split at the semicolons outside quotes and
    comments, each with its comments replaced by a space (so `DEALLOCATE /* x */ s` still
    reads as two words). Lexes quotes as PostgreSQL does: '...' (E'...' with backslash
    escapes), "...", $tag$...$tag$, -- and nested /* */ comments."""
    parts: list[str] = []
    start = 0  # where the current uncommented stretch begins
    at = 0
    size = len(text)
    while at < size:
        char = text[at]
        if char == ";":
            parts.append(text[start:at])
            yield "".join(parts)
            parts = []
            at += 1
            start = at
        elif char == "'":
            backslashes = at > 0 and text[at - 1] in "eE" and (
                at == 1 or text[at - 2] not in _IDENTIFIER_CHARS)
            at = _end_of_quote(text, at + 1, "'", backslashes)
        elif char == '"':
            at = _end_of_quote(text, at + 1, '"', False)
        elif char == "$" and (at == 0 or text[at - 1] not in _IDENTIFIER_CHARS):
            tag = _DOLLAR_TAG.match(text, at)
            if tag is None:
                at += 1
            else:
                close = text.find(tag.group(), tag.end())
                at = size if close < 0 else close + len(tag.group())
        elif char == "-" and text.startswith("--", at):
            parts.append(text[start:at])
            newline = text.find("\n", at)
            at = size if newline < 0 else newline
            parts.append(" ")
            start = at
        elif char == "/" and text.startswith("/*", at):
            parts.append(text[start:at])
            at = _end_of_comment(text, at + 2)
            parts.append(" ")
            start = at
        else:
            at += 1
    parts.append(text[start:])
    rest = "".join(parts)
    if rest.strip():
        yield rest


def _end_of_quote(text: str, at: int, quote: str, backslashes: bool) -> int:
    """Where the quoted text whose body starts at `at` ends (after its closing quote; a
    doubled quote is part of the body)."""
    size = len(text)
    while at < size:
        char = text[at]
        if backslashes and char == "\\":
            at += 2
        elif char == quote:
            if text.startswith(quote, at + 1):
                at += 2
            else:
                return at + 1
        else:
            at += 1
    return size


def _end_of_comment(text: str, at: int) -> int:
    """Where the block comment whose body starts at `at` ends (comments nest)."""
    depth = 1
    size = len(text)
    while at < size and depth:
        if text.startswith("/*", at):
            depth += 1
            at += 2
        elif text.startswith("*/", at):
            depth -= 1
            at += 2
        else:
            at += 1
    return at
