"""The PostgreSQL protocol module: catalogue, byte-exact codecs, framing, connection states."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wirefault.protocols import BACKEND, FRONTEND, OPAQUE, PROTOCOL_ERROR, Frame, get
from wirefault.protocols._pg_layout import plain
from wirefault.protocols._pg_messages import WIRE
from wirefault.protocols.postgres import MAX_STARTUP_PACKET, PROTOCOL

M = PROTOCOL.messages
BRIEF_FRONTEND = {
    "Bind", "CancelRequest", "Close", "CopyData", "CopyDone", "CopyFail", "Describe", "Execute",
    "Flush", "FunctionCall", "GSSENCRequest", "GSSResponse", "Parse", "PasswordMessage",
    "Query", "SASLInitialResponse", "SASLResponse", "SSLRequest", "StartupMessage", "Sync",
    "Terminate",
}
BRIEF_BACKEND = {
    "AuthenticationOk", "AuthenticationKerberosV5", "AuthenticationCleartextPassword",
    "AuthenticationMD5Password", "AuthenticationGSS", "AuthenticationGSSContinue",
    "AuthenticationSSPI", "AuthenticationSASL", "AuthenticationSASLContinue",
    "AuthenticationSASLFinal", "BackendKeyData", "BindComplete", "CloseComplete",
    "CommandComplete", "CopyInResponse", "CopyOutResponse", "CopyBothResponse", "DataRow",
    "EmptyQueryResponse", "ErrorResponse", "NoticeResponse", "FunctionCallResponse",
    "NegotiateProtocolVersion", "NoData", "NotificationResponse", "ParameterDescription",
    "ParameterStatus", "ParseComplete", "PortalSuspended", "ReadyForQuery", "RowDescription",
    "SSLResponse", "GSSENCResponse", "CopyData", "CopyDone",
}

# --- strategies: valid field values for every message ------------------------------------

text = st.text(alphabet=st.characters(blacklist_characters="\0", codec="utf-8"), max_size=40)
uint16 = st.integers(0, 0xFFFF)
int16 = st.integers(-0x8000, 0x7FFF)
uint32 = st.integers(0, 0xFFFFFFFF)
int32 = st.integers(-0x80000000, 0x7FFFFFFF)
blob = st.binary(max_size=40)
nullable = st.none() | blob
formats = st.lists(st.integers(0, 1), max_size=4)
column = st.fixed_dictionaries({
    "name": text, "table_oid": uint32, "column_number": int16, "type_oid": uint32,
    "type_size": int16, "type_modifier": int32, "format": st.integers(0, 1),
})
error_fields = st.dictionaries(
    st.sampled_from(["severity", "severity_nonlocalized", "code", "message", "detail", "hint",
                     "position", "where", "routine", "constraint", "X"]),
    text, max_size=6,
)
startup = st.builds(
    lambda params: {"protocol_version": 196608, **{k: params[k] for k in
                    ("user", "database", "application_name", "options") if k in params},
                    "parameters": params},
    st.dictionaries(st.sampled_from(["user", "database", "application_name", "options",
                                     "client_encoding", "DateStyle"]) | text.filter(bool),
                    text, max_size=5),
)
copy_response = st.fixed_dictionaries({"format": st.integers(0, 1), "column_formats": formats})
EMPTY: st.SearchStrategy[dict[str, Any]] = st.just({})


def fields(**strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(strategies)


STRATEGIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "Bind": fields(portal=text, statement=text, parameter_formats=formats,
                   parameters=st.lists(nullable, max_size=4), result_formats=formats),
    "CancelRequest": fields(pid=uint32, secret_key=uint32),
    "Close": fields(kind=st.sampled_from("SP"), name=text),
    "CopyData": fields(data=blob),
    "CopyDone": EMPTY,
    "CopyFail": fields(message=text),
    "Describe": fields(kind=st.sampled_from("SP"), name=text),
    "Execute": fields(portal=text, max_rows=uint32),
    "Flush": EMPTY,
    "FunctionCall": fields(function_oid=uint32, argument_formats=formats,
                           arguments=st.lists(nullable, max_size=3),
                           result_format=st.integers(0, 1)),
    "GSSENCRequest": EMPTY,
    "GSSResponse": fields(data=blob),
    "Parse": fields(statement=text, query=text, parameter_types=st.lists(uint32, max_size=4)),
    "PasswordMessage": fields(password=text),
    "Query": fields(query=text),
    "SASLInitialResponse": fields(mechanism=text, data=nullable),
    "SASLResponse": fields(data=blob),
    "SSLRequest": EMPTY,
    "StartupMessage": startup,
    "Sync": EMPTY,
    "Terminate": EMPTY,
    "AuthenticationOk": EMPTY,
    "AuthenticationKerberosV5": EMPTY,
    "AuthenticationCleartextPassword": EMPTY,
    "AuthenticationMD5Password": fields(salt=st.binary(min_size=4, max_size=4)),
    "AuthenticationGSS": EMPTY,
    "AuthenticationGSSContinue": fields(data=blob),
    "AuthenticationSSPI": EMPTY,
    "AuthenticationSASL": fields(mechanisms=st.lists(text.filter(bool), max_size=3)),
    "AuthenticationSASLContinue": fields(data=blob),
    "AuthenticationSASLFinal": fields(data=blob),
    "BackendKeyData": fields(pid=uint32, secret_key=uint32),
    "BindComplete": EMPTY,
    "CloseComplete": EMPTY,
    "CommandComplete": fields(command=text),
    "CopyInResponse": copy_response,
    "CopyOutResponse": copy_response,
    "CopyBothResponse": copy_response,
    "DataRow": fields(values=st.lists(nullable, max_size=5)),
    "EmptyQueryResponse": EMPTY,
    "ErrorResponse": error_fields,
    "NoticeResponse": error_fields,
    "FunctionCallResponse": fields(result=nullable),
    "NegotiateProtocolVersion": fields(newest_minor_version=uint32,
                                       unrecognized_options=st.lists(text, max_size=3)),
    "NoData": EMPTY,
    "NotificationResponse": fields(pid=uint32, channel=text, payload=text),
    "ParameterDescription": fields(parameter_types=st.lists(uint32, max_size=4)),
    "ParameterStatus": fields(name=text, value=text),
    "ParseComplete": EMPTY,
    "PortalSuspended": EMPTY,
    "ReadyForQuery": fields(status=st.sampled_from("ITE")),
    "RowDescription": fields(columns=st.lists(column, max_size=3)),
    "SSLResponse": fields(answer=st.sampled_from("SN")),
    "GSSENCResponse": fields(answer=st.sampled_from("GN")),
}

# One hand-written example per message, with realistic values.
EXAMPLES: dict[str, dict[str, Any]] = {
    "Bind": {"portal": "", "statement": "s1", "parameter_formats": [1],
             "parameters": [b"\x00\x00\x00\x2a", None], "result_formats": [1]},
    "CancelRequest": {"pid": 4242, "secret_key": 0x12345678},
    "Close": {"kind": "S", "name": "s1"},
    "CopyData": {"data": b"1\tone\n"},
    "CopyDone": {},
    "CopyFail": {"message": "client gave up"},
    "Describe": {"kind": "P", "name": ""},
    "Execute": {"portal": "", "max_rows": 0},
    "Flush": {},
    "FunctionCall": {"function_oid": 1598, "argument_formats": [0], "arguments": [b"x"],
                     "result_format": 0},
    "GSSENCRequest": {},
    "GSSResponse": {"data": b"\x60\x82token"},
    "Parse": {"statement": "s1", "query": "SELECT $1::int", "parameter_types": [23]},
    "PasswordMessage": {"password": "md5a3556571e93b0d20722ba62be61e8c2d"},
    "Query": {"query": "SELECT 1"},
    "SASLInitialResponse": {"mechanism": "SCRAM-SHA-256", "data": b"n,,n=,r=abc"},
    "SASLResponse": {"data": b"c=biws,r=abc,p=xyz"},
    "SSLRequest": {},
    "StartupMessage": {"protocol_version": 196608, "user": "alice", "database": "shop",
                       "application_name": "psql", "options": "-c geqo=off",
                       "parameters": {"user": "alice", "database": "shop",
                                      "application_name": "psql", "options": "-c geqo=off",
                                      "client_encoding": "UTF8"}},
    "Sync": {},
    "Terminate": {},
    "AuthenticationOk": {},
    "AuthenticationKerberosV5": {},
    "AuthenticationCleartextPassword": {},
    "AuthenticationMD5Password": {"salt": b"\x01\x02\x03\x04"},
    "AuthenticationGSS": {},
    "AuthenticationGSSContinue": {"data": b"gss"},
    "AuthenticationSSPI": {},
    "AuthenticationSASL": {"mechanisms": ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]},
    "AuthenticationSASLContinue": {"data": b"r=abc,s=salt,i=4096"},
    "AuthenticationSASLFinal": {"data": b"v=signature"},
    "BackendKeyData": {"pid": 31337, "secret_key": 0xDEADBEEF},
    "BindComplete": {},
    "CloseComplete": {},
    "CommandComplete": {"command": "INSERT 0 1"},
    "CopyInResponse": {"format": 0, "column_formats": [0, 0]},
    "CopyOutResponse": {"format": 1, "column_formats": [1]},
    "CopyBothResponse": {"format": 0, "column_formats": []},
    "DataRow": {"values": [b"42", None, b""]},
    "EmptyQueryResponse": {},
    "ErrorResponse": {"severity": "ERROR", "severity_nonlocalized": "ERROR", "code": "57014",
                      "message": "canceling statement due to user request",
                      "file": "postgres.c", "line": "3301", "routine": "ProcessInterrupts"},
    "NoticeResponse": {"severity": "NOTICE", "code": "00000", "message": "hello",
                       "where": "PL/pgSQL function inline_code_block line 1 at RAISE"},
    "FunctionCallResponse": {"result": None},
    "NegotiateProtocolVersion": {"newest_minor_version": 0,
                                 "unrecognized_options": ["_pq_.compression"]},
    "NoData": {},
    "NotificationResponse": {"pid": 77, "channel": "jobs", "payload": "job 1 done"},
    "ParameterDescription": {"parameter_types": [23, 25]},
    "ParameterStatus": {"name": "server_version", "value": "15.8"},
    "ParseComplete": {},
    "PortalSuspended": {},
    "ReadyForQuery": {"status": "T"},
    "RowDescription": {"columns": [{"name": "id", "table_oid": 16390, "column_number": 1,
                                    "type_oid": 23, "type_size": 4, "type_modifier": -1,
                                    "format": 0}]},
    "SSLResponse": {"answer": "N"},
    "GSSENCResponse": {"answer": "G"},
}


def frame_bytes_of(name: str, data: bytes) -> None:
    """Asserts decode/encode are byte-exact inverses on `data`, and the fast parser agrees
    with construct's own parse of the same layout."""
    spec = M[name]
    decoded = spec.decode(data)
    assert spec.encode(**decoded) == data
    unlisted = set(decoded) - set(spec.fields)
    # only ErrorResponse / NoticeResponse have open-ended keys: unknown one-letter codes
    assert all(len(key) == 1 and name in ("ErrorResponse", "NoticeResponse") for key in unlisted)
    wire = WIRE[name]
    body_start = {"typed": 5, "untyped": 4, "bare": 0}[wire.kind]
    assert plain(wire.layout.parse(data[body_start:])) == decoded


