"""The client (FaultProxy), the builder and COPY parsing, against a real CommandChannel in a
helper process (fifo_helpers.py) whose handler keeps the proxy's contract."""

from __future__ import annotations

import ast
import doctest
import json
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from fifo_helpers import PROJECT_DIR, PYTHON, SEEDED_ROWS, ChannelProcess, fifo_dir, make_fifo
from hypothesis import given, settings
from hypothesis import strategies as st

from wirefault.fifo_client import (
    Command,
    CommandError,
    FaultProxy,
    ProxyUnavailable,
    TrafficRow,
    UnknownMethodError,
    WirefaultError,
    builder,
    client,
    conn,
    faults,
    parse_dump,
    recorder,
)
from wirefault.proxy import dsl

CITUS_COMMANDS = Path(__file__).resolve().parent / "data" / "citus_commands.txt"


@pytest.fixture(scope="module")
def served_fifo() -> Iterator[Path]:
    with fifo_dir() as directory, ChannelProcess(directory / "client.fifo") as process:
        yield process.fifo


@pytest.fixture
def proxy(served_fifo: Path) -> FaultProxy:
    return FaultProxy(str(served_fifo), timeout=5)


def current_rule(proxy: FaultProxy) -> str:
    with pytest.raises(CommandError) as info:
        proxy.send("test:rule")
    return info.value.message.removeprefix("rule ")


def parser_error(text: str) -> str:
    with pytest.raises(dsl.CommandError) as info:
        dsl.parse(text)
    return str(info.value)


# -- importing ------------------------------------------------------------------------------


def test_importing_the_client_never_imports_mitmproxy():
    script = (
        "import sys\n"
        "import wirefault.fifo_client, wirefault.fifo_client.cli\n"
        "from wirefault.fifo_client import conn, recorder, FaultProxy\n"
        "str(conn.onQuery(query='^COMMIT').after(2).kill()); str(recorder.dump())\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'mitmproxy')\n"
        "print(loaded)\n"
    )
    result = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True,
                            cwd=PROJECT_DIR, check=True)
    assert result.stdout.strip() == "[]"


def test_documentation_examples_run():
    for module in (builder, client):
        assert doctest.testmod(module).failed == 0


# -- send and friends -----------------------------------------------------------------------


def test_send_returns_empty_text_when_accepted(proxy):
    assert proxy.send('conn.onQuery(query="^COMMIT").kill()') == ""
    assert current_rule(proxy) == 'conn.onQuery(query="^COMMIT").kill()'
    assert proxy.send(conn.onCopyData().cancel(4242)) == ""
    assert current_rule(proxy) == "conn.onCopyData().cancel(4242)"


def test_send_raises_the_proxys_error_line(proxy):
    with pytest.raises(CommandError) as info:
        proxy.send("conn.onQury().kill()")
    assert str(info.value) == parser_error("conn.onQury().kill()")
    assert info.value.command == "conn.onQury().kill()"
    assert isinstance(info.value, WirefaultError)


def test_allow_and_fault(proxy):
    rule = conn.onQuery(query="^COMMIT").after(2).kill()
    with proxy.fault(rule):
        assert current_rule(proxy) == str(rule)
    assert current_rule(proxy) == "conn.allow()"
    proxy.send(rule)
    proxy.allow()
    assert current_rule(proxy) == "conn.allow()"


def test_fault_restores_allow_when_the_block_raises(proxy):
    with pytest.raises(ZeroDivisionError), proxy.fault(conn.kill()):
        assert current_rule(proxy) == "conn.kill()"
        _ = 1 / 0
    assert current_rule(proxy) == "conn.allow()"


def test_fault_keeps_the_blocks_error_when_the_proxy_is_gone():
    with fifo_dir() as directory:
        process = ChannelProcess(directory / "dying.fifo").start()
        proxy = FaultProxy(str(process.fifo), timeout=0.5)
        try:
            with pytest.raises(KeyError) as info, proxy.fault(conn.kill()):
                process.stop()
                raise KeyError("the test's own error")
        finally:
            process.stop()
    assert any("could not restore conn.allow()" in note
               for note in getattr(info.value, "__notes__", []))


