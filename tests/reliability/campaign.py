"""The reliability campaign's frame: what a part measures (`Row`), the registry of parts, and
the two sizes every part runs at.

A part is a function `run(size: Size, work: Path) -> list[Row]` registered with `@part(name)`
in its own module (`input_*.py`, `peers_*.py`, `load_*.py`); `work` is a scratch folder of
its own. `QUICK` is the short version that `make test` runs (tests/test_reliability.py);
`FULL` is `make reliability` (tests/reliability/run.py), whose figures go into the README.
A row passes when nothing was lost: the figures are there to be read, the verdict is
`passed`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Size = Literal["quick", "full"]
QUICK: Size = "quick"
FULL: Size = "full"

MODULES = ("input_frames", "input_commands", "input_http", "peers_upstream", "peers_client",
           "peers_fds", "load_connections", "load_volume", "load_soak")
"""The parts' modules, in the table's order (a module not written yet is skipped)."""


@dataclass
class Row:
    part: str
    """The table's section: "hostile input", "hostile peers" or "hostile load"."""
    case: str
    """What was tried, e.g. "postgres frames, mutated, through the runner"."""
    count: str
    """How many, e.g. "1,000,000 frames" or "10 min"."""
    lost: str
    """What was lost or broken: "nothing" when it passed, else what went wrong."""
    figure: str
    """What was measured, e.g. "healthy loop p99 1.2 ms (1.1x alone), RSS 61 MiB"."""
    passed: bool

    def as_json(self) -> dict[str, object]:
        return asdict(self)


PartRun = Callable[[Size, Path], list[Row]]
PARTS: dict[str, PartRun] = {}


def part(name: str) -> Callable[[PartRun], PartRun]:
    """Register a part under `name` (unique: the `--only` and pytest id)."""

    def register(run: PartRun) -> PartRun:
        assert name not in PARTS, name
        PARTS[name] = run
        return run

    return register


def load_parts() -> dict[str, PartRun]:
    """Import every part module there is; the registry, in the table's order."""
    for module in MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return PARTS


def markdown(rows: list[Row]) -> str:
    lines = ["| part | what was tried | how many | lost | figures |",
             "| --- | --- | --: | --- | --- |"]
    for row in rows:
        lost = row.lost if row.passed else f"**{row.lost}**"
        lines.append(f"| {row.part} | {row.case} | {row.count} | {lost} | {row.figure} |")
    return "\n".join(lines)