# --- catalogue ------------------------------------------------------------------------------


def test_protocol_is_registered_with_its_limits() -> None:
    assert get("postgres") is PROTOCOL
    assert PROTOCOL.name == "postgres"
    assert PROTOCOL.default_max_frame == 1 << 30
    assert set(PROTOCOL.extra_types) == {PROTOCOL_ERROR, OPAQUE, "SSLResponse", "GSSENCResponse"}


def test_catalogue_has_every_message_in_the_right_directions() -> None:
    frontend = {name for name, spec in M.items() if FRONTEND in spec.directions}
    backend = {name for name, spec in M.items() if BACKEND in spec.directions}
    assert frontend == BRIEF_FRONTEND
    assert backend == BRIEF_BACKEND
    assert set(M) == BRIEF_FRONTEND | BRIEF_BACKEND
    assert all(spec.name == name for name, spec in M.items())


def test_every_catalogue_entry_has_an_example_and_a_strategy() -> None:
    assert set(EXAMPLES) == set(M)
    assert set(STRATEGIES) == set(M)


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_round_trips_byte_exact(name: str) -> None:
    spec = M[name]
    data = spec.encode(**EXAMPLES[name])
    assert spec.decode(data) == EXAMPLES[name]
    frame_bytes_of(name, data)
    assert list(EXAMPLES[name]) == [f for f in spec.fields if f in EXAMPLES[name]]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_valid_message_round_trips(name: str, data: st.DataObject) -> None:
    values = data.draw(STRATEGIES[name])
    spec = M[name]
    encoded = spec.encode(**values)
    assert spec.decode(encoded) == values
    frame_bytes_of(name, encoded)


