"""The command language after #12: named faults, the new steps and actions, their exact
results and refusals (message and column), protocol-dependent checks, fuzzing."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wirefault import protocols
from wirefault.protocols import ProtocolSpec
from wirefault.proxy import dsl, dsl_vocabulary
from wirefault.proxy.dsl import (
    ACTIONS,
    FAULT_COMMANDS,
    FILTERS,
    PROXY_COMMANDS,
    ROOTS,
    Action,
    After,
    BytesContains,
    CommandError,
    ConnectionProbability,
    FaultCommand,
    FromSide,
    MessageFilter,
    Probability,
    ProxyCommand,
    RecorderCommand,
    Rule,
    Times,
    Where,
    parse,
)

DATA = Path(__file__).parent / "data" / "citus_commands.txt"
SHARED = Path("/work/shared/corpus")
CORPUS = [line for path in [DATA, *sorted(SHARED.glob("*"))] if path.is_file()
          for line in path.read_text().splitlines() if line.strip()]

ACTION_LIST = (
    'allow(), kill(), reset(after_ms=0), killall(), cancel(pid), cancel(after_ms=100), '
    'connect_delay(ms), delay(ms, jitter=0), drop(timeout_ms=None), duplicate(n=1), '
    'error(code="XX000", message=None, severity="ERROR"), hang(ms=None), '
    'throttle(bytes_per_second), slice(size, delay_ms=0, variation=None), '
    "slow_close(ms) or limit(bytes)")
NAME_RULE = "a name is a letter or digit, then up to 63 letters, digits, '_', '.', ':' or '-'"
CONNECT_DELAY = ("connect_delay() applies to every new connection and must come directly after "
                 "{head}, without filters: only where(), times(), once(), probability() or "
                 "connectionProbability() may precede it, not {step}()")


def _error(text: str, protocol: ProtocolSpec | str = "postgres") -> CommandError:
    with pytest.raises(CommandError) as caught:
        parse(text, protocol)
    return caught.value


def _rule(text: str, protocol: ProtocolSpec | str = "postgres") -> Rule:
    result = parse(text, protocol)
    assert isinstance(result, Rule)
    return result


def _action(text: str, protocol: ProtocolSpec | str = "postgres") -> Action:
    return _rule(text, protocol).action


def _where(**regexes: str) -> Where:
    return Where(tuple((key, re.compile(value)) for key, value in regexes.items()))


# --- new steps: exact results --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        ("conn.fromClient().kill()", (FromSide(from_client=True),)),
        ("conn.fromServer().kill()", (FromSide(from_client=False),)),
        ("conn.times(3).kill()", (Times(3),)),
        ("conn.times(n=1).kill()", (Times(1),)),
        ("conn.once().kill()", (Times(1),)),
        ("conn.probability(0.25).kill()", (Probability(0.25),)),
        ("conn.probability(p=1).kill()", (Probability(1.0),)),
        ("conn.probability(0).kill()", (Probability(0.0),)),
        ("conn.connectionProbability(0.5).kill()", (ConnectionProbability(0.5),)),
        ('conn.where(user="^app$").kill()', (_where(user="^app$"),)),
        ('conn.where(client=":5432$", database="db", application_name="psql", user="u").kill()',
         (_where(client=":5432$", database="db", application_name="psql", user="u"),)),
        ('conn.onExecute(query="^COMMIT").kill()',
         (MessageFilter("Execute", (("query", re.compile("^COMMIT")),)),)),
        ('conn.onExecute(portal="").kill()',
         (MessageFilter("Execute", (("portal", re.compile("")),)),)),
        ('conn.onBind(query="^INSERT", statement="s1").kill()',
         (MessageFilter("Bind", (("query", re.compile("^INSERT")),
                                 ("statement", re.compile("s1")))),)),
        ('conn.onDescribe(query="x").onClose(query="y").kill()',
         (MessageFilter("Describe", (("query", re.compile("x")),)),
          MessageFilter("Close", (("query", re.compile("y")),)))),
        # any order, probability() any number of times, with the old steps
        ('conn.probability(0.5).fromClient().onQuery(query="B").probability(0.1).after(2)'
         '.times(4).contains(b"x").kill()',
         (Probability(0.5), FromSide(True), MessageFilter("Query", (("query", re.compile("B")),)),
          Probability(0.1), After(2), Times(4), BytesContains(b"x"))),
    ],
)
def test_new_steps_parse_to_exact_results(text: str, steps: tuple) -> None:
    assert parse(text) == Rule(steps, Action("kill"), text)


def test_step_values_have_exact_types() -> None:
    [step] = _rule("conn.probability(1).kill()").steps
    assert type(step.p) is float
    [step] = _rule("conn.connectionProbability(0).kill()").steps
    assert type(step.p) is float
    [step] = _rule("conn.times(7).kill()").steps
    assert type(step.count) is int


def test_where_regexes_search() -> None:
    [step] = _rule('conn.where(client="^127\\.0\\.0\\.1:").kill()').steps
    [(key, regex)] = step.fields
    assert key == "client"
    assert regex.search("127.0.0.1:40000") and not regex.search("10.127.0.0.1:1")


def test_where_client_works_on_every_protocol() -> None:
    for name in protocols.names():
        assert _rule('conn.where(client="x").kill()', name).steps == (_where(client="x"),)


# --- new actions: exact results ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "action"),
    [
        ("conn.delay(50)", Action("delay", options=(("ms", 50.0), ("jitter", 0.0)))),
        ("conn.delay(50, 10)", Action("delay", options=(("ms", 50.0), ("jitter", 10.0)))),
        ("conn.delay(jitter=2.5, ms=0)", Action("delay", options=(("ms", 0.0), ("jitter", 2.5)))),
        ("conn.drop()", Action("drop", options=(("timeout_ms", None),))),
        ("conn.duplicate()", Action("duplicate", options=(("n", 1),))),
        ("conn.duplicate(1000)", Action("duplicate", options=(("n", 1000),))),
        ("conn.error()", Action("error", options=(("code", "XX000"), ("message", None),
                                                  ("severity", "ERROR")))),
        ('conn.error("57014", "canceled", "FATAL")',
         Action("error", options=(("code", "57014"), ("message", "canceled"),
                                  ("severity", "FATAL")))),
        ('conn.error(severity="PANIC", message="é")',
         Action("error", options=(("code", "XX000"), ("message", "é"), ("severity", "PANIC")))),
        ("conn.error(message=None)", Action("error", options=(
            ("code", "XX000"), ("message", None), ("severity", "ERROR")))),
        ("conn.cancel(4242)", Action("cancel", pid=4242)),
        ("conn.cancel(pid=7)", Action("cancel", pid=7)),
        ("conn.cancel()", Action("cancel", pid=None, options=(("after_ms", 100.0),))),
        ("conn.cancel(after_ms=0)", Action("cancel", pid=None, options=(("after_ms", 0.0),))),
        ("conn.hang()", Action("hang", options=(("ms", None),))),
        ("conn.hang(None)", Action("hang", options=(("ms", None),))),
        ("conn.hang(ms=250)", Action("hang", options=(("ms", 250.0),))),
        ("conn.throttle(1024)", Action("throttle", options=(("bytes_per_second", 1024),))),
        ("conn.slice(8)", Action("slice", options=(("size", 8), ("delay_ms", 0.0),
                                                   ("variation", None)))),
        ("conn.slice(1, delay_ms=5)", Action("slice", options=(("size", 1), ("delay_ms", 5.0),
                                                               ("variation", None)))),
        ("conn.slice(4, 1, variation=2)", Action("slice", options=(("size", 4), ("delay_ms", 1.0),
                                                                   ("variation", 2)))),
        ("conn.reset(after_ms=250)", Action("reset", options=(("after_ms", 250.0),))),
        ("conn.drop(timeout_ms=0)", Action("drop", options=(("timeout_ms", 0.0),))),
        ("conn.slow_close(0)", Action("slow_close", options=(("ms", 0.0),))),
        ("conn.limit(0)", Action("limit", options=(("bytes", 0),))),
        ("conn.limit(bytes=100)", Action("limit", options=(("bytes", 100),))),
        ("conn.connect_delay(5)", Action("connect_delay", delay_ms=5.0)),
        ("conn.allow()", Action("allow")),
        ("conn.killall()", Action("killall")),
    ],
)
def test_new_actions_parse_to_exact_results(text: str, action: Action) -> None:
    assert parse(text) == Rule((), action, text)


def test_option_values_have_exact_types() -> None:
    assert [type(v) for _, v in _action("conn.delay(1, 2)").options] == [float, float]
    assert [type(v) for _, v in _action("conn.slice(3)").options] == [int, float, type(None)]
    assert type(_action("conn.slice(3, variation=2)").option("variation")) is int
    assert type(_action("conn.reset(after_ms=5)").option("after_ms")) is float
    assert type(_action("conn.drop(timeout_ms=5)").option("timeout_ms")) is float
    assert type(_action("conn.duplicate(2)").option("n")) is int
    assert type(_action("conn.cancel(after_ms=5)").option("after_ms")) is float
    assert type(_action("conn.throttle(5)").option("bytes_per_second")) is int


def test_action_option_looks_up_by_name() -> None:
    action = _action('conn.error(message="boom")')
    assert action.option("message") == "boom"
    assert action.option("code") == "XX000"
    assert action.option("nope") is None
    assert action.option("nope", 3) == 3
    assert Action("kill").option("ms", 1.5) == 1.5


def test_connect_delay_may_follow_connection_steps() -> None:
    rule = _rule('conn.where(user="^u$").probability(0.5).connectionProbability(0.2).times(2)'
                 '.connect_delay(10)')
    assert rule.steps == (_where(user="^u$"), Probability(0.5), ConnectionProbability(0.2),
                          Times(2))
    assert rule.action == Action("connect_delay", delay_ms=10.0)
    assert _rule("conn.once().connect_delay(1)").steps == (Times(1),)


# --- faults.* ------------------------------------------------------------------------------


def test_faults_add_returns_the_name_rule_and_column() -> None:
    text = 'faults.add("slow-commit").onQuery(query="^COMMIT").delay(50)'
    assert parse(text) == FaultCommand(
        op="add", name="slow-commit",
        rule=Rule((MessageFilter("Query", (("query", re.compile("^COMMIT")),)),),
                  Action("delay", options=(("ms", 50.0), ("jitter", 0.0))), text),
        seed=None, text=text, name_column=12)


def test_faults_add_with_a_seed() -> None:
    result = parse('faults.add("r", seed=7).probability(0.5).drop()')
    assert isinstance(result, FaultCommand)
    assert (result.name, result.seed, result.name_column) == ("r", 7, 12)
    assert result.rule == Rule((Probability(0.5),), Action("drop", options=(("timeout_ms", None),)),
                               result.text)
    assert parse('faults.add("r", 0).kill()').seed == 0
    assert parse('faults.add(name="r", seed=None).kill()').seed is None
    assert parse('faults.add(seed=3, name="r").kill()').name_column == 25


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('faults.remove("slow")', FaultCommand("remove", "slow", None, None,
                                               'faults.remove("slow")', 15)),
        ('faults.remove(name="a.b:c_d-9")',
         FaultCommand("remove", "a.b:c_d-9", None, None, 'faults.remove(name="a.b:c_d-9")', 20)),
        ("faults.clear()", FaultCommand("clear", None, None, None, "faults.clear()", 0)),
        ("faults.list()", FaultCommand("list", None, None, None, "faults.list()", 0)),
        ("  faults.list() ;", FaultCommand("list", None, None, None, "faults.list()", 0)),
    ],
)
def test_faults_commands(text: str, expected: FaultCommand) -> None:
    assert parse(text) == expected


def test_fault_names_at_the_limits() -> None:
    longest = "A" + "z_.:-9" * 10 + "xyz"
    assert len(longest) == 64
    assert parse(f'faults.add("{longest}").kill()').name == longest
    assert parse('faults.add("0").kill()').name == "0"
    assert str(_error(f'faults.add("{longest}x").kill()')) == (
        f"column 12: bad fault name '{longest}x': {NAME_RULE}")


def test_name_column_counts_characters() -> None:
    assert parse('  faults.remove( "x")').name_column == 16
    assert str(_error('faults.add("é", seed=1).kill()')) == (
        f"column 12: bad fault name 'é': {NAME_RULE}")


def test_faults_add_checks_its_chain_like_conn() -> None:
    """Every corpus rule means the same after faults.add(...) as after conn."""
    head = 'faults.add("x")'
    for line in CORPUS:
        if not line.startswith("conn."):
            continue
        expected = _rule(line)
        result = parse(head + line[len("conn"):])
        assert isinstance(result, FaultCommand)
        assert (result.rule.steps, result.rule.action) == (expected.steps, expected.action)
        assert result.rule.text == result.text == head + line[len("conn"):]


@pytest.mark.parametrize(
    "chain",
    [
        ".kil()", ".onQury().kill()", '.onQuery(qery="x").kill()', ".after(-1).kill()",
        ".kill().allow()", ".onQuery()", ".cancel(0)", ".times(1).once().kill()",
        '.where(usr="x").kill()', ".delay(-1)", ".error(code=1)", ".cancel(1, after_ms=2)",
        ".dump()", ".add()", ".probability(2).drop()", ".once(1).kill()", ".__class__()",
    ],
)
def test_faults_add_chain_errors_match_conn_chain_errors(chain: str) -> None:
    head = 'faults.add("x")'
    as_conn, as_fault = _error("conn" + chain), _error(head + chain)
    assert as_fault.message == as_conn.message
    assert as_fault.column == as_conn.column + len(head) - len("conn")


# --- refusals: exact message and column ----------------------------------------------------

REJECTIONS = [
    # faults structure
    ("faults", "column 7: faults needs a command: add(name, seed=None), remove(name), clear(), "
               "list()"),
    ("faults.kill()", "column 8: unknown faults command 'kill'; use add(name, seed=None), "
                      "remove(name), clear(), list()"),
    ('faults.ad("x").kill()', "column 8: unknown faults command 'ad'; did you mean 'add'?"),
    ("faults.Clear()", "column 8: unknown faults command 'Clear'; did you mean 'clear'?"),
    ('faults.add("x")',
     f"column 16: faults.add(name) must be followed by a chain ending in an action: "
     f"{ACTION_LIST}"),
    ('faults.add("x").onQuery()', f"column 26: the command must end with an action: {ACTION_LIST}"),
    ("faults.add().kill()", "column 8: add(name, seed=None) needs name"),
    ('faults.add("x", 1, 2).kill()',
     "column 20: too many arguments: add(name, seed=None) takes at most 2 arguments"),
    ('faults.add("x", sed=1).kill()', "column 17: add(name, seed=None) has no parameter 'sed'"),
    ('faults.add("x", name="y").kill()', "column 17: add(name, seed=None) got 'name' twice"),
    ('faults.remove("x").kill()', "column 20: nothing may follow faults.remove()"),
    ("faults.clear().list()", "column 16: nothing may follow faults.clear()"),
    ("faults.list().onQuery().kill()", "column 15: nothing may follow faults.list()"),
    ("faults.list(1)", "column 13: too many arguments: list() takes no arguments"),
    ("faults.remove()", "column 8: remove(name) needs name"),
    ('faults.clear("x")', "column 14: too many arguments: clear() takes no arguments"),
    ("faults[0]", "column 7: a subscript is not allowed after faults; expected .method(...)"),
    ("faults.add", "column 8: 'add' must be called: write add(...)"),
    ("faults.__class__", "column 8: attribute '__class__' is not allowed"),
    # names
    ('faults.add("").kill()', f"column 12: bad fault name '': {NAME_RULE}"),
    ('faults.add("-x").kill()', f"column 12: bad fault name '-x': {NAME_RULE}"),
    ('faults.add("_x").kill()', f"column 12: bad fault name '_x': {NAME_RULE}"),
    ('faults.add("a/b").kill()', f"column 12: bad fault name 'a/b': {NAME_RULE}"),
    ('faults.add("a b").kill()', f"column 12: bad fault name 'a b': {NAME_RULE}"),
    ('faults.add("x\\n").kill()', f"column 12: bad fault name 'x\\n': {NAME_RULE}"),
    ('faults.remove("é")', f"column 15: bad fault name 'é': {NAME_RULE}"),
    ('faults.add(b"x").kill()', "column 12: a fault name is a string such as \"slow\", got b'x'"),
    ("faults.add(5).kill()", 'column 12: a fault name is a string such as "slow", got 5'),
    ("faults.remove(1.5)", 'column 15: a fault name is a string such as "slow", got 1.5'),
    ("faults.add(x).kill()",
     "column 12: name 'x' is not allowed here; arguments must be literal strings, bytes or "
     "numbers"),
    ('faults.add("x" * 2).kill()',
     "column 12: an operator is not allowed here; arguments must be literal strings, bytes or "
     "numbers"),
    ("faults.add(None).kill()",
     "column 12: value None is not allowed here; arguments must be literal strings, bytes or "
     "numbers"),
    # seed
    ('faults.add("x", seed=-1).kill()', "column 22: add(seed) needs an integer >= 0, got -1"),
    ('faults.add("x", seed=1.5).kill()', "column 22: add(seed) needs an integer >= 0, got 1.5"),
    ('faults.add("x", seed="1").kill()', "column 22: add(seed) needs an integer >= 0, got '1'"),
    ('faults.add("x", seed=True).kill()',
     "column 22: value True is not allowed here; arguments must be literal strings, bytes or "
     "numbers"),
    # once per chain
    ("conn.times(2).once().kill()", "column 15: a chain may have only one times(n) or once()"),
    ("conn.once().onQuery().times(3).kill()",
     "column 23: a chain may have only one times(n) or once()"),
    ("conn.connectionProbability(0.5).onQuery().connectionProbability(0.5).kill()",
     "column 43: a chain may have only one connectionProbability(p)"),
    # step arguments
    ("conn.times(0).kill()", "column 12: times(n) needs an integer >= 1, got 0"),
    ("conn.times(1.0).kill()", "column 12: times(n) needs an integer >= 1, got 1.0"),
    ("conn.times().kill()", "column 6: times(n) needs n"),
    ("conn.once(1).kill()", "column 11: too many arguments: once() takes no arguments"),
    ("conn.fromClient(True).kill()", "column 17: too many arguments: fromClient() takes no "
                                     "arguments"),
    ("conn.fromServer(x=1).kill()", "column 17: fromServer() has no parameter 'x'"),
    ("conn.probability(-0.1).kill()", "column 18: probability(p) needs a number from 0 to 1, "
                                      "got -0.1"),
    ("conn.probability(1.5).kill()", "column 18: probability(p) needs a number from 0 to 1, "
                                     "got 1.5"),
    ("conn.probability(1e999).kill()", "column 18: probability(p) needs a number from 0 to 1, "
                                       "got inf"),
    ('conn.probability("1").kill()', "column 18: probability(p) needs a number, got '1'"),
    ("conn.probability().kill()", "column 6: probability(p) needs p"),
    ("conn.connectionProbability(2).kill()",
     "column 28: connectionProbability(p) needs a number from 0 to 1, got 2"),
    # where
    ("conn.where().kill()",
     "column 6: where() needs at least one of user=, database=, application_name= or client="),
    ('conn.where("x").kill()',
     'column 12: where() takes key=regex keyword arguments only, e.g. where(user="regex")'),
    ('conn.where(usr="x").kill()',
     "column 12: where() has no key 'usr'; did you mean 'user'? keys: user, database, "
     "application_name, client"),
    ('conn.where(host="x").kill()',
     "column 12: where() has no key 'host'; keys: user, database, application_name, client"),
    ('conn.where(user="a", user="b").kill()', "column 22: where() key 'user' given twice"),
    ('conn.where(user="(").kill()',
     "column 17: bad regex '(': missing ), unterminated subpattern at position 0"),
    ('conn.where(user=b"x").kill()', "column 17: user= needs a str regex, got b'x'"),
    ("conn.where(client=1).kill()", "column 19: client= needs a str regex, got 1"),
    ("conn.where(**x).kill()", "column 12: '**' arguments are not allowed"),
    # derived fields
    ('conn.onExecute(qury="x").kill()',
     "column 16: 'Execute' has no field 'qury'; did you mean 'query'? fields: portal, max_rows, "
     "query"),
    ('conn.onParse(portal="x").kill()',
     "column 14: 'Parse' has no field 'portal'; fields: statement, query, parameter_types"),
    ('conn.onExecute(query=b"x").kill()', "column 22: query= needs a str regex, got b'x'"),
    ('conn.onExecute(query="(").kill()',
     "column 22: bad regex '(': missing ), unterminated subpattern at position 0"),
    # connect_delay
    ("conn.fromClient().connect_delay(5)",
     "column 19: " + CONNECT_DELAY.format(head="'conn'", step="fromClient")),
    ('conn.where(user="x").after(1).connect_delay(5)',
     "column 31: " + CONNECT_DELAY.format(head="'conn'", step="after")),
    ('faults.add("x").onQuery().connect_delay(5)',
     "column 27: " + CONNECT_DELAY.format(head="faults.add(...)", step="onQuery")),
    ("conn.connect_delay(" + "9" * 400 + ")",
     "column 20: connect_delay(ms) needs a finite number >= 0, got " + "9" * 400),
    # action arguments
    ("conn.delay(-1)", "column 12: delay(ms) needs a finite number >= 0, got -1"),
    ("conn.delay(1, -1)", "column 15: delay(jitter) needs a finite number >= 0, got -1"),
    ("conn.delay(1e999)", "column 12: delay(ms) needs a finite number >= 0, got inf"),
    ("conn.delay(-1e999)", "column 12: delay(ms) needs a finite number >= 0, got -inf"),
    ("conn.delay()", "column 6: delay(ms, jitter=0) needs ms"),
    ('conn.delay("5")', "column 12: delay(ms) needs a number of milliseconds, got '5'"),
    ("conn.delay(None)",
     "column 12: value None is not allowed here; arguments must be literal strings, bytes or "
     "numbers"),
    ("conn.delay(True)",
     "column 12: value True is not allowed here; arguments must be literal strings, bytes or "
     "numbers"),
    ("conn.delay(1, jitter=2, ms=3)", "column 25: delay(ms, jitter=0) got 'ms' twice"),
    ("conn.delay(1, 2, 3)",
     "column 18: too many arguments: delay(ms, jitter=0) takes at most 2 arguments"),
    ("conn.delay(1, jiter=2)", "column 15: delay(ms, jitter=0) has no parameter 'jiter'"),
    ("conn.delay(*a)", "column 12: '*' arguments are not allowed"),
    ("conn.duplicate(0)", "column 16: duplicate(n) needs an integer from 1 to 1000, got 0"),
    ("conn.duplicate(1001)", "column 16: duplicate(n) needs an integer from 1 to 1000, got 1001"),
    ("conn.duplicate(2.0)", "column 16: duplicate(n) needs an integer from 1 to 1000, got 2.0"),
    ("conn.hang(-1)", "column 11: hang(ms) needs a finite number >= 0, got -1"),
    ('conn.hang("x")', "column 11: hang(ms) needs a number of milliseconds, got 'x'"),
    ("conn.throttle(0)", "column 15: throttle(bytes_per_second) needs an integer >= 1, got 0"),
    ("conn.throttle(1.5)",
     "column 15: throttle(bytes_per_second) needs an integer >= 1, got 1.5"),
    ("conn.throttle()", "column 6: throttle(bytes_per_second) needs bytes_per_second"),
    ("conn.slice(0)", "column 12: slice(size) needs an integer >= 1, got 0"),
    ("conn.slice(1, -1)", "column 15: slice(delay_ms) needs a finite number >= 0, got -1"),
    ("conn.slice(delay_ms=1)", "column 6: slice(size, delay_ms=0, variation=None) needs size"),
    ("conn.slow_close(-1)", "column 17: slow_close(ms) needs a finite number >= 0, got -1"),
    ("conn.slow_close()", "column 6: slow_close(ms) needs ms"),
    ("conn.limit(-1)", "column 12: limit(bytes) needs an integer >= 0, got -1"),
    ("conn.limit(1.5)", "column 12: limit(bytes) needs an integer >= 0, got 1.5"),
    ("conn.drop(1, 2)",
     "column 14: too many arguments: drop(timeout_ms=None) takes at most 1 argument"),
    ("conn.delay(5).delay(5)",
     "column 15: nothing may follow the action delay(); the action comes last"),
    ("conn.kill().once()",
     "column 13: nothing may follow the action kill(); the action comes last"),
    # error() on postgres
    ('conn.error("xx000")',
     'column 12: error(code) needs a SQLSTATE: 5 digits or upper-case letters such as "57014", '
     "got 'xx000'; did you mean 'XX000'?"),
    ('conn.error("XX00")',
     'column 12: error(code) needs a SQLSTATE: 5 digits or upper-case letters such as "57014", '
     "got 'XX00'"),
    ('conn.error("XX0000")',
     'column 12: error(code) needs a SQLSTATE: 5 digits or upper-case letters such as "57014", '
     "got 'XX0000'"),
    ("conn.error(code=57014)", "column 17: error(code) needs a str, got 57014"),
    ("conn.error(code=None)",
     "column 17: value None is not allowed here; arguments must be literal strings, bytes or "
     "numbers"),
    ('conn.error(severity="error")',
     "column 21: error(severity) must be 'ERROR', 'FATAL' or 'PANIC', in upper case, got "
     "'error'; did you mean 'ERROR'?"),
    ('conn.error(severity="WARNING")',
     "column 21: error(severity) must be 'ERROR', 'FATAL' or 'PANIC', in upper case, got "
     "'WARNING'"),
    ("conn.error(message=5)", "column 20: error(message) needs a str, got 5"),
    ('conn.error(message=b"x")', "column 20: error(message) needs a str, got b'x'"),
    ('conn.error(message="a\\x00b")', "column 20: error(message) must not contain NUL characters"),
    ('conn.error(message="\\ud800")', "column 20: error(message) must not contain lone surrogates"),
    ('conn.error("XX000", "m", "ERROR", 1)',
     'column 35: too many arguments: error(code="XX000", message=None, severity="ERROR") takes '
     "at most 3 arguments"),
    ('conn.error(hint="x")',
     'column 12: error(code="XX000", message=None, severity="ERROR") has no parameter \'hint\''),
    # cancel
    ("conn.cancel(1, after_ms=2)", "column 16: cancel() takes a pid or after_ms, not both"),
    ("conn.cancel(pid=1, after_ms=2)", "column 20: cancel() takes a pid or after_ms, not both"),
    ("conn.cancel(after_ms=-1)", "column 22: cancel(after_ms) needs a finite number >= 0, got -1"),
    ('conn.cancel(after_ms="1")',
     "column 22: cancel(after_ms) needs a number of milliseconds, got '1'"),
    ("conn.cancel(pod=1)", "column 13: cancel(pid) or cancel(after_ms=100) has no parameter 'pod'"),
    ("conn.cancel(0)",
     "column 13: cancel(pid) needs an integer process id from 1 to 2147483647, got 0"),
    # wrong root for a method
    ('conn.remove("x")', "column 6: remove() is a faults command: write faults.remove(...)"),
    ("conn.clear()", "column 6: clear() is a faults command: write faults.clear()"),
    ("conn.list()", "column 6: list() is a faults command: write faults.list()"),
    ("conn.fromserver().kill()", "column 6: unknown method 'fromserver'; did you mean "
                                 "'fromServer'?"),
    ("conn.onc().kill()",
     "column 6: unknown message type 'c' for protocol postgres; did you mean 'once'?"),
    ("conn.thottle(5)", "column 6: unknown method 'thottle'; did you mean 'throttle'?"),
    ("recorder.list()", "column 10: unknown recorder command 'list'; use dump(), reset()"),
    ("frobnicate.kill()",
     "column 1: name 'frobnicate' is not allowed; commands start with 'conn', 'faults', "
     "'recorder' or 'proxy'"),
]


@pytest.mark.parametrize(("text", "message"), REJECTIONS)
def test_rejections_name_the_problem_and_column(text: str, message: str) -> None:
    error = _error(text)
    assert str(error) == message
    assert message.startswith(f"column {error.column}: ")
    assert error.message == message.split(": ", 1)[1]


# --- protocol-dependent checks -------------------------------------------------------------

PROTOCOL_REJECTIONS = [
    ("conn.error()", "raw",
     "column 6: error() needs a protocol with error messages; this proxy's protocol raw has none"),
    ('conn.onData().error(message="x")', "raw",
     "column 15: error() needs a protocol with error messages; this proxy's protocol raw has "
     "none"),
    ('conn.error(code="57014")', "wallaroo",
     "column 12: protocol wallaroo has no error code: its error() takes only message"),
    ('conn.error(severity="FATAL")', "wallaroo",
     "column 12: protocol wallaroo has no error severity: its error() takes only message"),
    ('conn.error(message=None, code="XX000")', "wallaroo",
     "column 26: protocol wallaroo has no error code: its error() takes only message"),
    ('conn.error("a", "b")', "wallaroo",
     "column 17: too many arguments: error(message=None) takes at most 1 argument"),
    ("conn.error(message=1)", "wallaroo", "column 20: error(message) needs a str, got 1"),
    ("conn.cancel(after_ms=5)", "raw",
     "column 13: cancel() without a pid needs a protocol that can cancel the server's work; "
     "this proxy's protocol raw cannot"),
    ("conn.cancel(after_ms=5)", "wallaroo",
     "column 13: cancel() without a pid needs a protocol that can cancel the server's work; "
     "this proxy's protocol wallaroo cannot"),
    ("conn.cancel()", "raw", "column 6: cancel(pid) needs pid"),
    ("conn.cancel()", "wallaroo", "column 6: cancel(pid) needs pid"),
    ("conn.cancel(pod=1)", "raw", "column 13: cancel(pid) has no parameter 'pod'"),
    ('conn.where(user="x").kill()', "raw",
     "column 12: protocol raw has no startup parameter 'user'; where() takes only client= here"),
    ('conn.where(client="x", database="x").kill()', "wallaroo",
     "column 24: protocol wallaroo has no startup parameter 'database'; where() takes only "
     "client= here"),
    ('conn.where(application_name="x").kill()', "wallaroo",
     "column 12: protocol wallaroo has no startup parameter 'application_name'; where() takes "
     "only client= here"),
    ("conn.where().kill()", "raw", "column 6: where() needs at least one of client="),
    ('conn.where("x").kill()', "raw",
     'column 12: where() takes key=regex keyword arguments only, e.g. where(client="regex")'),
    ('conn.where(usr="x").kill()', "raw", "column 12: where() has no key 'usr'; keys: client"),
    ('faults.add("x").where(user="x").kill()', "raw",
     "column 23: protocol raw has no startup parameter 'user'; where() takes only client= here"),
    ('conn.onData(query="x").kill()', "raw", "column 13: 'Data' has no field 'query'; "
                                             "fields: data"),
]


@pytest.mark.parametrize(("text", "protocol", "message"), PROTOCOL_REJECTIONS)
def test_protocol_dependent_rejections(text: str, protocol: str, message: str) -> None:
    assert str(_error(text, protocol)) == message


def test_wallaroo_error_takes_the_message_positionally() -> None:
    assert _action('conn.error("boom")', "wallaroo") == Action("error", options=(
        ("code", "XX000"), ("message", "boom"), ("severity", "ERROR")))
    assert _action("conn.error()", "wallaroo").option("message") is None


def test_new_actions_without_protocol_requirements_parse_on_every_protocol() -> None:
    for name in protocols.names():
        for text in ("conn.delay(1)", "conn.drop()", "conn.duplicate(2)", "conn.hang()",
                     "conn.throttle(10)", "conn.slice(1)", "conn.slow_close(1)", "conn.limit(1)",
                     "conn.cancel(4242)"):
            assert _action(text, name).name == text[5:text.index("(")]


def test_checks_follow_the_protocol_fields_not_its_name() -> None:
    postgres = protocols.get("postgres")
    bare = dataclasses.replace(postgres, derived_fields={}, error_parameters=None,
                               cancels_backends=False)
    assert str(_error('conn.onExecute(query="x").kill()', bare)) == (
        "column 16: 'Execute' has no field 'query'; fields: portal, max_rows")
    assert str(_error("conn.error()", bare)) == (
        "column 6: error() needs a protocol with error messages; this proxy's protocol postgres "
        "has none")
    assert str(_error("conn.cancel(after_ms=1)", bare)).startswith(
        "column 13: cancel() without a pid needs a protocol")
    raw = protocols.get("raw")
    able = dataclasses.replace(raw, derived_fields={"Data": ("text",)},
                               error_parameters=("severity",), cancels_backends=True)
    assert _rule('conn.onData(text="x").kill()', able).steps == (
        MessageFilter("Data", (("text", re.compile("x")),)),)
    assert _action('conn.error("FATAL")', able).option("severity") == "FATAL"
    assert _action("conn.cancel()", able) == Action("cancel", options=(("after_ms", 100.0),))
    # A derived field that is also a message's own is listed once.
    doubled = dataclasses.replace(raw, derived_fields={"Data": ("data",)})
    assert str(_error('conn.onData(x="y").kill()', doubled)) == (
        "column 13: 'Data' has no field 'x'; fields: data")


def test_where_keys_come_from_the_startup_message_fields() -> None:
    postgres = protocols.get("postgres")
    startup = postgres.messages["StartupMessage"]
    narrow = dataclasses.replace(postgres, messages={
        **postgres.messages,
        "StartupMessage": dataclasses.replace(startup, fields=("protocol_version", "user"))})
    assert _rule('conn.where(user="u").kill()', narrow).steps == (_where(user="u"),)
    assert str(_error('conn.where(database="d").kill()', narrow)) == (
        "column 12: protocol postgres has no startup parameter 'database'; where() takes only "
        "user= or client= here")


def test_protected_pids_apply_inside_faults_add() -> None:
    with pytest.raises(CommandError) as caught:
        parse('faults.add("x").cancel(77)', "postgres", {77: "the proxy"})
    assert str(caught.value) == (
        "column 24: cancel(77) would interrupt the proxy; give the pid of the process to cancel "
        "(e.g. pg_backend_pid())")


# --- old commands keep their meaning -------------------------------------------------------


def test_corpus_means_the_same_with_and_without_the_new_protocol_fields() -> None:
    """The #12 protocol fields only add: every corpus command parses as before them."""
    postgres = protocols.get("postgres")
    before = dataclasses.replace(postgres, derived_fields={}, error_parameters=None,
                                 cancels_backends=False)
    assert len(CORPUS) >= 310
    for line in CORPUS:
        assert parse(line, postgres) == parse(line, before), line


