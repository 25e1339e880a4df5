"""The machinery behind wirefault's YAML files (`wirefault chaos` scenarios, `wirefault serve
--config`): the composed node tree read into checked values, every problem reported as one
line `file:line:column: key: problem`.

A file format is a `YamlReader` subclass with one method per section. `fail` raises a
ReaderError for the value at hand; `attempt` records it and returns None, so the caller
carries on with the next value. None therefore means "absent or bad", and whatever depends
on such a value is not checked: one pass finds every problem, each reported once. The
loader sorts the recorded problems by `position` and raises them as one ReaderErrors.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml
from yaml.constructor import SafeConstructor

from .errors import WirefaultError

T = TypeVar("T")

Fields = dict[str, tuple[yaml.Node, yaml.Node]]
"""A mapping's known keys: name -> (key node, value node)."""


class ReaderError(WirefaultError):
    """A file that cannot be used; `str()` is `file:line:column: key: problem`."""

    def __init__(self, path: Path | str, line: int | None, column: int | None, key: str,
                 problem: str) -> None:
        self.path, self.line, self.column, self.key = str(path), line, column, key
        where = self.path if line is None else f"{self.path}:{line}:{column}"
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


class ReaderErrors(ReaderError):
    """Every problem of a file, in file order: `errors`, one line each in `str()`. The
    location attributes are the first problem's."""

    def __init__(self, errors: Sequence[ReaderError]) -> None:
        self.errors = tuple(errors)
        first = self.errors[0]
        self.path, self.line, self.column, self.key = first.path, first.line, first.column, \
            first.key
        WirefaultError.__init__(self, "\n".join(str(error) for error in self.errors))


