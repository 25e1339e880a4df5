"""Named faults on the client side: the `faults` builder, `faults.list()`/`proxy.status()`
reply parsing, `FaultProxy.add_fault`/`remove_fault`/`clear_faults`/`faults`, and the
`wirefault faults ...`/`wirefault status` command line.

The text each call sends is checked against a real CommandChannel in a helper process
(fifo_helpers.py, whose handler records the last command it accepted); what the faults do,
and the replies they get, against a real proxy (raw protocol, in front of a TCP echo server).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fifo_helpers import ChannelProcess, fifo_dir
from proxy_helpers import RunningProxy
from test_chaos_runner import raw_echo_proxy

from wirefault.fifo_client import (
    CommandError,
    FaultInfo,
    FaultProxy,
    UnknownMethodError,
    WirefaultError,
    builder,
    cli,
    client,
    conn,
    faults,
    parse_faults,
)
from wirefault.proxy import dsl

WIREFAULT = Path(sys.executable).parent / "wirefault"
LINE = ('name=slow matched=12 fired=3 added=2026-12-02T01:02:03.456Z state=active '
        'command=faults.add("slow").onQuery().delay(50)')


def parser_error(text: str, protocol: str = "postgres") -> str:
    with pytest.raises(dsl.CommandError) as info:
        dsl.parse(text, protocol)
    return str(info.value)


# -- the builder ------------------------------------------------------------------------------


def test_the_faults_root_renders_the_exact_command_text():
    assert str(faults.add("slow").onQuery(query="^COMMIT").delay(50)) == \
        'faults.add("slow").onQuery(query="^COMMIT").delay(50)'
    assert str(faults.add("flaky", seed=3).onQuery().probability(0.25).kill()) == \
        'faults.add("flaky", seed=3).onQuery().probability(0.25).kill()'
    assert str(faults.add("x").connect_delay(300)) == 'faults.add("x").connect_delay(300)'
    assert str(faults.remove("slow")) == 'faults.remove("slow")'
    assert str(faults.clear()) == "faults.clear()"
    assert str(faults.list()) == "faults.list()"
    raw = faults.for_protocol("raw").add("cut").matches(b"^ping").kill()
    assert (str(raw), raw.protocol) == ('faults.add("cut").matches(b"^ping").kill()', "raw")


def test_a_fault_builder_knows_its_name_and_chain():
    fault = faults.add("slow", seed=1).onQuery().fromClient().delay(5, jitter=2)
    assert fault.finished and fault.root == "faults" and fault.fault_name == "slow"
    assert fault.chain == ".onQuery().fromClient().delay(5, jitter=2)"
    rule = conn.onQuery().kill()
    assert (rule.fault_name, rule.chain) == (None, ".onQuery().kill()")
    for command in (faults.list(), faults.remove("x")):
        assert command.finished and command.fault_name is None
        with pytest.raises(CommandError, match="has no chain"):
            _ = command.chain


NEW_CHAINS = [
    ".fromClient().kill()",
    ".fromServer().onDataRow().drop()",
    ".onQuery().times(3).kill()",
    ".onQuery().once().reset()",
    ".probability(0.5).kill()",
    ".connectionProbability(0.1).onQuery().kill()",
    '.where(user="^app$", application_name="psql").kill()',
    '.where(client="^127\\\\.").hang()',
    ".onQuery().delay(100)",
    ".onQuery().delay(100, jitter=50)",
    ".onQuery().drop()",
    ".onQuery().duplicate()",
    ".onQuery().duplicate(3)",
    ".onQuery().error()",
    '.onQuery().error(code="40001", message="serialization failure", severity="ERROR")',
    ".onQuery().hang()",
    ".onQuery().hang(500)",
    ".throttle(1024)",
    ".onDataRow().slice(3, delay_ms=10)",
    ".slow_close(200)",
    ".limit(4096)",
    '.onExecute(query="^COMMIT").cancel()',
    ".onQuery().cancel(after_ms=50)",
    ".onQuery().cancel(4242)",
]


def _replay(root, chain: str):
    """Build `chain` on `root` through the builder's attributes, call by call."""
    import ast

    node = ast.parse("x" + chain, mode="eval").body
    calls = []
    while isinstance(node, ast.Call):
        calls.append(node)
        node = node.func.value
    command = root
    for call in reversed(calls):
        args = [ast.literal_eval(arg) for arg in call.args]
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        command = getattr(command, call.func.attr)(*args, **kwargs)
    return command