def test_old_actions_have_no_options() -> None:
    for text in ("conn.allow()", "conn.kill()", "conn.killall()",
                 "conn.cancel(5)", "conn.connect_delay(1)"):
        assert _action(text).options == ()
    # reset() and drop() took options for Toxiproxy's reset_peer and timeout (#13).
    assert _action("conn.reset()").options == (("after_ms", 0.0),)
    assert _action("conn.drop()").options == (("timeout_ms", None),)


# --- vocabulary ----------------------------------------------------------------------------


def test_signatures_render_defaults() -> None:
    signatures = {name: spec.signatures for name, spec in ACTIONS.items()}
    assert signatures["delay"] == ("delay(ms, jitter=0)",)
    assert signatures["cancel"] == ("cancel(pid)", "cancel(after_ms=100)")
    assert signatures["error"] == ('error(code="XX000", message=None, severity="ERROR")',)
    assert signatures["hang"] == ("hang(ms=None)",)
    assert FAULT_COMMANDS["add"].signature == "add(name, seed=None)"
    assert list(FAULT_COMMANDS) == ["add", "remove", "clear", "list"]
    assert FILTERS["where"].signature == (
        "where(user=regex, database=regex, application_name=regex, client=regex)")
    assert [p.required for p in ACTIONS["slice"].params] == [True, False, False]