def test_known_wire_bytes() -> None:
    assert M["Query"].encode(query="SELECT 1") == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert M["ReadyForQuery"].decode(b"Z\x00\x00\x00\x05I") == {"status": "I"}
    assert M["SSLRequest"].encode() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert M["AuthenticationOk"].encode() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert M["DataRow"].decode(b"D\x00\x00\x00\x0e\x00\x02\xff\xff\xff\xff\x00\x00\x00\x00") \
        == {"values": [None, b""]}


def test_text_that_is_not_utf8_still_decodes_and_round_trips() -> None:
    raw = b"Q\x00\x00\x00\x09ab\xff\xfe\x00"
    fields = M["Query"].decode(raw)
    assert isinstance(fields["query"], str) and fields["query"].startswith("ab")
    assert M["Query"].encode(**fields) == raw


def test_error_response_names_every_field_and_keeps_unknown_codes() -> None:
    body = b"".join(code + value + b"\0" for code, value in [
        (b"S", b"ERROR"), (b"V", b"ERROR"), (b"C", b"23505"), (b"M", b"dup"), (b"D", b"Key"),
        (b"H", b"h"), (b"P", b"7"), (b"p", b"3"), (b"q", b"iq"), (b"W", b"w"), (b"s", b"public"),
        (b"t", b"users"), (b"c", b"id"), (b"d", b"int4"), (b"n", b"users_pkey"),
        (b"F", b"nbtinsert.c"), (b"L", b"664"), (b"R", b"_bt_check_unique"), (b"Z", b"new"),
    ]) + b"\0"
    data = b"E" + struct.pack(">I", len(body) + 4) + body
    fields = M["ErrorResponse"].decode(data)
    assert fields == {
        "severity": "ERROR", "severity_nonlocalized": "ERROR", "code": "23505",
        "message": "dup", "detail": "Key", "hint": "h", "position": "7",
        "internal_position": "3", "internal_query": "iq", "where": "w", "schema": "public",
        "table": "users", "column": "id", "datatype": "int4", "constraint": "users_pkey",
        "file": "nbtinsert.c", "line": "664", "routine": "_bt_check_unique", "Z": "new",
    }
    assert M["ErrorResponse"].encode(**fields) == data


