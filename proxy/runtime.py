"""What every connection's layer shares within one proxy: protocol, rules, recorder, options."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wirefault.protocols import ProtocolSpec

from .faults import ConnectionState as RuleState
from .pause import ProxyPause
from .recorder import Recorder
from .rules import RuleEngine

if TYPE_CHECKING:
    from .layer import WirefaultLayer
    from .mitm_internals import MitmEdge
    from .relay_io import RelayIO

DEFAULT_KILL_GRACE = 2.0
DEFAULT_REPLY_TIMEOUT = 10.0
"""Seconds a FIFO client may take to read its reply."""
DEFAULT_FLOW_MESSAGES = 100


def _no_delivery(client_id: str, event: Any) -> bool:
    return False


@dataclass
class Traffic:
    """Bytes and frames each way through one proxy: finished connections' sums here, live
    connections' counts read from their layers when asked (so a read costs one addition)."""

    bytes_from_client: int = 0
    bytes_from_server: int = 0
    frames_from_client: int = 0
    frames_from_server: int = 0

    def add(self, connection: Any) -> None:
        """Fold a finished connection's counts in."""
        self.bytes_from_client += connection.bytes_from_client
        self.bytes_from_server += connection.bytes_from_server
        self.frames_from_client += connection.rule_state.client_frames_seen
        self.frames_from_server += connection.rule_state.server_frames_seen

    def with_live(self, live: Iterable[Any]) -> Traffic:
        """These totals plus the live connections' counts so far."""
        total = Traffic(self.bytes_from_client, self.bytes_from_server,
                        self.frames_from_client, self.frames_from_server)
        for connection in live:
            total.add(connection)
        return total


@dataclass
class ProxyRuntime:
    protocol: ProtocolSpec
    engine: RuleEngine
    recorder: Recorder
    kill_grace: float = DEFAULT_KILL_GRACE
    """Seconds to wait for the killed side to close before closing the other side anyway."""
    max_frame: int | None = None
    make_flows: bool = False
    """Create mitmproxy flows and fire tcp_* hooks (slow; for watching in mitmproxy's tools)."""
    max_flow_messages: int = DEFAULT_FLOW_MESSAGES
    fast_path: bool = True
    """Relay established connections straight from their transports (see fast_relay.py)."""
    idle_timeout: float | None = None
    """Close a connection after this many seconds without a read (None: never)."""
    edge: MitmEdge | None = None
    """mitmproxy's side of each connection (mitm_internals); None when layers are driven
    without sockets (tests): their commands are then yielded, not carried out."""
    deliver_event: Callable[[str, Any], bool] = field(default=_no_delivery)
    """How an event reaches a layer that has no executor (tests drive it)."""
    pause: ProxyPause = field(default_factory=ProxyPause)
    """cancel(pid)'s proxy-wide pause, and the registry of live connections it needs."""
    clock: Callable[[], float] = time.monotonic
    """The clock throttle() paces by."""
    connections_total: int = 0
    """Connections this proxy has relayed (and numbered) since it started."""
    traffic: Traffic = field(default_factory=Traffic)
    """Bytes and frames of the connections that finished (see `traffic_now`)."""

    def traffic_now(self) -> Traffic:
        """Bytes and frames each way since the proxy started, live connections included."""
        return self.traffic.with_live(self.pause.connections)

    def new_rule_state(self, peername: tuple | None) -> RuleState:
        """A new connection's state for the fault engine: its number on this proxy, its
        client's address, and its protocol agent."""
        make_agent = self.protocol.new_agent
        agent = make_agent() if make_agent is not None else None
        if agent is not None and self.engine.tracks_statements:
            agent.track_statements = True
        client = f"{peername[0]}:{peername[1]}" if peername else "?"
        self.connections_total += 1
        return RuleState(number=self.connections_total, client=client, agent=agent)

    def close_connections(self) -> None:
        """Close every live connection of this proxy (it was disabled or removed)."""
        for connection in list(self.pause.connections):
            connection.shut_down()  # type: ignore[attr-defined]

    def faults_changed(self) -> None:
        """Tell every live connection that the faults in force changed (a hang() lifted,
        statements to track)."""
        for connection in list(self.pause.connections):
            connection.faults_changed()  # type: ignore[attr-defined]

    def new_io(self, layer: WirefaultLayer) -> RelayIO | None:
        """The executor of a new connection's commands, on mitmproxy's path to start with
        (the fast path takes its reading over later)."""
        edge = self.edge
        if edge is None:
            return None
        from .relay_io import RelayIO

        client_id = layer.context.client.id
        edge.disable_idle_timeout(client_id)
        return RelayIO(
            layer.context.client, layer.context.server,
            transport_of=lambda connection: edge.transport_of(client_id, connection),
            deliver=lambda event: edge.deliver(client_id, event),
            on_side_closed=lambda connection: edge.end_reader(client_id, connection),
            reset_grace=self.kill_grace,
            idle_timeout=self.idle_timeout,
        )

    @classmethod
    def create(cls, protocol: ProtocolSpec, rule: str | None = None, seed: int = 0,
               **options) -> ProxyRuntime:
        recorder_options = {
            k: options.pop(k) for k in ("limit", "client_label", "server_label") if k in options
        }
        return cls(
            protocol=protocol,
            engine=RuleEngine(protocol, rule, seed=seed),
            recorder=Recorder(messages=protocol.messages, **recorder_options),
            **options,
        )
