"""Drive a WirefaultLayer with scripted events, no sockets (mitmproxy's sans-I/O style)."""

from __future__ import annotations

from mitmproxy import options
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.test import tflow

from wirefault import protocols
from wirefault.proxy.layer import WirefaultLayer
from wirefault.proxy.runtime import ProxyRuntime


class PauseClock:
    """Stands in for the event loop behind a runtime's proxy-wide pause and its deliveries:
    timers wait until `fire()`, events reach the driver of their connection."""

    def __init__(self, runtime: ProxyRuntime) -> None:
        self.timers: list[tuple[float, object]] = []
        self.drivers: dict[str, LayerDriver] = {}
        self.delivered: dict[str, list[commands.Command]] = {}
        runtime.pause.call_later = self.call_later
        runtime.deliver_event = self.deliver

    def call_later(self, delay: float, callback) -> None:
        self.timers.append((delay, callback))

    def deliver(self, client_id: str, event: events.Event) -> bool:
        self.delivered.setdefault(client_id, []).extend(self.drivers[client_id].send(event))
        return True

    def fire(self) -> dict[str, list[commands.Command]]:
        """Run the timers due; the commands each connection answered with, by client id."""
        self.delivered = {}
        timers, self.timers = self.timers, []
        for _, callback in timers:
            callback()
        return self.delivered


class LayerDriver:
    """One connection through a layer; collects the commands it yields."""

    def __init__(self, protocol: str = "raw", rule: str | None = None, runtime=None,
                 **runtime_options) -> None:
        self.runtime = runtime or ProxyRuntime.create(
            protocols.get(protocol), rule, **runtime_options
        )
        clock = getattr(self.runtime, "test_clock", None)
        if clock is None:
            clock = self.runtime.test_clock = PauseClock(self.runtime)
        self.clock: PauseClock = clock
        client = tflow.tclient_conn()
        server = tflow.tserver_conn()
        client.state = ConnectionState.OPEN
        server.state = ConnectionState.OPEN
        self.context = Context(client, options.Options())
        self.context.server = server
        self.layer = WirefaultLayer(self.context, self.runtime)
        clock.drivers[client.id] = self
        self.started = self.send(events.Start())

    @property
    def client(self):
        return self.context.client

    @property
    def server(self):
        return self.context.server

    def send(self, event: events.Event) -> list[commands.Command]:
        out = list(self.layer.handle_event(event))
        # Answer blocking hooks at once, as the proxy server does when no addon intervenes.
        index = 0
        while index < len(out):
            command = out[index]
            if isinstance(command, commands.StartHook) and command.blocking:
                out.extend(self.layer.handle_event(events.HookCompleted(command)))
            index += 1
        for command in out:  # apply what the proxy server would do to connection state
            if isinstance(command, commands.CloseTcpConnection) and command.half_close:
                command.connection.state &= ~ConnectionState.CAN_WRITE
            elif isinstance(command, commands.CloseConnection):
                command.connection.state = ConnectionState.CLOSED
        return out

    def from_client(self, data: bytes) -> list[commands.Command]:
        return self.send(events.DataReceived(self.client, data))

    def from_server(self, data: bytes) -> list[commands.Command]:
        return self.send(events.DataReceived(self.server, data))

    def closed(self, connection) -> list[commands.Command]:
        connection.state &= ~ConnectionState.CAN_READ
        return self.send(events.ConnectionClosed(connection))

    def wakeup(self, request: commands.RequestWakeup) -> list[commands.Command]:
        return self.send(events.Wakeup(request))


def sent(cmds, connection=None) -> bytes:
    """The bytes sent (to `connection`, if given) by these commands."""
    return b"".join(
        c.data for c in cmds
        if isinstance(c, commands.SendData) and (connection is None or c.connection is connection)
    )


def of_type(cmds, kind) -> list:
    return [c for c in cmds if type(c) is kind]
