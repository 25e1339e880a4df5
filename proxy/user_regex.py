"""The one place a user's regular expression is compiled: Python's syntax and meaning, run in
time linear in the text.

Python's `re` backtracks: `(a+)+$` against 26 `a`s and a `b` takes seconds, and the rules
engine runs on the proxy's event loop, so one such query would stall every connection. RE2
(`google-re2`) runs any pattern in time linear in the text, but through its Python binding a
match costs about 1 us where `re` needs 0.2-0.4 us on a typical Query, and the common
`^COMMIT` is on the hot path of every frame. So:

- The pattern is parsed by Python's own parser: what it means is what Python says, errors
  are Python's, and only constructs with a linear-time equivalent are accepted (no
  lookarounds, backreferences, conditionals, atomic groups or possessive repeats; those are
  refused with the construct and its offset in the pattern).
- A pattern whose backtracking is provably bounded (no repeat of anything longer than one
  character; at most one variable repeat, and then only if anchored at the start; few
  alternatives) stays on `re`: the same result, at `re`'s speed.
- Every other pattern is translated from Python's parse tree into RE2 syntax with Python's
  meaning (`$` before a final newline, `\\Z`, Unicode `\\d`/`\\w`/`\\s`, ASCII-only case folding
  for bytes) and runs on RE2.

A filter only asks whether a frame matches, so both kinds answer `search(text)` with
something truthy or None.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from re import _constants as sre  # Python's own parse tree: the meaning we must keep
from re import _parser as sre_parse
from typing import Any, Literal

from re2 import Options, _re2  # the binding's compiled core: no per-call Python layer

from wirefault.protocols.batch import LITERAL_ANCHORED, LITERAL_FOLDED

__all__ = ["Re2Pattern", "UserPattern", "UserRegexError", "compile_for_re2",
           "compile_user_pattern", "literal_form"]

# RE2 refuses larger counts; so does this module, before RE2 logs anything.
_MAX_REPEAT = 1000
# Past this many combinations of alternatives a backtracking match could try per start
# position, the pattern goes to RE2 even with no repeat in it.
_MAX_SAFE_PATHS = 64
_UNANCHORED = _re2.RE2.Anchor.UNANCHORED
_SINGLE = frozenset({sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN})


class UserRegexError(ValueError):
    """A pattern this proxy will not run; `offset` is where in the pattern (0-based)."""

    def __init__(self, problem: str, offset: int | None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.offset = offset


class Re2Pattern:
    """A user's pattern that runs on RE2; equal to the `re.Pattern` of the same source."""

    __slots__ = ("_hash", "_regexp", "flags", "pattern", "translated")

    def __init__(self, pattern: str | bytes, python: re.Pattern[Any], translated: str) -> None:
        self.pattern = pattern
        self.flags = python.flags
        self.translated = translated  # RE2 syntax, for tests and debugging
        self._hash = hash(python)
        options = Options()
        options.never_capture = True  # a filter needs no groups: faster, less memory
        options.log_errors = False  # a refusal is a one-line command error, not a log line
        options.case_sensitive = True  # case folding is written into `translated`
        if isinstance(pattern, bytes):
            options.encoding = Options.Encoding.LATIN1  # one byte, one character, as in re
            source = translated.encode("latin-1")
        else:
            source = translated.encode("utf-8")
        self._regexp = _re2.RE2(source, options)
        if not self._regexp.ok():
            raise UserRegexError(f"the linear-time engine refuses it: "
                                 f"{self._regexp.error().decode('utf-8', 'replace')}", None)

    def search(self, text: str | bytes) -> Literal[True] | None:
        # surrogatepass: a lone surrogate (no decoder makes one) must not raise mid-frame;
        # RE2 then sees bytes that are not UTF-8, which no character class matches.
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        return True if self._regexp.Match(_UNANCHORED, data, 0, len(data))[0][0] >= 0 else None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Re2Pattern | re.Pattern):
            return self.pattern == other.pattern and self.flags == other.flags
        return NotImplemented

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"re2.compile({self.pattern!r})"


