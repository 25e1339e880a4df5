"""PgAgent: startup parameters, cancel key, the `query` derived field and injected errors,
on frames framed by the real framer, and against a real PostgreSQL with the proxy played by
hand (the test forwards what the agent says, frame by frame)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable

import pytest
from pgserver import PostgresServer
from pgwire import startup_message

from wirefault.protocols import PROTOCOL_ERROR, ErrorPlan, Frame, get
from wirefault.protocols._pg_agent import MAX_OUTSTANDING, PgAgent
from wirefault.protocols.postgres import CATALOGUE as C
from wirefault.protocols.postgres import PROTOCOL, PgFramer, PgSession, new_session

SERVER_HELLO = (
    C["AuthenticationOk"].encode()
    + C["ParameterStatus"].encode(name="server_version", value="17.0")
    + C["BackendKeyData"].encode(pid=4242, secret_key=0x01020304)
    + C["ReadyForQuery"].encode(status="I")
)
STARTUP = C["StartupMessage"].encode(
    parameters={"user": "alice", "database": "shop", "application_name": "billing"})


def observe_all(agent: PgAgent, frames: Iterable[Frame]) -> list[bytes | None]:
    """Each frame observed as the proxy would: only while its direction is watched."""
    results = []
    for frame in frames:
        watched = agent.watch_client if frame.from_client else agent.watch_server
        results.append(agent.observe(frame) if watched else None)
    return results


def started(track: bool = False) -> tuple[PgAgent, PgSession]:
    """An agent past a trust startup, and the session that framed it."""
    session = new_session()
    agent = PgAgent()
    if track:
        agent.track_statements = True
    observe_all(agent, session.client.feed(STARTUP))
    observe_all(agent, session.server.feed(SERVER_HELLO))
    return agent, session


def one(framer: PgFramer, data: bytes) -> Frame:
    (frame,) = framer.feed(data)
    return frame


def decoded(data: bytes, from_client: bool) -> list[tuple[str, dict]]:
    """Bytes the agent builds, framed back (typed messages, after the startup)."""
    session = new_session()
    if from_client:
        session.client.feed(STARTUP)
        frames = session.client.feed(data)
    else:
        frames = session.server.feed(data)
    return [(frame.type, frame.fields) for frame in frames]


# --- the protocol's declarations --------------------------------------------------------------


def test_protocol_spec_fields() -> None:
    assert get("postgres") is PROTOCOL
    assert PROTOCOL.new_agent is PgAgent
    assert PROTOCOL.derived_fields == {"Bind": ("query",), "Execute": ("query",),
                                       "Describe": ("query",), "Close": ("query",)}
    assert PROTOCOL.error_parameters == ("code", "message", "severity")
    assert PROTOCOL.cancels_backends is True
    assert get("raw").new_agent is None


# --- startup ----------------------------------------------------------------------------------


def test_initial_flags() -> None:
    agent = PgAgent()
    assert (agent.watch_client, agent.watch_server, agent.track_statements, agent.started) \
        == (True, True, False, False)
    assert agent.parameters() == {}
    assert agent.cancel_request() is None


def test_startup_and_backend_key() -> None:
    session = new_session()
    agent = PgAgent()
    observe_all(agent, session.client.feed(STARTUP))
    assert agent.started
    assert agent.parameters() == {"user": "alice", "database": "shop",
                                  "application_name": "billing"}
    assert not agent.watch_client
    assert agent.watch_server
    assert agent.cancel_request() is None
    results = observe_all(agent, session.server.feed(SERVER_HELLO))
    assert results == [None] * 4
    assert not agent.watch_server
    assert agent.transaction_status == "I"
    cancel = agent.cancel_request()
    assert cancel == C["CancelRequest"].encode(pid=4242, secret_key=0x01020304)
    assert C["CancelRequest"].decode(cancel) == {"pid": 4242, "secret_key": 0x01020304}


def test_long_secret_key_of_protocol_3_2() -> None:
    session = new_session()
    agent = PgAgent()
    key = bytes(range(32))
    observe_all(agent, session.client.feed(STARTUP))
    observe_all(agent, session.server.feed(C["BackendKeyData"].encode(pid=7, secret_key=key)))
    assert C["CancelRequest"].decode(agent.cancel_request()) == {"pid": 7, "secret_key": key}


def test_tracking_keeps_the_client_watched() -> None:
    agent, _ = started(track=True)
    assert agent.watch_client and agent.track_statements
    agent.track_statements = False
    assert not agent.watch_client
    agent.track_statements = True
    assert agent.watch_client


def test_ssl_refused_then_startup() -> None:
    session = new_session()
    agent = PgAgent()
    observe_all(agent, session.client.feed(C["SSLRequest"].encode()))
    assert agent.watch_client and not agent.started
    observe_all(agent, session.server.feed(b"N"))
    observe_all(agent, session.client.feed(STARTUP))
    assert agent.started and agent.parameters()["user"] == "alice"


def test_encrypted_connection_gives_up() -> None:
    session = new_session()
    agent = PgAgent()
    agent.track_statements = True
    observe_all(agent, session.client.feed(C["SSLRequest"].encode()))
    observe_all(agent, session.server.feed(b"S"))
    frames = session.client.feed(b"\x16\x03\x01 tls client hello")
    assert frames[0].type == "Opaque" and frames[0].encrypted
    observe_all(agent, frames)
    assert agent.started and agent.parameters() == {}
    assert not agent.watch_client and not agent.watch_server
    agent.track_statements = True  # cannot read encrypted frames: stays off
    assert not agent.watch_client
    plan = agent.error_plan(frames[0], None, None, None)
    assert plan == ErrorPlan(to_server=b"", to_client=b"", close=True)


def test_cancel_request_connection_never_starts() -> None:
    session = new_session()
    agent = PgAgent()
    observe_all(agent, session.client.feed(C["CancelRequest"].encode(pid=1, secret_key=2)))
    assert not agent.started
    assert agent.parameters() == {}


def test_protocol_error_before_startup_gives_up_on_the_client() -> None:
    session = new_session()
    agent = PgAgent()
    frames = session.client.feed(b"\x00\x00\x00\x08\x00\x09\x00\x00")  # protocol 9.0
    assert frames[0].type == PROTOCOL_ERROR
    observe_all(agent, frames)
    assert agent.started and not agent.watch_client
    assert agent.watch_server


# --- the derived field ------------------------------------------------------------------------


def test_query_of_bind_execute_describe_close() -> None:
    agent, session = started(track=True)
    client = session.client
    frames = client.feed(
        C["Parse"].encode(statement="ins", query="INSERT INTO t VALUES ($1)")
        + C["Bind"].encode(portal="p", statement="ins", parameters=[b"1"])
        + C["Describe"].encode(kind="P", name="p")
        + C["Describe"].encode(kind="S", name="ins")
        + C["Execute"].encode(portal="p")
        + C["Bind"].encode(statement="other")
        + C["Execute"].encode()
        + C["Sync"].encode())
    found = []
    for frame in frames:
        agent.observe(frame)
        found.append((frame.type, agent.derived_field(frame, "query")))
    text = "INSERT INTO t VALUES ($1)"
    assert found == [("Parse", None), ("Bind", text), ("Describe", text), ("Describe", text),
                     ("Execute", text), ("Bind", None), ("Execute", None), ("Sync", None)]
    assert agent.derived_field(frames[4], "portal") is None


def test_close_still_answers_for_itself() -> None:
    agent, session = started(track=True)
    frames = session.client.feed(
        C["Parse"].encode(statement="s", query="SELECT 1")
        + C["Bind"].encode(portal="p", statement="s")
        + C["Close"].encode(kind="P", name="p")
        + C["Close"].encode(kind="S", name="s")
        + C["Describe"].encode(kind="S", name="s")
        + C["Execute"].encode(portal="p"))
    found = []
    for frame in frames:
        agent.observe(frame)
        found.append(agent.derived_field(frame, "query"))
    assert found == [None, "SELECT 1", "SELECT 1", "SELECT 1", None, None]


def test_a_failed_close_keeps_its_statement() -> None:
    agent, session = started(track=True)
    observe_all(agent, session.client.feed(C["Parse"].encode(statement="s", query="SELECT 1")))
    close = one(session.client, C["Close"].encode(kind="S", name="s"))
    agent.observe(close)
    agent.error_plan(close, None, None, None)  # the server never sees this Close
    bind = one(session.client, C["Bind"].encode(statement="s"))
    agent.observe(bind)
    assert agent.derived_field(bind, "query") == "SELECT 1"


def test_simple_query_discard_all() -> None:
    agent, session = started(track=True)
    observe_all(agent, session.client.feed(
        C["Parse"].encode(statement="s", query="SELECT 1")
        + C["Query"].encode(query="SELECT 2; DISCARD ALL")))
    bind = one(session.client, C["Bind"].encode(statement="s"))
    agent.observe(bind)
    assert agent.derived_field(bind, "query") is None


def test_not_tracking_answers_none() -> None:
    agent, session = started()
    frames = session.client.feed(C["Parse"].encode(statement="s", query="SELECT 1")
                                 + C["Bind"].encode(statement="s"))
    observe_all(agent, frames)
    assert agent.derived_field(frames[1], "query") is None
    agent.track_statements = True  # statements from before are unknown
    assert agent.derived_field(frames[1], "query") is None


# --- error plans ------------------------------------------------------------------------------


def test_error_defaults_and_fatal() -> None:
    agent, session = started()
    query = one(session.client, C["Query"].encode(query="SELECT 1"))
    plan = agent.error_plan(query, None, None, "FATAL")
    assert plan.to_server == b"" and plan.close
    assert decoded(plan.to_client, False) == [("ErrorResponse", {
        "severity": "FATAL", "severity_nonlocalized": "FATAL", "code": "XX000",
        "message": "wirefault: injected error XX000"})]
    plan = agent.error_plan(query, "53300", "too many", "PANIC")
    assert plan.to_server == b"" and plan.close
    assert decoded(plan.to_client, False)[0][1]["code"] == "53300"


def test_error_on_terminate_closes() -> None:
    agent, session = started()
    plan = agent.error_plan(one(session.client, C["Terminate"].encode()), "08006", "bye", None)
    assert plan.to_server == b"" and plan.close
    assert decoded(plan.to_client, False)[0][1]["severity"] == "ERROR"


def test_error_before_the_startup_ends_closes() -> None:
    session = new_session()
    agent = PgAgent()
    startup = one(session.client, STARTUP)
    agent.observe(startup)
    plan = agent.error_plan(startup, "28000", "no", "ERROR")
    assert plan.to_server == b"" and plan.close
    assert decoded(plan.to_client, False)[0][1]["message"] == "no"


def test_error_on_a_server_frame_replaces_it() -> None:
    agent, session = started()
    row = one(session.server, C["DataRow"].encode(values=[b"1"]))
    plan = agent.error_plan(row, "22012", "boom", "ERROR")
    assert plan.to_server == b"" and plan.close
    assert decoded(plan.to_client, False) == [("ErrorResponse", {
        "severity": "ERROR", "severity_nonlocalized": "ERROR", "code": "22012",
        "message": "boom"})]


@pytest.mark.parametrize("data, expected", [
    (C["Query"].encode(query="SELECT 1"), ["Query"]),
    (C["Parse"].encode(query="SELECT 1"), ["Describe"]),
    (C["Bind"].encode(), ["Describe"]),
    (C["Describe"].encode(kind="P"), ["Describe"]),
    (C["Execute"].encode(), ["Describe"]),
    (C["Close"].encode(kind="S"), ["Describe"]),
    (C["Sync"].encode(), ["Describe", "Sync"]),
    (C["Flush"].encode(), ["Describe", "Flush"]),
    (C["FunctionCall"].encode(function_oid=1), ["Describe", "Sync"]),
    (C["CopyData"].encode(data=b"1\n"), ["CopyFail"]),
    (C["CopyDone"].encode(), ["CopyFail"]),
    (C["CopyFail"].encode(message="x"), ["CopyFail"]),
])
def test_substitutes(data: bytes, expected: list[str]) -> None:
    agent, session = started()
    frame = one(session.client, data)
    plan = agent.error_plan(frame, "40001", "retry", None)
    assert plan.to_client == b"" and not plan.close
    sent = decoded(plan.to_server, True)
    assert [name for name, _ in sent] == expected
    token = next(iter(agent._outstanding))
    assert token.startswith("wirefault_injected_") and len(token) < 64
    name, fields = sent[0]
    if name == "Describe":
        assert fields == {"kind": "S", "name": token}
    else:
        assert fields == {"query": token} if name == "Query" else {"message": token}
    assert agent.watch_server


def test_rewrite_of_the_substitutes_error_only() -> None:
    agent, session = started()
    execute = one(session.client, C["Execute"].encode())
    plan = agent.error_plan(execute, "40001", "retry", None)
    token = C["Describe"].decode(plan.to_server)["name"]
    real = C["ErrorResponse"].encode(severity="ERROR", code="22012", message="division by zero")
    answer = C["ErrorResponse"].encode(
        severity="ERROR", severity_nonlocalized="ERROR", code="26000",
        message=f'prepared statement "{token}" does not exist', file="prepare.c", line="451")
    frames = session.server.feed(C["ParseComplete"].encode() + real + answer
                                 + C["ReadyForQuery"].encode(status="T"))
    results = observe_all(agent, frames)
    assert results[:2] == [None, None]
    assert decoded(results[2], False) == [("ErrorResponse", {
        "severity": "ERROR", "severity_nonlocalized": "ERROR", "code": "40001",
        "message": "retry"})]
    assert results[3] is None
    assert not agent.watch_server


def test_a_skipped_substitute_is_dropped_by_a_later_answer() -> None:
    agent, session = started()
    sync = one(session.client, C["Sync"].encode())
    first = C["Describe"].decode(decoded_first(agent.error_plan(sync, "1A000", "a", None)))
    second = C["Describe"].decode(decoded_first(agent.error_plan(sync, "2B000", "b", None)))
    assert first["name"] != second["name"]
    answer = one(session.server, C["ErrorResponse"].encode(
        code="26000", message=f'prepared statement "{second["name"]}" does not exist'))
    assert decoded(agent.observe(answer), False)[0][1]["code"] == "2B000"
    assert agent._outstanding == {}
    assert not agent.watch_server


def decoded_first(plan: ErrorPlan) -> bytes:
    """The first message of a plan's substitute."""
    return plan.to_server[:1 + int.from_bytes(plan.to_server[1:5], "big")]


