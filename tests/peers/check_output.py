"""Is the sink's output a prefix of the source's input (or, with --complete, all of it)?

    python -m peers.check_output --input input.txt --output out.txt [--complete]

Exit status 0 when it is, 1 when it is not, with one line saying where the two part ways
(byte offset, line number, and a few bytes of each side), 2 on unusable arguments. A
missing output counts as empty: a sink that has committed nothing yet has lost nothing.
Meant as a chaos check (`run:`, `every: 2`): a prefix means nothing was lost, duplicated or
reordered so far; equality at the end means everything arrived.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SHOWN = 24
"""Bytes of each side quoted where they differ."""


def first_difference(expected: bytes, actual: bytes) -> int | None:
    """The first offset where `actual` stops being a prefix of `expected`; None if it is one."""
    common = min(len(expected), len(actual))
    if expected[:common] == actual[:common]:
        return None if len(actual) <= len(expected) else len(expected)
    # Halve the common range until one byte is left: a few compares of big slices beat a
    # Python loop over every byte.
    low, high = 0, common
    while high - low > 1:
        middle = (low + high) // 2
        if expected[low:middle] == actual[low:middle]:
            low = middle
        else:
            high = middle
    return low


def verdict(expected: bytes, actual: bytes, *, complete: bool) -> str | None:
    """None when the output passes, else the one line saying why not."""
    where = first_difference(expected, actual)
    if where is None:
        if complete and len(actual) < len(expected):
            line = expected.count(b"\n", 0, len(actual)) + 1
            return (f"output is incomplete: {len(actual)} of {len(expected)} bytes "
                    f"(it stops in line {line})")
        return None
    line = expected.count(b"\n", 0, where) + 1
    if where == len(expected):
        return (f"output runs {len(actual) - where} bytes beyond the input's {where} "
                f"(from line {line}): {actual[where:where + SHOWN]!r}")
    return (f"output differs from input at byte {where} (line {line}): expected "
            f"{expected[where:where + SHOWN]!r}, got {actual[where:where + SHOWN]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peers.check_output", description=(
        "Exit 0 when OUTPUT is a prefix of INPUT (with --complete: equal to it)."))
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--complete", action="store_true", help="require the whole input")
    args = parser.parse_args(argv)
    try:
        expected = args.input.read_bytes()
    except OSError as exc:
        print(f"{args.input}: cannot read the input: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        actual = args.output.read_bytes()
    except FileNotFoundError:
        actual = b""
    except OSError as exc:
        print(f"{args.output}: cannot read the output: {exc.strerror}", file=sys.stderr)
        return 2
    problem = verdict(expected, actual, complete=args.complete)
    if problem:
        print(f"{args.output}: {problem}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
