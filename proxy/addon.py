"""The mitmproxy addon: installs wirefault's layer for TCP connections and serves commands.

Options (`--set name=value` in mitmdump): `fifo` (command FIFO path), `fifo_mode` and
`fifo_group` (for a FIFO it creates), `slug` (the rule in force at start), `protocol`
(postgres, wallaroo or raw), `kill_grace`, `recorder_limit`, `recorder_max_bytes`,
`source_labels`, `fifo_reply_timeout`, `max_frame`, `idle_timeout`, `fast_path`, `seed`,
`wirefault_flows`.

With `--rawtcp` and a reverse target without a scheme (`--mode reverse:HOST:PORT`, as Citus's
harness starts it), connections are relayed as raw TCP, not as the https mitmproxy assumes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mitmproxy import ctx
from mitmproxy.exceptions import OptionsError
from mitmproxy.proxy import layer as mitm_layer
from mitmproxy.proxy.layers.tcp import TCPLayer

from wirefault import protocols

from . import dsl, mitm_internals
from .layer import WirefaultLayer, upstream_failure_line
from .proxy_registry import Proxy, ProxyError, ProxyRegistry, ProxySpec
from .recorder import (
    DEFAULT_CLIENT_LABEL,
    DEFAULT_LIMIT,
    DEFAULT_MAX_BYTES,
    DEFAULT_SERVER_LABEL,
    DumpSnapshot,
)
from .rules import DEFAULT_RULE
from .runtime import DEFAULT_KILL_GRACE, DEFAULT_REPLY_TIMEOUT, ProxyRuntime

if TYPE_CHECKING:
    from .command_channel import CommandChannel, Reply

logger = logging.getLogger("wirefault")

DEFAULT_LABELS = f"{DEFAULT_CLIENT_LABEL},{DEFAULT_SERVER_LABEL}"
SYNC_DUMP_FRAMES = 200
"""A dump of up to this many frames is rendered at once (a few milliseconds at most); a
larger one a slice at a time (`DumpSnapshot.render_in_slices`)."""


def _dump_reply(snapshot: DumpSnapshot) -> str | asyncio.Future[str]:
    """A dump's reply: its rows and a newline, nothing at all when there are none."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop to give turns to (a caller outside the proxy)
        running = False
    else:
        running = True
    if snapshot.frames <= SYNC_DUMP_FRAMES or not running:
        return snapshot.render(end="\n")
    return asyncio.ensure_future(snapshot.render_in_slices(end="\n"))