def compose(path: Path, text: str, errors: type[ReaderErrors] = ReaderErrors
            ) -> yaml.Node | None:
    """The node tree of `text` (safe loader: every node knows its line and column), None
    for an empty document; broken syntax raises `errors`, as nothing after it can be
    trusted."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise errors([yaml_error(path, exc)]) from None


def yaml_error(path: Path, exc: yaml.YAMLError, key: str = "") -> ReaderError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
    problem = getattr(exc, "problem", None) or exc
    return ReaderError(path, line, column, key, f"invalid YAML: {problem}")


def position(error: ReaderError) -> tuple[int, int]:
    """Sort key putting problems in file order."""
    return error.line or 0, error.column or 0


def join_key(key: str, name: str) -> str:
    """`faults[0]` + `armed` -> `faults[0].armed`."""
    return f"{key}.{name}" if key else name


class YamlReader:
    """Reads values out of the composed node tree of `path`, collecting every problem in
    `errors`. Relative paths in it start at `folder` (default: the file's own folder; a
    copy of a file, such as a replayed run's scenario, names its original's)."""

    def __init__(self, path: Path, folder: Path | None = None) -> None:
        self.path = path
        self.folder = path.parent if folder is None else folder
        self.constructor = SafeConstructor()
        self.errors: list[ReaderError] = []

    def error(self, node: yaml.Node, key: str, problem: str) -> ReaderError:
        mark = node.start_mark
        return ReaderError(self.path, mark.line + 1, mark.column + 1, key, problem)

    def fail(self, node: yaml.Node, key: str, problem: str) -> NoReturn:
        raise self.error(node, key, problem)

    def report(self, node: yaml.Node, key: str, problem: str) -> None:
        self.errors.append(self.error(node, key, problem))

    def attempt(self, read: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """`read(*args, **kwargs)`, or None once the problem it raised is recorded."""
        try:
            return read(*args, **kwargs)
        except ReaderError as exc:
            self.errors.append(exc)
            return None

    def field(self, fields: Fields, name: str, key: str, read: Callable[..., T],
              *args: Any, **kwargs: Any) -> T | None:
        """The value of an optional (or already reported missing) field, read by `read`."""
        if name not in fields:
            return None
        return self.attempt(read, fields[name][1], join_key(key, name), *args, **kwargs)

    def clean_since(self, count: int) -> bool:
        return len(self.errors) == count

    # -- shapes ----------------------------------------------------------------------------

    def construct(self, node: yaml.Node, key: str) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # a scalar no safe constructor accepts (`!tag`)
            raise yaml_error(self.path, exc, key) from None

    def mapping(self, node: yaml.Node, key: str, required: tuple[str, ...],
                optional: tuple[str, ...], alternatives: dict[str, str] | None = None,
                others: tuple[str, ...] = ()) -> Fields:
        """The mapping's known keys; unknown, duplicate and missing keys are reported.
        `alternatives` maps a further key to the one it may stand in for. `others` are
        keys accepted into the result but not listed as expected: the caller says what is
        wrong with them (a network-fault key in a process fault)."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, key, f"expected a mapping, got {self.describe(node, key)}")
        fields: Fields = {}
        known = required + optional
        for key_node, value_node in node.value:
            name = self.attempt(self.key_name, key_node, key, known, fields,
                                alternatives or {}, others)
            if name is not None:
                fields[name] = (key_node, value_node)
        for name in required:
            if name not in fields:
                self.report(node, join_key(key, name), "missing required key")
        return fields

    def key_name(self, node: yaml.Node, key: str, known: tuple[str, ...],
                 fields: Fields, alternatives: dict[str, str],
                 others: tuple[str, ...] = ()) -> str:
        name = self.construct(node, key)
        where = join_key(key, str(name))
        if not isinstance(name, str):
            self.fail(node, where, "keys must be strings")
        if name in fields:
            self.fail(node, where, "duplicate key")
        if name not in known and name not in alternatives and name not in others:
            hint = difflib.get_close_matches(name, (*known, *alternatives, *others), n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            instead = "".join(f", or {alt} in place of {of}" for alt, of in alternatives.items())
            self.fail(node, where,
                      f"unknown key (expected {', '.join(known)}){instead}{suggestion}")
        return name

    def sequence(self, node: yaml.Node, key: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, key, f"expected a list, got {self.describe(node, key)}")
        return list(node.value)

    def describe(self, node: yaml.Node, key: str) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        return repr(self.construct(node, key))

    def scalar(self, node: yaml.Node, key: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return node
        return self.construct(node, key)

    def string(self, node: yaml.Node, key: str) -> str:
        value = self.scalar(node, key)
        if not isinstance(value, str) or not value.strip():
            self.fail(node, key,
                      f"expected a non-empty string, got {self.describe(node, key)}")
        return value.strip()

    def path_in_scenario_folder(self, node: yaml.Node, key: str) -> str:
        """Relative paths start at `folder`; `~` is the user's home."""
        return str(self.folder / Path(self.string(node, key)).expanduser())

    def number(self, node: yaml.Node, key: str, *, minimum: float = 0.0,
               inclusive: bool = False) -> float:
        value = self.scalar(node, key)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            self.fail(node, key,
                      f"expected a number of seconds, got {self.describe(node, key)}")
        if value < minimum or (value == minimum and not inclusive):
            bound = ">=" if inclusive else ">"
            self.fail(node, key, f"must be {bound} {minimum:g}, got {value:g}")
        return float(value)

    def integer(self, node: yaml.Node, key: str, minimum: int | None = None,
                maximum: int | None = None) -> int:
        value = self.scalar(node, key)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(node, key, f"expected an integer, got {self.describe(node, key)}")
        if minimum is not None and value < minimum:
            self.fail(node, key, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(node, key, f"must be <= {maximum}, got {value}")
        return value

    def interval(self, node: yaml.Node, key: str, *, inclusive: bool = False
                 ) -> tuple[float, float]:
        """Seconds (`low == high`) or `[min, max]`; > 0, or >= 0 when `inclusive`."""
        if isinstance(node, yaml.ScalarNode):
            seconds = self.number(node, key, inclusive=inclusive)
            return seconds, seconds
        items = self.sequence(node, key) if isinstance(node, yaml.SequenceNode) else []
        if len(items) != 2:
            self.fail(node, key, "expected seconds or [min, max]")
        low, high = (self.number(item, key, inclusive=inclusive) for item in items)
        if low > high:
            self.fail(node, key, f"min {low:g} is above max {high:g}")
        return low, high

    def regex(self, node: yaml.Node, key: str) -> str:
        """A Python regular expression, as written (not stripped: spaces may matter)."""
        value = self.scalar(node, key)
        if not isinstance(value, str) or not value:
            self.fail(node, key,
                      f"expected a regular expression, got {self.describe(node, key)}")
        try:
            re.compile(value)
        except re.error as exc:
            where = f"column {exc.pos + 1}: " if exc.pos is not None else ""
            self.fail(node, key, f"{where}bad regular expression: {exc.msg}")
        return value

    def protocol(self, node: yaml.Node, key: str) -> str:
        """One of wirefault's protocols (both file formats name them)."""
        from wirefault import protocols

        name = self.string(node, key)
        if name not in protocols.names():
            self.fail(node, key, f"unknown protocol {name!r}; known: "
                                 f"{', '.join(protocols.names())}")
        return name
