"""Users' regular expressions: Python's syntax and meaning, never a frozen proxy.

The engine choice (proxy/user_regex.py): `re` for patterns whose backtracking is bounded,
RE2 for the rest, refusal (one line, with the column) for what RE2 cannot run. These tests
hold each engine to Python's answers, and show a catastrophic pattern armed on a real proxy
while another connection keeps its latency.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pgserver import PostgresServer
from proxy_helpers import running_proxy

from wirefault import protocols
from wirefault.fifo_client import FaultProxy
from wirefault.proxy.dsl import BytesMatch, CommandError, MessageFilter, Rule, Where, parse
from wirefault.proxy.user_regex import Re2Pattern, compile_for_re2, compile_user_pattern

POSTGRES = protocols.get("postgres")
CORPUS = [line for line in (Path(__file__).parent / "data" / "citus_commands.txt")
          .read_text().splitlines() if line.strip()]
EVIL = "(a+)+$"


def _patterns(command: str) -> list[str | bytes]:
    rule = parse(command, POSTGRES)
    if not isinstance(rule, Rule):
        return []
    found: list[str | bytes] = []
    for step in rule.steps:
        if isinstance(step, MessageFilter | Where):
            found += [pattern.pattern for _, pattern in step.fields]
        elif isinstance(step, BytesMatch):
            found.append(step.pattern.pattern)
    return found


CORPUS_PATTERNS = sorted({p for line in CORPUS for p in _patterns(line)}, key=repr)


def _agree(pattern: str | bytes, text: str | bytes) -> None:
    expected = re.search(pattern, text) is not None
    assert (compile_user_pattern(pattern).search(text) is not None) == expected, (pattern, text)
    assert (compile_for_re2(pattern).search(text) is not None) == expected, (pattern, text)


# --- the engine choice --------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["^COMMIT", "(?i)^copy", "^SELECT 1$", "BEGIN",
                                     "^VACUUM.*other", r"SELECT min\(latest_end_lsn",
                                     b"CREATE INDEX"])
def test_bounded_patterns_stay_on_pythons_engine(pattern: str | bytes) -> None:
    # the hot path keeps `re`'s speed: these are exactly what re.compile returns
    assert compile_user_pattern(pattern) == re.compile(pattern)
    assert isinstance(compile_user_pattern(pattern), re.Pattern)


@pytest.mark.parametrize("pattern", [EVIL, "SELECT.*select_test", "a+b", "(a|aa)+$",
                                     "^x.*y.*z", r"\bfoo", "é+".encode()])
def test_patterns_that_could_backtrack_run_on_re2(pattern: str | bytes) -> None:
    compiled = compile_user_pattern(pattern)
    assert isinstance(compiled, Re2Pattern)
    assert compiled == re.compile(pattern)  # same meaning: rules compare equal as before


@pytest.mark.parametrize(("pattern", "text"), [
    (EVIL, "a" * 100_000 + "b"),  # re: 2**100000 steps
    ("a+b", "a" * 1_000_000),  # re: quadratic, minutes
    ("SELECT.*x.*y", "SELECT " * 100_000),
    (b"(\x00+)+\x01", b"\x00" * 100_000),
])
def test_catastrophic_patterns_answer_at_once(pattern: str | bytes, text: str | bytes) -> None:
    compiled = compile_user_pattern(pattern)
    started = time.perf_counter()
    assert compiled.search(text) is None
    assert time.perf_counter() - started < 1.0  # linear: milliseconds; generous bound


def test_every_corpus_pattern_is_accepted_and_agrees_with_python() -> None:
    assert len(CORPUS_PATTERNS) > 100
    for pattern in CORPUS_PATTERNS:
        compiled = compile_user_pattern(pattern)
        assert compiled == re.compile(pattern)
        sample = re.sub(r"\\(.)", r"\1", pattern if isinstance(pattern, str) else
                        pattern.decode("latin-1")).replace(".*", " x ").strip("^$")
        for text in (sample, sample.lower(), f"-- {sample}\n", "", "SELECT 1\n"):
            data = text if isinstance(pattern, str) else text.encode("latin-1")
            _agree(pattern, data)


@st.composite
def _corpus_case(draw: st.DrawFn) -> tuple[str | bytes, str | bytes]:
    pattern = draw(st.sampled_from(CORPUS_PATTERNS))
    source = pattern if isinstance(pattern, str) else pattern.decode("latin-1")
    pieces = st.sampled_from(sorted(set(source.replace("\\", "")) | {"\n", " ", "a", "é"}))
    text = "".join(draw(st.lists(pieces, max_size=40)))
    if draw(st.booleans()):  # most pieces alone never spell the pattern's literal
        keep = source.replace("\\", "").strip("^$")
        text = draw(st.sampled_from(["", "x", "\n"])) + keep + text
    return pattern, text if isinstance(pattern, str) else text.encode("utf-8")


@settings(max_examples=400, deadline=None)
@given(_corpus_case())
def test_re2_translation_of_corpus_patterns_agrees_with_python(case) -> None:
    _agree(*case)


# --- Python's meaning kept on RE2 ---------------------------------------------------------

SEMANTICS = [
    # Python's `$` also matches before a final newline; RE2's alone would not
    ("^SELECT 1$", ["SELECT 1", "SELECT 1\n", "SELECT 1\n\n", "SELECT 12"]),
    (r"a.*1$", ["a 1", "a 1\n", "a 1\nx"]),
    ("(?m)^b.*c$", ["a\nbxc\nd", "bc", "b\nc"]),
    # \Z is the very end (RE2 spells it \z)
    (r"x.*1\Z", ["x1", "x1\n"]),
    ("(?s)a.*b", ["a\nb"]), ("a.*b", ["a\nb", "axb"]),
    # case folding, Unicode for str: Kelvin sign and long s fold as in Python
    ("(?i)^co.*py", ["COPY", "Copy", "COxPY"]), ("(?i)k.*s", ["\u212a \u017f", "K S"]),
    ("(?i:a)b.*c", ["Abc", "aBc"]), ("(?i)[a-c]x.*", ["Bx", "dx"]),
    # \d, \w, \s are Unicode for str patterns, as in Python
    (r"\d+.*x", ["\u0663x", "3x", "x"]), (r"\w+.*!", ["é!", "_!", " !"]),
    (r"\s+.*x", ["\xa0x", "\x1cx", "\x0bx", "x"]), (r"[\d_]+.*x", ["\u0663x", "_x"]),
    (r"[^\W]+.*x", ["éx", "-x"]), (r"(?a)\w+.*x", ["éx", "ex"]),
    (r"[\Wa]x.*", ["-x", "ax", "bx"]), (r"\S+.*x", ["\xa0x", "yx"]),
    ("[^a]+b", ["\nb", "ab"]),
    # lazy, bounded and alternation
    ("a{2,3}?b.*", ["aab", "ab"]), ("(?:ab|cd)+e", ["abcde", "abce"]),
    ("x(?:y$)?", ["x", "xy\n"]),
]


@pytest.mark.parametrize(("pattern", "texts"), SEMANTICS)
def test_re2_keeps_pythons_meaning(pattern: str, texts: list[str]) -> None:
    for text in texts:
        _agree(pattern, text)


@pytest.mark.parametrize(("pattern", "texts"), [
    (b"(?i)\xe9.*x", [b"\xc9 x", b"\xe9x"]),  # bytes fold ASCII letters only
    (b"(?i)[a-c\xe0]x.*", [b"Bx", b"\xc0x", b"\xe0x"]),
    (rb"\w+.*x", [b"\xe9x", b"ax"]),  # bytes \w is ASCII
    (rb"\s+.*x", [b"\x0bx", b"\xa0x"]),
    (b"a.+b", [b"a\xffb", b"a\nb"]),  # any byte but newline, one byte one character
    ("é+".encode(), ["é".encode(), b"\xc3"]),
])
def test_bytes_patterns_keep_pythons_meaning(pattern: bytes, texts: list[bytes]) -> None:
    for text in texts:
        _agree(pattern, text)


def test_word_boundary_is_ascii_whatever_the_engine() -> None:
    # RE2's \b knows ASCII word characters only; every str pattern with \b runs there, so
    # a pattern means the same whether or not it holds a repeat
    for pattern in (r"\bfoo", r"\bfoo.*bar"):
        assert compile_user_pattern(pattern).search("éfoo bar") is not None
        assert compile_user_pattern(pattern).search("xfoo bar") is None


# --- refusals: one line, the construct, the column ----------------------------------------


@pytest.mark.parametrize(("command", "column", "words"), [
    ('conn.onQuery(query="^SELECT(?=x)").kill()', 28, "lookahead"),
    ('conn.onQuery(query="^SELECT(?!x)").kill()', 28, "lookahead"),
    ('conn.onQuery(query="(?<=a)b").kill()', 21, "lookbehind"),
    ('conn.onQuery(query="(a)\\\\1").kill()', 20, "offset 3"),  # escaped: the literal's column
    (r'conn.onQuery(query=r"(a)\1").kill()', 25, "backreference"),
    ('conn.onQuery(query="(?P<x>a)(?P=x)").kill()', 29, "backreference"),
    ('conn.onQuery(query="(a)?(?(1)b|c)").kill()', 25, "conditional"),
    ('conn.onQuery(query="(?>a+)b").kill()', 21, "atomic"),
    ('conn.onQuery(query="a++b").kill()', 22, "possessive"),
    ('conn.onQuery(query="^SELECT 1$;").kill()', 30, "'$' followed by more"),
    ('conn.onQuery(query="a{1001}").kill()', 22, "above 1000"),
    ('conn.matches(b"x(?=y)").kill()', 17, "lookahead"),
    ('conn.where(user="^(?!postgres)").kill()', 19, "lookahead"),
])
def test_unsupported_constructs_are_refused_at_their_column(command: str, column: int,
                                                            words: str) -> None:
    with pytest.raises(CommandError) as caught:
        parse(command, POSTGRES)
    message = str(caught.value)
    assert message.startswith(f"column {column}: regex "), message
    assert words in message and "linear time" in message and "\n" not in message


def test_pythons_own_errors_keep_their_message() -> None:
    with pytest.raises(CommandError, match=r"column 20: bad regex '\(a': missing \)"):
        parse('conn.onQuery(query="(a").kill()', POSTGRES)


# --- a real proxy: the evil query stalls nobody -------------------------------------------


@pytest.mark.timeout(120)
def test_catastrophic_pattern_does_not_stall_other_connections(pg: PostgresServer) -> None:
    with running_proxy(pg.port) as proxy:
        FaultProxy(proxy.fifo, timeout=30).send(f'conn.onQuery(query="{EVIL}").kill()')
        latencies: list[float] = []
        done = threading.Event()
        failures: list[BaseException] = []

        def healthy() -> None:
            try:
                with pg.connect(proxy.port, autocommit=True) as conn:
                    while not done.is_set():
                        started = time.perf_counter()
                        assert conn.execute("SELECT 1").fetchone() == (1,)
                        latencies.append(time.perf_counter() - started)
            except BaseException as exc:
                failures.append(exc)

        loop = threading.Thread(target=healthy)
        loop.start()
        try:
            deadline = time.monotonic() + 30
            while len(latencies) < 20 and time.monotonic() < deadline and not failures:
                time.sleep(0.01)
            before = len(latencies)
            with pg.connect(proxy.port, autocommit=True) as evil:
                # 40 a's: Python's engine would need about 2**40 steps (days)
                started = time.perf_counter()
                text = "a" * 40 + "b"
                assert evil.execute(f"SELECT '{text}'").fetchone() == (text,)
                assert time.perf_counter() - started < 5.0
                # ending in a's: the same pattern matches, the fault fires at once
                started = time.perf_counter()
                with pytest.raises(psycopg.OperationalError):
                    evil.execute("SELECT 1 -- " + "a" * 40)
                assert time.perf_counter() - started < 5.0
            during = len(latencies)
            while len(latencies) < during + 20 and time.monotonic() < deadline + 30:
                time.sleep(0.01)
        finally:
            done.set()
            loop.join(30)
        assert not failures, failures
        assert before >= 20 and len(latencies) >= during + 20
        assert max(latencies) < 0.5, f"worst SELECT 1 took {max(latencies):.3f}s"
