"""The mitmproxy addon: installs wirefault's layer for TCP connections and serves commands.

Options (`--set name=value` in mitmdump): `fifo` (command FIFO path), `slug` (the rule in
force at start), `protocol` (postgres, wallaroo or raw), `kill_grace`, `recorder_limit`,
`source_labels`, `fifo_reply_timeout`, `max_frame`, `wirefault_flows`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mitmproxy import ctx
from mitmproxy.exceptions import OptionsError
from mitmproxy.proxy import layer as mitm_layer
from mitmproxy.proxy.layers.tcp import TCPLayer

from wirefault import protocols

from . import dsl, mitm_internals
from .layer import WirefaultLayer
from .recorder import DEFAULT_CLIENT_LABEL, DEFAULT_LIMIT, DEFAULT_SERVER_LABEL
from .rules import DEFAULT_RULE
from .runtime import DEFAULT_KILL_GRACE, DEFAULT_REPLY_TIMEOUT, ProxyRuntime

if TYPE_CHECKING:
    from .command_channel import CommandChannel

logger = logging.getLogger("wirefault")

DEFAULT_LABELS = f"{DEFAULT_CLIENT_LABEL},{DEFAULT_SERVER_LABEL}"


def _seconds(option: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise OptionsError(f"option {option}: not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise OptionsError(f"option {option}: must be a non-negative number of seconds")
    return value


class WirefaultAddon:
    def __init__(self) -> None:
        self.runtime: ProxyRuntime | None = None
        self.channel: CommandChannel | None = None
        self._running = False

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
        loader.add_option("source_labels", str, DEFAULT_LABELS,
                          "Recorder labels for client and server frames, comma-separated.")
        loader.add_option("fifo_reply_timeout", str, str(DEFAULT_REPLY_TIMEOUT),
                          "Seconds to wait for a FIFO client to read its reply.")
        loader.add_option("max_frame", int, 0,
                          "Largest frame accepted, in bytes (0: the protocol's default).")
        loader.add_option("fast_path", bool, True,
                          "Relay established connections straight from their sockets, "
                          "bypassing mitmproxy's per-read machinery.")
        loader.add_option("wirefault_flows", bool, False,
                          "Also create mitmproxy TCP flows and fire tcp_* hooks (slower).")

    def configure(self, updated: set[str]) -> None:
        rebuild = {"protocol", "recorder_limit", "source_labels", "max_frame", "kill_grace",
                   "wirefault_flows", "fast_path"}
        if self.runtime is None or updated & rebuild:
            self.runtime = self._build_runtime()
        elif "slug" in updated:
            try:
                self.runtime.engine.set_rule_text(ctx.options.slug)
            except dsl.CommandError as exc:
                raise OptionsError(f"option slug: {exc}") from None
        if "fifo" in updated and self._running:
            self._start_channel()

    def _build_runtime(self) -> ProxyRuntime:
        opts = ctx.options
        try:
            protocol = protocols.get(opts.protocol)
        except ValueError as exc:
            raise OptionsError(f"option protocol: {exc}") from None
        client_label, _, server_label = opts.source_labels.partition(",")
        try:
            runtime = ProxyRuntime.create(
                protocol,
                opts.slug,
                limit=opts.recorder_limit,
                client_label=client_label.strip() or DEFAULT_CLIENT_LABEL,
                server_label=server_label.strip() or DEFAULT_SERVER_LABEL,
                kill_grace=_seconds("kill_grace", opts.kill_grace),
                max_frame=opts.max_frame or None,
                make_flows=opts.wirefault_flows,
                abort_with_rst=self._abort_with_rst,
                fast_path=opts.fast_path,
                take_over=self._take_over,
            )
        except dsl.CommandError as exc:
            raise OptionsError(f"option slug: {exc}") from None
        logger.info("wirefault: protocol %s, rule %s", protocol.name, runtime.engine.rule.text)
        return runtime

    @staticmethod
    def _abort_with_rst(client_id: str) -> bool:
        return mitm_internals.abort_with_rst(ctx.master.addons.get("proxyserver"), client_id)

    @staticmethod
    def _take_over(client_id: str):
        return mitm_internals.take_over_transports(ctx.master.addons.get("proxyserver"), client_id)

    # -- lifecycle -------------------------------------------------------------------------

    def running(self) -> None:
        self._running = True
        self._start_channel()

    def done(self) -> None:
        if self.channel:
            self.channel.close()
            self.channel = None

    def _start_channel(self) -> None:
        if self.channel:
            self.channel.close()
            self.channel = None
        if ctx.options.fifo:
            from .command_channel import CommandChannel

            self.channel = CommandChannel(
                ctx.options.fifo, self.handle_command,
                reply_timeout=_seconds("fifo_reply_timeout", ctx.options.fifo_reply_timeout),
            )
            self.channel.start()
            logger.info("wirefault: listening for commands on %s", ctx.options.fifo)

    # -- layers ----------------------------------------------------------------------------

    def next_layer(self, nextlayer: mitm_layer.NextLayer) -> None:
        if nextlayer.layer is None:
            # As a mitmdump script we run before mitmproxy's own choice: let it choose first.
            chooser = ctx.master.addons.get("nextlayer")
            if chooser is not None:
                chooser.next_layer(nextlayer)
        chosen = nextlayer.layer
        if type(chosen) is TCPLayer and self.runtime is not None:
            layers = nextlayer.context.layers
            if layers and layers[-1] is chosen:
                layers.pop()
            nextlayer.layer = WirefaultLayer(nextlayer.context, self.runtime)

    # -- commands --------------------------------------------------------------------------

    def handle_command(self, text: str) -> str:
        """The full reply to one command: "\\n" on success, the error line, or dump rows."""
        assert self.runtime is not None
        try:
            parsed = dsl.parse(text, self.runtime.protocol)
        except dsl.CommandError as exc:
            logger.warning("wirefault: rejected command %r: %s", text, exc)
            return f"{exc}\n"
        if isinstance(parsed, dsl.RecorderCommand):
            if parsed.name == "dump":
                rows = self.runtime.recorder.dump()
                return f"{rows}\n" if rows else ""
            self.runtime.recorder.reset()
            return "\n"
        self.runtime.engine.install(parsed)
        logger.info("wirefault: rule %s", parsed.text)
        return "\n"

