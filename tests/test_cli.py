"""The `wirefault` command line against a real CommandChannel process."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fifo_helpers import PROJECT_DIR, SEEDED_ROWS, ChannelProcess, fifo_dir, make_fifo

from wirefault.fifo_client import cli, parse_dump
from wirefault.proxy import dsl

WIREFAULT = PROJECT_DIR / ".venv" / "bin" / "wirefault"


@pytest.fixture(scope="module")
def served_fifo() -> Iterator[Path]:
    with fifo_dir() as directory, ChannelProcess(directory / "cli.fifo") as process:
        yield process.fifo


@pytest.fixture
def fifo_args(served_fifo: Path) -> list[str]:
    return ["--fifo", str(served_fifo), "--timeout", "5"]


@pytest.fixture(autouse=True)
def no_fifo_in_environment(monkeypatch):
    monkeypatch.delenv(cli.FIFO_ENV, raising=False)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_send_accepted_exits_0_silently(capsys, fifo_args):
    assert run(capsys, "send", *fifo_args, 'conn.onQuery(query="^COMMIT").kill()') == (0, "", "")
    status, _, err = run(capsys, "send", *fifo_args, "test:rule")
    assert status == 1 and 'rule conn.onQuery(query="^COMMIT").kill()' in err


def test_send_rejected_exits_1_with_the_message_on_stderr(capsys, fifo_args):
    status, out, err = run(capsys, "send", *fifo_args, "conn.onQury().kill()")
    assert (status, out) == (1, "")
    with pytest.raises(dsl.CommandError) as info:
        dsl.parse("conn.onQury().kill()")
    assert err == f"wirefault send: {info.value}\n"


def test_allow_and_reset(capsys, fifo_args):
    run(capsys, "send", *fifo_args, "conn.kill()")
    assert run(capsys, "allow", *fifo_args) == (0, "", "")
    assert "rule conn.allow()" in run(capsys, "send", *fifo_args, "test:rule")[2]
    assert run(capsys, "reset", *fifo_args) == (0, "", "")
    status, out, _ = run(capsys, "dump", *fifo_args, "--format", "json")
    assert (status, json.loads(out)) == (0, [])


def test_dump_formats(capsys, fifo_args):
    run(capsys, "send", *fifo_args, "test:seed")
    status, out, _ = run(capsys, "dump", *fifo_args, "--format", "json")
    assert status == 0
    assert json.loads(out) == [{"conn": c, "source": s, "message": m} for c, s, m in SEEDED_ROWS]

    run(capsys, "send", *fifo_args, "test:seed")
    status, out, _ = run(capsys, "dump", *fifo_args, "--format", "copy")
    assert status == 0 and out.endswith("\n")
    assert [(r.conn, r.source, r.message) for r in parse_dump(out[:-1])] == SEEDED_ROWS

    run(capsys, "send", *fifo_args, "test:seed")
    status, out, _ = run(capsys, "dump", *fifo_args)  # table by default
    lines = out.splitlines()
    assert status == 0 and len(lines) == 1 + len(SEEDED_ROWS)
    assert lines[0].split() == ["conn", "source", "message"]
    assert lines[3] == "   0  worker       line one\\nline two\\r\\\\end é"


def test_fifo_from_the_environment(capsys, monkeypatch, served_fifo):
    monkeypatch.setenv(cli.FIFO_ENV, str(served_fifo))
    assert run(capsys, "allow") == (0, "", "")
    status, _, err = run(capsys, "send", "test:echo env")
    assert (status, err) == (1, "wirefault send: echo env\n")


def test_no_fifo_given_exits_2(capsys):
    status, _, err = run(capsys, "reset")
    assert status == 2 and "--fifo PATH" in err and cli.FIFO_ENV in err


def test_no_proxy_exits_2_naming_the_fifo(capsys, tmp_path):
    fifo = make_fifo(tmp_path / "idle.fifo")
    started = time.monotonic()
    status, _, err = run(capsys, "dump", "--fifo", str(fifo), "--timeout", "0.3")
    assert status == 2 and str(fifo) in err and "no proxy answered" in err
    assert time.monotonic() - started < 1.0
    status, _, err = run(capsys, "send", "--fifo", str(tmp_path / "nope"), "--timeout", "0.2",
                         "conn.allow()")
    assert status == 2 and "does not exist" in err


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "dump", "--fifo", "x", "--format", "xml")[0] == 2
    assert run(capsys, "send", "--fifo", "x", "--timeout", "-1", "conn.allow()")[0] == 2
    assert run(capsys)[0] == 2


@pytest.mark.parametrize("command", ["send", "dump", "reset", "allow"])
def test_help_of_every_client_command_has_an_example(capsys, command):
    status, out, _ = run(capsys, command, "--help")
    assert status == 0 and "--fifo PATH" in out and "example:" in out


def test_main_help_lists_every_command(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0 and "example:" in out
    for command in ("send", "dump", "reset", "faults", "status", "proxy", "chaos"):
        assert command in out


def test_proxy_is_dispatched_to_the_runner(capsys):
    with pytest.raises(SystemExit) as info:  # the runner's own argparse --help
        cli.main(["proxy", "--help"])
    assert info.value.code == 0
    assert "--upstream" in capsys.readouterr().out


def test_chaos_is_dispatched_to_the_chaos_runner(capsys):
    code, out, _ = run(capsys, "chaos", "--help")
    assert code == 0 and "usage: wirefault chaos" in out


def test_console_script(served_fifo):
    if not WIREFAULT.exists():
        pytest.skip("console script not installed")
    result = subprocess.run([str(WIREFAULT), "send", "--fifo", str(served_fifo), "conn.kil()"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "did you mean 'kill'" in result.stderr
    result = subprocess.run([str(WIREFAULT), "reset", "--fifo", str(served_fifo)],
                            capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
