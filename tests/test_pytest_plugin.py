"""The pytest plugin (fifo_client/pytest_plugin.py), as a user's suite meets it: a test file
with no code of its own but the fixtures, run by a separate pytest in a scratch directory,
against a real PostgreSQL."""

from __future__ import annotations

import importlib.util
import json
import os
import textwrap

import pytest
from psycopg.conninfo import conninfo_to_dict

from wirefault.fifo_client.pytest_plugin import WirefaultProxy

pytest_plugins = ["pytester"]

USER_TESTS = '''
import json
import os

import psycopg
import pytest

PORT = int(os.environ["WF_TEST_PG_PORT"])
DSN = f"host=127.0.0.1 port={PORT} user={os.environ['WF_TEST_PG_USER']} dbname=postgres"
OUT = os.environ["WF_TEST_OUT"]


def record(**facts):
    name = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(OUT, f"{name}.jsonl"), "a") as f:
        f.write(json.dumps(facts) + "\\n")


def test_a_fault_kills_select_2_and_select_1_passes(wirefault, wirefault_proxy):
    proxy = wirefault_proxy(upstream=f"127.0.0.1:{PORT}", protocol="postgres")
    record(pid=wirefault.pid, directory=wirefault.directory, port=proxy.port,
           proxy=proxy.name)
    dsn = proxy.dsn_for(DSN)
    assert f"port={proxy.port}" in dsn and f"host={proxy.host}" in dsn
    with proxy.fault('onQuery(query="^SELECT 2").kill()') as name:
        assert [f["name"] for f in proxy.faults()] == [name]
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchall() == [(1,)]
        with pytest.raises(psycopg.OperationalError):
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT 2")
        event = proxy.wait_fired(name, timeout=10)
        assert event["fault"] == name and event["proxy"] == proxy.name
        assert event["action"] == "kill"
    assert proxy.faults() == []
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT 2").fetchall() == [(2,)]
    assert any("SELECT 2" in row["message"] for row in proxy.dump())


def test_the_uri_form_add_remove_clear_and_a_timeout(wirefault, wirefault_proxy):
    assert wirefault.proxies() == []  # the previous test's proxy is gone
    proxy = wirefault_proxy(upstream=("127.0.0.1", PORT))
    record(pid=wirefault.pid, directory=wirefault.directory, port=proxy.port,
           proxy=proxy.name)
    uri = proxy.dsn_for(f"postgresql://{os.environ['WF_TEST_PG_USER']}@db.invalid:1/postgres"
                        "?connect_timeout=10&port=2")
    assert uri.startswith(f"postgresql://{os.environ['WF_TEST_PG_USER']}@"
                          f"{proxy.host}:{proxy.port}/postgres?")
    assert "connect_timeout=10" in uri and "port=2" not in uri
    with psycopg.connect(uri, autocommit=True) as conn:
        assert conn.execute("SELECT 3").fetchall() == [(3,)]
    proxy.add("never", 'onQuery(query="^NEVER").kill()')
    proxy.add("later", "conn.onQuery().delay(1)")
    assert [f["name"] for f in proxy.faults()] == ["never", "later"]
    with pytest.raises(TimeoutError, match="fault 'never' .* did not fire within 0.3 s"):
        proxy.wait_fired("never", timeout=0.3)
    proxy.remove("never")
    assert [f["name"] for f in proxy.faults()] == ["later"]
    proxy.clear()
    assert proxy.faults() == []
    proxy.add("left", 'onQuery(query="^NEVER").kill()')  # the teardown removes it


def test_each_test_starts_with_no_proxy(wirefault):
    record(pid=wirefault.pid, directory=wirefault.directory, port=0, proxy="")
    assert wirefault.proxies() == []
'''


def run_user_suite(pytester, monkeypatch, pg, tmp_path, *args: str):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("WF_TEST_PG_PORT", str(pg.port))
    monkeypatch.setenv("WF_TEST_PG_USER", pg.user)
    monkeypatch.setenv("WF_TEST_OUT", str(out))
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=180)
    facts = [json.loads(line) for path in sorted(out.glob("*.jsonl"))
             for line in path.read_text().splitlines()]
    return result, facts


def assert_stopped(facts):
    for pid in {f["pid"] for f in facts}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the serve process is gone (and reaped)
    for directory in {f["directory"] for f in facts}:
        assert not os.path.exists(directory)


def test_the_fixtures_in_a_users_suite(pytester, monkeypatch, pg, tmp_path):
    result, facts = run_user_suite(pytester, monkeypatch, pg, tmp_path)
    result.assert_outcomes(passed=3)
    assert len(facts) == 3 and len({f["pid"] for f in facts}) == 1  # one server a session
    assert len({f["proxy"] for f in facts}) == 3
    assert_stopped(facts)


def test_under_xdist_each_worker_has_its_own_server(pytester, monkeypatch, pg, tmp_path):
    if importlib.util.find_spec("xdist") is None:
        pytest.skip("pytest-xdist is not installed")
    result, facts = run_user_suite(pytester, monkeypatch, pg, tmp_path, "-n", "2",
                                   "--dist", "each")
    result.assert_outcomes(passed=6)  # every test on both workers
    pids = {f["pid"] for f in facts}
    assert len(pids) == 2 and len({f["directory"] for f in facts}) == 2
    assert_stopped(facts)


def test_a_users_suite_that_does_not_use_the_fixtures_starts_no_server(pytester):
    pytester.makepyfile(test_plain="def test_plain():\n    assert True\n")
    pytester.makeconftest(textwrap.dedent("""
        import subprocess

        def pytest_sessionfinish(session):
            out = subprocess.run(["ps", "-o", "args=", "--ppid", str(__import__("os").getpid())],
                                 capture_output=True, text=True).stdout
            assert "wirefault.fifo_client.cli serve" not in out
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(passed=1)
    assert result.ret == 0


@pytest.mark.parametrize(("dsn", "expected"), [
    ("host=db port=5432 user=u dbname=d", "host=127.0.0.1 port=9999 user=u dbname=d"),
    ("hostaddr=10.0.0.1 host=db user=u options='-c x=1'",
     "host=127.0.0.1 port=9999 user=u options='-c x=1'"),
    ("postgres://u:p@db:5432/d?sslmode=disable",
     "postgres://u:p@127.0.0.1:9999/d?sslmode=disable"),
    ("postgresql:///d?host=/tmp&port=5", "postgresql://127.0.0.1:9999/d"),
    ("postgresql://u@h1:1,h2:2/d", "postgresql://u@127.0.0.1:9999/d"),
])
def test_dsn_for_keeps_the_form_and_points_at_the_proxy(dsn, expected):
    proxy = WirefaultProxy(server=None, name="p", host="127.0.0.1",  # type: ignore[arg-type]
                           port=9999, upstream="db:5432", protocol="postgres")
    got = proxy.dsn_for(dsn)
    if "://" in dsn:
        assert got == expected
    else:  # key=value stays key=value; libpq's order of keys
        assert "://" not in got and conninfo_to_dict(got) == conninfo_to_dict(expected)


def test_the_readme_example_passes(pytester, pg):
    from test_readme import blocks

    (example,) = [b for b in blocks("python") if "wirefault_proxy(" in b]
    example = example.replace("127.0.0.1:5432", f"127.0.0.1:{pg.port}").replace(
        "postgres@", f"{pg.user}@")
    pytester.makepyfile(test_readme_example=example)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)