UserPattern = re.Pattern[str] | re.Pattern[bytes] | Re2Pattern


_PLAIN_TEXT = re.compile(r"\^?[^.^$*+?{}\[\]\\|()]*")
_PLAIN_BYTES = re.compile(rb"\^?[^.^$*+?{}\[\]\\|()]*")


def compile_user_pattern(pattern: str | bytes) -> UserPattern:
    """Compile a user's pattern (a str for text fields, bytes for raw frames), or raise
    `re.error` (Python refuses it) / `UserRegexError` (it cannot run in linear time)."""
    plain = _PLAIN_BYTES if isinstance(pattern, bytes) else _PLAIN_TEXT
    if plain.fullmatch(pattern):  # type: ignore[arg-type]
        # A literal, anchored or not (`^COMMIT`, a megabyte of text): `re` finds it in
        # linear time, and there is nothing to refuse or translate.
        return re.compile(pattern)
    with warnings.catch_warnings():  # a FutureWarning must not reach the proxy's log
        warnings.simplefilter("ignore")
        python = re.compile(pattern)
        tree = sre_parse.parse(pattern, 0)
    is_bytes = isinstance(pattern, bytes)
    flags = tree.state.flags
    if flags & sre.SRE_FLAG_LOCALE:
        raise UserRegexError("(?L) depends on the proxy's locale; write the bytes", None)
    translated = _Translator(pattern, is_bytes).sequence(tree, flags, tail=True)
    # Translated even when `re` will run it: a pattern is accepted or refused by one rule,
    # whichever engine runs it.
    if _bounded(tree, flags, is_bytes):
        return python
    return Re2Pattern(pattern, python, translated)


def literal_form(pattern: object) -> bytes | None:
    """A text pattern as `texts_pass`'s literal test when that finds exactly what
    `pattern.search` finds in ASCII text (texts_pass tests only ASCII): `re` patterns of
    ASCII literal characters, anchored at the start or not, case folded by (?i) or not, and
    no other flag (MULTILINE would move `^`). None for anything else."""
    if type(pattern) is not re.Pattern or not isinstance(pattern.pattern, str):
        return None
    if pattern.flags & ~(re.UNICODE | re.IGNORECASE):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = list(sre_parse.parse(pattern.pattern, 0))
    flags = 0
    if items and items[0] in ((sre.AT, sre.AT_BEGINNING), (sre.AT, sre.AT_BEGINNING_STRING)):
        flags |= LITERAL_ANCHORED
        items = items[1:]
    if any(op is not sre.LITERAL or code >= 128 for op, code in items):
        return None
    literal = bytes(code for _, code in items)
    if pattern.flags & re.IGNORECASE:
        # In ASCII text an ASCII letter matches only its two cases (the Unicode folds that
        # reach ASCII, like the Kelvin sign's, start from characters outside it).
        flags |= LITERAL_FOLDED
        literal = literal.lower()
    return bytes([flags]) + literal


def compile_for_re2(pattern: str | bytes) -> Re2Pattern:
    """`pattern` on RE2 whatever its shape: for tests that compare the engines."""
    compiled = compile_user_pattern(pattern)
    if isinstance(compiled, Re2Pattern):
        return compiled
    tree = sre_parse.parse(pattern, 0)
    translated = _Translator(pattern, isinstance(pattern, bytes)).sequence(
        tree, tree.state.flags, tail=True)
    return Re2Pattern(pattern, compiled, translated)


# --- is Python's backtracking bounded? -----------------------------------------------------