def test_action_list_names_every_action_form() -> None:
    assert dsl._ACTION_LIST == ACTION_LIST
    for spec in ACTIONS.values():
        for form in spec.signatures:
            assert form in ACTION_LIST


def test_roots_and_status_doc() -> None:
    assert ROOTS == ("conn", "faults", "recorder", "proxy")
    status = PROXY_COMMANDS["status"].doc
    assert "fired" in status and "faults" in status


def test_vocabulary_lives_in_its_module_and_dsl_re_exports_it() -> None:
    assert dsl.ACTIONS is dsl_vocabulary.ACTIONS
    assert dsl.MethodSpec is dsl_vocabulary.MethodSpec and dsl.Param is dsl_vocabulary.Param
    for name in ("ACTIONS", "FILTERS", "FILTER_PREFIX", "PROXY_COMMANDS", "RECORDER_COMMANDS",
                 "ROOTS", "Action", "After", "BytesContains", "BytesMatch", "Command",
                 "CommandError", "MessageFilter", "MethodSpec", "Param", "ProxyCommand",
                 "RecorderCommand", "Rule", "Step", "filter_names", "parse",
                 "FAULT_COMMANDS", "FaultCommand", "FromSide", "Times", "Probability",
                 "ConnectionProbability", "Where"):
        assert name in dsl.__all__ and hasattr(dsl, name), name
    assert all(hasattr(dsl, name) for name in dsl.__all__)
    assert all(hasattr(dsl_vocabulary, name) for name in dsl_vocabulary.__all__)