def test_startup_message_fields_are_filterable_and_encode_accepts_them() -> None:
    data = M["StartupMessage"].encode(user="bob", database="db",
                                      parameters={"client_encoding": "UTF8"})
    fields = M["StartupMessage"].decode(data)
    assert fields["user"] == "bob" and fields["database"] == "db"
    assert "application_name" not in fields
    assert fields["parameters"] == {"user": "bob", "database": "db", "client_encoding": "UTF8"}
    assert M["StartupMessage"].encode(**fields) == data


def test_encode_refuses_a_nul_in_text() -> None:
    with pytest.raises(Exception, match="NUL"):
        M["Query"].encode(query="a\0b")


# --- framing valid streams ------------------------------------------------------------------

CLIENT_TYPED = sorted(
    name for name, spec in M.items()
    if FRONTEND in spec.directions and WIRE[name].kind == "typed"
    and name not in {"GSSResponse", "SASLInitialResponse", "SASLResponse"}  # state-dependent
)
SERVER_TYPED = sorted(
    name for name, spec in M.items() if BACKEND in spec.directions and WIRE[name].kind == "typed"
)


def message(names: list[str]) -> st.SearchStrategy[tuple[str, bytes]]:
    return st.sampled_from(names).flatmap(
        lambda name: STRATEGIES[name].map(lambda values: (name, M[name].encode(**values))))


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed_reads(framer: Any, reads: list[bytes]) -> list[Frame]:
    """Feeds the reads, checking each frame's span against its read."""
    frames: list[Frame] = []
    for data in reads:
        got = framer.feed(data)
        last_end = 0
        for frame in got:
            start, end = frame.span
            assert last_end <= start <= end <= len(data)
            assert frame.data.endswith(data[start:end])
            if start > 0 or frame is not got[0]:
                assert frame.data == data[start:end]
            last_end = end
        frames += got
    return frames


@settings(max_examples=60, deadline=None)
@given(
    startup=message(["StartupMessage"]),
    refused_tls_first=st.booleans(),
    messages=st.lists(message(CLIENT_TYPED), max_size=12),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_client_stream_frames_to_the_original_messages(
    startup: tuple[str, bytes], refused_tls_first: bool,
    messages: list[tuple[str, bytes]], cuts: list[int],
) -> None:
    session = PROTOCOL.new_session()
    frames: list[Frame] = []
    if refused_tls_first:
        frames += feed_reads(session.client, [M["SSLRequest"].encode()])
        assert [f.type for f in session.server.feed(b"N")] == ["SSLResponse"]
    stream = [startup, *messages]
    frames += feed_reads(session.client, cut(b"".join(data for _, data in stream), cuts))
    expected = ([("SSLRequest", M["SSLRequest"].encode())] if refused_tls_first else []) + stream
    assert [(f.type, f.data) for f in frames] == expected
    assert session.client.buffered == 0
    assert all(f.spec is M[f.type] and f.from_client for f in frames)


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(message(SERVER_TYPED), max_size=15),
       cuts=st.lists(st.integers(0, 10_000), max_size=15))
def test_server_stream_frames_to_the_original_messages(
    messages: list[tuple[str, bytes]], cuts: list[int]
) -> None:
    session = PROTOCOL.new_session()
    frames = feed_reads(session.server, cut(b"".join(data for _, data in messages), cuts))
    assert [(f.type, f.data) for f in frames] == messages
    assert session.server.buffered == 0
    assert not any(f.from_client for f in frames)


def test_a_frame_split_byte_by_byte_is_found_once_with_its_completing_span() -> None:
    session = PROTOCOL.new_session()
    data = M["CommandComplete"].encode(command="SELECT 1") + M["ReadyForQuery"].encode()
    frames = []
    for index in range(len(data)):
        got = session.server.feed(data[index:index + 1])
        assert session.server.buffered <= len(data)
        frames += [(f.type, f.span, index) for f in got]
    assert frames == [("CommandComplete", (0, 1), 13), ("ReadyForQuery", (0, 1), 19)]


def test_several_frames_in_one_read_have_consecutive_spans() -> None:
    session = PROTOCOL.new_session()
    data = (M["ParseComplete"].encode() + M["BindComplete"].encode()
            + M["DataRow"].encode(values=[b"1"]))
    frames = session.server.feed(data[:-2])
    frames += session.server.feed(data[-2:])
    assert [(f.type, f.span) for f in frames] == [
        ("ParseComplete", (0, 5)), ("BindComplete", (5, 10)), ("DataRow", (0, 2))]
    assert frames[2].fields == {"values": [b"1"]}