@pytest.mark.parametrize("chain", NEW_CHAINS)
def test_every_new_step_and_action_builds_on_both_roots(chain):
    for root, prefix in ((conn, "conn"), (faults.add("f"), 'faults.add("f")')):
        built = _replay(root, chain)
        assert built.finished and str(built) == prefix + chain
        dsl.parse(str(built))  # the parser takes what the builder wrote


def test_the_builders_names_are_the_parsers_vocabularies():
    chain_names = {*dsl.FILTERS, *dsl.ACTIONS}
    assert chain_names <= set(dir(conn)) and chain_names <= set(dir(faults.add("x")))
    assert set(dsl.FAULT_COMMANDS) <= set(dir(faults))
    assert not set(dsl.FILTERS) & set(dir(faults))  # faults.onQuery: no, faults.add first
    for name in dsl.ACTIONS:
        assert getattr(faults.add("x"), name).__repr__().endswith(f".{name}>")


def test_builder_errors_are_the_parsers_words():
    with pytest.raises(UnknownMethodError, match="did you mean 'add'"):
        _ = faults.ad
    with pytest.raises(UnknownMethodError):
        _ = faults.onQuery  # steps come after faults.add(name)
    assert not hasattr(faults, "kill") and hasattr(faults, "add")
    with pytest.raises(UnknownMethodError, match="did you mean 'kill'"):
        _ = faults.add("x").onQuery().kil
    with pytest.raises(UnknownMethodError, match=r"^nothing may follow faults\.list\(\)$"):
        _ = faults.list().kill
    with pytest.raises(UnknownMethodError, match="the action comes last"):
        _ = faults.add("x").kill().after
    with pytest.raises(CommandError) as info:
        faults.add("bad name")
    assert str(info.value) == parser_error('faults.add("bad name").kill()')
    with pytest.raises(CommandError) as info:
        faults.add("x").probability(2)
    assert str(info.value) == parser_error('faults.add("x").probability(2).kill()')
    with pytest.raises(CommandError) as info:
        faults.add("x").onQuery().error(code="oops")
    assert str(info.value) == parser_error('faults.add("x").onQuery().error(code="oops")')
    with pytest.raises(CommandError) as info:
        faults.add("x").onQuery().text()  # no action yet
    assert str(info.value) == parser_error('faults.add("x").onQuery()')


def test_chain_text_accepts_every_spelling():
    for text in ('conn.onQuery(query="^COMMIT").kill()', '.onQuery(query="^COMMIT").kill()',
                 'onQuery(query="^COMMIT").kill()', '  conn .onQuery(query="^COMMIT").kill() '):
        assert builder.chain_text(text).replace(" ", "") == '.onQuery(query="^COMMIT").kill()'
    assert builder.chain_text(conn.onQuery().kill()) == ".onQuery().kill()"
    assert builder.chain_text(faults.add("x").drop()) == ".drop()"
    assert builder.chain_text("connect_delay(5)") == ".connect_delay(5)"
    for bad in ("", "   ", 'faults.add("x").kill()', "faults.list()"):
        with pytest.raises(CommandError):
            builder.chain_text(bad)
    with pytest.raises(CommandError):  # unfinished: the parser's words for it
        builder.chain_text(conn.onQuery())
    with pytest.raises(CommandError, match="no chain"):
        builder.chain_text(faults.list())
    with pytest.raises(TypeError):
        builder.chain_text(3)  # type: ignore[arg-type]


