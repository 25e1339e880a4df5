"""The pytest plugin in a user's own project: the README's example, as written but for the
server's address, run by pytest in a scratch folder outside this repository, with wirefault
installed from a wheel into a fresh virtual environment (not this checkout's editable
install).

The wheel is built from a copy of the sources, so the repository stays untouched. The new
environment gets wirefault alone; its dependencies (mitmproxy, psycopg, pytest...) are the
test environment's, made visible through a `.pth` file, so the test needs no network. A `.pth`
line adds a folder to the path without running that folder's own `.pth` files, so the test
environment's editable wirefault is not on the path: only the wheel's is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from test_readme import blocks

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "proxy", "protocols", "fifo_client")


def _run(*argv: str | Path, cwd: Path | None = None, env: dict | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def user_python(tmp_path_factory) -> Path:
    """The python of a fresh virtual environment with wirefault installed from a wheel."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(origin, source / name)
    wheels = root / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", wheels, source)
    [wheel] = wheels.glob("wirefault-*.whl")
    venv = root / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
         "--no-index", wheel)
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    (Path(purelib.stdout.strip()) / "test-dependencies.pth").write_text(
        sysconfig.get_path("purelib") + "\n")
    return python


def _clean_env() -> dict[str, str]:
    """The environment without what would lead the user's pytest to this checkout."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PYTEST_", "PYTHON")) and k != "VIRTUAL_ENV"}


def test_the_readme_example_passes_in_a_project_of_its_own(pg, user_python, tmp_path):
    where = _run(user_python, "-c", "import wirefault.fifo_client.pytest_plugin as p; "
                                    "print(p.__file__)", cwd=tmp_path, env=_clean_env())
    assert where.stdout.startswith(str(user_python.parent.parent)), where.stdout
    assert not where.stdout.startswith(str(REPO))

    [example] = [b for b in blocks("python") if "wirefault_proxy(" in b]
    address = f"127.0.0.1:{pg.port}"
    assert example.count("127.0.0.1:5432") == 2
    test_file = example.replace("127.0.0.1:5432", address).replace(
        "postgresql://postgres@", f"postgresql://{pg.user}@")
    project = tmp_path / "user-project"
    project.mkdir()
    (project / "test_with_wirefault.py").write_text(test_file)

    done = subprocess.run(
        [str(user_python), "-m", "pytest", "-v", "-p", "no:cacheprovider",
         "test_with_wirefault.py"],
        cwd=project, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"test_with_wirefault\.py::test_\w+ PASSED", done.stdout), done.stdout
    assert re.search(r"plugins: .*wirefault-", done.stdout), done.stdout
    # The project holds only its test: the plugin's server kept its files elsewhere.
    assert {p.name for p in project.iterdir()} <= {"test_with_wirefault.py", "__pycache__"}