def test_partial_frame_buffers_only_what_it_received() -> None:
    session = PROTOCOL.new_session()
    data = M["DataRow"].encode(values=[b"x" * 1000])
    assert session.server.feed(data[:3]) == [] and session.server.buffered == 3
    assert session.server.feed(data[3:500]) == [] and session.server.buffered == 500
    frames = session.server.feed(data[500:] + b"Z")
    assert [f.type for f in frames] == ["DataRow"] and session.server.buffered == 1


# --- connection states -----------------------------------------------------------------------


def types(frames: list[Frame]) -> list[str]:
    return [f.type for f in frames]


def test_password_family_follows_the_last_authentication_request() -> None:
    session = PROTOCOL.new_session()
    client, server = session.client, session.server
    client.feed(M["StartupMessage"].encode(user="u"))
    server.feed(M["AuthenticationSASL"].encode(mechanisms=["SCRAM-SHA-256"]))
    assert types(client.feed(M["SASLInitialResponse"].encode(
        mechanism="SCRAM-SHA-256", data=b"n,,n=,r=x"))) == ["SASLInitialResponse"]
    server.feed(M["AuthenticationSASLContinue"].encode(data=b"r=xy,s=c2FsdA==,i=4096"))
    sasl = client.feed(M["SASLResponse"].encode(data=b"c=biws,r=xy,p=proof"))
    assert types(sasl) == ["SASLResponse"] and sasl[0].fields["data"] == b"c=biws,r=xy,p=proof"
    assert types(server.feed(M["AuthenticationSASLFinal"].encode(data=b"v=ok")
                             + M["AuthenticationOk"].encode())) == [
        "AuthenticationSASLFinal", "AuthenticationOk"]

    for request, answer in [("AuthenticationGSS", "GSSResponse"),
                            ("AuthenticationSSPI", "GSSResponse"),
                            ("AuthenticationMD5Password", "PasswordMessage"),
                            ("AuthenticationCleartextPassword", "PasswordMessage")]:
        session = PROTOCOL.new_session()
        session.client.feed(M["StartupMessage"].encode(user="u"))
        session.server.feed(M[request].encode(**EXAMPLES[request]))
        reply = session.client.feed(M[answer].encode(**EXAMPLES[answer]))
        assert types(reply) == [answer] and reply[0].fields == EXAMPLES[answer]


def test_p_without_authentication_state_is_a_password_message() -> None:
    session = PROTOCOL.new_session()
    session.client.feed(M["StartupMessage"].encode(user="u"))
    assert types(session.client.feed(M["PasswordMessage"].encode(password="pw"))) == [
        "PasswordMessage"]


@pytest.mark.parametrize(("request_name", "accept"), [("SSLRequest", b"S"),
                                                     ("GSSENCRequest", b"G")])
def test_accepted_encryption_makes_both_directions_opaque(request_name: str,
                                                          accept: bytes) -> None:
    session = PROTOCOL.new_session()
    assert types(session.client.feed(M[request_name].encode())) == [request_name]
    answer = session.server.feed(accept + b"\x16\x03\x03")
    assert types(answer) == [M[request_name].name.replace("Request", "Response"), OPAQUE]
    assert answer[0].fields == {"answer": accept.decode()} and answer[1].encrypted
    for framer in (session.client, session.server):
        for chunk in (b"\x16\x03\x01\x02\x00Q\x00\x00\x00\x00", b"\xff" * 70_000):
            frames = framer.feed(chunk)
            assert types(frames) == [OPAQUE] and frames[0].encrypted
            assert frames[0].data == chunk and frames[0].span == (0, len(chunk))
            assert framer.buffered == 0


def test_refused_ssl_then_gssenc_then_startup() -> None:
    session = PROTOCOL.new_session()
    assert types(session.client.feed(M["GSSENCRequest"].encode())) == ["GSSENCRequest"]
    assert session.server.feed(b"N")[0].fields == {"answer": "N"}
    assert types(session.client.feed(M["SSLRequest"].encode())) == ["SSLRequest"]
    assert types(session.server.feed(b"N")) == ["SSLResponse"]
    frames = session.client.feed(M["StartupMessage"].encode(user="u") + M["Query"].encode(
        query="SELECT 1"))
    assert types(frames) == ["StartupMessage", "Query"]
    assert types(session.server.feed(M["AuthenticationOk"].encode())) == ["AuthenticationOk"]


def test_error_instead_of_ssl_answer_is_framed_as_error_response() -> None:
    session = PROTOCOL.new_session()
    session.client.feed(M["SSLRequest"].encode())
    error = M["ErrorResponse"].encode(severity="FATAL", code="53300", message="too many")
    frames = session.server.feed(error)
    assert types(frames) == ["ErrorResponse"] and frames[0].fields["code"] == "53300"