def test_fault_command_names_the_fault():
    assert builder.fault_command("a", "kill()") == 'faults.add("a").kill()'
    assert builder.fault_command("a:1", conn.onQuery().kill(), seed=0) == \
        'faults.add("a:1", seed=0).onQuery().kill()'
    assert builder.fault_command("a", faults.add("a", seed=2).kill()) == \
        'faults.add("a", seed=2).kill()'
    with pytest.raises(CommandError, match="not 'b'"):
        builder.fault_command("b", faults.add("a").kill())
    with pytest.raises(CommandError, match="pass no seed"):
        builder.fault_command("a", faults.add("a").kill(), seed=1)
    for name in ("", "-x", "a b", 'a"', "x" * 65, "é"):
        with pytest.raises(CommandError, match="bad fault name"):
            builder.fault_command(name, "kill()")
    assert builder.fault_command("x" * 64, "kill()").startswith('faults.add("' + "x" * 64)
    with pytest.raises(TypeError):
        builder.fault_command("a", "kill()", seed=True)  # type: ignore[arg-type]


# -- reply parsing ----------------------------------------------------------------------------


def test_parse_faults_reads_the_spec_example():
    (info,) = parse_faults(LINE)
    assert info == FaultInfo("slow", 12, 3, datetime(2026, 12, 2, 1, 2, 3, 456000, tzinfo=UTC),
                             "active", 'faults.add("slow").onQuery().delay(50)')
    assert info.added.utcoffset().total_seconds() == 0
    assert client.format_timestamp(info.added) == "2026-12-02T01:02:03.456Z"
    assert parse_faults("") == []


def test_parse_faults_keeps_order_spaces_and_skips_unknown_keys():
    tricky = 'faults.add("t").onQuery(query="a command=b  c").error(message="x y")'
    reply = "\n".join([
        LINE,
        f"name=t matched=0 fired=0 added=2026-01-01T00:00:00.000Z state=spent shard=7 "
        f"command={tricky}",
        "name=conn matched=1 fired=1 added=2026-01-01T00:00:00.001Z state=active "
        "command=conn.onQuery().kill()",
    ])
    infos = parse_faults(reply)
    assert [(i.name, i.state, i.command) for i in infos] == [
        ("slow", "active", 'faults.add("slow").onQuery().delay(50)'),
        ("t", "spent", tricky), ("conn", "active", "conn.onQuery().kill()")]


@pytest.mark.parametrize("line", [
    "column 1: unknown method 'list'",
    "internal error: RuntimeError: boom",
    LINE.replace("fired=3", "fired=x"),
    LINE.replace(" state=active", ""),
    LINE.replace("added=2026-12-02T01:02:03.456Z", "added=yesterday"),
    LINE.replace(".456Z", ".456+01:00"),
    LINE.replace(" command=", " cmd="),
])
def test_a_single_line_that_is_no_fault_is_the_proxys_error(line):
    with pytest.raises(CommandError) as info:
        parse_faults(line)
    assert info.value.message == line and info.value.command == "faults.list()"


def test_an_odd_line_among_faults_is_no_command_error():
    with pytest.raises(WirefaultError, match="unexpected line") as info:
        parse_faults(LINE + "\nnonsense")
    assert not isinstance(info.value, CommandError)


def test_parse_status():
    assert client.parse_status("connections=1 handlers=1 tasks=5 fired=7 faults=2") == {
        "connections": 1, "handlers": 1, "tasks": 5, "fired": 7, "faults": 2}
    with pytest.raises(CommandError, match=r"^column 1: nope$"):
        client.parse_status("column 1: nope")
    with pytest.raises(WirefaultError):
        client.parse_status("")


# -- what the client sends --------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel() -> Iterator[Path]:
    with fifo_dir() as directory, ChannelProcess(directory / "faults.fifo") as process:
        yield process.fifo


def last_command(proxy: FaultProxy) -> str:
    """The last command the helper's handler accepted."""
    with pytest.raises(CommandError) as info:
        proxy.send("test:rule")
    return info.value.message.removeprefix("rule ")


def commands_handled(proxy: FaultProxy) -> int:
    with pytest.raises(CommandError) as info:
        proxy.send("test:count")
    return int(info.value.message)


