"""Direct TLS (libpq 17+'s sslnegotiation=direct) through the proxy, and the layer choice
behind it: a raw TCP reverse proxy is wirefault's whatever the client sends first; every
other mode keeps mitmproxy's own choice."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
import test_proxy_e2e
from mitmproxy.addons.next_layer import NextLayer
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.connection import Client, ConnectionState
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.mode_servers import ServerInstance
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons
from peers.pg_tls_standin import ALPN, PgTlsStandIn, Seen
from proxy_helpers import running_proxy

from wirefault.fifo_client import TrafficRow
from wirefault.protocols.postgres import CATALOGUE
from wirefault.proxy.addon import WirefaultAddon

UPSTREAM = "127.0.0.1:5432"


def client_hello() -> bytes:
    """The first bytes of a direct-TLS client: a real ClientHello offering ALPN postgresql."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([ALPN])
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                           server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO = client_hello()
STARTUP = CATALOGUE["StartupMessage"].encode(user="u")

# --- the layer choice, in process: mitmproxy's own top layers and next-layer hook -----------


def drive(top: layer.Layer, event: events.Event, addons, follow: bool) -> list[commands.Command]:
    """Feeds one event to a connection's top layer; blocking hooks go to the addons, in their
    order, and are answered, as mitmproxy's connection handler does. Returns the other
    commands; stops at the layer decision unless `follow` (what mitmproxy's own layers do
    next is mitmproxy's, and its TLS layers would need its certificate addon)."""
    out: list[commands.Command] = []
    pending = list(top.handle_event(event))
    while pending:
        command = pending.pop(0)
        if isinstance(command, commands.StartHook) and command.blocking:
            addons.trigger(command)
            if isinstance(command, layer.NextLayerHook) and not follow:
                break
            pending[:0] = top.handle_event(events.HookCompleted(command))
        else:
            out.append(command)
    return out


@dataclass
class FirstRead:
    stack: list[str]
    """The connection's layers by class name, once the first read chose them."""
    tls: tuple[bool, bool]
    """Whether the client and the server connection are marked as TLS."""
    commands: list[commands.Command]


def first_read(mode: str, data: bytes, rawtcp: bool = True, wirefault_first: bool = False,
               follow: bool = False) -> FirstRead:
    """A connection in `mode` whose client sends `data` first. mitmproxy's chooser runs
    before wirefault's hook in the runner, after it when wirefault is a mitmdump script
    (`wirefault_first`)."""
    chooser, wirefault = NextLayer(), WirefaultAddon()
    order = (wirefault, chooser) if wirefault_first else (chooser, wirefault)
    with taddons.context(Proxyserver(), *order, loadcore=False) as tctx:
        tctx.configure(wirefault, mode=[mode], rawtcp=rawtcp, connection_strategy="lazy")
        client = Client(peername=("127.0.0.1", 40000), sockname=("127.0.0.1", 9060),
                        timestamp_start=0, proxy_mode=ProxyMode.parse(mode),
                        state=ConnectionState.OPEN)
        context = Context(client, tctx.options)
        context.server.address = ("127.0.0.1", 5432)  # transparent mode's destination
        top = ServerInstance.make(client.proxy_mode, None).make_top_layer(context)
        out = drive(top, events.Start(), tctx.master.addons, follow)
        out += drive(top, events.DataReceived(client, data), tctx.master.addons, follow)
        return FirstRead([type(each).__name__ for each in context.layers],
                         (client.tls, context.server.tls), out)


OWNED = [  # raw TCP reverse proxies, TLS first or not
    pytest.param(f"reverse:tcp://{UPSTREAM}", True, HELLO, id="reverse-tcp-tls"),
    pytest.param(f"reverse:tcp://{UPSTREAM}", False, HELLO, id="reverse-tcp-tls-no-rawtcp"),
    pytest.param(f"reverse:tcp://{UPSTREAM}", True, STARTUP, id="reverse-tcp-plain"),
    pytest.param(f"reverse:{UPSTREAM}", True, HELLO, id="reverse-bare-rawtcp-tls"),
    pytest.param(f"reverse:{UPSTREAM}", True, STARTUP, id="reverse-bare-rawtcp-plain"),
]


@pytest.mark.parametrize("wirefault_first", [False, True], ids=["runner", "mitmdump"])
@pytest.mark.parametrize(("mode", "rawtcp", "data"), OWNED)
def test_a_raw_tcp_reverse_proxy_is_wirefaults_whatever_comes_first(mode, rawtcp, data,
                                                                    wirefault_first):
    read = first_read(mode, data, rawtcp, wirefault_first, follow=True)
    assert read.stack == ["ReverseProxy", "WirefaultLayer"] and read.tls == (False, False)
    out = read.commands
    assert any(isinstance(c, commands.OpenConnection) for c in out), out  # the upstream
    assert not [c for c in out if isinstance(c, commands.CloseConnection)], out