def test_every_numeric_parameter_has_a_range() -> None:
    """The parser checks numbers by `Param.number`: every parameter it reads as a number
    has one, and every other parameter is a string or regex."""
    strings = {("error", "code"), ("error", "message"), ("error", "severity"),
               ("add", "name"), ("remove", "name"), ("matches", "pattern"),
               ("contains", "needle"), ("cancel", "pid"),
               *(("where", key) for key in dsl_vocabulary.WHERE_KEYS)}
    for vocabulary in (FILTERS, ACTIONS, FAULT_COMMANDS):
        for spec in vocabulary.values():
            for form in (spec.params, *spec.alternatives):
                for param in form:
                    numeric = (spec.name, param.name) not in strings
                    assert (param.number is not None) == numeric, (spec.name, param.name)


# --- fuzzing -------------------------------------------------------------------------------

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROTOCOLS = st.sampled_from(["postgres", "raw", "wallaroo"])
METHODS = [*FILTERS, *ACTIONS, *FAULT_COMMANDS, "onQuery", "onExecute", "onData", "onMessage",
           "onNope", "dump", "ping", "__class__", "onc", "once", "on"]
KEYWORDS = ["query", "portal", "data", "pid", "ms", "n", "p", "jitter", "code", "message",
            "severity", "after_ms", "size", "delay_ms", "bytes", "bytes_per_second", "user",
            "database", "application_name", "client", "name", "seed", "x"]
