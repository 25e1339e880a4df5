"""Text that is not valid UTF-8: how filters match it and how dumps show it.

Text fields decode through surrogate escapes, so they keep the exact bytes (and re-encode to
them). Their text form, the one regex filters search and the recorder shows, writes each byte
that is not valid UTF-8 as `\\xNN`: a PostgreSQL client with `client_encoding=LATIN1`
sending `SELECT 'café'` sends the byte 0xe9, whose text is `SELECT 'caf\\xe9'`, matched by
`query=r"caf\\\\xe9"`. Dumps never hold a lone surrogate.
"""

from __future__ import annotations

import psycopg
import pytest
from proxy_helpers import running_proxy
from test_proxy_e2e import LAUNCHES

from wirefault.fifo_client import FaultProxy, parse_dump
from wirefault.protocols import Frame, get
from wirefault.proxy.faults import FORWARD, ConnectionState
from wirefault.proxy.recorder import MAX_RENDERED_CHARS, Recorder, RecorderSlot
from wirefault.proxy.rules import RuleEngine

POSTGRES = get("postgres")
WALLAROO = get("wallaroo")
M = POSTGRES.messages
LATIN1_QUERY = "SELECT 'café'".encode("latin-1")
SHOWN = "SELECT 'caf\\xe9'"
"""The text filters search and dumps show for `LATIN1_QUERY`."""
KEYED_ON_THE_BYTE = 'conn.onQuery(query=r"caf\\\\xe9").kill()'


def query(raw: bytes) -> Frame:
    data = b"Q" + (len(raw) + 5).to_bytes(4, "big") + raw + b"\0"
    return Frame("Query", data, (0, len(data)), True, M["Query"])


def fires(rule: str, frame: Frame, protocol=POSTGRES) -> bool:
    return RuleEngine(protocol, rule).decide(frame, ConnectionState()) is not FORWARD


def dump_of(*frames: Frame, protocol=POSTGRES) -> str:
    recorder = Recorder(messages=protocol.messages)
    for frame in frames:
        recorder.record(RecorderSlot(), frame)
    return recorder.dump()


# -- matching ---------------------------------------------------------------------------------


def test_filters_see_each_undecodable_byte_as_an_escape():
    assert query(LATIN1_QUERY).field_text("query") == SHOWN
    assert query("SELECT 'café'".encode()).field_text("query") == "SELECT 'café'"
    # valid UTF-8 around a stray byte stays as it is
    assert query("é".encode() + b"\xff" + "€".encode()).field_text("query") == "é\\xff€"


def test_a_fault_keyed_on_the_escaped_byte_fires_and_only_on_that_byte():
    assert fires(KEYED_ON_THE_BYTE, query(LATIN1_QUERY))
    assert not fires(KEYED_ON_THE_BYTE, query("SELECT 'café'".encode()))
    assert fires('conn.onQuery(query="café").kill()', query("SELECT 'café'".encode()))
    assert not fires('conn.onQuery(query="café").kill()', query(LATIN1_QUERY))


def test_wallaroo_text_fields_follow_the_same_rule():
    data = WALLAROO.messages["Notify"].encode(stream_id=1, stream_name=b"caf\xe9",
                                              point_of_ref=0)
    (notify,) = WALLAROO.new_session().client.feed(data)
    assert notify.field_text("stream_name") == "caf\\xe9"
    assert fires('conn.onNotify(stream_name=r"caf\\\\xe9$").kill()', notify, WALLAROO)
    assert "\\x" in dump_of(notify, protocol=WALLAROO)


# -- the dump ---------------------------------------------------------------------------------


def test_the_dump_shows_the_same_escapes_and_never_a_lone_surrogate():
    dump = dump_of(query(LATIN1_QUERY))
    dump.encode("utf-8")  # strict: a lone surrogate would raise here
    assert [row.message for row in parse_dump(dump)] == [f"Query(query={SHOWN})"]


def test_keys_and_values_of_maps_and_cut_text_show_escapes_too():
    startup = M["StartupMessage"].encode(parameters={
        "user": "postgres", "application_name": "caf\udce9", "x\udcff": "y"})
    text = "é".encode("latin-1") * (MAX_RENDERED_CHARS + 10)
    frames = [Frame("StartupMessage", startup, (0, len(startup)), True, M["StartupMessage"]),
              query(text)]
    dump = dump_of(*frames)
    dump.encode("utf-8")
    startup_row, query_row = (row.message for row in parse_dump(dump))
    assert startup_row == ("StartupMessage(protocol_version=196608, user=postgres, "
                           "application_name=caf\\xe9, parameters={user: postgres, "
                           "application_name: caf\\xe9, x\\xff: y})")
    assert query_row == ("Query(query=" + "\\xe9" * MAX_RENDERED_CHARS
                         + f"...({len(text)} chars))")


# -- through a real proxy, from a real LATIN1 client --------------------------------------------


@pytest.fixture(scope="module", params=list(LAUNCHES))
def proxy(request, pg):
    kind, extra = LAUNCHES[request.param]
    with running_proxy(pg.port, kind=kind, extra_args=extra) as running:
        yield running


def test_a_latin1_client_is_matched_and_dumped_with_escapes(proxy, pg):
    control = FaultProxy(proxy.fifo, timeout=10)
    control.allow()
    control.reset_traffic()
    with pg.connect(port=proxy.port, autocommit=True, client_encoding="LATIN1") as latin1:
        assert latin1.execute("SELECT 'café'").fetchone() == ("café",)  # the server agrees
        control.send(KEYED_ON_THE_BYTE)
        with pytest.raises(psycopg.OperationalError):
            latin1.execute("SELECT 'café'")
    with pg.connect(port=proxy.port, autocommit=True) as utf8:
        assert utf8.execute("SELECT 'café'").fetchone() == ("café",)  # not that byte
    control.allow()
    messages = [row.message for row in control.dump()]
    assert messages.count(f"Query(query={SHOWN})") == 2, messages
    assert "DataRow(values=[caf\\xe9])" in messages  # the reply, in LATIN1 too
    assert "Query(query=SELECT 'café')" in messages