def test_add_fault_sends_faults_add_with_the_chain(channel):
    proxy = FaultProxy(str(channel), timeout=5)
    for chain in ('conn.onQuery(query="^COMMIT").kill()', '.onQuery(query="^COMMIT").kill()',
                  'onQuery(query="^COMMIT").kill()', conn.onQuery(query="^COMMIT").kill()):
        proxy.add_fault("commit-kill", chain)
        assert last_command(proxy) == 'faults.add("commit-kill").onQuery(query="^COMMIT").kill()'
    proxy.add_fault("flaky", "probability(0.5).kill()", seed=9)
    assert last_command(proxy) == 'faults.add("flaky", seed=9).probability(0.5).kill()'
    proxy.remove_fault("flaky")
    assert last_command(proxy) == 'faults.remove("flaky")'
    proxy.clear_faults()
    assert last_command(proxy) == "faults.clear()"
    assert proxy.send(faults.add("b").drop()) == ""
    assert last_command(proxy) == 'faults.add("b").drop()'


def test_a_bad_name_is_refused_before_anything_is_sent(channel):
    proxy = FaultProxy(str(channel), timeout=5)
    before = commands_handled(proxy)
    for call in (lambda: proxy.add_fault("a b", "kill()"), lambda: proxy.remove_fault('x")'),
                 lambda: proxy.add_fault("ok", 'faults.add("ok").kill()')):
        with pytest.raises(CommandError):
            call()
    assert commands_handled(proxy) == before + 1  # only the first test:count


def test_fault_with_a_name_adds_and_removes_only_that_fault(channel):
    proxy = FaultProxy(str(channel), timeout=5)
    with proxy.fault("onQuery().kill()", name="scoped"):
        assert last_command(proxy) == 'faults.add("scoped").onQuery().kill()'
    assert last_command(proxy) == 'faults.remove("scoped")'
    with pytest.raises(ZeroDivisionError), proxy.fault(conn.onQuery().drop(), name="s2"):
        _ = 1 / 0
    assert last_command(proxy) == 'faults.remove("s2")'


def test_faults_and_status_reach_the_parsers(channel):
    proxy = FaultProxy(str(channel), timeout=5)
    # The helper's handler answers faults.list() with an empty line (no faults): data, no
    # error; proxy.status() likewise, which is no status line.
    assert proxy.faults() == []
    assert proxy.send("faults.list()") == ""
    with pytest.raises(WirefaultError, match="empty reply"):
        proxy.status()


# -- the command line: arguments --------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_faults_add_remove_clear_send_what_they_say(capsys, channel, monkeypatch):
    monkeypatch.delenv(cli.FIFO_ENV, raising=False)
    proxy = FaultProxy(str(channel), timeout=5)
    fifo = ["--fifo", str(channel)]
    assert run_cli(capsys, "faults", "add", *fifo, "slow", "onQuery().delay(100)") == (0, "", "")
    assert last_command(proxy) == 'faults.add("slow").onQuery().delay(100)'
    assert run_cli(capsys, "faults", "add", "slow", "conn.kill()", "--seed", "4", *fifo)[0] == 0
    assert last_command(proxy) == 'faults.add("slow", seed=4).kill()'
    assert run_cli(capsys, "faults", "remove", *fifo, "slow") == (0, "", "")
    assert last_command(proxy) == 'faults.remove("slow")'
    assert run_cli(capsys, "faults", "clear", *fifo) == (0, "", "")
    assert last_command(proxy) == "faults.clear()"
    assert run_cli(capsys, "faults", "list", *fifo) == (0, "", "")
    assert run_cli(capsys, "faults", "list", "--json", *fifo) == (0, "[]\n", "")


def test_cli_faults_add_reads_the_chain_from_stdin(capsys, channel, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'onQuery(query="x").drop()\n')))
    assert run_cli(capsys, "faults", "add", "--fifo", str(channel), "s", "-") == (0, "", "")
    assert last_command(FaultProxy(str(channel))) == 'faults.add("s").onQuery(query="x").drop()'


