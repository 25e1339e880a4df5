"""cancel(after_ms=100) end to end: the proxy cancels the connection's own query on the
server, with a CancelRequest carrying that connection's BackendKeyData; and cancel(pid),
the Citus meaning, still signals a process.

Real PostgreSQL, real proxies in both launch modes (fault_e2e.py), psycopg.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from fault_e2e import TIMER_SLACK, Harness
from fifo_helpers import wait_until
from psycopg import errors

pytest_plugins = ["fault_e2e"]

BY_USER = "canceling statement due to user request"
"""What the server says for a CancelRequest (a statement_timeout says something else)."""


def sleeping(e2e: Harness, marker: str) -> bool:
    """A backend other than ours runs a query holding `marker`."""
    with e2e.direct() as c:
        return c.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                         "AND query LIKE %s AND pid <> pg_backend_pid()",
                         (f"%{marker}%",)).fetchone()[0] > 0


def test_cancel_after_ms_cancels_this_connections_query_only(e2e: Harness):
    # statement_timeout: without a cancel the test fails in 20 s, not 30 (and says why).
    options = {"options": "-c statement_timeout=20000"}
    bystander = e2e.connect(autocommit=True, **options)
    victim = e2e.connect(autocommit=True, **options)
    # Another connection through the same proxy sleeps meanwhile, and must not be hit.
    other = e2e.in_thread(lambda: bystander.execute(
        "SELECT 'bystander', pg_sleep(1)").fetchone())
    assert wait_until(lambda: sleeping(e2e, "bystander"), timeout=30)
    e2e.control.send('faults.add("stop").onQuery(query="victim").cancel(after_ms=300)')
    started = time.monotonic()
    with pytest.raises(errors.QueryCanceled) as caught:
        victim.execute("SELECT 'victim', pg_sleep(30)")
    assert time.monotonic() - started >= 0.3 - TIMER_SLACK
    assert caught.value.sqlstate == "57014"
    assert caught.value.diag.message_primary == BY_USER
    assert other.result(30) == ("bystander", "")
    # The cancelled connection is fine: only its statement was cancelled.
    assert victim.execute("SELECT 'after'").fetchone() == ("after",)
    assert e2e.fault("stop").fired == 1


def test_cancel_with_the_default_delay_on_an_execute(e2e: Harness):
    conn = e2e.connect(autocommit=True, options="-c statement_timeout=20000")
    e2e.control.send('faults.add("stop").onExecute(query="pg_sleep").cancel()')
    with pytest.raises(errors.QueryCanceled) as caught:
        conn.execute("SELECT pg_sleep(%s)", (30,))
    assert caught.value.diag.message_primary == BY_USER
    assert conn.execute("SELECT %s::int", (1,)).fetchone() == (1,)


def test_cancel_before_the_server_session_exists_changes_nothing(e2e: Harness):
    """On the StartupMessage there is no BackendKeyData yet: nothing to cancel, the proxy
    says so in its log and the connection starts as usual."""
    e2e.control.send('faults.add("early").onStartupMessage().cancel(after_ms=0)')
    conn = e2e.connect(autocommit=True)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    assert e2e.fault("early").fired == 1
    assert wait_until(lambda: "no server session to cancel" in e2e.proxy.log(), timeout=30)


SIGNAL_CATCHER = """
import signal, sys, time
signal.signal(signal.SIGINT, lambda *_: (print("SIGINT", flush=True), sys.exit(0)))
print("ready", flush=True)
time.sleep(60)
"""


def test_cancel_pid_still_signals_the_process(e2e: Harness):
    catcher = subprocess.Popen([sys.executable, "-c", SIGNAL_CATCHER],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert catcher.stdout is not None and catcher.stdout.readline() == "ready\n"
        conn = e2e.connect(autocommit=True)
        e2e.control.send(f'faults.add("sig").onQuery(query="SIGNAL").cancel({catcher.pid})')
        # The query itself goes through (after the short proxy-wide pause).
        assert conn.execute("SELECT 'SIGNAL'").fetchone() == ("SIGNAL",)
        assert catcher.stdout.readline() == "SIGINT\n"
        assert catcher.wait(30) == 0
        assert e2e.fault("sig").command.endswith(f".cancel({catcher.pid})")
    finally:
        if catcher.poll() is None:
            catcher.kill()
        catcher.wait()
