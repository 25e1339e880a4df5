"""A `wirefault chaos` run's directory: where it goes, its run log, and replaying it.

Each run gets its own directory, `<run root>/<UTC YYYYmmdd-HHMMSS>-seed<N>[-k]` (the run
root is the scenario's `run_dir`, else `<scenario folder>/chaos-runs`), or exactly the one
given with `--run-dir`. It holds:

- `run.jsonl`: the first line is the schedule (`{"event": "schedule", "seed", "duration",
  "windows": [...], "dropped": [...], ...}`), then one JSON object per event, each with
  `t` (seconds since the start) and `event`, naming its `fault`, `process` or `proxy`;
- `scenario.yaml`: a copy of the scenario as it was run;
- the managed processes' logs and `processes.json` (see `chaos_processes`).

`--replay RUN_DIR` loads `RUN_DIR/scenario.yaml` with the recorded seed, rebuilds the
schedule, and runs it only if it is the recorded one (a changed scenario, or a changed
way of drawing schedules, would otherwise run something else under the same name).
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import Any, TextIO

from .chaos_scenario import Scenario, ScenarioErrors, load_scenario
from .chaos_schedule import Schedule, build_schedule
from .errors import WirefaultError

RUN_LOG = "run.jsonl"
SCENARIO_COPY = "scenario.yaml"
DEFAULT_RUN_ROOT = "chaos-runs"


class RunDirError(WirefaultError):
    """The run directory cannot be made or used, or a replay cannot be set up: one line."""


def run_root(scenario: Scenario, folder: Path | None = None) -> Path:
    """Where this scenario's runs go by default: its `run_dir`, else `chaos-runs` in its
    folder (`folder`, for a replay: the original scenario's)."""
    if scenario.run_dir is not None:
        return scenario.run_dir
    return (folder or scenario.path.parent) / DEFAULT_RUN_ROOT


def make_run_dir(scenario: Scenario, seed: int, given: Path | None = None,
                 folder: Path | None = None, now: datetime.datetime | None = None) -> Path:
    """The run's directory, created: `given` exactly (it may exist, but must not hold a
    run log already), else a fresh `<run root>/<stamp>-seed<N>[-k]`."""
    if given is not None:
        try:
            given.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"--run-dir {given}: cannot create it: {exc}") from None
        if (given / RUN_LOG).exists():
            raise RunDirError(f"--run-dir {given}: already holds a run "
                              f"({given / RUN_LOG}); give a new directory")
        return given
    root = run_root(scenario, folder)
    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-seed{seed}"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"run directory {root}: cannot create it: {exc}") from None
    for k in range(1, 1000):
        candidate = root / (base if k == 1 else f"{base}-{k}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue  # two runs in one second: the second gets -2
        except OSError as exc:
            raise RunDirError(f"run directory {candidate}: cannot create it: {exc}") from None
        return candidate
    raise RunDirError(f"run directory {root}: {base} and 999 more are taken")


def schedule_json(schedule: Schedule) -> dict[str, Any]:
    """The schedule as plain JSON values (lists, not tuples), as the run log holds it."""
    return json.loads(json.dumps(schedule.to_json()))


class RunLog:
    """`run.jsonl`, one JSON object per line, flushed as it goes (a run killed midway
    leaves every event up to then)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / RUN_LOG
        self._file: TextIO | None = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def start_run_log(run_dir: Path, scenario: Scenario, schedule: Schedule, source: Path,
                  replay_of: Path | None = None) -> RunLog:
    """Copy the scenario in and write the schedule line; `source` is the scenario file
    the run comes from (for a replay, the original one: its folder is the paths')."""
    try:
        shutil.copyfile(scenario.path, run_dir / SCENARIO_COPY)
        log = RunLog(run_dir)
    except OSError as exc:
        raise RunDirError(f"run directory {run_dir}: {exc}") from None
    record: dict[str, Any] = {
        "event": "schedule", "t": 0.0, **schedule_json(schedule),
        "scenario": str(source.resolve()),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if replay_of is not None:
        record["replay_of"] = str(replay_of)
    log.write(record)
    return log


def read_run_log(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / RUN_LOG
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RunDirError(f"--replay {run_dir}: cannot read {path}: {exc}") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # a run killed while writing its last line
                break
            raise RunDirError(f"{path}:{number}:{exc.colno}: not JSON: {exc.msg}") from None
    if not records or records[0].get("event") != "schedule":
        raise RunDirError(f"{path}:1:1: the first line is not the run's schedule")
    return records


def load_replay(run_dir: Path) -> tuple[Scenario, Schedule, Path]:
    """The recorded run's scenario (its copy, with paths resolved in the original
    scenario's folder), its schedule rebuilt from the recorded seed, and the original
    scenario's path; RunDirError unless the rebuilt schedule is the recorded one.
    ScenarioErrors as for any scenario."""
    recorded = read_run_log(run_dir)[0]
    copy = run_dir / SCENARIO_COPY
    if not copy.is_file():
        raise RunDirError(f"--replay {run_dir}: no {SCENARIO_COPY} in it")
    original = Path(recorded.get("scenario", copy))
    # The copy is what runs; its relative paths are the original's folder's.
    scenario = load_scenario(copy, folder=original.parent)
    try:
        seed = int(recorded["seed"])
    except (KeyError, TypeError, ValueError):
        raise RunDirError(f"{run_dir / RUN_LOG}:1:1: the schedule has no seed") from None
    schedule = build_schedule(scenario, seed)
    rebuilt = schedule_json(schedule)
    difference = _first_difference(recorded, rebuilt)
    if difference:
        raise RunDirError(f"--replay {run_dir}: the scenario no longer gives the recorded "
                          f"schedule ({difference}); not run")
    return scenario, schedule, original


def _first_difference(recorded: dict[str, Any], rebuilt: dict[str, Any]) -> str:
    for key in ("seed", "duration"):
        if recorded.get(key) != rebuilt.get(key):
            return f"{key} {recorded.get(key)!r} recorded, {rebuilt.get(key)!r} now"
    for key in ("windows", "dropped"):
        old, new = recorded.get(key) or [], rebuilt.get(key) or []
        for index, (before, now) in enumerate(zip(old, new, strict=False)):
            if before != now:
                changed = sorted(k for k in set(before) | set(now)
                                 if before.get(k) != now.get(k))
                return f"{key}[{index}] ({before.get('name')}): {', '.join(changed)} differ"
        if len(old) != len(new):
            return f"{len(old)} {key} recorded, {len(new)} now"
    return ""


__all__ = ["DEFAULT_RUN_ROOT", "RUN_LOG", "SCENARIO_COPY", "RunDirError", "RunLog",
           "ScenarioErrors", "load_replay", "make_run_dir", "read_run_log", "run_root",
           "schedule_json", "start_run_log"]