KEPT = [  # (mode, rawtcp, first bytes, the layer mitmproxy chooses)
    pytest.param(f"reverse:tls://{UPSTREAM}", True, HELLO, "ServerTLSLayer", id="reverse-tls"),
    pytest.param(f"reverse:{UPSTREAM}", False, HELLO, "ServerTLSLayer",
                 id="reverse-bare-no-rawtcp"),
    pytest.param("transparent", True, HELLO, "ServerTLSLayer", id="transparent-tls"),
    pytest.param("regular", True, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", "HttpLayer",
                 id="regular"),
]


@pytest.mark.parametrize("wirefault_first", [False, True], ids=["runner", "mitmdump"])
@pytest.mark.parametrize(("mode", "rawtcp", "data", "chosen"), KEPT)
def test_other_modes_keep_mitmproxys_choice(mode, rawtcp, data, chosen, wirefault_first):
    stack = first_read(mode, data, rawtcp, wirefault_first).stack
    assert stack[1] == chosen and "WirefaultLayer" not in stack


@pytest.mark.parametrize("wirefault_first", [False, True], ids=["runner", "mitmdump"])
def test_other_modes_still_get_wirefaults_layer_for_plain_tcp(wirefault_first):
    read = first_read("transparent", STARTUP, True, wirefault_first)
    assert read.stack == ["TransparentProxy", "WirefaultLayer"]


# --- end to end: psycopg (libpq 18), the proxy, a direct-TLS stand-in server -----------------

needs_direct_tls = pytest.mark.skipif(psycopg.pq.version() < 170000,
                                      reason="libpq 17 or later speaks direct TLS")
E2E_LAUNCHES = {**test_proxy_e2e.LAUNCHES, "mitmdump-citus": ("mitmdump-citus", [])}
control = test_proxy_e2e.control  # the same fixture (rule allowed, recorder reset), on this proxy


@pytest.fixture(scope="module")
def standin() -> Iterator[PgTlsStandIn]:
    with PgTlsStandIn() as server:
        yield server


@pytest.fixture(scope="module", params=list(E2E_LAUNCHES))
def proxy(request, standin):
    kind, extra = E2E_LAUNCHES[request.param]
    with running_proxy(standin.port, kind=kind, extra_args=extra) as running:
        yield running


def run_one_query(proxy, standin: PgTlsStandIn, query: str, **ssl_options
                  ) -> tuple[tuple, bool, Seen]:
    """Connects through the proxy, runs `query`, closes: (the row, whether the client's
    connection was TLS, what the server saw once the connection ended)."""
    with psycopg.connect(host="127.0.0.1", port=proxy.port, user="wirefault", dbname="tls",
                         gssencmode="disable", autocommit=True, connect_timeout=10,
                         **ssl_options) as conn:
        row = conn.execute(query).fetchone()
        tls = conn.pgconn.ssl_in_use
    seen = standin.connection_that_ran(query)
    assert seen.ended.wait(10), "the stand-in never saw the connection end"
    return row, tls, seen


def one_connection(rows: list[TrafficRow]) -> list[tuple[str, str]]:
    assert rows and {row.conn for row in rows} == {0}, rows
    return [(row.source, row.message) for row in rows]


@needs_direct_tls
def test_direct_tls_reaches_the_server_and_is_recorded_as_tls(proxy, standin, control, request):
    query = f"SELECT 'direct tls via {request.node.callspec.id}'"
    row, tls, seen = run_one_query(proxy, standin, query, sslmode="require",
                                   sslnegotiation="direct")
    assert row == (f"direct: {query}",) and tls
    assert (seen.negotiation, seen.alpn, seen.queries) == ("direct", ALPN, [query])
    traffic = one_connection(control.dump())
    assert traffic[0][0] == "coordinator"  # the ClientHello, where a startup packet would be
    assert {source for source, _ in traffic} == {"coordinator", "worker"}
    assert all(message.startswith("Opaque(length=") for _, message in traffic), traffic


@needs_direct_tls
def test_tls_after_an_sslrequest_is_recorded_the_same_way(proxy, standin, control, request):
    query = f"SELECT 'sslrequest via {request.node.callspec.id}'"
    row, tls, seen = run_one_query(proxy, standin, query, sslmode="require",
                                   sslnegotiation="postgres")
    assert row == (f"sslrequest: {query}",) and tls and seen.negotiation == "sslrequest"
    traffic = one_connection(control.dump())
    assert traffic[:2] == [("coordinator", "SSLRequest()"), ("worker", "SSLResponse(answer=S)")]
    assert all(message.startswith("Opaque(length=") for _, message in traffic[2:]), traffic


def test_a_plain_connection_through_the_same_proxy_still_works(proxy, standin, control,
                                                               request):
    query = f"SELECT 'plain via {request.node.callspec.id}'"
    row, tls, seen = run_one_query(proxy, standin, query, sslmode="disable")
    assert row == (f"plain: {query}",) and not tls and seen.negotiation == "plain"
    traffic = one_connection(control.dump())
    assert traffic[0][0] == "coordinator" and traffic[0][1].startswith("StartupMessage(")
    assert ("coordinator", f"Query(query={query})") in traffic
    assert ("worker", f"DataRow(values=[plain: {query}])") in traffic
    assert not [m for _, m in traffic if m.startswith(("Opaque", "ProtocolError"))], traffic