def test_fault_with_a_rejected_rule_does_not_enter_the_block(proxy):
    entered = False
    with pytest.raises(CommandError), proxy.fault("conn.kil()"):
        entered = True
    assert not entered


def test_dump_parses_rows_with_escapes_and_the_dropped_frames_row(proxy):
    proxy.reset_traffic()
    proxy.send("test:seed")
    rows = proxy.dump()
    assert rows == [TrafficRow(*row) for row in SEEDED_ROWS]
    assert rows[0].conn == -1 and rows[0].source == "recorder"
    assert proxy.dump() == []


def test_reset_traffic_forgets_recorded_rows(proxy):
    proxy.send(conn.kill())
    proxy.reset_traffic()
    proxy.send(conn.allow())
    assert proxy.dump() == [TrafficRow(0, "coordinator", "conn.allow()")]


def test_send_of_a_dump_returns_the_copy_text(proxy):
    proxy.reset_traffic()
    proxy.send(conn.kill())
    assert proxy.send(recorder.dump()) == "0\tcoordinator\tconn.kill()"
    assert proxy.send("recorder.dump()") == ""


def test_an_unfinished_builder_is_refused_before_sending(proxy):
    with pytest.raises(CommandError) as info:
        proxy.send(conn.onQuery(query="x"))
    assert str(info.value) == parser_error('conn.onQuery(query="x")')


# -- concurrency ----------------------------------------------------------------------------

_WORKER = """
import json, sys
from wirefault.fifo_client import FaultProxy, CommandError
proxy = FaultProxy(sys.argv[1], timeout=30)
replies = {}
for i in range(int(sys.argv[3])):
    tag = f"{sys.argv[2]}-{i}"
    try:
        proxy.send(f"test:echo {tag}")
    except CommandError as exc:
        replies[tag] = exc.message
print(json.dumps(replies))
"""


