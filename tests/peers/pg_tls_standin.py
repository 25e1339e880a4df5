"""A PostgreSQL stand-in that speaks TLS the way PostgreSQL 17 and later can, for tests.

The PostgreSQL the tests run (15) cannot do direct TLS (libpq's `sslnegotiation=direct`: a
TLS ClientHello at once, ALPN `postgresql`, no SSLRequest), so this server does, and the
older ways too. It tells them apart by the first bytes of each connection:

- direct TLS: the first byte opens a TLS handshake record (0x16); ALPN must be `postgresql`;
- TLS after an SSLRequest, which it accepts ('S');
- plain: a StartupMessage at once.

Then it trusts the user (AuthenticationOk), reports the parameters libpq reads, and answers
every simple Query with one row of one text column, `"<negotiation>: <query>"`, so a client
sees how its bytes reached the server. It frames what the client sends with wirefault's own
PostgreSQL framer. Blocking sockets, one thread per connection: it is a test peer.

    with PgTlsStandIn() as server:   # listens on 127.0.0.1, a free port
        psycopg.connect(host="127.0.0.1", port=server.port, sslmode="require",
                        sslnegotiation="direct")
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from wirefault.protocols import postgres

M = postgres.CATALOGUE
ALPN = "postgresql"
TLS_HANDSHAKE_RECORD = 0x16
TEXT_OID = 25
PARAMETERS = {"server_version": "17.0", "server_encoding": "UTF8", "client_encoding": "UTF8",
              "DateStyle": "ISO, MDY", "integer_datetimes": "on",
              "standard_conforming_strings": "on", "TimeZone": "UTC"}


@dataclass
class Seen:
    """What the stand-in saw of one connection."""

    negotiation: str
    """`direct`, `sslrequest` or `plain`."""
    alpn: str | None
    """The ALPN protocol the TLS handshake agreed on (None: none, or no TLS)."""
    queries: list[str] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event, compare=False)
    """Set once the client's side ended (EOF after its Terminate) and the stand-in closed:
    everything the client sent has crossed the proxy by then."""


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for localhost and 127.0.0.1: (certificate, key) PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names = x509.SubjectAlternativeName([
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ])
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(alt_names, critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class PgTlsStandIn:
    """The server; `seen` lists each connection, once its negotiation is known."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="wirefault-tls-standin-")
        cert, key = self_signed_certificate(Path(self._tmp.name))
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.tls.set_alpn_protocols([ALPN])
        self.seen: list[Seen] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="pg-tls-standin", daemon=True).start()

    def __enter__(self) -> PgTlsStandIn:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._listener.close()
        self._tmp.cleanup()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        seen: Seen | None = None
        try:
            with contextlib.suppress(OSError, ssl.SSLError), sock:
                sock.settimeout(30)
                conn, seen = self._negotiate(sock)
                self.seen.append(seen)
                if conn is not None:
                    with conn:
                        self._converse(conn, seen)
        finally:
            if seen is not None:
                seen.ended.set()

    def connection_that_ran(self, query: str) -> Seen:
        """The connection that sent this query (the tests make each query unique)."""
        (seen,) = [seen for seen in self.seen if query in seen.queries]
        return seen

    def _negotiate(self, sock: socket.socket) -> tuple[socket.socket | None, Seen]:
        """The connection as it carries the startup packet: wrapped in TLS, or as it is."""
        first = sock.recv(1, socket.MSG_PEEK)
        if first and first[0] == TLS_HANDSHAKE_RECORD:
            conn = self.tls.wrap_socket(sock, server_side=True)
            alpn = conn.selected_alpn_protocol()
            # PostgreSQL 17 refuses direct TLS without ALPN `postgresql`: so does this
            return (conn if alpn == ALPN else None), Seen("direct", alpn)
        head = sock.recv(8, socket.MSG_PEEK)
        if head == M["SSLRequest"].encode():
            sock.recv(8)
            sock.sendall(b"S")
            conn = self.tls.wrap_socket(sock, server_side=True)
            return conn, Seen("sslrequest", conn.selected_alpn_protocol())
        return sock, Seen("plain", None)

    def _converse(self, conn: socket.socket, seen: Seen) -> None:
        """Answers until the client's EOF (after a Terminate, nothing more is answered)."""
        framer = postgres.new_session().client
        terminated = False
        while data := conn.recv(65536):
            for frame in framer.feed(data):
                terminated = terminated or frame.type == "Terminate"
                if not terminated:
                    conn.sendall(self._reply(frame.type, frame.fields, seen))

    def _reply(self, kind: str, fields: dict, seen: Seen) -> bytes:
        if kind == "StartupMessage":
            return b"".join([
                M["AuthenticationOk"].encode(),
                *(M["ParameterStatus"].encode(name=k, value=v) for k, v in PARAMETERS.items()),
                M["BackendKeyData"].encode(pid=4242, secret_key=2424),
                M["ReadyForQuery"].encode(status="I"),
            ])
        if kind == "Query":
            seen.queries.append(fields["query"])
            column = {"name": "answer", "table_oid": 0, "column_number": 0,
                      "type_oid": TEXT_OID, "type_size": -1, "type_modifier": -1, "format": 0}
            answer = f"{seen.negotiation}: {fields['query']}".encode()
            return b"".join([
                M["RowDescription"].encode(columns=[column]),
                M["DataRow"].encode(values=[answer]),
                M["CommandComplete"].encode(command="SELECT 1"),
                M["ReadyForQuery"].encode(status="I"),
            ])
        return M["ErrorResponse"].encode(severity="ERROR", code="0A000",
                                         message=f"the stand-in does not speak {kind}") \
            + M["ReadyForQuery"].encode(status="I")