def test_cli_faults_errors_and_usage(capsys, channel, monkeypatch):
    monkeypatch.delenv(cli.FIFO_ENV, raising=False)
    fifo = ["--fifo", str(channel)]
    status, out, err = run_cli(capsys, "faults", "add", *fifo, "a b", "kill()")
    assert (status, out) == (1, "") and err.startswith("wirefault faults add: bad fault name")
    status, _, err = run_cli(capsys, "faults", "add", *fifo, "a", "onQury().kill()")
    assert status == 1
    expected = parser_error('faults.add("a").onQury().kill()')
    assert err == f"wirefault faults add: {expected}\n"
    assert run_cli(capsys, "faults")[0] == 2
    assert run_cli(capsys, "faults", "add", *fifo, "only-a-name")[0] == 2
    assert run_cli(capsys, "faults", "add", *fifo, "a", "kill()", "--seed", "x")[0] == 2
    assert run_cli(capsys, "faults", "pop", *fifo)[0] == 2
    status, _, err = run_cli(capsys, "faults", "clear")
    assert status == 2 and err.startswith("wirefault faults clear: no FIFO")


@pytest.mark.parametrize("command", [["faults", "add"], ["faults", "list"],
                                     ["faults", "remove"], ["faults", "clear"], ["status"]])
def test_cli_help_of_the_faults_commands(capsys, command):
    status, out, _ = run_cli(capsys, *command, "--help")
    assert status == 0 and "--fifo PATH" in out and "example:" in out


def test_cli_main_help_lists_faults_and_status(capsys):
    out = run_cli(capsys, "--help")[1]
    assert re.search(r"^ +faults +", out, re.M) and re.search(r"^ +status +", out, re.M)
    out = run_cli(capsys, "faults", "--help")[1]
    for command in ("add", "list", "remove", "clear"):
        assert re.search(rf"^ +{command} +", out, re.M)


def test_format_faults_aligns_columns():
    infos = parse_faults(LINE + "\n" + LINE.replace("name=slow", "name=s")
                         .replace("matched=12", "matched=1234"))
    assert cli.format_faults(infos).splitlines() == [
        "name  state   matched  fired  added                     command",
        'slow  active       12      3  2026-12-02T01:02:03.456Z  '
        'faults.add("slow").onQuery().delay(50)',
        's     active     1234      3  2026-12-02T01:02:03.456Z  '
        'faults.add("slow").onQuery().delay(50)',
    ]
    assert cli.format_faults([]) == ""


# -- against a real proxy ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_proxy() -> Iterator[RunningProxy]:
    with raw_echo_proxy() as proxy:
        yield proxy


@pytest.fixture
def real(raw_proxy: RunningProxy) -> Iterator[FaultProxy]:
    proxy = FaultProxy(raw_proxy.fifo, timeout=5)
    proxy.allow()
    yield proxy
    proxy.allow()


