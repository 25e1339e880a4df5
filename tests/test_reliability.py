"""The reliability campaign's short version (tests/reliability/; `make reliability` runs the
full one): every part, at QUICK size, must lose nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(_TESTS / "reliability"), str(_TESTS / "benchmarks")]

from campaign import QUICK, load_parts  # noqa: E402

PARTS = load_parts()


@pytest.mark.parametrize("name", list(PARTS))
def test_the_quick_campaign_loses_nothing(name: str, tmp_path: Path) -> None:
    rows = PARTS[name](QUICK, tmp_path)
    assert rows, f"part {name} reported nothing"
    failed = [f"{row.case}: {row.lost} ({row.figure})" for row in rows if not row.passed]
    assert not failed, "\n".join(failed)