def _bounded(tree: sre_parse.SubPattern, flags: int, is_bytes: bool) -> bool:
    """True when `re` cannot take more than (text length x pattern size) steps: every repeat
    is of one character, at most one repeat varies and then the pattern is anchored at the
    start (else each start position could rescan the rest: quadratic), and the
    alternatives multiply to few paths."""
    variable = 0
    paths = 1
    unicode_words = not is_bytes and not flags & sre.SRE_FLAG_ASCII

    def walk(items: sre_parse.SubPattern | list[Any]) -> bool:
        nonlocal variable, paths
        for op, av in items:
            if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
                low, high, body = av
                if len(body) != 1 or body[0][0] not in _SINGLE:
                    return False
                variable += low != high
            elif op is sre.BRANCH:
                paths *= len(av[1])
                if not all(walk(branch) for branch in av[1]):
                    return False
            elif op is sre.SUBPATTERN:
                # (?a:...) changes \b: keep it simple, such patterns go to RE2
                if av[1] or av[2] or not walk(av[3]):
                    return False
            elif op is sre.AT and av in (sre.AT_BOUNDARY, sre.AT_NON_BOUNDARY) and unicode_words:
                return False  # RE2's \b is ASCII: keep \b the same whatever the engine
        return True

    if not walk(tree) or paths > _MAX_SAFE_PATHS or variable > 1:
        return False
    if variable == 0:
        return True
    first = tree[0] if len(tree) else None
    return first in ((sre.AT, sre.AT_BEGINNING_STRING),) or (
        first == (sre.AT, sre.AT_BEGINNING) and not flags & sre.SRE_FLAG_MULTILINE)


# --- Python's parse tree to RE2 syntax -----------------------------------------------------

# Python's \s for str: what str.isspace() accepts.
_UNICODE_SPACE = "\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_ASCII_SPACE = "\t\n\x0b\x0c\r "  # RE2's \s lacks \v


def _char(code: int) -> str:
    """One character as RE2 syntax; escaped unless a letter or digit, so it never means
    anything else inside or outside a class."""
    if code < 128 and chr(code).isalnum():
        return chr(code)
    return f"\\x{{{code:x}}}"


def _class_text(chars: str) -> str:
    """A run like "\\t\\n\\x1c-\\x1f" (ranges written with '-') as RE2 class content."""
    out = []
    index = 0
    while index < len(chars):
        if index + 2 < len(chars) and chars[index + 1] == "-":
            out.append(f"{_char(ord(chars[index]))}-{_char(ord(chars[index + 2]))}")
            index += 3
        else:
            out.append(_char(ord(chars[index])))
            index += 1
    return "".join(out)