def test_cancel_request_ends_the_connection() -> None:
    session = PROTOCOL.new_session()
    frames = session.client.feed(M["CancelRequest"].encode(pid=12, secret_key=34))
    assert types(frames) == ["CancelRequest"]
    assert frames[0].fields == {"pid": 12, "secret_key": 34}
    after = session.client.feed(b"Q\x00\x00\x00\x05\x00")
    assert types(after) == [PROTOCOL_ERROR] and "CancelRequest" in (after[0].error or "")
    assert types(session.server.feed(b"x")) == [PROTOCOL_ERROR]


def test_client_speaking_before_the_ssl_answer_is_an_error() -> None:
    session = PROTOCOL.new_session()
    session.client.feed(M["SSLRequest"].encode())
    frames = session.client.feed(M["StartupMessage"].encode(user="u"))
    assert types(frames) == [PROTOCOL_ERROR] and "SSLRequest" in (frames[0].error or "")


def test_unexpected_ssl_answer_is_an_error() -> None:
    session = PROTOCOL.new_session()
    session.client.feed(M["SSLRequest"].encode())
    frames = session.server.feed(b"G")
    assert types(frames) == [PROTOCOL_ERROR]
    assert types(session.server.feed(b"more")) == [OPAQUE]


def test_direct_tls_client_hello_is_passed_on_encrypted() -> None:
    session = PROTOCOL.new_session()
    hello = b"\x16\x03\x01\x00\xf1\x01" + b"\x00" * 20
    frames = session.client.feed(hello)
    assert types(frames) == [OPAQUE] and frames[0].encrypted and frames[0].data == hello
    assert session.server.feed(b"\x16\x03\x03")[0].encrypted


@settings(max_examples=100, deadline=None)
@given(records=st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=200)),
                        max_size=8),
       cuts=st.lists(st.integers(0, 2000), max_size=10),
       max_frame=st.sampled_from([None, -1, 0, 1, 100, 1 << 64]))
def test_direct_tls_passes_both_directions_on_encrypted_whatever_the_reads(
    records: list[tuple[bool, bytes]], cuts: list[int], max_frame: int | None
) -> None:
    # a handshake record where the startup packet would be: from then on, every byte of both
    # directions is passed on once, as encrypted Opaque frames, however TCP cut the reads,
    # with no limit applying (nothing is framed)
    hello = b"\x16\x03\x01\x00\xf1\x01" + bytes(range(60))
    session = PROTOCOL.new_session(max_frame=max_frame)
    frames = feed_reads(session.client, cut(hello, cuts))
    for from_client, data in records:
        frames += feed_reads(session.client if from_client else session.server, cut(data, cuts))
    assert all(f.type == OPAQUE and f.encrypted for f in frames)
    for from_client in (True, False):
        sent = (hello if from_client else b"") + b"".join(
            data for side, data in records if side == from_client)
        assert b"".join(f.data for f in frames if f.from_client == from_client) == sent
    assert session.client.buffered == session.server.buffered == 0


# --- bad input ---------------------------------------------------------------------------------


def started(max_frame: int | None = None) -> Any:
    session = PROTOCOL.new_session(max_frame=max_frame)
    session.client.feed(M["StartupMessage"].encode(user="u"))
    return session


def test_unknown_type_byte_is_one_protocol_error_then_passthrough() -> None:
    session = started()
    good = M["Query"].encode(query="SELECT 1")
    frames = session.client.feed(good + b"\x07\x00\x00\x00\x04rest")
    assert types(frames) == ["Query", PROTOCOL_ERROR]
    assert frames[1].data == b"\x07\x00\x00\x00\x04rest"
    assert frames[1].span == (len(good), len(good) + 9)
    assert "0x07" in (frames[1].error or "") and frames[1].fields == {"error": frames[1].error}
    passed = session.client.feed(good)
    assert types(passed) == [OPAQUE] and not passed[0].encrypted and passed[0].data == good


def test_server_only_type_byte_from_the_client_is_unknown() -> None:
    session = started()
    frames = session.client.feed(M["ReadyForQuery"].encode())
    assert types(frames) == [PROTOCOL_ERROR]


@pytest.mark.parametrize("length", [0, 3, 0x80000000, 0xFFFFFFFF])
def test_impossible_length_is_an_error_at_once(length: int) -> None:
    session = started()
    frames = session.server.feed(b"D" + struct.pack(">I", length))
    assert types(frames) == [PROTOCOL_ERROR] and session.server.buffered == 0


def test_length_over_a_configured_limit_is_an_error_before_buffering() -> None:
    session = started(max_frame=100)
    fits = M["CopyData"].encode(data=b"x" * 95)
    assert len(fits) == 100
    assert types(session.client.feed(fits)) == ["CopyData"]
    too_big = M["CopyData"].encode(data=b"x" * 96)
    frames = session.client.feed(too_big[:7])
    assert types(frames) == [PROTOCOL_ERROR] and "limit 100" in (frames[0].error or "")
    assert session.client.buffered == 0


def test_complete_frame_over_the_limit_in_one_read_is_an_error() -> None:
    session = started(max_frame=100)
    frames = session.client.feed(M["Sync"].encode() + M["CopyData"].encode(data=b"x" * 96))
    assert types(frames) == ["Sync", PROTOCOL_ERROR]


