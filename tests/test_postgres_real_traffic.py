"""The PostgreSQL framer on real traffic: psycopg talking to a real server through a relay
that records both directions' bytes exactly as read."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import pytest
from pgserver import PostgresServer

from wirefault.protocols import OPAQUE, PROTOCOL_ERROR, Frame
from wirefault.protocols.postgres import PROTOCOL


@dataclass
class Recording:
    """One relayed connection: its reads, in the order the relay made them."""

    reads: list[tuple[bool, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, from_client: bool, data: bytes) -> None:
        with self.lock:
            self.reads.append((from_client, data))


class RecordingRelay:
    """Forwards each accepted connection to the server, recording every read. A read is
    recorded before it is forwarded, so the recording keeps cause before effect (the server's
    answer to SSLRequest before the client's StartupMessage)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.recordings: list[Recording] = []
        self.threads: list[threading.Thread] = []
        self._start(self._accept_loop)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self.threads.append(thread)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            recording = Recording()
            self.recordings.append(recording)
            self._start(self._pump, client, server, True, recording)
            self._start(self._pump, server, client, False, recording)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, from_client: bool,
              recording: Recording) -> None:
        try:
            while data := source.recv(65536):
                recording.add(from_client, data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the blocked accept() (Linux)
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for thread in self.threads:
            thread.join(timeout=10)


@pytest.fixture
def relay(pg: PostgresServer) -> Iterator[RecordingRelay]:
    relay = RecordingRelay(pg.port)
    yield relay
    relay.close()


def connect(pg: PostgresServer, relay: RecordingRelay, **kwargs: object) -> psycopg.Connection:
    return psycopg.connect(pg.dsn(port=relay.port, sslmode="prefer"), autocommit=True,
                           **kwargs)


def frame_recording(recording: Recording) -> list[Frame]:
    """Frames a connection's reads in their order, checking every frame is understood."""
    session = PROTOCOL.new_session()
    frames: list[Frame] = []
    for from_client, data in recording.reads:
        framer = session.client if from_client else session.server
        frames += framer.feed(data)
    assert session.client.buffered == 0 and session.server.buffered == 0
    for frame in frames:
        assert frame.type not in (PROTOCOL_ERROR, OPAQUE), (frame, frame.error)
        assert frame.type in PROTOCOL.messages, frame
        fields = frame.fields
        assert frame.error is None, frame.error
        assert frame.spec is not None
        assert frame.spec.encode(**fields) == frame.data, frame
    client_bytes = b"".join(data for from_client, data in recording.reads if from_client)
    assert b"".join(f.data for f in frames if f.from_client) == client_bytes
    return frames


def all_frames(relay: RecordingRelay) -> list[list[Frame]]:
    relay.close()
    return [frame_recording(recording) for recording in relay.recordings]


def of_type(frames: list[Frame], name: str) -> list[Frame]:
    return [f for f in frames if f.type == name]


def test_simple_queries_notice_error_and_notify(
    pg: PostgresServer, relay: RecordingRelay
) -> None:
    notified: list[psycopg.Notify] = []
    with connect(pg, relay) as conn:
        conn.add_notify_handler(notified.append)
        conn.execute("CREATE TEMP TABLE items (id int, name text)")
        conn.execute("INSERT INTO items VALUES (1, 'one')")
        assert conn.execute("SELECT name, NULL::text FROM items").fetchall() == [("one", None)]
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.execute("LISTEN jobs")
        conn.execute("NOTIFY jobs, 'job 7 done'")
        conn.execute("SELECT 1")
    assert [n.payload for n in notified] == ["job 7 done"]

    [frames] = all_frames(relay)
    client_types = [f.type for f in frames if f.from_client]
    assert client_types[:3] == ["SSLRequest", "StartupMessage", "Query"]
    assert of_type(frames, "SSLResponse")[0].fields == {"answer": "N"}
    assert of_type(frames, "StartupMessage")[0].fields["user"] == pg.user
    queries = [f.fields["query"] for f in of_type(frames, "Query")]
    assert "INSERT INTO items VALUES (1, 'one')" in queries
    tags = [f.fields["command"] for f in of_type(frames, "CommandComplete")]
    assert "INSERT 0 1" in tags and "SELECT 1" in tags and "LISTEN" in tags
    rows = [f.fields["values"] for f in of_type(frames, "DataRow")]
    assert [b"one", None] in rows
    [column_name, _] = of_type(frames, "RowDescription")[0].fields["columns"]
    assert column_name["name"] == "name" and column_name["type_oid"] == 25
    notice = of_type(frames, "NoticeResponse")[0].fields
    assert notice["message"] == "hello from plpgsql" and notice["severity"] == "NOTICE"
    error = of_type(frames, "ErrorResponse")[0].fields
    assert error["code"] == "22012" and error["message"] == "division by zero"
    notification = of_type(frames, "NotificationResponse")[0].fields
    assert notification["channel"] == "jobs" and notification["payload"] == "job 7 done"
    assert of_type(frames, "ReadyForQuery")[-1].fields == {"status": "I"}
    assert of_type(frames, "Terminate")


def test_extended_protocol_with_prepared_binary_parameters(
    pg: PostgresServer, relay: RecordingRelay
) -> None:
    with connect(pg, relay) as conn:
        for value in (41, 42, 43):
            cursor = conn.execute("SELECT %s::int4 + 1, %s::text", (value, None), prepare=True,
                                  binary=True)
            assert cursor.fetchone() == (value + 1, None)

    [frames] = all_frames(relay)
    parses = of_type(frames, "Parse")
    assert len(parses) == 1 and parses[0].fields["statement"] != ""
    assert parses[0].fields["query"] == "SELECT $1::int4 + 1, $2::text"
    binds = of_type(frames, "Bind")
    assert len(binds) == 3
    assert all(bind.fields["statement"] == parses[0].fields["statement"] for bind in binds)
    assert int.from_bytes(binds[1].fields["parameters"][0], "big") == 42
    assert binds[1].fields["parameters"][1] is None
    assert 1 in binds[1].fields["parameter_formats"] and binds[1].fields["result_formats"] == [1]
    assert of_type(frames, "ParseComplete") and of_type(frames, "BindComplete")
    assert of_type(frames, "Execute") and of_type(frames, "Sync")
    rows = [f.fields["values"] for f in of_type(frames, "DataRow")]
    assert [(44).to_bytes(4, "big"), None] in rows


def test_copy_from_stdin_and_to_stdout(
    pg: PostgresServer, relay: RecordingRelay
) -> None:
    with connect(pg, relay) as conn:
        conn.execute("CREATE TEMP TABLE copied (id int, name text)")
        with conn.cursor() as cursor:
            with cursor.copy("COPY copied (id, name) FROM STDIN") as copy:
                copy.write_row((1, "alpha"))
                copy.write_row((2, None))
            with cursor.copy("COPY copied TO STDOUT") as copy:
                rows = list(copy.rows())
    assert rows == [("1", "alpha"), ("2", None)]

    [frames] = all_frames(relay)
    assert of_type(frames, "CopyInResponse") and of_type(frames, "CopyOutResponse")
    client_data = b"".join(f.fields["data"] for f in frames
                           if f.type == "CopyData" and f.from_client)
    server_data = b"".join(f.fields["data"] for f in frames
                           if f.type == "CopyData" and not f.from_client)
    assert client_data == server_data == b"1\talpha\n2\t\\N\n"
    assert [f.from_client for f in of_type(frames, "CopyDone")] == [True, False]
    tags = [f.fields["command"] for f in of_type(frames, "CommandComplete")]
    assert "COPY 2" in tags


def test_cancel_request_travels_on_its_own_connection(
    pg: PostgresServer, relay: RecordingRelay
) -> None:
    with connect(pg, relay) as conn:
        backend_pid = conn.info.backend_pid
        canceller = threading.Thread(target=cancel_when_sleeping,
                                     args=(pg, backend_pid, conn))
        canceller.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        canceller.join()

    recordings = all_frames(relay)
    cancels = [frames for frames in recordings if of_type(frames, "CancelRequest")]
    assert len(cancels) == 1
    cancel = of_type(cancels[0], "CancelRequest")[0]
    assert cancel is [f for f in cancels[0] if f.from_client][-1]  # nothing after it
    [session] = [frames for frames in recordings if of_type(frames, "StartupMessage")]
    key = of_type(session, "BackendKeyData")[0].fields
    assert cancel.fields == {"pid": backend_pid, "secret_key": key["secret_key"]}
    assert key["pid"] == backend_pid
    assert of_type(session, "ErrorResponse")[0].fields["code"] == "57014"


def cancel_when_sleeping(pg: PostgresServer, backend_pid: int, conn: psycopg.Connection) -> None:
    """Cancels `conn`'s query once the server shows it running pg_sleep."""
    with psycopg.connect(pg.dsn(), autocommit=True) as observer:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            running = observer.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active' "
                "AND query LIKE '%%pg_sleep%%'", (backend_pid,)).fetchone()
            if running:
                # cancel_safe, not cancel: psycopg's blocking cancel() keeps the GIL while it
                # waits for the server, so this in-process relay could not forward its bytes
                conn.cancel_safe(timeout=10)
                return
            time.sleep(0.02)  # polling the server: no event to wait on