class WirefaultAddon:
    def __init__(self, option_names: dict[str, str] | None = None,
                 registry: ProxyRegistry | None = None) -> None:
        self.serving = registry is not None
        """`wirefault serve`: the registry's named proxies, each its own mode entry; else
        one proxy, the registry's default, built from the options."""
        self.registry = registry if registry is not None else ProxyRegistry()
        self.registry.bind(self.make_runtime, self.reply, self.open_channel,
                           self.apply_listeners)
        self.channel: CommandChannel | None = None
        self._running = False
        self.option_names = option_names or {}
        """How errors name an option: `--rule` for the runner's `slug`; as itself (what
        mitmdump's `--set` takes) when absent."""
        self._raw_tcp_reverse = False

    # -- options ---------------------------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option("fifo", str | None, None,
                          "Path of the command FIFO (created if missing).")
        loader.add_option("slug", str, DEFAULT_RULE, "The rule in force at start.")
        loader.add_option("protocol", str, "postgres",
                          f"Wire protocol to frame: {', '.join(protocols.names())}.")
        # mitmproxy's --set parses no float options, so durations are strings of seconds.
        loader.add_option("kill_grace", str, str(DEFAULT_KILL_GRACE),
                          "Seconds kill() waits for the killed side to close before closing "
                          "the other side anyway.")
        loader.add_option("recorder_limit", int, DEFAULT_LIMIT,
                          "Frames the recorder keeps; older ones are dropped and counted.")
        loader.add_option("recorder_max_bytes", int, DEFAULT_MAX_BYTES,
                          "Bytes the recorder's rows may hold; older ones are dropped and "
                          "counted.")
        loader.add_option("source_labels", str, DEFAULT_LABELS,
                          "Recorder labels for client and server frames, comma-separated.")
        loader.add_option("fifo_reply_timeout", str, str(DEFAULT_REPLY_TIMEOUT),
                          "Seconds to wait for a FIFO client to read its reply.")
        loader.add_option("fifo_mode", str, "0600",
                          "Permission bits (octal) of a command FIFO the proxy creates.")
        loader.add_option("fifo_group", str | None, None,
                          "Group (name or gid) of a command FIFO the proxy creates.")
        loader.add_option("max_frame", int, 0,
                          "Largest frame accepted, in bytes (0: the protocol's default).")
        loader.add_option("idle_timeout", str, "0",
                          "Seconds without a read after which a connection is closed "
                          "(0: never, the default).")
        loader.add_option("fast_path", bool, True,
                          "Relay established connections straight from their sockets, "
                          "bypassing mitmproxy's per-read machinery.")
        loader.add_option("seed", int, 0,
                          "Seed of every fault's randomness (probability, jitter): the same "
                          "seed and the same traffic make the same choices.")
        loader.add_option("wirefault_flows", bool, False,
                          "Also create mitmproxy TCP flows and fire tcp_* hooks (slower).")

    @property
    def runtime(self) -> ProxyRuntime | None:
        """The default proxy's runtime (`wirefault proxy`'s one)."""
        default = self.registry.default
        return default.runtime if default is not None else None

    @runtime.setter
    def runtime(self, runtime: ProxyRuntime) -> None:
        self.registry.set_default(runtime)

    def option_error(self, option: str, problem: object) -> OptionsError:
        return OptionsError(f"{self.option_names.get(option, option)}: {problem}")

    def configure(self, updated: set[str]) -> None:
        rebuild = {"protocol", "recorder_limit", "recorder_max_bytes", "source_labels",
                   "max_frame", "kill_grace", "wirefault_flows", "fast_path", "idle_timeout",
                   "seed"}
        if self.serving:
            pass  # the registry's proxies have their own runtimes (make_runtime)
        elif self.runtime is None or updated & rebuild:
            self.runtime = self._build_runtime()
        elif "slug" in updated:
            try:
                self.runtime.engine.set_rule_text(ctx.options.slug)
            except dsl.CommandError as exc:
                raise self.option_error("slug", exc) from None
        if updated & {"mode", "rawtcp"}:
            self._raw_tcp_reverse = self._reverse_without_scheme()
        if "fifo" in updated and self._running:
            self._start_channel()

    def _reverse_without_scheme(self) -> bool:
        """`--rawtcp --mode reverse:HOST:PORT` (Citus's command line) means raw TCP here.

        mitmproxy reads a reverse target without a scheme as https and would speak TLS to
        the server; with --rawtcp on, wirefault relays such a connection as raw TCP."""
        opts = ctx.options
        specs = [m for m in opts.mode if m.startswith("reverse:")]
        bare = [m for m in specs if "://" not in m.partition(":")[2]]
        if bare and opts.rawtcp:
            logger.warning("wirefault: --mode %s has no scheme; relaying raw TCP to it "
                           "(as reverse:tcp://%s) because --rawtcp is on",
                           bare[0], bare[0].partition(":")[2])
            return True
        return False

    def _build_runtime(self, spec: ProxySpec | None = None) -> ProxyRuntime:
        """A proxy's runtime from the options; a named proxy's protocol and seed are its
        own."""
        opts = ctx.options
        try:
            protocol = protocols.get(spec.protocol if spec else opts.protocol)
        except ValueError as exc:
            raise self.option_error("protocol", exc) from None
        client_label, comma, server_label = opts.source_labels.partition(",")
        if not (comma and client_label.strip() and server_label.strip()):
            raise self.option_error("source_labels", "needs two non-empty labels separated "
                                    f"by a comma, as CLIENT,SERVER: {opts.source_labels!r}")
        if opts.recorder_limit < 1:
            raise self.option_error("recorder_limit", f"must be >= 1: {opts.recorder_limit}")
        if opts.recorder_max_bytes < 1:
            raise self.option_error("recorder_max_bytes",
                                    f"must be >= 1: {opts.recorder_max_bytes}")
        if opts.max_frame < 0:
            raise self.option_error("max_frame", f"must be >= 0: {opts.max_frame}")
        try:
            runtime = ProxyRuntime.create(
                protocol,
                None if spec else opts.slug,
                limit=opts.recorder_limit,
                client_label=client_label.strip() or DEFAULT_CLIENT_LABEL,
                server_label=server_label.strip() or DEFAULT_SERVER_LABEL,
                kill_grace=self._seconds("kill_grace"),
                max_frame=opts.max_frame or None,
                make_flows=opts.wirefault_flows,
                fast_path=opts.fast_path,
                idle_timeout=self._seconds("idle_timeout") or None,
                seed=opts.seed if spec is None or spec.seed is None else spec.seed,
                edge=mitm_internals.MitmEdge(lambda: ctx.master.addons.get("proxyserver")),
            )
        except dsl.CommandError as exc:
            raise self.option_error("slug", exc) from None
        runtime.recorder.max_bytes = opts.recorder_max_bytes
        logger.info("wirefault: %sprotocol %s, rule %s", f"proxy {spec.name}: " if spec else "",
                    protocol.name, runtime.engine.rule_text)
        return runtime

    def make_runtime(self, spec: ProxySpec) -> ProxyRuntime:
        """A named proxy's runtime (the registry's way to build one)."""
        try:
            return self._build_runtime(spec)
        except OptionsError as exc:
            raise ProxyError(f"proxy {spec.name}: {exc}") from None

    def open_channel(self, proxy: Proxy) -> CommandChannel | None:
        """A named proxy's FIFO, answered by its own runtime (the registry's way to open
        one); ProxyError naming the proxy when it cannot be served."""
        from .command_channel import ChannelError

        fifo = proxy.spec.fifo
        if not fifo:
            return None
        try:
            return self._open_fifo(fifo, lambda text: self.reply(proxy, text))
        except ChannelError as exc:
            raise ProxyError(f"proxy {proxy.name}: fifo {exc.path}: {exc.problem}") from None
        except OptionsError as exc:
            raise ProxyError(f"proxy {proxy.name}: {exc}") from None

    async def apply_listeners(self, modes: list[str]) -> dict:
        """Make mitmproxy listen for exactly `modes` (the registry's way to apply a change);
        each listener's state by mode entry once the update is done."""
        proxyserver = ctx.master.addons.get("proxyserver")
        ctx.options.update(mode=modes)
        await mitm_internals.listeners_updated(proxyserver)
        mitm_internals.widen_listen_backlogs(proxyserver)  # the new listeners' too
        return mitm_internals.listener_states(proxyserver)

    def _seconds(self, option: str, positive: bool = False) -> float:
        text = getattr(ctx.options, option)
        try:
            value = float(text)
        except ValueError:
            raise self.option_error(option, f"not a number of seconds: {text!r}") from None
        if not 0 <= value < float("inf") or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise self.option_error(option, f"must be a finite number of seconds {bound}: "
                                            f"{text!r}")
        return value

    # -- lifecycle -------------------------------------------------------------------------

    def running(self) -> None:
        self._running = True
        # mitmproxy's listeners are up by now; a burst of connections must not find the
        # accept queue full (mitm_internals.widen_listen_backlogs says why)
        mitm_internals.widen_listen_backlogs(ctx.master.addons.get("proxyserver"))
        import asyncio  # one line per 10 s about failing accepts, not a traceback for each

        mitm_internals.rate_limit_accept_errors(asyncio.get_running_loop())
        if self.serving:
            self.registry.running = True
            for problem in self.registry.open_channels():
                # The serve runner's start-up check ends the start on the first.
                logger.error("%s", problem)
            return
        from .command_channel import ChannelError

        try:
            self._start_channel()
        except ChannelError as exc:
            # mitmdump's errorcheck (or the runner's start-up check) ends the start on it.
            logger.error("%s %s: %s", self.option_names.get("fifo", "fifo"), exc.path,
                         exc.problem)
        except OptionsError as exc:
            logger.error("%s", exc)

    def done(self) -> None:
        self.registry.running = False
        self.registry.close_channels()
        if self.channel:
            self.channel.close()
            self.channel = None

    def _start_channel(self) -> None:
        if self.channel:
            self.channel.close()
            self.channel = None
        if ctx.options.fifo and not self.serving:
            self.channel = self._open_fifo(ctx.options.fifo, self.handle_command)

    def _open_fifo(self, path: str, handle: Callable[[str], Reply]) -> CommandChannel:
        from .command_channel import CommandChannel, parse_fifo_mode

        try:
            mode = parse_fifo_mode(ctx.options.fifo_mode)
        except ValueError as exc:
            raise self.option_error("fifo_mode", exc) from None
        channel = CommandChannel(  # an unknown fifo_group fails in start()
            path, handle,
            reply_timeout=self._seconds("fifo_reply_timeout", positive=True),
            mode=mode, group=ctx.options.fifo_group or None,
        )
        channel.start()  # ChannelError: one line, nothing left behind
        logger.info("wirefault: listening for commands on %s", path)
        return channel

    # -- layers ----------------------------------------------------------------------------

    def client_connected(self, client) -> None:
        """Under `wirefault serve` the connection strategy is each proxy's: lazy (the
        upstream opened with the client's first bytes) unless its protocol's server may
        speak first. `wirefault proxy` sets the option itself."""
        if not self.serving:
            return
        runtime = self.registry.runtime_for(client.proxy_mode)
        if runtime is not None and not runtime.protocol.client_speaks_first:
            mitm_internals.set_connection_strategy(ctx.master.addons.get("proxyserver"),
                                                   client.id, "eager")

    def server_connect_error(self, data) -> None:
        """An upstream opened eagerly (mitmproxy's layer did it, before wirefault's) could
        not be reached: one line, as wirefault's layer logs a lazily opened one."""
        if mitm_internals.opens_upstream_eagerly(ctx.master.addons.get("proxyserver"),
                                                 data.client.id):
            line = upstream_failure_line(data.server.address, data.client.peername,
                                         data.server.error, time.monotonic())
            if line is not None:
                logger.warning("%s", line)

    def client_disconnected(self, client) -> None:
        # mitmproxy may leave the socket of a connection whose upstream failed at once open
        # (mitm_internals.close_client_left_open says when): a file descriptor per attempt.
        mitm_internals.close_client_left_open(ctx.master.addons.get("proxyserver"), client.id)

    def next_layer(self, nextlayer: mitm_layer.NextLayer) -> None:
        # Whose connection this is: once per connection, by the listener that accepted it.
        runtime = self.registry.runtime_for(nextlayer.context.client.proxy_mode)
        if runtime is not None and mitm_internals.is_raw_tcp_reverse_start(
                nextlayer, bare_is_tcp=self._raw_tcp_reverse):
            # A raw TCP reverse proxy is wirefault's whatever the client sends first. For a
            # ClientHello (PostgreSQL's sslnegotiation=direct) mitmproxy picks its own TLS
            # layer, which has no certificate here and never opens the upstream; wirefault
            # relays TLS it does not terminate as opaque bytes. In the runner mitmproxy's
            # chooser has run already: its choice is undone first.
            mitm_internals.discard_layer_choice(nextlayer)
            nextlayer.layer = WirefaultLayer(nextlayer.context, runtime)
            return
        # Any other mode keeps mitmproxy's choice; only its plain TCP layer becomes ours.
        if nextlayer.layer is None:
            # As a mitmdump script we run before mitmproxy's own choice: let it choose first.
            chooser = ctx.master.addons.get("nextlayer")
            if chooser is not None:
                chooser.next_layer(nextlayer)
        chosen = nextlayer.layer
        if type(chosen) is TCPLayer and runtime is not None:
            layers = nextlayer.context.layers
            if layers and layers[-1] is chosen:
                layers.pop()
            nextlayer.layer = WirefaultLayer(nextlayer.context, runtime)

    # -- commands --------------------------------------------------------------------------

    def _status(self, proxy: Proxy) -> str:
        import asyncio

        runtime = proxy.runtime
        proxyserver = ctx.master.addons.get("proxyserver")
        handlers = (mitm_internals.handler_count(proxyserver) if proxy is self.registry.default
                    else mitm_internals.handlers_of(proxyserver, proxy.specs))
        engine = runtime.engine
        return (f"connections={len(runtime.pause.connections)} handlers={handlers} "
                f"tasks={len(asyncio.all_tasks())} fired={engine.fired_total} "
                f"faults={len(engine.faults)}")

    def handle_command(self, text: str) -> str | asyncio.Future[str]:
        """The default proxy's reply to one command (its FIFO's handler)."""
        assert self.registry.default is not None
        return self.reply(self.registry.default, text)

    def reply(self, proxy: Proxy, text: str) -> str | asyncio.Future[str]:
        """The full reply to one command for one proxy: "\n" on success, the error line,
        or dump rows. A large dump's rows are rendered a slice at a time, so that rendering
        never holds the event loop: its reply is a Future of the text (the recorder is
        emptied at once all the same, so the dump shows what was recorded up to now)."""
        runtime = proxy.runtime
        try:
            parsed = runtime.engine.parse(text)
        except dsl.CommandError as exc:
            logger.warning("wirefault: rejected command %r: %s", text, exc)
            return f"{exc}\n"
        if isinstance(parsed, dsl.ProxyCommand):
            return f"{self._status(proxy)}\n" if parsed.name == "status" else "\n"
        if isinstance(parsed, dsl.RecorderCommand):
            if parsed.name == "dump":
                return _dump_reply(runtime.recorder.snapshot())
            runtime.recorder.reset()
            return "\n"
        if isinstance(parsed, dsl.FaultCommand):
            return self._fault_command(runtime, parsed)
        runtime.engine.install(parsed)
        runtime.faults_changed()
        logger.info("wirefault: rule %s", parsed.text)
        return "\n"

    def _fault_command(self, runtime: ProxyRuntime, command: dsl.FaultCommand) -> str:
        engine = runtime.engine
        if command.op == "list":
            return "".join(f"{line}\n" for line in engine.listing()) or "\n"
        if command.op == "add":
            assert command.name is not None and command.rule is not None
            engine.add(command.name, command.rule, command.seed)
            logger.info("wirefault: fault %s added: %s", command.name, command.text)
        elif command.op == "remove":
            assert command.name is not None
            if not engine.remove(command.name):
                in_force = ", ".join(engine.names()) or "none"
                error = dsl.CommandError(f"no fault named {command.name!r}; faults in force: "
                                         f"{in_force}", command.name_column)
                logger.warning("wirefault: rejected command %r: %s", command.text, error)
                return f"{error}\n"
            logger.info("wirefault: fault %s removed", command.name)
        else:
            engine.clear()
            logger.info("wirefault: every fault cleared")
        runtime.faults_changed()
        return "\n"
