"""StatementTracker: which query each prepared statement and portal of a connection runs."""

from __future__ import annotations

import pytest

from wirefault.protocols._pg_statements import (
    MAX_ENTRIES,
    StatementTracker,
    split_statements,
)


def test_parse_bind_and_lookups() -> None:
    tracker = StatementTracker()
    tracker.parse("s1", "INSERT INTO t VALUES ($1)")
    tracker.bind("p1", "s1")
    assert tracker.statement_query("s1") == "INSERT INTO t VALUES ($1)"
    assert tracker.portal_query("p1") == "INSERT INTO t VALUES ($1)"
    assert tracker.statement_query("nope") is None
    assert tracker.portal_query("nope") is None


def test_unnamed_statement_and_portal_are_replaced() -> None:
    tracker = StatementTracker()
    tracker.parse("", "SELECT 1")
    tracker.bind("", "")
    tracker.parse("", "SELECT 2")
    # The portal keeps what it was bound to; the next Bind takes the new statement.
    assert tracker.portal_query("") == "SELECT 1"
    tracker.bind("", "")
    assert tracker.portal_query("") == "SELECT 2"
    assert tracker.statement_count == 1 and tracker.portal_count == 1


def test_bind_to_an_unknown_statement_forgets_the_portal() -> None:
    tracker = StatementTracker()
    tracker.parse("s", "SELECT 1")
    tracker.bind("p", "s")
    tracker.bind("p", "never_parsed")
    assert tracker.portal_query("p") is None


def test_close_statement_and_portal() -> None:
    tracker = StatementTracker()
    tracker.parse("s", "SELECT 1")
    tracker.bind("p", "s")
    tracker.close("P", "p")
    assert tracker.portal_query("p") is None
    assert tracker.statement_query("s") == "SELECT 1"
    tracker.close("S", "s")
    assert tracker.statement_query("s") is None
    tracker.close("S", "absent")  # closing what is not there is allowed by the server too
    tracker.close("X", "s")  # an invalid kind changes nothing


def test_simple_query_drops_the_unnamed_ones_only() -> None:
    tracker = StatementTracker()
    tracker.parse("", "SELECT 1")
    tracker.parse("named", "SELECT 2")
    tracker.bind("", "")
    tracker.bind("p", "named")
    tracker.simple_query("SELECT 3")
    assert tracker.statement_query("") is None and tracker.portal_query("") is None
    assert tracker.statement_query("named") == "SELECT 2"
    assert tracker.portal_query("p") == "SELECT 2"


@pytest.mark.parametrize("text", [
    "DISCARD ALL",
    "discard all;",
    "SELECT 1; Discard\n  All ; SELECT 2",
    "/* first */ DISCARD -- a comment\n ALL",
])
def test_discard_all_removes_everything(text: str) -> None:
    tracker = StatementTracker()
    tracker.parse("a", "SELECT 1")
    tracker.bind("pa", "a")
    tracker.simple_query(text)
    assert tracker.statement_count == 0 and tracker.portal_count == 0


@pytest.mark.parametrize("text, gone, kept", [
    ("DEALLOCATE a", {"a"}, {"B", "c"}),
    ("deallocate prepare a", {"a"}, {"B", "c"}),
    ('DEALLOCATE "B"', {"B"}, {"a", "c"}),
    ("DEALLOCATE B", set(), {"a", "B", "c"}),  # unquoted folds to b, which does not exist
    ("DEALLOCATE C", {"c"}, {"a", "B"}),
    ("DEALLOCATE ALL", {"a", "B", "c"}, set()),
    ("DEALLOCATE PREPARE all", {"a", "B", "c"}, set()),
    ("SELECT 1; DEALLOCATE a; DEALLOCATE c", {"a", "c"}, {"B"}),
])
def test_deallocate(text: str, gone: set[str], kept: set[str]) -> None:
    tracker = StatementTracker()
    for name in ("a", "B", "c"):
        tracker.parse(name, f"SELECT '{name}'")
    tracker.bind("p", "a")
    tracker.simple_query(text)
    for name in gone:
        assert tracker.statement_query(name) is None, name
    for name in kept:
        assert tracker.statement_query(name) == f"SELECT '{name}'", name
    # DEALLOCATE leaves portals alone: a portal outlives its statement on the server too.
    assert tracker.portal_query("p") == "SELECT 'a'"