def echoes(port: int, text: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.settimeout(2)
            sock.sendall(text)
            return sock.recv(64) == text
    except OSError:
        return False


def test_several_named_faults_are_in_force_at_once(real, raw_proxy):
    started = datetime.now(UTC).replace(microsecond=0)
    real.add_fault("apple", 'matches(b"^apple").kill()')
    real.add_fault("banana", conn.for_protocol("raw").matches(b"^banana").kill())
    assert not echoes(raw_proxy.port, b"apple") and not echoes(raw_proxy.port, b"banana")
    assert echoes(raw_proxy.port, b"cherry")
    listed = real.faults()
    assert [(f.name, f.fired, f.state) for f in listed] == [("apple", 1, "active"),
                                                            ("banana", 1, "active")]
    assert [f.command for f in listed] == ['faults.add("apple").matches(b"^apple").kill()',
                                           'faults.add("banana").matches(b"^banana").kill()']
    assert all(started <= f.added <= datetime.now(UTC) for f in listed)
    assert listed[0].added <= listed[1].added and listed[0].matched >= 1
    status = real.status()
    assert status["faults"] == 2 and status["fired"] >= 2
    real.remove_fault("apple")
    assert echoes(raw_proxy.port, b"apple") and not echoes(raw_proxy.port, b"banana")
    assert [f.name for f in real.faults()] == ["banana"]
    real.clear_faults()
    assert real.faults() == [] and real.status()["faults"] == 0
    assert echoes(raw_proxy.port, b"banana")


def test_a_fault_of_the_same_name_is_replaced_and_times_spends_it(real, raw_proxy):
    real.add_fault("f", 'matches(b"^one").kill()')
    real.add_fault("f", 'matches(b"^two").once().kill()')
    assert echoes(raw_proxy.port, b"one")
    assert not echoes(raw_proxy.port, b"two")
    assert echoes(raw_proxy.port, b"two")  # spent: it fired its once()
    (info,) = real.faults()
    assert (info.name, info.fired, info.state) == ("f", 1, "spent")


def test_the_proxys_errors_come_back_as_command_errors(real):
    with pytest.raises(CommandError, match="no fault named 'nothing'") as info:
        real.remove_fault("nothing")
    assert info.value.message.startswith("column ")
    with pytest.raises(CommandError, match="unknown message type 'Query' for protocol raw"):
        real.add_fault("q", "onQuery().kill()")
    assert real.faults() == []


def test_a_conn_rule_replaces_every_fault_and_allow_clears_them(real, raw_proxy):
    real.add_fault("a", "matches(b\"^a\").kill()")
    real.add_fault("b", "matches(b\"^b\").kill()")
    real.send('conn.matches(b"^c").kill()')
    assert [(f.name, f.command) for f in real.faults()] == [("conn", 'conn.matches(b"^c").kill()')]
    assert echoes(raw_proxy.port, b"a") and not echoes(raw_proxy.port, b"c")
    real.allow()
    assert real.faults() == []


def test_a_named_fault_block_leaves_other_faults_alone(real, raw_proxy):
    real.add_fault("outer", 'matches(b"^outer").kill()')
    with real.fault('matches(b"^inner").kill()', name="inner"):
        assert [f.name for f in real.faults()] == ["outer", "inner"]
        assert not echoes(raw_proxy.port, b"inner")
    assert [f.name for f in real.faults()] == ["outer"]


def wirefault(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(WIREFAULT), *args], capture_output=True, text=True, timeout=60)


def test_the_real_cli_against_a_real_proxy(real, raw_proxy):
    fifo = ["--fifo", raw_proxy.fifo]
    done = wirefault("faults", "add", *fifo, "slow", 'matches(b"^slow").delay(1)')
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert wirefault("faults", "add", *fifo, "cut", 'conn.matches(b"^cut").kill()').returncode == 0
    assert not echoes(raw_proxy.port, b"cut")
    table = wirefault("faults", "list", *fifo)
    assert table.returncode == 0
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["name", "state", "matched", "fired", "added", "command"]
    assert [row.split()[:4] for row in rows] == [["slow", "active", "0", "0"],
                                                 ["cut", "active", "1", "1"]]
    listed = json.loads(wirefault("faults", "list", "--json", *fifo).stdout)
    assert [(f["name"], f["fired"], f["command"]) for f in listed] == [
        ("slow", 0, 'faults.add("slow").matches(b"^slow").delay(1)'),
        ("cut", 1, 'faults.add("cut").matches(b"^cut").kill()')]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", listed[0]["added"])
    status = wirefault("status", *fifo)
    first, blank, *table_lines = status.stdout.splitlines()
    assert status.returncode == 0 and blank == ""
    assert re.fullmatch(r"connections=\d+ handlers=\d+ tasks=\d+ fired=\d+ faults=2", first)
    assert table_lines == table.stdout.splitlines()
    data = json.loads(wirefault("status", "--json", *fifo).stdout)
    assert data["status"]["faults"] == 2 and [f["name"] for f in data["faults"]] == ["slow", "cut"]
    missing = wirefault("faults", "remove", *fifo, "nothing")
    assert missing.returncode == 1
    assert missing.stderr.startswith("wirefault faults remove: column ")
    assert "no fault named 'nothing'" in missing.stderr
    assert wirefault("faults", "remove", *fifo, "cut").returncode == 0
    assert echoes(raw_proxy.port, b"cut")
    assert wirefault("faults", "clear", *fifo).returncode == 0
    empty = wirefault("status", *fifo)
    assert empty.stdout.endswith("faults=0\n") and len(empty.stdout.splitlines()) == 1
    assert wirefault("faults", "list", *fifo).stdout == ""
