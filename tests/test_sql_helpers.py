"""sql/citus_helpers.sql and sql/wirefault.sql in a real PostgreSQL server, talking to a
real CommandChannel (the helper process of fifo_helpers.py) through a real FIFO."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fifo_helpers import (
    SEEDED_ROWS,
    ChannelProcess,
    blocked_in_fifo_open,
    fifo_dir,
    make_fifo,
    postgres_ids,
    shell_exchange,
    wait_until,
)

from wirefault.proxy import dsl

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
BAD_COMMAND = "conn.onQury(query=\"x\").kill()"


def _error_of(command: str) -> str:
    with pytest.raises(dsl.CommandError) as info:
        dsl.parse(command)
    return str(info.value)


@pytest.fixture(scope="module")
def helpers_loaded(pg) -> None:
    with pg.connect(autocommit=True) as conn:
        for name in ("citus_helpers.sql", "wirefault.sql"):
            conn.execute((SQL_DIR / name).read_text())


@pytest.fixture
def fifo() -> Iterator[Path]:
    with fifo_dir() as directory:
        yield make_fifo(directory / "proxy.fifo", for_postgres=True)


@pytest.fixture
def channel(fifo: Path) -> Iterator[ChannelProcess]:
    with ChannelProcess(fifo, reply_timeout=2.0) as process:
        yield process


@pytest.fixture
def db(pg, helpers_loaded, fifo: Path) -> Iterator[psycopg.Connection]:
    with pg.connect(autocommit=True) as conn:
        conn.execute("SELECT set_config('citus.mitmfifo', %s, false)", (str(fifo),))
        conn.execute("SELECT set_config('wirefault.fifo', %s, false)", (str(fifo),))
        conn.execute("SET wirefault.timeout = 5")
        yield conn


def _rows(conn: psycopg.Connection, query: str, *params) -> list[tuple]:
    return conn.execute(query, params).fetchall()


# -- citus helpers ----------------------------------------------------------------------------


def test_citus_mitmproxy_accepts_a_command_with_one_empty_row(db, channel):
    assert _rows(db, "SELECT * FROM citus.mitmproxy('conn.allow()')") == [("",)]
    rule = 'conn.onQuery(query="^COMMIT").after(2).kill()'
    assert _rows(db, "SELECT * FROM citus.mitmproxy(%s)", rule) == [("",)]
    assert _rows(db, "SELECT * FROM citus.mitmproxy('test:rule')") == [(f"rule {rule}",)]


def test_citus_mitmproxy_returns_the_error_line_of_a_bad_command(db, channel):
    assert _rows(db, "SELECT * FROM citus.mitmproxy(%s)", BAD_COMMAND) == [
        (_error_of(BAD_COMMAND),)]


def test_citus_backslashes_arrive_doubled_and_parse_like_the_original(db, channel):
    # COPY doubles the backslash of \( ; the parser's string literals undo it.
    rule = r'conn.onQuery(query="SELECT min\(latest_end_lsn\)").kill()'
    assert _rows(db, "SELECT * FROM citus.mitmproxy(%s)", rule) == [("",)]
    (installed,), = _rows(db, "SELECT * FROM citus.mitmproxy('test:rule')")
    parsed = dsl.parse(installed.removeprefix("rule "))
    assert parsed.steps[0].fields[0][1].pattern == r"SELECT min\(latest_end_lsn\)"


def test_citus_dump_network_traffic_returns_typed_rows(db, channel):
    db.execute("SELECT citus.mitmproxy('test:seed')")
    rows = _rows(db, "SELECT * FROM citus.dump_network_traffic()")
    assert rows == SEEDED_ROWS
    assert _rows(db, "SELECT * FROM citus.dump_network_traffic()") == []


def test_citus_clear_network_traffic_forgets_the_traffic(db, channel):
    db.execute("SELECT citus.mitmproxy('conn.kill()')")
    assert _rows(db, "SELECT citus.clear_network_traffic()::text") == [("",)]
    assert _rows(db, "SELECT * FROM citus.dump_network_traffic()") == []


# -- wirefault helpers ------------------------------------------------------------------------


def test_wirefault_command_returns_empty_text_when_accepted(db, channel):
    assert _rows(db, "SELECT wirefault.command('conn.kill()')") == [("",)]
    # twice in one transaction: the helper's temporary table is reused
    with db.transaction():
        assert _rows(db, "SELECT wirefault.command('conn.allow()'), "
                         "wirefault.command('conn.allow()')") == [("", "")]


def test_wirefault_command_raises_the_proxy_error(db, channel):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
        db.execute("SELECT wirefault.command(%s)", (BAD_COMMAND,))
    assert info.value.diag.message_primary == f"wirefault: {_error_of(BAD_COMMAND)}"
    assert _rows(db, "SELECT 1") == [(1,)]


def test_wirefault_command_keeps_backslashes_in_the_error(db, channel):
    bad = r'conn.onQuery(query="[\d-a]").kill()'
    with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
        db.execute("SELECT wirefault.command(%s)", (bad,))
    # the error line, "bad regex '[\\d-a]': ...", comes back with its backslashes intact
    assert info.value.diag.message_primary == f"wirefault: {_error_of(bad)}"
    assert "\\\\d" in info.value.diag.message_primary


def test_wirefault_traffic_and_clear_traffic(db, channel):
    db.execute("SELECT wirefault.command('test:seed')")
    assert _rows(db, "SELECT * FROM wirefault.traffic()") == SEEDED_ROWS
    db.execute("SELECT wirefault.command('conn.kill()')")
    assert _rows(db, "SELECT * FROM wirefault.traffic()") == [(0, "coordinator", "conn.kill()")]
    db.execute("SELECT wirefault.command('conn.kill()')")
    assert _rows(db, "SELECT wirefault.clear_traffic()::text") == [("",)]
    assert _rows(db, "SELECT * FROM wirefault.traffic()") == []


def test_wirefault_command_returns_dump_rows_as_copy_text(db, channel):
    db.execute("SELECT wirefault.command('conn.kill()')")
    db.execute("SELECT wirefault.command('conn.allow()')")
    (text,), = _rows(db, "SELECT wirefault.command('recorder.dump()')")
    assert text == "0\tcoordinator\tconn.kill()\n1\tcoordinator\tconn.allow()"


def test_wirefault_command_gives_up_after_the_timeout_without_a_proxy(db, fifo):
    db.execute("SET wirefault.timeout = 2")
    started = time.monotonic()
    with pytest.raises(psycopg.errors.ConnectionFailure) as info:
        db.execute("SELECT wirefault.command('conn.allow()')")
    elapsed = time.monotonic() - started
    assert 1.9 <= elapsed < 3.5
    assert str(fifo) in info.value.diag.message_primary
    assert "within 2 s" in info.value.diag.message_primary
    assert _rows(db, "SELECT 1") == [(1,)]


def test_wirefault_command_reports_a_missing_fifo_at_once(db, fifo):
    db.execute("SELECT set_config('wirefault.fifo', %s, false)", (str(fifo) + ".missing",))
    started = time.monotonic()
    with pytest.raises(psycopg.errors.ConnectionFailure, match="is not a FIFO"):
        db.execute("SELECT wirefault.command('conn.allow()')")
    assert time.monotonic() - started < 1.5


def test_wirefault_settings_are_checked(db):
    db.execute("SET wirefault.timeout = 'soon'")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"wirefault\.timeout"):
        db.execute("SELECT wirefault.command('conn.allow()')")
    db.execute("RESET wirefault.timeout")
    db.execute("RESET wirefault.fifo")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="no FIFO configured"):
        db.execute("SELECT wirefault.command('conn.allow()')")


def test_concurrent_backends_each_get_their_own_reply(pg, helpers_loaded, fifo, channel):
    replies: dict[str, str] = {}
    failures: list[BaseException] = []

    def backend(number: int) -> None:
        try:
            with pg.connect(autocommit=True) as conn:
                conn.execute("SELECT set_config('wirefault.fifo', %s, false)", (str(fifo),))
                for i in range(5):
                    tag = f"b{number}-{i}"
                    try:
                        conn.execute("SELECT wirefault.command(%s)", (f"test:echo {tag}",))
                    except psycopg.errors.InvalidParameterValue as exc:
                        replies[tag] = exc.diag.message_primary or ""
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=backend, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    assert replies == {f"b{n}-{i}": f"wirefault: echo b{n}-{i}" for n in range(4)
                       for i in range(5)}


# -- named faults -----------------------------------------------------------------------------


def _sent(db: psycopg.Connection) -> str:
    """The last command the helper process accepted."""
    (reply,), = _rows(db, "SELECT * FROM citus.mitmproxy('test:rule')")
    return reply.removeprefix("rule ")


def _handled(db: psycopg.Connection) -> int:
    (reply,), = _rows(db, "SELECT * FROM citus.mitmproxy('test:count')")
    return int(reply)


@pytest.mark.parametrize("chain", ['onQuery(query="^COMMIT").kill()',
                                   '.onQuery(query="^COMMIT").kill()',
                                   'conn.onQuery(query="^COMMIT").kill()',
                                   '  conn . onQuery(query="^COMMIT").kill()  '])
def test_wirefault_add_fault_sends_faults_add_with_the_chain(db, channel, chain):
    assert _rows(db, "SELECT wirefault.add_fault('commit:kill', %s)::text", chain) == [("",)]
    assert _sent(db).replace(" ", "") == 'faults.add("commit:kill").onQuery(query="^COMMIT").kill()'


def test_wirefault_remove_and_clear_faults_send_their_commands(db, channel):
    db.execute("SELECT wirefault.remove_fault('Slow-1.a_b')")
    assert _sent(db) == 'faults.remove("Slow-1.a_b")'
    db.execute("SELECT wirefault.clear_faults()")
    assert _sent(db) == "faults.clear()"


def test_wirefault_faults_reads_an_empty_list(db, channel):
    # The helper process answers faults.list() with an empty line: no faults.
    assert _rows(db, "SELECT * FROM wirefault.faults()") == []
    assert _rows(db, "SELECT wirefault.command('faults.list()')") == [("",)]
    (columns,), = _rows(db, "SELECT pg_get_function_result('wirefault.faults'::regproc)")
    assert columns == ("TABLE(name text, matched bigint, fired bigint, added timestamp with "
                       "time zone, state text, command text)")


@pytest.mark.parametrize("name", [None, "", "a b", 'a")', "-a", "_a", "x" * 65, "é", "a\nb",
                                  "a'b"])
def test_a_bad_fault_name_is_refused_before_anything_is_sent(db, channel, name):
    before = _handled(db)
    for call in ("SELECT wirefault.add_fault(%s, 'kill()')", "SELECT wirefault.remove_fault(%s)"):
        with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
            db.execute(call, (name,))
        assert info.value.diag.message_primary.startswith("wirefault: bad fault name ")
    assert _handled(db) == before + 1  # nothing but the first test:count arrived


def test_a_longest_fault_name_is_fine(db, channel):
    db.execute("SELECT wirefault.add_fault(%s, 'kill()')", ("x" * 64,))
    assert _sent(db) == f'faults.add("{"x" * 64}").kill()'


@pytest.mark.parametrize(("chain", "problem"), [
    (None, "needs its steps and action"), ("  ", "needs its steps and action"),
    ('faults.add("x").kill()', "without faults.*"), ("faults.list()", "without faults.*")])
def test_a_chain_that_is_no_chain_is_refused(db, channel, chain, problem):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=re.escape(problem)):
        db.execute("SELECT wirefault.add_fault('x', %s)", (chain,))


def test_a_fault_the_proxy_refuses_raises_its_error(db, channel):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
        db.execute("SELECT wirefault.add_fault('x', 'onQury().kill()')")
    expected = _error_of('faults.add("x").onQury().kill()')
    assert info.value.diag.message_primary == f"wirefault: {expected}"
    assert info.value.diag.message_detail == 'command: faults.add("x").onQury().kill()'


def test_the_fault_helpers_give_up_after_the_timeout_without_a_proxy(db, fifo):
    db.execute("SET wirefault.timeout = 1")
    for call in ("SELECT wirefault.add_fault('x', 'kill()')", "SELECT * FROM wirefault.faults()",
                 "SELECT wirefault.remove_fault('x')", "SELECT wirefault.clear_faults()"):
        started = time.monotonic()
        with pytest.raises(psycopg.errors.ConnectionFailure, match="within 1 s"):
            db.execute(call)
        assert 0.9 <= time.monotonic() - started < 2.5
    assert _rows(db, "SELECT 1") == [(1,)]


# -- privileges -------------------------------------------------------------------------------

TEST_ROLE = "wirefault_test_role"
PUBLIC_FUNCTIONS = ("wirefault.command(text)", "wirefault.traffic()",
                    "wirefault.clear_traffic()")


def test_unprivileged_roles_need_the_documented_security_definer_setup(pg, helpers_loaded,
                                                                        fifo, channel):
    with pg.connect(autocommit=True) as admin:
        admin.execute(f"DROP ROLE IF EXISTS {TEST_ROLE}")
        admin.execute(f"CREATE ROLE {TEST_ROLE} LOGIN")
        admin.execute(f"GRANT USAGE ON SCHEMA wirefault TO {TEST_ROLE}")
        try:
            with pg.connect(autocommit=True) as user:
                user.execute(f"SET ROLE {TEST_ROLE}")
                user.execute("SELECT set_config('wirefault.fifo', %s, false)", (str(fifo),))
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    user.execute("SELECT wirefault.command('conn.allow()')")
                for function in PUBLIC_FUNCTIONS:  # the recipe of docs/client.md
                    admin.execute(f"ALTER FUNCTION {function} SECURITY DEFINER "
                                  f"SET wirefault.fifo = '{fifo}'")
                user.execute("SELECT set_config('wirefault.fifo', '/etc/passwd', false)")
                assert _rows(user, "SELECT wirefault.command('conn.kill()')") == [("",)]
                assert _rows(user, "SELECT * FROM wirefault.traffic()") == [
                    (0, "coordinator", "conn.kill()")]
                # The fault helpers go through wirefault.command: the same three suffice.
                user.execute("SELECT wirefault.add_fault('f', 'kill()')")
                user.execute("SELECT wirefault.remove_fault('f'), wirefault.clear_faults()")
                assert _rows(user, "SELECT count(*) FROM wirefault.faults()") == [(0,)]
                with pytest.raises(psycopg.errors.InsufficientPrivilege):  # the inner one
                    user.execute("SELECT wirefault._exchange('conn.allow()', false)")
        finally:
            admin.execute((SQL_DIR / "wirefault.sql").read_text())  # undo the ALTERs
            admin.execute(f"DROP OWNED BY {TEST_ROLE}")
            admin.execute(f"DROP ROLE {TEST_ROLE}")
        assert _rows(admin, "SELECT bool_or(prosecdef), count(proconfig) FROM pg_proc "
                            "WHERE pronamespace = 'wirefault'::regnamespace") == [(False, 0)]


# -- a FIFO the server's account may not open -------------------------------------------------


def test_wirefault_command_says_permission_denied_for_a_fifo_the_server_cannot_open(db):
    if postgres_ids() is None:
        pytest.skip("needs root, so the FIFO can belong to another account than the server's")
    with fifo_dir() as directory:
        # root's, mode 0600: served, but the server's account may not open it
        fifo = make_fifo(directory / "root-only.fifo")
        with ChannelProcess(fifo):
            db.execute("SELECT set_config('wirefault.fifo', %s, false)", (str(fifo),))
            started = time.monotonic()
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                db.execute("SELECT wirefault.command('conn.allow()')")
            assert time.monotonic() - started < 1.5  # at once, not at the timeout
            assert info.value.diag.message_primary == (
                "wirefault: permission denied: the database server's OS account cannot read "
                f"and write FIFO {fifo}")
            assert "--fifo-group" in info.value.diag.message_hint
            assert shell_exchange(fifo, "test:count").stdout == "1\n"  # nothing reached it
    assert _rows(db, "SELECT 1") == [(1,)]


def test_wirefault_command_says_permission_denied_for_a_directory_the_server_cannot_search(db):
    if postgres_ids() is None:
        pytest.skip("needs root, so the directory can belong to another account")
    with fifo_dir() as directory:
        private = directory / "private"
        private.mkdir(mode=0o700)
        fifo = make_fifo(private / "proxy.fifo", for_postgres=True)
        db.execute("SELECT set_config('wirefault.fifo', %s, false)", (str(fifo),))
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            db.execute("SELECT wirefault.command('conn.allow()')")
    assert info.value.diag.message_primary == (
        "wirefault: permission denied: the database server's OS account cannot reach FIFO "
        f"{fifo} (a directory on its path is not searchable)")


# -- a citus helper blocked on a FIFO nobody serves -------------------------------------------

DOCUMENTED_FIFO = "/tmp/wirefault.fifo"


def documented_release_line() -> str:
    """The one-liner citus_helpers.sql gives for freeing a stuck backend, as written."""
    lines = [line.removeprefix("--").strip()
             for line in (SQL_DIR / "citus_helpers.sql").read_text().splitlines()
             if line.startswith("--   psql ")]
    assert len(lines) == 1, lines
    return lines[0]


class BlockedCall:
    """A session running `query` in a thread; it blocks in open() of a FIFO nobody serves."""

    def __init__(self, pg, fifo: Path, query: str) -> None:
        self.conn = pg.connect(autocommit=True)
        self.conn.execute("SELECT set_config('citus.mitmfifo', %s, false)", (str(fifo),))
        self.pid = self.conn.info.backend_pid
        self.query = query
        self.outcome: BaseException | list[tuple] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.outcome = self.conn.execute(self.query).fetchall()
        except BaseException as exc:
            self.outcome = exc

    def start(self) -> BlockedCall:
        self.thread.start()
        return self

    def blocked(self) -> bool:
        return self.thread.is_alive() and blocked_in_fifo_open(self.pid)

    def finished(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def close(self) -> None:
        self.conn.close()


def consume_one_command(fifo: Path) -> threading.Thread:
    """A "proxy" that reads one command and dies without replying: the COPY TO goes
    through, the COPY FROM then waits for a writer that never comes."""
    def read_and_vanish() -> None:
        with open(fifo, "rb") as reader:  # blocks until the backend opens it to write
            reader.read()

    thread = threading.Thread(target=read_and_vanish, daemon=True)
    thread.start()
    return thread


def release_env(pg) -> dict[str, str]:
    return dict(os.environ, PGHOST=pg.host, PGPORT=str(pg.port), PGUSER=pg.user,
                PGDATABASE=pg.dbname, PATH=f"{pg.bindir}:{os.environ['PATH']}")


@pytest.mark.parametrize("stuck_in", ["TO", "FROM"])
def test_the_documented_one_liner_frees_a_citus_call_stuck_on_an_unserved_fifo(
        pg, helpers_loaded, fifo, stuck_in):
    query = ("SELECT * FROM citus.mitmproxy('conn.allow()')" if stuck_in == "TO"
             else "SELECT * FROM citus.dump_network_traffic()")
    reader = consume_one_command(fifo) if stuck_in == "FROM" else None
    call = BlockedCall(pg, fifo, query).start()
    try:
        if reader is not None:
            reader.join(10)
            assert not reader.is_alive(), "the command never reached the FIFO"
        assert wait_until(call.blocked, 10), "the backend never blocked in open()"
        line = documented_release_line().replace(DOCUMENTED_FIFO, str(fifo))
        released = subprocess.run(["sh", "-c", line], env=release_env(pg), capture_output=True,
                                  text=True, timeout=30)
        assert released.returncode == 0, released.stderr
        assert call.finished(10), "the backend is still stuck"
        assert isinstance(call.outcome, psycopg.errors.QueryCanceled), call.outcome
        # the error's context names the statement it was stuck in
        assert re.search(rf"COPY \w+ {stuck_in} '{fifo}'", call.outcome.diag.context or "")
        assert call.conn.execute("SELECT 1").fetchone() == (1,)  # the session lives on
    finally:
        if not call.finished(0):
            subprocess.run(["sh", "-c", ': <> "$1"', "sh", str(fifo)], timeout=10)
        call.close()


def test_signals_alone_leave_a_citus_call_stuck_on_an_unserved_fifo(pg, helpers_loaded, fifo):
    call = BlockedCall(pg, fifo, "SELECT * FROM citus.mitmproxy('conn.allow()')").start()
    try:
        assert wait_until(call.blocked, 10)
        with pg.connect(autocommit=True) as admin:
            assert _rows(admin, "SELECT pg_cancel_backend(%s), pg_terminate_backend(%s)",
                         call.pid, call.pid) == [(True, True)]
            # What the README used to promise: it does not happen, the open() restarts.
            assert not call.finished(1.0)
            assert call.blocked()
            assert _rows(admin, "SELECT state FROM pg_stat_activity WHERE pid = %s",
                         call.pid) == [("active",)]
        # Opening the FIFO is what lets the pending termination through.
        subprocess.run(["sh", "-c", ': <> "$1"', "sh", str(fifo)], check=True, timeout=10)
        assert call.finished(10)
        assert isinstance(call.outcome, psycopg.errors.AdminShutdown), call.outcome
    finally:
        if not call.finished(0):
            subprocess.run(["sh", "-c", ': <> "$1"', "sh", str(fifo)], timeout=10)
        call.close()