def test_outstanding_is_bounded() -> None:
    agent, session = started()
    execute = one(session.client, C["Execute"].encode())
    for _ in range(MAX_OUTSTANDING + 10):
        agent.error_plan(execute, None, None, None)
    assert len(agent._outstanding) == MAX_OUTSTANDING


# --- against a real server, with the proxy played by hand ------------------------------------


class HandProxy:
    """One connection to the real server through a PgAgent: client bytes are framed and
    observed, each frame forwarded or, when it is the one to fail, replaced by the plan;
    server bytes are framed and observed, then what the client would get is framed again by
    a fresh framer (so the rewritten stream must be well formed)."""

    def __init__(self, pg: PostgresServer, track: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", pg.port), timeout=10)
        self.session = new_session()
        self.client_view = new_session().server
        self.agent = PgAgent()
        self.agent.track_statements = track
        self.seen: list[Frame] = []  # client frames, as the faults would have judged them
        self.send(startup_message())
        self.until_ready()

    def send(self, data: bytes, fail: str | None = None, code: str = "40001",
             message: str = "wirefault test", severity: str | None = None) -> list[Frame]:
        """Forwards `data`; the first frame of type `fail` gets the injected error. Returns
        the frames the client receives at once (the plan's to_client)."""
        out = b""
        at_once = b""
        for frame in self.session.client.feed(data):
            if self.agent.watch_client:
                assert self.agent.observe(frame) is None
            self.seen.append(frame)
            if frame.type == fail:
                plan = self.agent.error_plan(frame, code, message, severity)
                out += plan.to_server
                at_once += plan.to_client
                fail = None
            else:
                out += frame.data
        self.sock.sendall(out)
        return self.client_view.feed(at_once)

    def receive(self, stop: str = "ReadyForQuery", count: int = 1) -> list[Frame]:
        """What the client receives up to the `count`-th frame of type `stop`."""
        got: list[Frame] = []
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            forwarded = b""
            for frame in self.session.server.feed(data):
                replaced = self.agent.observe(frame) if self.agent.watch_server else None
                forwarded += frame.data if replaced is None else replaced
            for frame in self.client_view.feed(forwarded):
                got.append(frame)
                if frame.type == stop:
                    count -= 1
                    if count == 0:
                        return got

    def until_ready(self) -> list[Frame]:
        return self.receive()

    def query(self, text: str, **fail: str) -> list[Frame]:
        self.send(C["Query"].encode(query=text), **fail)
        return self.receive()

    def close(self) -> None:
        self.sock.close()


def types(frames: list[Frame]) -> list[str]:
    return [frame.type for frame in frames]


def injected(frame: Frame, code: str = "40001", message: str = "wirefault test") -> bool:
    return frame.type == "ErrorResponse" and frame.fields == {
        "severity": "ERROR", "severity_nonlocalized": "ERROR", "code": code,
        "message": message}


def status(frames: list[Frame]) -> str:
    assert frames[-1].type == "ReadyForQuery"
    return frames[-1].fields["status"]


@pytest.fixture
def conn(pg: PostgresServer):
    proxy = HandProxy(pg)
    yield proxy
    proxy.close()


@pytest.fixture
def table(conn: HandProxy) -> str:
    name = f"agent_t_{time.monotonic_ns()}"
    conn.query(f"CREATE TABLE {name} (a int)")
    return name


def count(conn: HandProxy, table: str) -> int:
    frames = conn.query(f"SELECT count(*) FROM {table}")
    (row,) = [f for f in frames if f.type == "DataRow"]
    return int(row.fields["values"][0])


def test_real_startup(conn: HandProxy) -> None:
    agent = conn.agent
    assert agent.started and agent.parameters() == {"user": "postgres", "database": "postgres"}
    assert not agent.watch_client and not agent.watch_server
    assert agent.transaction_status == "I"
    assert agent.cancel_request() is not None


def test_real_simple_query_autocommit(conn: HandProxy) -> None:
    frames = conn.query("SELECT 1", fail="Query")
    assert types(frames) == ["ErrorResponse", "ReadyForQuery"]
    assert injected(frames[0]) and status(frames) == "I"
    assert not conn.agent.watch_server
    frames = conn.query("SELECT 41 + 1")
    assert types(frames) == ["RowDescription", "DataRow", "CommandComplete", "ReadyForQuery"]
    assert frames[1].fields["values"] == [b"42"]


def test_real_error_inside_a_transaction_block(conn: HandProxy, table: str) -> None:
    assert status(conn.query("BEGIN")) == "T"
    frames = conn.query(f"INSERT INTO {table} VALUES (1)", fail="Query")
    assert types(frames) == ["ErrorResponse", "ReadyForQuery"]
    assert injected(frames[0]) and status(frames) == "E"
    frames = conn.query(f"SELECT count(*) FROM {table}")  # the block really failed
    assert types(frames) == ["ErrorResponse", "ReadyForQuery"]
    assert frames[0].fields["code"] == "25P02"
    frames = conn.query("COMMIT")
    assert [f.fields for f in frames if f.type == "CommandComplete"] == [{"command": "ROLLBACK"}]
    assert status(frames) == "I"
    assert count(conn, table) == 0


def test_real_extended_protocol_error_on_execute(conn: HandProxy, table: str) -> None:
    conn.send(C["Parse"].encode(query=f"INSERT INTO {table} VALUES ($1)")
              + C["Bind"].encode(parameters=[b"7"])
              + C["Execute"].encode()
              + C["Sync"].encode(), fail="Execute")
    frames = conn.receive()
    assert types(frames) == ["ParseComplete", "BindComplete", "ErrorResponse", "ReadyForQuery"]
    assert injected(frames[2]) and status(frames) == "I"
    assert count(conn, table) == 0
    # Inside a block, the extended protocol's error fails the block, as a real one does.
    conn.query("BEGIN")
    conn.send(C["Parse"].encode(query=f"INSERT INTO {table} VALUES ($1)")
              + C["Bind"].encode(parameters=[b"8"])
              + C["Execute"].encode()
              + C["Sync"].encode(), fail="Execute")
    frames = conn.receive()
    assert types(frames) == ["ParseComplete", "BindComplete", "ErrorResponse", "ReadyForQuery"]
    assert status(frames) == "E"
    assert [f.fields["command"] for f in conn.query("COMMIT")
            if f.type == "CommandComplete"] == ["ROLLBACK"]


def test_real_error_on_sync_rolls_back_the_batch(conn: HandProxy, table: str) -> None:
    conn.send(C["Parse"].encode(query=f"INSERT INTO {table} VALUES (1)")
              + C["Bind"].encode() + C["Execute"].encode() + C["Sync"].encode(), fail="Sync")
    frames = conn.receive()
    assert types(frames) == ["ParseComplete", "BindComplete", "CommandComplete",
                             "ErrorResponse", "ReadyForQuery"]
    assert injected(frames[3]) and status(frames) == "I"
    assert count(conn, table) == 0


def test_real_error_on_flush_then_sync(conn: HandProxy) -> None:
    conn.send(C["Parse"].encode(query="SELECT 1") + C["Flush"].encode(), fail="Flush")
    frames = conn.receive(stop="ErrorResponse")
    assert types(frames) == ["ParseComplete", "ErrorResponse"] and injected(frames[1])
    conn.send(C["Bind"].encode() + C["Execute"].encode() + C["Sync"].encode())
    frames = conn.receive()  # skipped to the Sync, as after a real error
    assert types(frames) == ["ReadyForQuery"]


def test_real_function_call_gets_its_ready_for_query(conn: HandProxy) -> None:
    (row,) = [f for f in conn.query("SELECT 'pg_backend_pid'::regproc::oid")
              if f.type == "DataRow"]
    call = C["FunctionCall"].encode(function_oid=int(row.fields["values"][0]))
    conn.send(call, fail="FunctionCall")
    frames = conn.receive()
    assert types(frames) == ["ErrorResponse", "ReadyForQuery"] and injected(frames[0])
    conn.send(call)
    assert types(conn.receive()) == ["FunctionCallResponse", "ReadyForQuery"]


def test_real_error_during_copy_from_stdin(conn: HandProxy, table: str) -> None:
    conn.send(C["Query"].encode(query=f"COPY {table} FROM STDIN"))
    assert types(conn.receive(stop="CopyInResponse")) == ["CopyInResponse"]
    conn.send(C["CopyData"].encode(data=b"1\n"), fail="CopyData")
    conn.send(C["CopyData"].encode(data=b"2\n") + C["CopyDone"].encode())
    frames = conn.receive()
    assert types(frames) == ["ErrorResponse", "ReadyForQuery"] and injected(frames[0])
    assert count(conn, table) == 0


def test_real_pipeline_keeps_real_errors(conn: HandProxy) -> None:
    conn.send(C["Query"].encode(query="SELECT 1/0")
              + C["Parse"].encode(query="SELECT 1") + C["Bind"].encode()
              + C["Execute"].encode() + C["Sync"].encode(), fail="Execute")
    frames = conn.receive(count=2)
    assert types(frames) == ["ErrorResponse", "ReadyForQuery", "ParseComplete",
                             "BindComplete", "ErrorResponse", "ReadyForQuery"]
    assert frames[0].fields["code"] == "22012"
    assert injected(frames[4])


def test_real_skipped_substitute_leaves_later_errors_alone(conn: HandProxy) -> None:
    # The Parse fails for real, so the server skips the substitute up to the Sync.
    conn.send(C["Parse"].encode(query="SELEC 1") + C["Bind"].encode()
              + C["Execute"].encode() + C["Sync"].encode(), fail="Execute")
    frames = conn.receive()
    assert types(frames) == ["ErrorResponse", "ReadyForQuery"]
    assert frames[0].fields["code"] == "42601"
    frames = conn.query("SELECT 1/0")
    assert frames[0].fields["code"] == "22012"


def test_real_fatal_error(conn: HandProxy) -> None:
    at_once = conn.send(C["Query"].encode(query="SELECT 1"), fail="Query", severity="FATAL")
    assert types(at_once) == ["ErrorResponse"]
    assert at_once[0].fields["severity"] == "FATAL"


def test_real_prepared_statement_query_text(pg: PostgresServer) -> None:
    conn = HandProxy(pg, track=True)
    try:
        assert conn.agent.watch_client
        text = "SELECT $1::int * 2"
        conn.send(C["Parse"].encode(statement="double", query=text) + C["Sync"].encode())
        assert types(conn.receive()) == ["ParseComplete", "ReadyForQuery"]
        for n in range(3):
            conn.send(C["Bind"].encode(portal=f"p{n}", statement="double", parameters=[b"%d" % n])
                      + C["Execute"].encode(portal=f"p{n}") + C["Sync"].encode())
            frames = conn.receive()
            assert [f.fields["values"] for f in frames if f.type == "DataRow"] == \
                [[b"%d" % (2 * n)]]
            execute = conn.seen[-2]
            assert execute.type == "Execute"
            assert conn.agent.derived_field(execute, "query") == text
            assert conn.agent.derived_field(conn.seen[-3], "query") == text  # the Bind
        conn.send(C["Close"].encode(kind="S", name="double") + C["Sync"].encode())
        assert types(conn.receive()) == ["CloseComplete", "ReadyForQuery"]
        conn.send(C["Bind"].encode(statement="double") + C["Sync"].encode())
        assert conn.receive()[0].fields["code"] == "26000"  # the server forgot it too
        assert conn.agent.derived_field(conn.seen[-2], "query") is None
    finally:
        conn.close()


def test_real_cancel_request(conn: HandProxy) -> None:
    cancel = conn.agent.cancel_request()
    assert cancel is not None
    conn.send(C["Query"].encode(query="SELECT pg_sleep(30)"))
    result: list[list[Frame]] = []
    reader = threading.Thread(target=lambda: result.append(conn.receive()))
    started_at = time.monotonic()
    reader.start()
    time.sleep(0.5)  # let the sleep begin
    with socket.create_connection(("127.0.0.1", conn.sock.getpeername()[1]), timeout=10) as s:
        s.sendall(cancel)
        assert s.recv(1) == b""  # the server closes a cancel connection without a word
    reader.join(timeout=20)
    assert not reader.is_alive()
    (frames,) = result
    # The row's description comes before the sleep starts; the row itself never comes.
    assert types(frames) == ["RowDescription", "ErrorResponse", "ReadyForQuery"]
    assert frames[1].fields["code"] == "57014"
    assert time.monotonic() - started_at < 20