def test_limit_also_applies_to_a_header_completed_across_reads() -> None:
    session = started(max_frame=100)
    assert session.server.feed(b"d\x00") == [] and session.server.buffered == 2
    frames = session.server.feed(b"\x01\x00\x00abc")
    assert types(frames) == [PROTOCOL_ERROR]
    assert frames[0].data == b"d\x00\x01\x00\x00abc" and frames[0].span == (0, 6)
    assert session.server.buffered == 0


def test_oversized_or_short_startup_packet_is_an_error() -> None:
    for header in (struct.pack(">I", MAX_STARTUP_PACKET + 1), struct.pack(">I", 7)):
        session = PROTOCOL.new_session()
        frames = session.client.feed(header + b"\x00\x03\x00\x00")
        assert types(frames) == [PROTOCOL_ERROR] and session.client.buffered == 0


def test_unknown_startup_code_and_authentication_code_are_errors() -> None:
    session = PROTOCOL.new_session()
    assert types(session.client.feed(b"\x00\x00\x00\x08\x00\x02\x00\x00")) == [PROTOCOL_ERROR]
    session = started()
    frames = session.server.feed(b"R\x00\x00\x00\x08\x00\x00\x00\x63")
    assert types(frames) == [PROTOCOL_ERROR] and "99" in (frames[0].error or "")


def test_body_its_type_cannot_decode_is_found_at_decode_time() -> None:
    session = started()
    frames = session.client.feed(b"Q\x00\x00\x00\x07abc" + M["Sync"].encode())
    assert types(frames) == ["Query", "Sync"]
    assert frames[0].fields == {} and "Query" in (frames[0].error or "")
    short = session.server.feed(b"Z\x00\x00\x00\x06IT")
    assert types(short) == ["ReadyForQuery"] and short[0].fields == {} and short[0].error


def accounted(frames: list[Frame], framer: Any) -> int:
    return sum(len(f.data) for f in frames) + framer.buffered


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=8),
       from_client=st.booleans(), after_startup=st.booleans(),
       max_frame=st.sampled_from([None, 64, 1000]))
def test_random_bytes_never_raise_and_every_byte_is_accounted_once(
    garbage: bytes, cuts: list[int], from_client: bool, after_startup: bool,
    max_frame: int | None,
) -> None:
    session = started(max_frame) if after_startup else PROTOCOL.new_session(max_frame=max_frame)
    framer = session.client if from_client else session.server
    limit = max_frame or PROTOCOL.default_max_frame
    frames: list[Frame] = []
    for data in cut(garbage, cuts):
        got = framer.feed(data)
        for frame in got:
            assert 0 <= frame.span[0] <= frame.span[1] <= len(data)
            assert isinstance(frame.fields, dict)
            assert frame.type in M or frame.type in PROTOCOL.extra_types
        frames += got
        assert framer.buffered <= min(limit, len(garbage))
    assert b"".join(f.data for f in frames) + bytes(framer._pending) == garbage
    errors = [i for i, f in enumerate(frames) if f.type == PROTOCOL_ERROR]
    assert len(errors) <= 1
    if errors:
        assert all(f.type == OPAQUE for f in frames[errors[0] + 1:])


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(message(SERVER_TYPED), max_size=6),
       junk=st.sampled_from([b"\x00", b"\xff\x00\x00\x00\x05", b"Z\x00\x00\x00\x02"]),
       tail=st.binary(max_size=50), cuts=st.lists(st.integers(0, 1000), max_size=6))
def test_valid_frames_then_junk_give_the_frames_then_one_error(
    messages: list[tuple[str, bytes]], junk: bytes, tail: bytes, cuts: list[int]
) -> None:
    session = started()
    stream = b"".join(data for _, data in messages) + junk + tail
    frames = feed_reads(session.server, cut(stream, cuts))
    assert [(f.type, f.data) for f in frames[:len(messages)]] == messages
    rest = frames[len(messages):]
    assert rest[0].type == PROTOCOL_ERROR and rest[0].data == (junk + tail)[:len(rest[0].data)]
    assert all(f.type == OPAQUE for f in rest[1:])
    assert b"".join(f.data for f in rest) == junk + tail


# --- whole conversations: both directions, in causal order ------------------------------------

AUTH_FLOWS: dict[str, list[tuple[bool, str]]] = {
    "trust": [],
    "cleartext": [(False, "AuthenticationCleartextPassword"), (True, "PasswordMessage")],
    "md5": [(False, "AuthenticationMD5Password"), (True, "PasswordMessage")],
    "sasl": [(False, "AuthenticationSASL"), (True, "SASLInitialResponse"),
             (False, "AuthenticationSASLContinue"), (True, "SASLResponse"),
             (False, "AuthenticationSASLFinal")],
    "gss": [(False, "AuthenticationGSS"), (True, "GSSResponse"),
            (False, "AuthenticationGSSContinue"), (True, "GSSResponse")],
    "sspi": [(False, "AuthenticationSSPI"), (True, "GSSResponse")],
}