VALUES = st.one_of(
    st.integers(-3, 2000), st.sampled_from([2**31, 2**64, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.binary(max_size=6),
    st.booleans(), st.none(), st.sampled_from(["XX000", "57014", "ERROR", "FATAL", "fatal", "slow",
                                               "a.b:c", "-x", "^COMMIT", "(", "\x00"]))


def _literal(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**300:
        return str(value)  # repr of a 401-digit int, written out
    return repr(value)


@st.composite
def _chains(draw: st.DrawFn) -> str:
    root = draw(st.sampled_from(["conn", "faults", "faults.add", "recorder", "proxy", "x"]))
    text = root
    if root == "faults.add":
        text += f"({', '.join(_literal(v) for v in draw(st.lists(VALUES, max_size=2)))})"
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(METHODS))
        positional = [_literal(v) for v in draw(st.lists(VALUES, max_size=3))]
        keywords = [f"{k}={_literal(v)}" for k, v in draw(st.dictionaries(
            st.sampled_from(KEYWORDS), VALUES, max_size=3)).items()]
        text += f".{name}({', '.join(positional + keywords)})"
    return text


def _assert_parses_or_reports(text: str, protocol: str) -> None:
    try:
        result = parse(text, protocol)
    except CommandError as error:
        line = str(error)
        assert line.splitlines() == [line]
        assert line.startswith(f"column {error.column}: ")
        assert 1 <= error.column <= len(text.strip()) + 1
    else:
        assert isinstance(result, Rule | FaultCommand | RecorderCommand | ProxyCommand)
        assert result.text and result.text in text
        if isinstance(result, FaultCommand):
            assert (result.name is None) == (result.name_column == 0)
            assert (result.rule is not None) == (result.op == "add")


@FUZZ
@given(_chains(), PROTOCOLS)
def test_fuzz_random_chains_only_raise_command_errors(text: str, protocol: str) -> None:
    _assert_parses_or_reports(text, protocol)


@FUZZ
@given(st.text(), PROTOCOLS)
def test_fuzz_arbitrary_text_only_raises_command_errors(text: str, protocol: str) -> None:
    _assert_parses_or_reports(text, protocol)


FRAGMENTS = ["faults", "conn", ".", "add(", "remove(", "clear()", "list()", '"x"', "(", ")",
             ",", "=", "seed=", "where(", "user=", "client=", "once()", "times(", "delay(",
             "error(", "code=", "cancel(", "after_ms=", "1", "-1", "0.5", "1e999", "None",
             "True", ".kill()", "connect_delay(", "probability(", '"^a"', "b'x'", "**", "*", " "]


@FUZZ
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join), PROTOCOLS)
def test_fuzz_token_soup_only_raises_command_errors(text: str, protocol: str) -> None:
    _assert_parses_or_reports(text, protocol)