class _Translator:
    def __init__(self, pattern: str | bytes, is_bytes: bool) -> None:
        self.pattern = pattern
        self.is_bytes = is_bytes

    def refuse(self, problem: str, finder: str) -> UserRegexError:
        return UserRegexError(problem, _find(self.pattern, finder))

    def unicode(self, flags: int) -> bool:
        return not self.is_bytes and not flags & sre.SRE_FLAG_ASCII

    def sequence(self, items: sre_parse.SubPattern | list[Any], flags: int, tail: bool) -> str:
        # `$` is exact as `\n?\z` only if nothing that consumes text may follow it: from the
        # end, whether every later item is zero-width (one pass: a pattern may be 1 MB long).
        items = list(items)
        rest_zero_width = [True] * len(items)
        for index in range(len(items) - 2, -1, -1):
            rest_zero_width[index] = rest_zero_width[index + 1] and \
                items[index + 1][0] is sre.AT
        return "".join(self.node(op, av, flags, tail and rest_zero_width[index])
                       for index, (op, av) in enumerate(items))

    def node(self, op: Any, av: Any, flags: int, tail: bool) -> str:
        if op is sre.LITERAL:
            return self.literal(av, flags)
        if op is sre.NOT_LITERAL:
            return self.char_class([(sre.NEGATE, None), (sre.LITERAL, av)], flags)
        if op is sre.ANY:
            return "(?s:.)" if flags & sre.SRE_FLAG_DOTALL else "."
        if op is sre.IN:
            return self.char_class(av, flags)
        if op is sre.BRANCH:
            return "(?:" + "|".join(self.sequence(b, flags, tail) for b in av[1]) + ")"
        if op is sre.SUBPATTERN:
            _, add, remove, body = av
            return "(?:" + self.sequence(body, (flags | add) & ~remove, tail) + ")"
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            return self.repeat(op, av, flags, tail)
        if op is sre.AT:
            return self.at(av, flags, tail)
        if op in (sre.ASSERT, sre.ASSERT_NOT):
            behind = av[0] < 0
            kind = ("lookbehind" if behind else "lookahead") + (
                " (?<=...)" if behind and op is sre.ASSERT else
                " (?<!...)" if behind else " (?=...)" if op is sre.ASSERT else " (?!...)")
            raise self.refuse(f"a {kind}", "(?<" if behind else "(?=" if op is sre.ASSERT
                              else "(?!")
        if op is sre.GROUPREF:
            raise self.refuse("a backreference", "backref")
        if op is sre.GROUPREF_EXISTS:
            raise self.refuse("a conditional group (?(...)...)", "(?(")
        if op is sre.ATOMIC_GROUP:
            raise self.refuse("an atomic group (?>...)", "(?>")
        if op is sre.POSSESSIVE_REPEAT:
            raise self.refuse("a possessive repeat (*+, ++, ?+ or {m,n}+)", "possessive")
        raise self.refuse(f"the construct {op}", "")

    def literal(self, code: int, flags: int) -> str:
        if not flags & sre.SRE_FLAG_IGNORECASE:
            return _char(code)
        if self.unicode(flags):
            return f"(?i:{_char(code)})"  # RE2 folds Unicode cases as Python does
        if code < 128 and chr(code).isalpha():  # bytes and (?a): ASCII letters only
            return f"[{chr(code).lower()}{chr(code).upper()}]"
        return _char(code)

    def char_class(self, items: list[tuple[Any, Any]], flags: int) -> str:
        negate = bool(items) and items[0][0] is sre.NEGATE
        positive: list[str] = []
        complements: list[str] = []  # \D, \W, \S beside other items: added as alternatives
        fold = flags & sre.SRE_FLAG_IGNORECASE
        ascii_fold = fold and not self.unicode(flags)
        for op, av in items[1:] if negate else items:
            if op is sre.LITERAL:
                positive.append(_char(av))
                if ascii_fold and av < 128 and chr(av).isalpha():
                    positive.append(chr(av).swapcase())
            elif op is sre.RANGE:
                low, high = av
                positive.append(f"{_char(low)}-{_char(high)}")
                if ascii_fold:
                    for a, z in ((65, 90), (97, 122)):  # the case-swapped part of the range
                        start, end = max(low, a), min(high, z)
                        if start <= end:
                            positive.append(f"{_char(start ^ 32)}-{_char(end ^ 32)}")
            elif op is sre.CATEGORY:
                content, negated = self.category(av, flags)
                if negated:
                    complements.append(f"[^{content}]")
                else:
                    positive.append(content)
            else:
                raise self.refuse(f"the class item {op}", "[")
        if negate and complements and not positive and len(complements) == 1:
            negate, positive, complements = False, [complements[0][2:-1]], []  # [^\W] is \w
        if complements and negate:
            raise self.refuse("a negated class holding \\D, \\W or \\S (write the class "
                              "without the negations)", "[")
        wrap = "(?i:{})" if fold and self.unicode(flags) else "{}"
        if negate:
            # Python's [^...] matches any character outside the set, newline included,
            # as RE2's does; an empty negated set cannot come from Python's parser.
            return wrap.format("[^" + "".join(positive) + "]")
        alternatives = ([wrap.format("[" + "".join(positive) + "]")] if positive else [])
        alternatives += complements
        return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"

    def category(self, code: Any, flags: int) -> tuple[str, bool]:
        """The class content of \\d, \\w, \\s (or their negations) with Python's meaning."""
        unicode = self.unicode(flags)
        table = {
            sre.CATEGORY_DIGIT: "\\p{Nd}" if unicode else "0-9",
            sre.CATEGORY_WORD: "\\p{L}\\p{N}_" if unicode else "0-9A-Za-z_",
            sre.CATEGORY_SPACE: _class_text(_UNICODE_SPACE if unicode else _ASCII_SPACE),
        }
        negations = {sre.CATEGORY_NOT_DIGIT: sre.CATEGORY_DIGIT,
                     sre.CATEGORY_NOT_WORD: sre.CATEGORY_WORD,
                     sre.CATEGORY_NOT_SPACE: sre.CATEGORY_SPACE}
        if code in table:
            return table[code], False
        if code in negations:
            return table[negations[code]], True
        raise self.refuse(f"the category {code}", "\\")

    def repeat(self, op: Any, av: Any, flags: int, tail: bool) -> str:
        low, high, body = av
        if low > _MAX_REPEAT or (high is not sre.MAXREPEAT and high > _MAX_REPEAT):
            raise self.refuse(f"a repeat count above {_MAX_REPEAT}", "{")
        inner = self.sequence(body, flags, tail and high is not sre.MAXREPEAT and high <= 1)
        if high is sre.MAXREPEAT:
            count = "*" if low == 0 else "+" if low == 1 else f"{{{low},}}"
        elif (low, high) == (0, 1):
            count = "?"
        else:
            count = f"{{{low}}}" if low == high else f"{{{low},{high}}}"
        return f"(?:{inner}){count}{'?' if op is sre.MIN_REPEAT else ''}"

    def at(self, code: Any, flags: int, tail: bool) -> str:
        multiline = flags & sre.SRE_FLAG_MULTILINE
        if code is sre.AT_BEGINNING:
            return "(?m:^)" if multiline else "\\A"
        if code is sre.AT_BEGINNING_STRING:
            return "\\A"
        if code is sre.AT_END_STRING:
            return "\\z"  # Python's \Z is RE2's \z: the very end
        if code is sre.AT_END:
            if multiline:
                return "(?m:$)"
            if not tail:
                raise self.refuse("'$' followed by more pattern (write \\n or \\Z instead)",
                                  "$")
            return "(?:\\n?\\z)"  # Python's $: at the end or before a final newline
        if code in (sre.AT_BOUNDARY, sre.AT_NON_BOUNDARY):
            return "\\b" if code is sre.AT_BOUNDARY else "\\B"  # ASCII word characters
        raise self.refuse(f"the assertion {code}", "")


