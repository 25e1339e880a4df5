"""Security (issue #15, section 4): the API's token, the FIFO and its lock in a shared
directory, and no path from a command, a config file or an API body to a shell or eval.

Real processes throughout: `wirefault serve` with a token file, `wirefault proxy` with its
FIFO, the real client.
"""

from __future__ import annotations

import ast
import contextlib
import os
import stat
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_helpers import BIN, running_proxy, running_serve

from wirefault.fifo_client import FaultProxy
from wirefault.fifo_client.errors import WirefaultError

REPO = Path(__file__).resolve().parent.parent
TOKEN = "wf-token-3kq9Zr7LmXp2"
GUESS = "wf-token-3kq9Zr7Lm000"  # a near miss: must not show either


def _get(url: str, authorization: str | None) -> int:
    request = urllib.request.Request(url)
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


# --- the HTTP API's token -----------------------------------------------------------------


def test_api_refuses_and_logs_bad_tokens_without_showing_any(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with running_serve(None, "--api-token-file", str(token_file), "-v") as serve:
        url = f"{serve.api}/proxies"
        assert _get(url, None) == 401
        assert _get(url, f"Bearer {GUESS}") == 401
        assert _get(url, f"Basic {GUESS}") == 401
        assert _get(url, GUESS) == 401
        assert _get(url, f"Bearer {TOKEN}") == 200
        serve.process.terminate()
        serve.process.wait(20)
        output = serve.process.stdout.read() + serve.log()
    assert TOKEN not in output and GUESS not in output and "3kq9Zr7Lm" not in output
    refusals = [line for line in output.splitlines() if "refused (401)" in line]
    assert len(refusals) == 4, output
    assert all("GET /proxies from 127.0.0.1" in line for line in refusals), refusals
    assert "no Authorization header" in refusals[0] and "wrong bearer token" in refusals[1]


# --- the FIFO and its lock ----------------------------------------------------------------


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize(("args", "mode"), [([], 0o600), (["--fifo-mode", "0660"], 0o660)])
def test_fifo_and_lock_are_created_with_the_documented_modes(pg, args: list[str],
                                                             mode: int) -> None:
    with _umask(0o077), running_proxy(pg.port, extra_args=args) as proxy:
        info = os.lstat(proxy.fifo)
        assert stat.S_ISFIFO(info.st_mode) and stat.S_IMODE(info.st_mode) == mode  # exactly
        os.unlink(proxy.fifo + ".lock")  # made by the start-up check, under umask 077
        with _umask(0o022):  # the lock is a plain file: 0644 less the umask
            FaultProxy(proxy.fifo, timeout=30).allow()
        lock = os.lstat(proxy.fifo + ".lock")
        assert stat.S_ISREG(lock.st_mode) and stat.S_IMODE(lock.st_mode) == 0o644


def _target(directory: Path) -> tuple[Path, tuple[bytes, int, int]]:
    target = directory / "victim.txt"
    target.write_bytes(b"precious\n")
    info = target.stat()
    return target, (target.read_bytes(), info.st_mode, info.st_mtime_ns)


def _untouched(target: Path, before: tuple[bytes, int, int]) -> bool:
    info = target.stat()
    return (target.read_bytes(), info.st_mode, info.st_mtime_ns) == before


@pytest.mark.parametrize("points_to", ["file", "fifo", "nothing"])
def test_proxy_refuses_a_symlink_planted_at_its_fifo_path(tmp_path: Path,
                                                          points_to: str) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    target, before = _target(tmp_path)
    if points_to == "fifo":  # the attacker's own FIFO: serving it would take their commands
        os.mkfifo(tmp_path / "theirs.fifo")
    destination = {"file": target, "fifo": tmp_path / "theirs.fifo",
                   "nothing": tmp_path / "created.txt"}[points_to]
    fifo = shared / "proxy.fifo"
    fifo.symlink_to(destination)
    done = subprocess.run([str(BIN / "wirefault"), "proxy", "--listen", "127.0.0.1:0",
                           "--upstream", "127.0.0.1:1", "--fifo", str(fifo)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(fifo) in lines[0] and "symbolic link" in lines[0], lines
    assert _untouched(target, before)
    assert not (tmp_path / "created.txt").exists()
    assert fifo.is_symlink()  # nothing removed or replaced either


@pytest.mark.parametrize("points_to", ["file", "nothing"])
def test_client_refuses_a_symlink_planted_at_the_lock_path(pg, points_to: str) -> None:
    with running_proxy(pg.port) as proxy:
        directory = Path(proxy.fifo).parent
        target, before = _target(directory)
        destination = target if points_to == "file" else directory / "created.txt"
        os.unlink(proxy.fifo + ".lock")  # left by the start-up check; an attacker's now
        Path(proxy.fifo + ".lock").symlink_to(destination)
        client = FaultProxy(proxy.fifo, timeout=10)
        with pytest.raises(WirefaultError, match=r"lock file .*\.lock is a symbolic link"):
            client.send("conn.onQuery(query='^X').kill()")
        assert _untouched(target, before)
        assert not (directory / "created.txt").exists()
        os.unlink(proxy.fifo + ".lock")
        assert "^X" not in FaultProxy(proxy.fifo, timeout=30).send("faults.list()")


def test_client_refuses_a_symlink_at_the_fifo_path(pg, tmp_path: Path) -> None:
    with running_proxy(pg.port) as proxy:
        planted = tmp_path / "planted.fifo"
        planted.symlink_to(proxy.fifo)  # it leads to a real FIFO: still not followed
        with pytest.raises(WirefaultError, match="symbolic link"):
            FaultProxy(str(planted), timeout=10).send("conn.onQuery(query='^X').kill()")
        assert "^X" not in FaultProxy(proxy.fifo, timeout=30).send("faults.list()")


# --- nothing reaches a shell or eval ------------------------------------------------------

ALLOWED = {
    ("fifo_client/chaos_checks.py", "asyncio.create_subprocess_shell"):
        "a chaos scenario's `run:` checks are shell commands by design: the user's own "
        "scenario file, documented; nothing from a command, a config file or an API body",
    ("fifo_client/chaos_processes.py", "/bin/sh -c"):
        "a chaos scenario's `processes:` given as one string run through sh, by design "
        "(the user's own scenario file, documented)",
}
_CODE_RUNNERS = {"eval", "exec", "compile", "__import__", "breakpoint"}
_SHELL_CALLS = {"os.system", "os.popen", "asyncio.create_subprocess_shell",
                "subprocess.getoutput", "subprocess.getstatusoutput", "pickle.loads",
                "pickle.load", "marshal.loads", "yaml.load", "yaml.unsafe_load",
                "yaml.full_load"}
_PROCESS_CALLS = {"subprocess.Popen", "subprocess.run", "subprocess.call",
                  "subprocess.check_call", "subprocess.check_output"}


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def _is_text(node: ast.expr) -> bool:
    return isinstance(node, ast.JoinedStr | ast.BinOp) or (
        isinstance(node, ast.Constant) and isinstance(node.value, str))


def _hits(source: str) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.List | ast.Tuple) and len(node.elts) >= 2 and all(
                isinstance(e, ast.Constant) for e in node.elts[:2]) and \
                str(node.elts[0].value).endswith("sh") and node.elts[1].value == "-c":
            yield node.lineno, f"{node.elts[0].value} -c"
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if (isinstance(node.func, ast.Name) and name in _CODE_RUNNERS) or name in _SHELL_CALLS \
                or name.startswith(("os.exec", "os.spawn")):
            yield node.lineno, name
        elif any(k.arg == "shell" and not (isinstance(k.value, ast.Constant)
                                           and k.value.value is False) for k in node.keywords):
            yield node.lineno, f"{name}(shell=...)"
        elif name in _PROCESS_CALLS and node.args and _is_text(node.args[0]):
            yield node.lineno, f"{name} with a string"


def test_scanner_finds_what_it_looks_for() -> None:
    found = {what for _, what in _hits(
        "eval(x)\nexec(y)\nos.system(c)\nsubprocess.run(c, shell=True)\n"
        "subprocess.Popen(f'ls {x}')\nyaml.load(s)\nargv = ['/bin/sh', '-c', c]\n")}
    assert found == {"eval", "exec", "os.system", "subprocess.run(shell=...)",
                     "subprocess.Popen with a string", "yaml.load", "/bin/sh -c"}


def test_no_command_config_or_api_body_reaches_a_shell_or_eval() -> None:
    found = {}
    for package in ("proxy", "protocols", "fifo_client"):
        for path in sorted((REPO / package).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            for line, what in _hits(path.read_text()):
                found[(relative, what)] = line
    unexplained = {key: line for key, line in found.items() if key not in ALLOWED}
    assert not unexplained, f"shell/eval uses without a reason in ALLOWED: {unexplained}"
    assert set(found) == set(ALLOWED), "an allowed use is gone: drop it from ALLOWED"
