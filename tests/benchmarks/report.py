"""Results: the machine they came from, how busy it was, medians, ratios and tables."""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field

IDLE_THRESHOLD_CORES = 0.05
"""Other processes using less than this share of one core on average: the machine was idle."""


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _memory_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def machine_info(postgres_binary: str, haproxy: str) -> dict[str, object]:
    postgres = subprocess.run([postgres_binary, "--version"], capture_output=True, text=True)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(_memory_gib(), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mitmproxy": _version("mitmproxy"),
        "psycopg": _version("psycopg"),
        "uvloop": _version("uvloop"),
        "postgresql": postgres.stdout.strip() or "unknown",
        "haproxy": haproxy,
        "load_average_at_start": os.getloadavg(),
    }


# --- how busy the machine was -------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, CPU ticks used, command name) for every process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                text = f.read()
        except OSError:
            continue  # gone meanwhile
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        # fields[0] is the state; ppid is fields[1]; utime and stime are fields[11] and [12]
        table[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), name)
    return table


def _descendants(table: dict[int, tuple[int, int, str]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = {root}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


@dataclass
class ForeignLoadMonitor:
    """Samples, every `interval` seconds, the CPU time used by processes that are not this
    harness or its children: other work sharing the machine skews every figure. Processes
    living shorter than an interval are missed, so the figure is a lower bound."""

    interval: float = 2.0
    foreign_ticks: int = 0
    busiest: dict[str, int] = field(default_factory=dict)
    _last: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _started: float = 0.0
    _ended: float = 0.0

    def _sample(self, first: bool = False) -> None:
        table = _process_table()
        ours = _descendants(table, os.getpid())
        current = {}
        for pid, (_, ticks, name) in table.items():
            if pid in ours:
                continue
            current[pid] = ticks
            if not first:
                used = ticks - self._last.get(pid, 0)
                if used > 0:
                    self.foreign_ticks += used
                    self.busiest[name] = self.busiest.get(name, 0) + used
        self._last = current

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> None:
        self._started = time.monotonic()
        self._sample(first=True)
        self._thread = threading.Thread(target=self._loop, name="foreign-load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._sample()
        self._ended = time.monotonic()

    def summary(self) -> dict[str, object]:
        elapsed = max((self._ended or time.monotonic()) - self._started, 1e-9)
        cpu_s = self.foreign_ticks / _TICKS
        average = cpu_s / elapsed
        top = sorted(self.busiest.items(), key=lambda kv: -kv[1])[:5]
        return {
            "elapsed_s": round(elapsed, 1),
            "other_processes_cpu_s": round(cpu_s, 1),
            "other_processes_average_cores": round(average, 3),
            "busiest_other_processes": {name: round(t / _TICKS, 1) for name, t in top},
            "load_average_at_end": os.getloadavg(),
            "idle": average < IDLE_THRESHOLD_CORES,
            "verdict": ("idle (other processes used {:.1%} of one core on average)"
                        if average < IDLE_THRESHOLD_CORES else
                        "NOT idle: other processes used {:.0%} of one core on average"
                        ).format(average),
        }


# --- aggregation --------------------------------------------------------------------------


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if isinstance(v, int | float) and math.isfinite(v)]


def summarize(samples: list[dict], metric_key: str, worst: str | None) -> float | None:
    """The median over rounds, or the worst round for counts of failures."""
    values = _finite([s[metric_key] for s in samples if metric_key in s])
    if not values:
        return None
    if worst == "max":
        return max(values)
    if worst == "min":
        return min(values)
    return statistics.median(values)


def paired_ratio(target_rounds: dict[int, dict], direct_rounds: dict[int, dict],
                 metric_key: str) -> float | None:
    """The median over rounds of target / direct, each pair from the same round, so drift
    of the machine between rounds cancels."""
    ratios = []
    for round_number, sample in target_rounds.items():
        base = direct_rounds.get(round_number, {}).get(metric_key)
        value = sample.get(metric_key)
        if base and value is not None and math.isfinite(base) and math.isfinite(value):
            ratios.append(value / base)
    return statistics.median(ratios) if ratios else None


def _number(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def cell(value: float | None, ratio: float | None, digits: int) -> str:
    if value is None:
        return "—"
    text = _number(value, digits)
    if ratio is not None:
        text += f" ({ratio:.2f}x)"
    return text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 2 else "--:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_lines(machine: dict, load: dict) -> list[str]:
    return [
        f"- date: {machine['date']}",
        f"- machine: {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB, kernel {machine['kernel']}",
        f"- software: Python {machine['python']}, mitmproxy {machine['mitmproxy']}, "
        f"{machine['postgresql']}, {machine['haproxy']}, psycopg {machine['psycopg']}, "
        f"uvloop {machine['uvloop']}",
        f"- load: {load['verdict']}; load average {_loads(machine['load_average_at_start'])} "
        f"at start, {_loads(load['load_average_at_end'])} at end; busiest other processes "
        f"(CPU s): {load['busiest_other_processes'] or 'none'}",
    ]


def _loads(values: object) -> str:
    return "/".join(f"{v:.2f}" for v in values)  # type: ignore[union-attr]