# --- where in the pattern ------------------------------------------------------------------


def _tokens(pattern: str) -> Iterator[tuple[int, str, bool]]:
    """(offset, token, inside a class) for each token: a character or a whole escape."""
    index = 0
    in_class = False
    class_start = -1
    while index < len(pattern):
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern):
            end = index + 2
            while end < len(pattern) and pattern[end].isdigit() and end - index < 3:
                end += 1  # \12: one token
            yield index, pattern[index:end], in_class
            index = end
            continue
        if in_class:
            # a ']' right after '[' or '[^' is a member, not the end
            if char == "]" and index > class_start + 1 and pattern[class_start + 1:index] != "^":
                in_class = False
        elif char == "[":
            in_class = True
            class_start = index
            yield index, char, False
            index += 1
            continue
        yield index, char, in_class
        index += 1


def _find(pattern: str | bytes, finder: str) -> int | None:
    """The offset of the first token `finder` names, outside classes; None if not found."""
    text = pattern.decode("latin-1") if isinstance(pattern, bytes) else pattern
    tokens = [(offset, token) for offset, token, in_class in _tokens(text) if not in_class]
    for position, (offset, token) in enumerate(tokens):
        previous = tokens[position - 1][1] if position else ""
        if finder == "backref":
            if ((len(token) > 1 and token[1].isdigit() and token[1] != "0")
                    or text.startswith("(?P=", offset)):
                return offset
        elif finder == "possessive":
            if token == "+" and previous in ("*", "+", "?", "}"):
                return tokens[position - 1][0]
        elif finder == "{":
            counts = re.match(r"\{(\d*)(?:,(\d*))?\}", text[offset:]) if token == "{" else None
            if counts and any(n and int(n) > _MAX_REPEAT for n in counts.groups()):
                return offset
        elif finder and token == finder[0] and text.startswith(finder, offset):
            return offset
    return None
