"""Rotating a managed process's log when the runner crashes or stops it.

`<log>` is renamed to `<log>.<n>` at once (so the restarted process writes a fresh `<log>`),
then compressed in a worker thread to `<log>.<n>.gz`, and only the newest `keep` rotated
logs are kept. Compressions of one log run one after another, oldest first, so pruning
never races a compression of a newer file.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path


class LogRotator:
    """The rotated logs of one `<log>` path."""

    def __init__(self, log_path: Path, keep: int) -> None:
        self.log_path = log_path
        self.keep = keep
        self._last = 0
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[None]] = set()
        self._rotated = re.compile(re.escape(log_path.name) + r"\.(\d+)(\.gz)?")

    def _numbers(self) -> dict[int, list[Path]]:
        """Every rotated log in the folder, plain or compressed, by number."""
        found: dict[int, list[Path]] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in self.log_path.parent.iterdir():
                match = self._rotated.fullmatch(entry.name)
                if match:
                    found.setdefault(int(match[1]), []).append(entry)
        return found

    def rotate(self, on_done: Callable[[Path], None]) -> None:
        """Rename `<log>` to `<log>.<n>` now; compress and prune in the background, then
        call `on_done(gz_path)`. Does nothing when there is no `<log>`."""
        if not self.log_path.exists():
            return
        # The counter also remembers numbers a prune deleted (keep=0), so a pending plain
        # file is never overwritten by a newer rename.
        number = max([self._last, *self._numbers()]) + 1
        self._last = number
        plain = self.log_path.with_name(f"{self.log_path.name}.{number}")
        os.replace(self.log_path, plain)
        task = asyncio.get_running_loop().create_task(self._compress(plain, on_done))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _compress(self, plain: Path, on_done: Callable[[Path], None]) -> None:
        async with self._lock:
            gz = plain.with_name(plain.name + ".gz")
            if self.keep > 0:
                await asyncio.to_thread(_gzip_file, plain, gz)
            else:
                plain.unlink(missing_ok=True)
            await asyncio.to_thread(self._prune)
            if self.keep > 0:
                on_done(gz)

    def _prune(self) -> None:
        found = self._numbers()
        for number in sorted(found, reverse=True)[max(self.keep, 0):]:
            for path in found[number]:
                path.unlink(missing_ok=True)

    async def wait(self) -> None:
        """Until every compression started so far is done."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


def _gzip_file(plain: Path, gz: Path) -> None:
    # Written under a temporary name and renamed, so a `.gz` is always complete.
    partial = gz.with_name(gz.name + ".partial")
    with plain.open("rb") as source, gzip.open(partial, "wb") as target:
        shutil.copyfileobj(source, target, 1 << 20)
    os.replace(partial, gz)
    plain.unlink()
