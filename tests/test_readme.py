"""The README's copy-paste examples, run as written against a real proxy and server."""

from __future__ import annotations

import doctest
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_helpers import BIN, RunningProxy, running_proxy_for_server_side_copy

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE_FIFO = "/tmp/wirefault.fifo"


def blocks(language: str) -> list[str]:
    """The fenced code blocks of the README whose info string is `language`."""
    found: list[str] = []
    current: list[str] | None = None
    info = ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == language:
                    found.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return found


@pytest.fixture(scope="module")
def proxy(pg) -> Iterator[RunningProxy]:
    with running_proxy_for_server_side_copy(pg.port) as running:
        yield running


def test_builder_examples_are_doctests_that_pass():
    failures, tried = doctest.testfile(str(README), module_relative=False)
    assert tried >= 5 and failures == 0


def test_python_client_example_runs(proxy):
    (example,) = [b for b in blocks("python") if "proxy = FaultProxy(" in b]
    namespace: dict = {}
    exec(example.replace(EXAMPLE_FIFO, proxy.fifo), namespace)  # the README's own code
    assert isinstance(namespace["rows"], list)
    namespace["proxy"].allow()


def cli_lines() -> list[list[str]]:
    (block,) = [b for b in blocks("") if b.startswith("wirefault send")]
    commands = []
    for line in block.splitlines():
        words = line.split("#")[0].strip()
        if not words or words.startswith("wirefault proxy"):
            continue
        if "[--format table|copy|json]" in words:
            base = words.replace(" [--format table|copy|json]", "")
            commands += [base, *(f"{base} --format {f}" for f in ("table", "copy", "json"))]
        else:
            commands.append(words)
    return commands


def test_cli_examples_run(proxy):
    env = dict(os.environ, WIREFAULT_FIFO=proxy.fifo, PATH=f"{BIN}:{os.environ['PATH']}")
    commands = cli_lines()
    assert len(commands) >= 6
    for command in commands:
        result = subprocess.run(["bash", "-c", command], env=env, capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, (command, result.stderr)


@pytest.mark.parametrize("index", [0, 1])
def test_sql_examples_run(pg, proxy, index):
    sql_blocks = [b for b in blocks("sql") if EXAMPLE_FIFO in b]
    assert len(sql_blocks) == 2
    block = sql_blocks[index].replace(EXAMPLE_FIFO, proxy.fifo)
    statements = [s.split("--")[0] for s in re.split(r";\s*(?:--[^\n]*)?\n", block)]
    with pg.connect(autocommit=True) as conn:
        for name in ("citus_helpers.sql", "wirefault.sql"):
            conn.execute((README.parent / "sql" / name).read_text())
        for statement in filter(str.strip, statements):
            conn.execute(statement)


def test_the_make_targets_named_in_the_readme_exist():
    text = README.read_text()
    makefile = (README.parent / "Makefile").read_text()
    for target in set(re.findall(r"`make (\w+)`", text)):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def chaos_scenarios() -> list[str]:
    """The README's YAML blocks that are chaos scenarios (they have a seed)."""
    return [b for b in blocks("yaml") if b.startswith("seed:") or "\nseed:" in b]


def test_every_chaos_scenario_in_the_readme_is_valid(tmp_path):
    from wirefault.fifo_client.chaos_scenario import load_scenario
    from wirefault.fifo_client.chaos_schedule import build_schedule

    scenarios = chaos_scenarios()
    assert len(scenarios) >= 2
    for index, text in enumerate(scenarios):
        path = tmp_path / f"scenario{index}.yaml"
        path.write_text(text)
        build_schedule(load_scenario(path))  # raises with file:line:column when invalid


def test_the_readme_crash_loop_is_the_file_and_passes(tmp_path):
    """The processes example: the README shows tests/data/crash-loop.yaml as it is, and it
    runs as the README says, every check passing."""
    scenario = README.parent / "tests" / "data" / "crash-loop.yaml"
    assert scenario.read_text() in chaos_scenarios()
    result = subprocess.run([str(BIN / "wirefault"), "chaos", str(scenario), "--run-dir",
                             str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=180, cwd=README.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4/4 checks passed" in result.stdout and "verdict: pass (exit 0)" in result.stdout
    assert "crashed by itself" not in result.stdout