def test_threads_and_processes_never_mix_commands_or_replies(served_fifo):
    shared = FaultProxy(str(served_fifo), timeout=30)
    count_before = int(_reply(shared, "test:count"))
    replies: dict[str, str] = {}
    errors: list[BaseException] = []

    def thread_client(number: int) -> None:
        # half the threads share one FaultProxy, half have their own
        proxy = shared if number % 2 else FaultProxy(str(served_fifo), timeout=30)
        try:
            for i in range(20):
                tag = f"t{number}-{i}"
                replies[tag] = _reply(proxy, f"test:echo {tag}")
        except BaseException as exc:
            errors.append(exc)

    processes = [subprocess.Popen([PYTHON, "-c", _WORKER, str(served_fifo), f"p{n}", "20"],
                                  stdout=subprocess.PIPE, text=True, cwd=PROJECT_DIR)
                 for n in range(2)]
    threads = [threading.Thread(target=thread_client, args=(n,)) for n in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for process in processes:
        out, _ = process.communicate(timeout=60)
        replies.update(json.loads(out))
    elapsed = time.monotonic() - started
    assert not errors
    expected_tags = [f"t{n}-{i}" for n in range(8) for i in range(20)]
    expected_tags += [f"p{n}-{i}" for n in range(2) for i in range(20)]
    assert replies == {tag: f"echo {tag}" for tag in expected_tags}
    # exactly 200 commands arrived (none merged or lost), then this one
    assert int(_reply(shared, "test:count")) == count_before + 200 + 1
    print(f"200 concurrent exchanges in {elapsed:.2f} s")


def _reply(proxy: FaultProxy, command: str) -> str:
    with pytest.raises(CommandError) as info:
        proxy.send(command)
    return info.value.message


# -- no proxy -------------------------------------------------------------------------------


def test_unavailable_when_nothing_serves_the_fifo(tmp_path):
    fifo = make_fifo(tmp_path / "idle.fifo")
    proxy = FaultProxy(str(fifo), timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ProxyUnavailable) as info:
        proxy.allow()
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 1.0
    assert str(fifo) in str(info.value) and info.value.fifo_path == str(fifo)
    assert "nothing reads the FIFO" in str(info.value)


def test_unavailable_when_the_fifo_does_not_exist(tmp_path):
    for path in (tmp_path / "missing.fifo", tmp_path / "no-such-dir" / "missing.fifo"):
        started = time.monotonic()
        with pytest.raises(ProxyUnavailable, match="does not exist"):
            FaultProxy(str(path), timeout=0.3).dump()
        assert 0.3 <= time.monotonic() - started < 0.8


def test_a_regular_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "not-a-fifo"
    path.write_text("precious")
    with pytest.raises(WirefaultError, match="is not a FIFO") as info:
        FaultProxy(str(path), timeout=1).allow()
    assert not isinstance(info.value, ProxyUnavailable)
    assert path.read_text() == "precious"


def test_a_proxy_that_reads_but_never_replies_times_out(tmp_path):
    fifo = make_fifo(tmp_path / "mute.fifo")
    # a reader that swallows the command and never answers
    reader = subprocess.Popen(["sh", "-c", 'exec cat "$1" > /dev/null', "sh", str(fifo)])
    try:
        started = time.monotonic()
        with pytest.raises(ProxyUnavailable, match="no complete reply"):
            FaultProxy(str(fifo), timeout=0.5).allow()
        assert 0.5 <= time.monotonic() - started < 1.0
    finally:
        reader.kill()
        reader.wait()


# -- COPY text ------------------------------------------------------------------------------


def test_parse_dump_undoes_every_copy_escape():
    rows = parse_dump("1\tworker\ta\\\\b\\tc\\nd\\re\\101\\x42\\303\\251\\q\n"[:-1])
    assert rows == [TrafficRow(1, "worker", "a\\b\tc\nd\reAB\u00e9q")]
    assert parse_dump("") == []


def test_parse_dump_treats_a_single_odd_line_as_the_proxys_error():
    with pytest.raises(CommandError, match=r"^column 1: boom$"):
        parse_dump("column 1: boom")
    with pytest.raises(WirefaultError, match="unexpected line"):
        parse_dump("0\tworker\tok\nnonsense")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_copy_escape_round_trips(text):
    row = TrafficRow(3, "coordinator", text)
    assert parse_dump(client.format_copy([row])[:-1]) == [row]


# -- the builder ----------------------------------------------------------------------------


def test_builder_renders_the_exact_command_text():
    assert str(conn.onQuery(query="^COMMIT").after(2).kill()) == \
        'conn.onQuery(query="^COMMIT").after(2).kill()'
    assert str(conn.after(1).onQuery(query="BEGIN").cancel(4242)) == \
        'conn.after(1).onQuery(query="BEGIN").cancel(4242)'
    assert str(conn.matches(b"CREATE INDEX").killall()) == 'conn.matches(b"CREATE INDEX").killall()'
    assert str(conn.connect_delay(1400)) == "conn.connect_delay(1400)"
    assert str(conn.onAuthenticationOk().kill()) == "conn.onAuthenticationOk().kill()"
    assert str(recorder.dump()) == "recorder.dump()"
    assert str(recorder.reset()) == "recorder.reset()"
    assert str(conn.reset()) == "conn.reset()"
    assert str(conn.onQuery(query='say "hi"').kill()) == """conn.onQuery(query='say "hi"').kill()"""


def test_builder_rejects_unknown_names_at_attribute_access():
    with pytest.raises(UnknownMethodError) as info:
        _ = conn.onQury
    assert str(info.value) == \
        "unknown message type 'Qury' for protocol postgres; did you mean 'Query'?"
    assert isinstance(info.value, AttributeError) and isinstance(info.value, CommandError)
    with pytest.raises(UnknownMethodError, match="did you mean 'kill'"):
        _ = conn.onQuery(query="x").kil
    with pytest.raises(UnknownMethodError, match="did you mean 'dump'"):
        _ = recorder.dum
    with pytest.raises(UnknownMethodError, match="recorder command"):
        _ = conn.dump
    with pytest.raises(UnknownMethodError, match="the action comes last"):
        _ = conn.kill().after
    assert not hasattr(conn, "onQury") and hasattr(conn, "onQuery")
    assert "onQuery" in dir(conn) and "kill" in dir(conn) and "dump" in dir(recorder)


def test_builder_checks_arguments_with_the_parsers_words():
    prefix = "conn.onQuery(qury=\"x\")"
    with pytest.raises(CommandError) as info:
        conn.onQuery(qury="x")
    assert str(info.value) == parser_error(prefix + ".kill()")
    with pytest.raises(CommandError) as info:
        conn.onQuery(query="^x").cancel(-1)
    assert str(info.value) == parser_error('conn.onQuery(query="^x").cancel(-1)')
    with pytest.raises(CommandError, match="must come directly after 'conn'"):
        conn.onQuery().connect_delay(10)
    with pytest.raises(TypeError):
        conn.after(True)
    with pytest.raises(TypeError):
        conn.onQuery(query=None)
    with pytest.raises(ValueError):
        conn.connect_delay(float("inf"))


def test_builder_for_other_protocols():
    wallaroo = conn.for_protocol("wallaroo")
    assert wallaroo.protocol == "wallaroo"
    assert isinstance(wallaroo, Command)
    with pytest.raises(UnknownMethodError, match="protocol wallaroo"):
        _ = wallaroo.onQuery
    raw = conn.for_protocol("raw")
    assert str(raw.onData().kill()) == "conn.onData().kill()"
    with pytest.raises(ValueError, match="unknown protocol"):
        conn.for_protocol("smtp")


def test_builder_commands_are_immutable_values():
    base = conn.onQuery(query="^A")
    first, second = base.kill(), base.after(1).kill()
    assert str(base) == 'conn.onQuery(query="^A")' and not base.finished
    assert first.finished and str(second) == 'conn.onQuery(query="^A").after(1).kill()'
    assert conn.kill() == conn.kill() and hash(conn.kill()) == hash(conn.kill())


@settings(max_examples=200, deadline=None)
@given(st.text(), st.binary())
def test_literals_read_back_identically(text, data):
    import re

    rule = conn.onQuery(query=re.escape(text)).contains(data).kill()
    parsed = dsl.parse(str(rule))
    assert parsed.steps[0].fields[0][1].pattern == re.escape(text)
    assert parsed.steps[1].needle == data


def _rebuild(line: str) -> Command:
    """Replay a command's chain of calls on the builder."""
    with warnings.catch_warnings():  # Citus writes regexes like "min\(" in plain strings
        warnings.simplefilter("ignore", DeprecationWarning)
        node = ast.parse(line, mode="eval").body
    calls = []
    while isinstance(node, ast.Call):
        calls.append(node)
        node = node.func.value
    command = {"conn": conn, "faults": faults, "recorder": recorder}[node.id]
    for call in reversed(calls):
        args = [ast.literal_eval(arg) for arg in call.args]
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        command = getattr(command, call.func.attr)(*args, **kwargs)
    return command


def test_every_citus_command_can_be_built_and_named():
    lines = [line for line in CITUS_COMMANDS.read_text().splitlines() if line.strip()]
    assert len(lines) > 300
    for line in lines:
        built = _rebuild(line)
        expected, actual = dsl.parse(line), dsl.parse(str(built))
        if isinstance(expected, dsl.Rule):
            assert (actual.steps, actual.action) == (expected.steps, expected.action), line
            # The same rule as a named fault, through the builder and from the text.
            for named in (str(_rebuild(f'faults.add("citus"){built.chain}')),
                          builder.fault_command("citus", line.strip().rstrip(";"))):
                fault = dsl.parse(named)
                assert (fault.name, fault.rule.steps, fault.rule.action) == \
                    ("citus", expected.steps, expected.action), line
        else:
            assert actual.name == expected.name


def test_dump_rows_are_frozen():
    row = TrafficRow(0, "worker", "x")
    with pytest.raises(AttributeError):
        row.conn = 1  # type: ignore[misc]
