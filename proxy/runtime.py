"""What every connection's layer shares within one proxy: protocol, rules, recorder, options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wirefault.protocols import ProtocolSpec

from .pause import ProxyPause
from .recorder import Recorder
from .rules import RuleEngine

DEFAULT_KILL_GRACE = 2.0
DEFAULT_REPLY_TIMEOUT = 10.0
"""Seconds a FIFO client may take to read its reply."""
DEFAULT_FLOW_MESSAGES = 100


def _no_reset(client_id: str) -> bool:
    return False


def _no_take_over(client_id: str) -> None:
    return None


def _no_delivery(client_id: str, event: Any) -> bool:
    return False


def _no_reading_switch(client_id: str, reading: bool) -> None:
    return None


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
    abort_with_rst: Callable[[str], bool] = field(default=_no_reset)
    """Aborts every socket of the client connection with this id with an RST."""
    fast_path: bool = True
    """Relay established connections straight from their transports (see fast_relay.py)."""
    take_over: Callable[[str], Any] = field(default=_no_take_over)
    """Hands an established connection's transports to the fast path (mitm_internals)."""
    deliver_event: Callable[[str, Any], bool] = field(default=_no_delivery)
    """Feeds an event to the layer of a connection on mitmproxy's path (mitm_internals)."""
    set_reading: Callable[[str, bool], None] = field(default=_no_reading_switch)
    """Pauses or resumes reading a connection on mitmproxy's path (mitm_internals)."""
    pause: ProxyPause = field(default_factory=ProxyPause)
    """cancel(pid)'s proxy-wide pause, and the registry of live connections it needs."""

    @classmethod
    def create(cls, protocol: ProtocolSpec, rule: str | None = None, **options) -> ProxyRuntime:
        recorder_options = {
            k: options.pop(k) for k in ("limit", "client_label", "server_label") if k in options
        }
        return cls(
            protocol=protocol,
            engine=RuleEngine(protocol, rule),
            recorder=Recorder(messages=protocol.messages, **recorder_options),
            **options,
        )
