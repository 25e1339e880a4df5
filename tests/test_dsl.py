"""The command language parser: the Citus corpus, every rejection class, fuzzing, no eval."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wirefault import protocols
from wirefault.protocols import BACKEND, FRONTEND, MessageSpec, ProtocolSpec
from wirefault.protocols.raw import new_session
from wirefault.proxy.dsl import (
    ACTIONS,
    FILTERS,
    RECORDER_COMMANDS,
    Action,
    After,
    BytesContains,
    BytesMatch,
    CommandError,
    FaultCommand,
    MessageFilter,
    ProxyCommand,
    RecorderCommand,
    Rule,
    filter_names,
    parse,
)

CORPUS_FILE = Path(__file__).parent / "data" / "citus_commands.txt"
CORPUS = [line for line in CORPUS_FILE.read_text().splitlines() if line.strip()]


def _message(name: str, *fields: str) -> MessageSpec:
    return MessageSpec(
        name=name,
        directions=frozenset({FRONTEND, BACKEND}),
        fields=fields,
        decode=lambda data: {},
        encode=lambda **values: b"",
    )


# A small catalogue shaped like PostgreSQL's, so these tests do not depend on the real one.
LOCAL = ProtocolSpec(
    name="postgres",
    messages={
        spec.name: spec
        for spec in (
            _message("Query", "query"),
            _message("Parse", "statement", "query", "param_types"),
            _message("CommandComplete", "command"),
            _message("CopyData", "data"),
            _message("AuthenticationOk"),
        )
    },
    new_session=new_session,
    default_max_frame=1 << 20,
)


def _error(text: str, protocol: ProtocolSpec | str = LOCAL) -> CommandError:
    with pytest.raises(CommandError) as caught:
        parse(text, protocol)
    return caught.value


def _query(regex: str) -> MessageFilter:
    return MessageFilter("Query", (("query", re.compile(regex)),))


@pytest.fixture(scope="module")
def postgres() -> ProtocolSpec:
    return protocols.get("postgres")


# --- the Citus corpus against the real PostgreSQL catalogue ---------------------------------


def test_corpus_has_every_line() -> None:
    assert len(CORPUS) == 310


@pytest.mark.parametrize("line", CORPUS)
def test_every_corpus_command_parses(line: str, postgres: ProtocolSpec) -> None:
    result = parse(line, postgres)
    assert result.text == line
    if isinstance(result, Rule):
        assert result.action.name in ACTIONS


@pytest.mark.parametrize(
    ("command", "steps", "action"),
    [
        ('conn.onQuery(query="^COMMIT").after(2).kill()', (_query("^COMMIT"), After(2)),
         Action("kill")),
        ('conn.onQuery(query="^TRUNCATE TABLE").after(2).kill()',
         (_query("^TRUNCATE TABLE"), After(2)), Action("kill")),
        ('conn.after(2).onQuery(query="BEGIN").cancel(4242)', (After(2), _query("BEGIN")),
         Action("cancel", pid=4242)),
        ('conn.matches(b"CREATE INDEX").killall()', (BytesMatch(re.compile(b"CREATE INDEX")),),
         Action("killall")),
        ("conn.connect_delay(1400)", (), Action("connect_delay", delay_ms=1400)),
        ("conn.onCopyData().kill()", (MessageFilter("CopyData", ()),), Action("kill")),
        ("conn.onAuthenticationOk().cancel(4242)", (MessageFilter("AuthenticationOk", ()),),
         Action("cancel", pid=4242)),
        ('conn.onCommandComplete(command="COPY 1").cancel(4242)',
         (MessageFilter("CommandComplete", (("command", re.compile("COPY 1")),)),),
         Action("cancel", pid=4242)),
        ('conn.onParse(query="^WITH distributed_object_data").kill()',
         (MessageFilter("Parse", (("query", re.compile("^WITH distributed_object_data")),)),),
         Action("kill")),
        ('conn.onQuery(query="SELECT.*select_test").after(1).reset()',
         (_query("SELECT.*select_test"), After(1)), Action("reset", options=(("after_ms", 0.0),))),
        ("conn.allow()", (), Action("allow")),
        ("conn.kill()", (), Action("kill")),
    ],
)
def test_corpus_commands_mean_what_citus_expects(
    command: str, steps: tuple, action: Action, postgres: ProtocolSpec
) -> None:
    assert parse(command, postgres) == Rule(steps, action, command)


def test_recorder_reset_from_corpus(postgres: ProtocolSpec) -> None:
    assert parse("recorder.reset()", postgres) == RecorderCommand("reset", "recorder.reset()")


def test_escaped_parenthesis_matches_a_literal_parenthesis(postgres: ProtocolSpec) -> None:
    command = r'conn.onQuery(query="SELECT min\(latest_end_lsn\) FROM pg_stat_subscription").kill()'
    assert command in CORPUS
    rule = parse(command, postgres)
    assert isinstance(rule, Rule)
    [(field, regex)] = rule.steps[0].fields
    assert field == "query"
    assert regex.search("SELECT min(latest_end_lsn) FROM pg_stat_subscription")
    assert not regex.search("SELECT minlatest_end_lsn FROM pg_stat_subscription")


def test_escaped_star_matches_a_literal_star(postgres: ProtocolSpec) -> None:
    command = next(line for line in CORPUS if r"SELECT \*" in line)
    [(_, regex)] = parse(command, postgres).steps[0].fields
    assert regex.search("SELECT * FROM pg_catalog.worker_split_shard_replication_setup(ARRAY[")
    assert not regex.search("SELECT x FROM pg_catalog.worker_split_shard_replication_setup(")


def test_invalid_escape_warnings_never_surface() -> None:
    command = r'conn.onQuery(query="worker_split_copy\(300").kill()'
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        parse(command, LOCAL)
    assert seen == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under `python -W error`
        assert isinstance(parse(command, LOCAL), Rule)


# --- accepted forms -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "stripped"),
    [
        ("conn.kill()\n", "conn.kill()"),
        ("  conn.kill() ;\n", "conn.kill()"),
        ("\tconn.kill();", "conn.kill()"),
    ],
)
def test_whitespace_and_one_trailing_semicolon_are_stripped(text: str, stripped: str) -> None:
    assert parse(text, LOCAL) == Rule((), Action("kill"), stripped)


def test_filters_in_any_order_and_number() -> None:
    rule = parse('conn.after(1).contains(b"x").onQuery(query="B").matches("é+").after(0).allow()',
                 LOCAL)
    assert rule.steps == (
        After(1),
        BytesContains(b"x"),
        _query("B"),
        BytesMatch(re.compile("é+".encode())),
        After(0),
    )


def test_fields_keep_written_order_and_search_semantics() -> None:
    rule = parse('conn.onParse(query="^SELECT", statement="s1$").kill()', LOCAL)
    [step] = rule.steps
    assert [name for name, _ in step.fields] == ["query", "statement"]
    assert step.fields[1][1].search("stmt_s1")


def test_matches_searches_raw_bytes() -> None:
    [step] = parse(r'conn.matches(b"^Q\x00").kill()', LOCAL).steps
    assert step.pattern.search(b"Q\x00\x00\x00\x0dSELECT 1\x00")
    assert not step.pattern.search(b"P\x00")


def test_keyword_arguments_by_parameter_name() -> None:
    assert parse("conn.cancel(pid=7)", LOCAL).action == Action("cancel", pid=7)
    assert parse("conn.connect_delay(ms=2.5)", LOCAL).action == Action(
        "connect_delay", delay_ms=2.5)
    assert parse("conn.after(n=3).kill()", LOCAL).steps == (After(3),)


def test_raw_string_regex() -> None:
    [step] = parse(r'conn.onQuery(query=r"\bCOMMIT\b").kill()', LOCAL).steps
    assert step.fields[0][1].search("END; COMMIT;")
    assert not step.fields[0][1].search("UNCOMMITTED")


def test_protocol_by_name_uses_its_catalogue() -> None:
    assert parse('conn.onData(data="x").kill()', "raw").steps == (
        MessageFilter("Data", (("data", re.compile("x")),)),)
    assert str(_error("conn.onQuery().kill()", "raw")) == (
        "column 6: unknown message type 'Query' for protocol raw")


def test_recorder_commands() -> None:
    assert parse("recorder.dump()", LOCAL) == RecorderCommand("dump", "recorder.dump()")
    assert parse("recorder.reset();", LOCAL) == RecorderCommand("reset", "recorder.reset()")


def test_vocabulary_constants_match_the_parser() -> None:
    assert list(FILTERS) == ["matches", "contains", "after", "fromClient", "fromServer",
                             "times", "once", "probability", "connectionProbability", "where"]
    assert list(ACTIONS) == ["allow", "kill", "reset", "killall", "cancel", "connect_delay",
                             "delay", "drop", "duplicate", "error", "hang", "throttle", "slice",
                             "slow_close", "limit"]
    assert list(RECORDER_COMMANDS) == ["dump", "reset"]
    assert [p.name for p in ACTIONS["cancel"].params] == ["pid"]
    assert [p.name for p in ACTIONS["connect_delay"].params] == ["ms"]
    assert all(p.description for spec in ACTIONS.values() for p in spec.params)
    samples = {"pid": "42", "ms": "10", "bytes_per_second": "10", "size": "10", "bytes": "10"}
    # error() needs a protocol with error messages (LOCAL has none); the rest do not care.
    erring = dataclasses.replace(LOCAL, error_parameters=("code", "message", "severity"))
    for spec in ACTIONS.values():
        arguments = ", ".join(samples[p.name] for p in spec.params if p.required)
        assert parse(f"conn.{spec.name}({arguments})", erring).action.name == spec.name
    assert filter_names(LOCAL) == [
        "onQuery", "onParse", "onCommandComplete", "onCopyData", "onAuthenticationOk"]
    assert filter_names("raw") == ["onData"]


# --- rejections: message and column ---------------------------------------------------------

ROOTS_HINT = "commands start with 'conn', 'faults', 'recorder' or 'proxy'"
ACTIONS_HINT = (
    'allow(), kill(), reset(after_ms=0), killall(), cancel(pid), cancel(after_ms=100), '
    'connect_delay(ms), delay(ms, jitter=0), drop(timeout_ms=None), duplicate(n=1), '
    'error(code="XX000", message=None, severity="ERROR"), hang(ms=None), '
    'throttle(bytes_per_second), slice(size, delay_ms=0, variation=None), '
    "slow_close(ms) or limit(bytes)")

REJECTIONS = [
    ("__import__('os')",
     f"column 1: name '__import__' is not allowed; {ROOTS_HINT}"),
    ("conn.__class__", "column 6: attribute '__class__' is not allowed"),
    ("conn.onQuery.__globals__", "column 6: 'onQuery' must be called: write onQuery(...)"),
    ("conn.onQuery().__class__()", "column 16: attribute '__class__' is not allowed"),
    ("conn.onQuery(query=x).kill()",
     "column 20: name 'x' is not allowed here; arguments must be literal strings, bytes or "
     "numbers"),
    ("conn[0].kill()", "column 5: a subscript is not allowed after conn; expected .method(...)"),
    ("conn.onQuery()[0].kill()",
     "column 15: a subscript is not allowed after onQuery(); expected .method(...)"),
    ("conn.onQuery(query=lambda: 1).kill()",
     "column 20: a lambda is not allowed here; arguments must be literal strings, bytes or "
     "numbers"),
    ('conn.onQuery(query=str("x")).kill()',
     "column 20: a nested call is not allowed here; arguments must be literal strings, bytes or "
     "numbers"),
    ("conn.onQuery(query=[q for q in 'ab']).kill()",
     "column 20: a comprehension is not allowed here; arguments must be literal strings, bytes "
     "or numbers"),
    ('conn.onQuery(query=f"{conn}").kill()',
     "column 20: an f-string is not allowed here; arguments must be literal strings, bytes or "
     "numbers"),
    ('conn.onQuery(query="a" + "b").kill()',
     "column 20: an operator is not allowed here; arguments must be literal strings, bytes or "
     "numbers"),
    ("conn.cancel(True)",
     "column 13: value True is not allowed here; arguments must be literal strings, bytes or "
     "numbers"),
    ("conn.cancel(--1)",
     "column 13: an operator is not allowed here; arguments must be literal strings, bytes or "
     "numbers"),
    ("conn.matches(*p).kill()", "column 14: '*' arguments are not allowed"),
    ("conn.onQuery(**f).kill()", "column 14: '**' arguments are not allowed"),
    ("conn.cancel(**f)", "column 13: '**' arguments are not allowed"),
    ("conn.kill().allow()",
     "column 13: nothing may follow the action kill(); the action comes last"),
    ("conn.onQuery()", f"column 15: the command must end with an action: {ACTIONS_HINT}"),
    ("conn", f"column 5: the command must end with an action: {ACTIONS_HINT}"),
    ('conn.onQuery(query="(").kill()',
     "column 20: bad regex '(': missing ), unterminated subpattern at position 0"),
    ('conn.matches(b"[").kill()',
     "column 14: bad regex b'[': unterminated character set at position 0"),
    ("conn.onQury().kill()",
     "column 6: unknown message type 'Qury' for protocol postgres; did you mean 'Query'?"),
    ("conn.onquery().kill()",
     "column 6: unknown message type 'query' for protocol postgres; did you mean 'Query'?"),
    ('conn.onQuery(qery="x").kill()',
     "column 14: 'Query' has no field 'qery'; did you mean 'query'? fields: query"),
    ('conn.onParse(sql="x").kill()',
     "column 14: 'Parse' has no field 'sql'; fields: statement, query, param_types"),
    ('conn.onAuthenticationOk(query="x").kill()',
     "column 25: 'AuthenticationOk' has no field 'query'; it has no fields"),
    ('conn.onQuery("BEGIN").kill()',
     'column 14: onQuery() takes field=regex keyword arguments only, e.g. '
     'onQuery(query="regex")'),
    ('conn.onQuery(query=b"BEGIN").kill()', "column 20: query= needs a str regex, got b'BEGIN'"),
    ('conn.onQuery(query="a", query="b").kill()', "column 25: field 'query' given twice"),
    ("conn.kil()", "column 6: unknown method 'kil'; did you mean 'kill'?"),
    ("conn.aftr(1).kill()", "column 6: unknown method 'aftr'; did you mean 'after'?"),
    ("conn.dump()", "column 6: dump() is a recorder command: write recorder.dump()"),
    ("conn.frobnicate()",
     "column 6: unknown method 'frobnicate'; filters: on<MessageType>(...), matches(pattern), "
     "contains(needle), after(n), fromClient(), fromServer(), times(n), once(), probability(p), "
     "connectionProbability(p), where(user=regex, database=regex, application_name=regex, "
     f"client=regex); actions: {ACTIONS_HINT}"),
    ('conn.cancel("x")',
     "column 13: cancel(pid) needs an integer process id from 1 to 2147483647, got 'x'"),
    ("conn.cancel(0)",
     "column 13: cancel(pid) needs an integer process id from 1 to 2147483647, got 0"),
    ("conn.cancel(2147483648)",
     "column 13: cancel(pid) needs an integer process id from 1 to 2147483647, got 2147483648"),
    ("conn.cancel()", "column 6: cancel(pid) needs pid"),
    ("conn.cancel(1, 2)", "column 16: too many arguments: cancel(pid) takes 1 argument"),
    ("conn.cancel(pod=1)", "column 13: cancel(pid) has no parameter 'pod'"),
    ("conn.cancel(1, pid=2)", "column 16: cancel(pid) got 'pid' twice"),
    ("conn.kill(1)", "column 11: too many arguments: kill() takes no arguments"),
    ("conn.after(-1).kill()", "column 12: after(n) needs an integer >= 0, got -1"),
    ("conn.after(1.5).kill()", "column 12: after(n) needs an integer >= 0, got 1.5"),
    ("conn.contains(5).kill()", 'column 15: contains(needle) needs bytes such as b"...", got 5'),
    ("conn.onQuery().connect_delay(5)",
     "column 16: connect_delay() applies to every new connection and must come directly after "
     "'conn', without filters: only where(), times(), once(), probability() or "
     "connectionProbability() may precede it, not onQuery()"),
    ("conn.connect_delay(-1)", "column 20: connect_delay(ms) needs a finite number >= 0, got -1"),
    ("conn.connect_delay(1e999)",
     "column 20: connect_delay(ms) needs a finite number >= 0, got inf"),
    ('conn.connect_delay("5")', "column 20: connect_delay(ms) needs a number of milliseconds, "
     "got '5'"),
    ("recorder", "column 9: recorder needs a command: dump(), reset()"),
    ("recorder.dmp()", "column 10: unknown recorder command 'dmp'; did you mean 'dump'?"),
    ("recorder.kill()", "column 10: unknown recorder command 'kill'; use dump(), reset()"),
    ("recorder.dump(1)", "column 15: too many arguments: dump() takes no arguments"),
    ("recorder.dump().reset()", "column 17: nothing may follow recorder.dump()"),
    ("conn.kill()()", "column 12: a call is not allowed after kill(); expected .method(...)"),
    ("conn()", "column 5: a call is not allowed after conn; expected .method(...)"),
    ("os.system('true')",
     f"column 1: name 'os' is not allowed; {ROOTS_HINT}"),
    ("1", f"column 1: value 1 is not allowed; {ROOTS_HINT}"),
    ("lambda: conn.kill()",
     f"column 1: a lambda is not allowed; {ROOTS_HINT}"),
    ("conn.kill(", "column 10: syntax error: '(' was never closed"),
    ("conn.kill();;", "column 12: syntax error: invalid syntax"),
    ("x = 1", "column 3: syntax error: invalid syntax"),
    ("", "column 1: empty command"),
    (" ;\n", "column 1: empty command"),
    ("conn.kill()\nconn.allow()", "column 12: a command must be on one line"),
    ("conn.kill(\x00)", "column 11: NUL character in command"),
]


@pytest.mark.parametrize(("text", "message"), REJECTIONS)
def test_rejections_name_the_problem_and_column(text: str, message: str) -> None:
    error = _error(text)
    assert str(error) == message
    assert error.message == message.split(": ", 1)[1]
    assert message.startswith(f"column {error.column}: ")
    assert isinstance(error, ValueError)


def test_columns_count_characters_not_utf8_bytes() -> None:
    error = _error('conn.onQuery(query="é€").kil()')
    assert error.column == 26
    assert str(error) == "column 26: unknown method 'kil'; did you mean 'kill'?"
    assert _error('conn.onQuery(query="é€(").kill()').column == 20
    assert str(_error("éé.kill()")).startswith("column 1: name 'éé' is not allowed")


def test_columns_count_from_the_stripped_command() -> None:
    assert str(_error("   conn.kil()\n")) == "column 6: unknown method 'kil'; did you mean 'kill'?"


def test_unknown_protocol_name_is_reported() -> None:
    with pytest.raises(ValueError, match="unknown protocol 'nope'"):
        parse("conn.kill()", "nope")


# --- never evaluate -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        'conn.onQuery(query=open("{path}","w")).kill()',
        '__import__("pathlib").Path("{path}").touch()',
        'conn.onQuery(query=__import__("pathlib").Path("{path}").touch()).kill()',
        'conn.onQuery(query=[open("{path}","w") for _ in "x"]).kill()',
        'conn.onQuery(query=f"{{open(\'{path}\',\'w\')}}").kill()',
        'conn.kill() or open("{path}","w")',
        '(lambda: open("{path}","w"))()',
        'conn.__class__.__init__.__globals__["__builtins__"]["open"]("{path}","w")',
        'conn.onQuery(query=(q := open("{path}","w"))).kill()',
    ],
)
def test_parser_never_evaluates_anything(template: str, tmp_path: Path) -> None:
    path = tmp_path / "wirefault-pwned"
    error = _error(template.format(path=path))
    assert "column" in str(error)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_module_does_not_import_mitmproxy() -> None:
    probe = (
        "import sys, wirefault.proxy.dsl as dsl\n"
        "dsl.parse('conn.kill()', 'raw')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mitmproxy'))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == "[]"


# --- fuzzing --------------------------------------------------------------------------------

FRAGMENTS = [
    "conn", "recorder", ".", "(", ")", "[", "]", ",", "=", "*", "**", "-", "+", '"', "'", 'b"',
    'f"', 'r"', "\\", "\\(", ";", ":", " ", "\n", "\r", "\t", "\x00", "é", "€", "\U0001f600",
    "__class__", "__import__", "lambda", "onQuery", "onQury", "query=", "after(", "kill()",
    ".kill()", ".allow()", ".cancel(", "connect_delay(", "matches(", "contains(", "0", "-1",
    "1e999", "True", "None", "...", "4242", "2147483648", "{", "}", "if", "else", "#", ":=",
]

FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def _assert_parses_or_reports(text: str) -> None:
    try:
        result = parse(text, LOCAL)
    except CommandError as error:
        line = str(error)
        assert line.splitlines() == [line]
        assert line.startswith(f"column {error.column}: ")
        assert "column" in line
        assert 1 <= error.column <= max(len(text.strip()), 0) + 1
    else:
        assert isinstance(result, Rule | RecorderCommand | ProxyCommand | FaultCommand)
        assert result.text and result.text in text


@st.composite
def _mutated_corpus_line(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(CORPUS))
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, min(len(text), start + 8)))
        insert = draw(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)))
        text = text[:start] + insert + text[end:]
    return text


@st.composite
def _random_chain(draw: st.DrawFn) -> str:
    names = ["onQuery", "onParse", "onCopyData", "onAuthenticationOk", "onNope", "matches",
             "contains", "after", *ACTIONS, "dump", "__class__"]
    values = st.one_of(st.integers(-3, 5000), st.floats(allow_nan=True), st.text(max_size=6),
                       st.binary(max_size=6), st.booleans(), st.none())
    root = draw(st.sampled_from(["conn", "recorder"]))
    links = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(names))
        positional = [repr(v) for v in draw(st.lists(values, max_size=2))]
        keywords = [f"{k}={v!r}" for k, v in draw(st.dictionaries(
            st.sampled_from(["query", "statement", "data", "pid", "ms", "n", "qq"]),
            values, max_size=2)).items()]
        links.append(f".{name}({', '.join(positional + keywords)})")
    return root + "".join(links)


@FUZZ
@given(st.text())
def test_fuzz_arbitrary_text(text: str) -> None:
    _assert_parses_or_reports(text)


@FUZZ
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join))
def test_fuzz_token_soup(text: str) -> None:
    _assert_parses_or_reports(text)


@FUZZ
@given(_mutated_corpus_line())
def test_fuzz_mutated_corpus_lines(text: str) -> None:
    _assert_parses_or_reports(text)


@FUZZ
@given(_random_chain())
def test_fuzz_random_chains(text: str) -> None:
    _assert_parses_or_reports(text)


@pytest.mark.parametrize(
    "text",
    [
        "-" * 200_000 + "1",
        "(" * 5_000 + "conn" + ")" * 5_000,
        "conn" + ".after(1)" * 20_000 + ".kill()",
        "conn.kill(" + "[" * 3_000 + "]" * 3_000 + ")",
        'conn.onQuery(query="' + "(" * 2_000 + ")" * 2_000 + '").kill()',
        "\ud800conn.kill()",
        'conn.onQuery(query="\udcff").kill()',
    ],
)
def test_pathological_inputs_are_reported_not_raised(text: str) -> None:
    _assert_parses_or_reports(text)