@pytest.mark.parametrize("text", [
    "SELECT 'DISCARD ALL'",
    "SELECT 'it''s; DISCARD ALL'",
    "SELECT E'\\'; DISCARD ALL'",
    'SELECT 1 AS "x; DISCARD ALL"',
    "SELECT $$; DISCARD ALL$$",
    "SELECT $tag$ $$; DISCARD ALL $tag$",
    "SELECT 1 -- ; DISCARD ALL",
    "SELECT 1 /* ; /* nested */ DISCARD ALL */",
    "DISCARD PLANS",
    "DISCARD ALL TABLES",
    "SELECT discard_all()",
    "DEALLOCATE",
])
def test_no_discard_outside_real_statements(text: str) -> None:
    tracker = StatementTracker()
    tracker.parse("a", "SELECT 1")
    tracker.bind("pa", "a")
    tracker.simple_query(text)
    assert tracker.statement_query("a") == "SELECT 1"
    assert tracker.portal_query("pa") == "SELECT 1"


def test_split_statements() -> None:
    assert list(split_statements("SELECT 1; SELECT ';' ; SELECT $a$;$a$")) == [
        "SELECT 1", " SELECT ';' ", " SELECT $a$;$a$"]
    assert list(split_statements("A /* c */ B -- d\nC;")) == ["A   B  \nC"]
    assert list(split_statements(";;")) == ["", ""]
    assert list(split_statements("SELECT 'unterminated; DISCARD ALL")) == [
        "SELECT 'unterminated; DISCARD ALL"]


def test_default_bounds_evict_the_oldest() -> None:
    tracker = StatementTracker()
    for n in range(MAX_ENTRIES + 5):
        tracker.parse(f"s{n}", f"SELECT {n}")
        tracker.bind(f"p{n}", f"s{n}")
    assert tracker.statement_count == MAX_ENTRIES == 10_000
    assert tracker.portal_count == MAX_ENTRIES
    assert tracker.statement_query("s4") is None and tracker.portal_query("p4") is None
    assert tracker.statement_query("s5") == "SELECT 5"
    assert tracker.portal_query(f"p{MAX_ENTRIES + 4}") == f"SELECT {MAX_ENTRIES + 4}"


def test_redefinition_counts_as_newest() -> None:
    tracker = StatementTracker(max_entries=2)
    tracker.parse("a", "SELECT 1")
    tracker.parse("b", "SELECT 2")
    tracker.parse("a", "SELECT 3")  # a is now the newest, so b goes first
    tracker.parse("c", "SELECT 4")
    assert tracker.statement_query("b") is None
    assert tracker.statement_query("a") == "SELECT 3"
    assert tracker.statement_query("c") == "SELECT 4"


def test_character_budget() -> None:
    tracker = StatementTracker(max_chars=100)
    tracker.parse("a", "x" * 60)
    tracker.parse("b", "y" * 30)
    tracker.parse("c", "z" * 30)  # 120 characters: a goes
    assert tracker.statement_query("a") is None
    assert tracker.statement_count == 2
    tracker.parse("huge", "h" * 500)  # larger than the budget alone: kept, the rest go
    assert tracker.statement_count == 1
    assert tracker.statement_query("huge") == "h" * 500
    tracker.close("S", "huge")
    tracker.parse("d", "d" * 90)
    tracker.parse("e", "e" * 10)  # 100 exactly: both stay (closing freed the budget)
    assert tracker.statement_count == 2