def drawn(draw: st.DrawFn, from_client: bool, name: str) -> tuple[bool, str, bytes]:
    return from_client, name, M[name].encode(**draw(STRATEGIES[name]))


@st.composite
def conversation(draw: st.DrawFn) -> list[tuple[bool, str, bytes]]:
    """A plausible connection: refused encryption requests, startup, an authentication
    flow, then rounds of client messages and server replies."""
    messages: list[tuple[bool, str, bytes]] = []
    for request in draw(st.lists(st.sampled_from(["SSLRequest", "GSSENCRequest"]), max_size=2)):
        messages.append((True, request, M[request].encode()))
        answer = request.replace("Request", "Response")
        messages.append((False, answer, M[answer].encode(answer="N")))
    messages.append(drawn(draw, True, "StartupMessage"))
    for from_client, name in AUTH_FLOWS[draw(st.sampled_from(sorted(AUTH_FLOWS)))]:
        messages.append(drawn(draw, from_client, name))
    for name in ("AuthenticationOk", "ParameterStatus", "BackendKeyData", "ReadyForQuery"):
        messages.append(drawn(draw, False, name))
    for _ in range(draw(st.integers(0, 3))):
        for name in draw(st.lists(st.sampled_from(CLIENT_TYPED), min_size=1, max_size=4)):
            messages.append(drawn(draw, True, name))
        for name in draw(st.lists(st.sampled_from(SERVER_TYPED), max_size=4)):
            if not name.startswith("Authentication"):  # 'R' would change how 'p' is read
                messages.append(drawn(draw, False, name))
    return messages


def frame_conversation(session: Any, messages: list[tuple[bool, str, bytes]],
                       cuts: list[int]) -> list[Frame]:
    """Feeds a conversation to a session's framers, cut into reads, in causal order:
    consecutive messages of one direction may share reads; a reply never shares a read
    with what it answers."""
    runs: list[tuple[bool, bytes]] = []
    for from_client, _, data in messages:
        if runs and runs[-1][0] == from_client:
            runs[-1] = (from_client, runs[-1][1] + data)
        else:
            runs.append((from_client, data))
    frames: list[Frame] = []
    for from_client, data in runs:
        framer = session.client if from_client else session.server
        frames += feed_reads(framer, cut(data, cuts))
    return frames


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=conversation(), cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_conversation_frames_to_the_original_messages_in_both_directions(
    messages: list[tuple[bool, str, bytes]], cuts: list[int]
) -> None:
    session = PROTOCOL.new_session()
    frames = frame_conversation(session, messages, cuts)
    assert [(f.from_client, f.type, f.data) for f in frames] == messages
    assert session.client.buffered == session.server.buffered == 0


EDGE_LIMITS = [-(1 << 70), -(1 << 64), -(1 << 63) - 1, -(1 << 63), -(1 << 31), -1, 0, 1, 4, 5,
               8, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 1 << 64, 1 << 70]
any_limit = st.one_of(
    st.integers(0, 300),  # around the sizes of the messages drawn here
    st.integers(-(1 << 70), 1 << 70),  # any int at all
    st.sampled_from(EDGE_LIMITS),  # where int64, uint32 and uint64 end
)


def frame_limit(name: str, max_frame: int) -> float:
    """The largest size a framer built with `max_frame` frames a message of this name at."""
    if name in ("SSLResponse", "GSSENCResponse"):  # one byte, never a header to check
        return float("inf")
    if WIRE[name].kind != "typed":  # the client's first message: PostgreSQL's own cap too
        return min(max_frame, MAX_STARTUP_PACKET)
    return max_frame


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=conversation(), cuts=st.lists(st.integers(0, 10_000), max_size=20),
       max_frame=any_limit)
def test_a_framer_built_with_any_limit_never_raises(
    messages: list[tuple[bool, str, bytes]], cuts: list[int], max_frame: int
) -> None:
    # --max-frame is the user's to choose (the CLI refuses negative values, the framer must
    # not depend on it): messages within the limit are framed as sent, the first one over it
    # is a ProtocolError, and every byte is passed on once, in each direction.
    session = PROTOCOL.new_session(max_frame=max_frame)
    frames = frame_conversation(session, messages, cuts)
    over = next((i for i, (_, name, data) in enumerate(messages)
                 if len(data) > frame_limit(name, max_frame)), len(messages))
    assert [(f.from_client, f.type, f.data) for f in frames[:over]] == messages[:over]
    if over < len(messages):
        error = frames[over]
        assert (error.type, error.from_client) == (PROTOCOL_ERROR, messages[over][0])
        assert "over the limit" in (error.error or "")
    for from_client, framer in ((True, session.client), (False, session.server)):
        sent = b"".join(data for side, _, data in messages if side == from_client)
        passed = b"".join(f.data for f in frames if f.from_client == from_client)
        assert passed + bytes(framer._pending) == sent
