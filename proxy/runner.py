"""`wirefault proxy`: an embedded mitmproxy master with only the addons wirefault needs.

    wirefault proxy --listen 127.0.0.1:9060 --upstream localhost:5432 \
        --protocol postgres --fifo /tmp/wirefault.fifo [--rule 'conn.allow()']
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from .recorder import (
    DEFAULT_CLIENT_LABEL,
    DEFAULT_LIMIT,
    DEFAULT_MAX_BYTES,
    DEFAULT_SERVER_LABEL,
)
from .rules import DEFAULT_RULE
from .runtime import DEFAULT_KILL_GRACE, DEFAULT_REPLY_TIMEOUT

EPILOG = """example:
  wirefault proxy --listen 9060 --upstream localhost:5432 --fifo /tmp/wf.fifo
  wirefault send --fifo /tmp/wf.fifo 'conn.onQuery(query="^COMMIT").kill()'
"""


GC_THRESHOLDS = (20_000, 20, 20)


def _host_port(text: str, default_host: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host = default_host
    host = host.strip("[]") or default_host
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {port!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {number}")
    return host, number


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0: {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}: {text!r}")
        return value

    return parse


def _labels(text: str) -> str:
    client, comma, server = text.partition(",")
    if not comma or not client.strip() or not server.strip() or "," in server:
        raise argparse.ArgumentTypeError(
            f"needs two non-empty labels separated by a comma, as CLIENT,SERVER: {text!r}")
    return f"{client.strip()},{server.strip()}"


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors are one line naming the option (argparse's default adds the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from wirefault import protocols

    parser = _OneLineParser(
        prog="wirefault proxy",
        description="Run the fault-injection proxy in front of a server.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--listen", required=True, metavar="[HOST:]PORT",
                        type=lambda t: _host_port(t, "127.0.0.1"),
                        help="where clients connect (default host 127.0.0.1)")
    parser.add_argument("--upstream", required=True, metavar="HOST:PORT",
                        type=lambda t: _host_port(t, "localhost"),
                        help="the server behind the proxy")
    parser.add_argument("--protocol", default="postgres", choices=protocols.names())
    parser.add_argument("--fifo", metavar="PATH", help="command FIFO (created if missing)")
    parser.add_argument("--ready-file", metavar="PATH",
                        help="write the ready line to this file (atomically) once serving; "
                             "removed when the proxy stops")
    parser.add_argument("--rule", default=DEFAULT_RULE, metavar="COMMAND",
                        help="the rule in force at start")
    parser.add_argument("--seed", type=_count(0), default=0, metavar="N",
                        help="seed of every fault's randomness (probability, jitter); the "
                             "same seed and traffic make the same choices (default 0)")
    add_proxy_options(parser)
    return parser


def add_proxy_options(parser: argparse.ArgumentParser) -> None:
    """The options every proxy of a process shares, for `wirefault proxy` and `wirefault
    serve` alike (a FIFO's mode and group apply to each proxy's FIFO)."""
    from .command_channel import fifo_group_argument, fifo_mode_argument

    parser.add_argument("--fifo-mode", type=fifo_mode_argument, default="0600", metavar="OCTAL",
                        help="permission bits of a FIFO the proxy creates (default 0600)")
    parser.add_argument("--fifo-group", type=fifo_group_argument, metavar="NAME",
                        help="group of a FIFO the proxy creates, e.g. the database server's "
                             "(with --fifo-mode 0660)")
    parser.add_argument("--fifo-reply-timeout", type=_positive_seconds,
                        default=DEFAULT_REPLY_TIMEOUT, metavar="SECONDS",
                        help="how long a FIFO client may take to read its reply")
    parser.add_argument("--kill-grace", type=_seconds, default=DEFAULT_KILL_GRACE,
                        metavar="SECONDS")
    parser.add_argument("--idle-timeout", type=_seconds, default=0, metavar="SECONDS",
                        help="close a connection after this long without traffic "
                             "(default 0: never)")
    parser.add_argument("--max-frame", type=_count(0), default=0, metavar="BYTES",
                        help="largest frame accepted before the direction turns opaque "
                             "(default: the protocol's own, 1 GiB for postgres, 64 MiB for "
                             "wallaroo)")
    parser.add_argument("--recorder-limit", type=_count(1), default=DEFAULT_LIMIT,
                        metavar="FRAMES")
    parser.add_argument("--recorder-max-bytes", type=_count(1), default=DEFAULT_MAX_BYTES,
                        metavar="BYTES", help="bytes the recorder's rows may hold (default 64 MiB)")
    parser.add_argument("--source-labels", metavar="CLIENT,SERVER", type=_labels,
                        default=f"{DEFAULT_CLIENT_LABEL},{DEFAULT_SERVER_LABEL}")
    parser.add_argument("--flows", action="store_true",
                        help="create mitmproxy flows and fire tcp_* hooks (slower)")
    parser.add_argument("--no-fast-path", action="store_true",
                        help="relay every read through mitmproxy's connection handler")
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's default loop")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command")


def proxy_option_values(args: argparse.Namespace) -> dict[str, Any]:
    """mitmproxy's options for what `add_proxy_options` parsed."""
    return dict(
        kill_grace=str(args.kill_grace),
        idle_timeout=str(args.idle_timeout),
        fifo_reply_timeout=str(args.fifo_reply_timeout),
        fifo_mode=args.fifo_mode,
        fifo_group=args.fifo_group,
        recorder_limit=args.recorder_limit,
        recorder_max_bytes=args.recorder_max_bytes,
        max_frame=args.max_frame,
        source_labels=args.source_labels,
        wirefault_flows=args.flows,
        fast_path=not args.no_fast_path,
    )


OPTION_FLAGS = {
    "slug": "--rule", "protocol": "--protocol", "fifo": "--fifo", "kill_grace": "--kill-grace",
    "fifo_reply_timeout": "--fifo-reply-timeout", "recorder_limit": "--recorder-limit",
    "recorder_max_bytes": "--recorder-max-bytes",
    "max_frame": "--max-frame", "source_labels": "--source-labels", "listen_port": "--listen",
    "listen_host": "--listen", "mode": "--upstream", "fifo_mode": "--fifo-mode",
    "fifo_group": "--fifo-group", "idle_timeout": "--idle-timeout", "seed": "--seed",
}
"""The CLI flag behind each mitmproxy option the runner sets, for error messages."""


async def serve(args: argparse.Namespace) -> int:
    from mitmproxy import options
    from mitmproxy.addons import next_layer, proxyserver
    from mitmproxy.master import Master

    from wirefault import protocols

    from .addon import WirefaultAddon
    from .startup import STARTUP_FAILED, StartupCheck

    listen_host, listen_port = args.listen
    up_host, up_port = args.upstream
    opts = options.Options()
    master = Master(opts)
    startup = StartupCheck("wirefault proxy", args.listen, args.fifo, args.ready_file)
    master.addons.add(proxyserver.Proxyserver(), next_layer.NextLayer(),
                      WirefaultAddon(option_names=OPTION_FLAGS), startup)
    try:
        opts.update(
            mode=[f"reverse:tcp://{up_host}:{up_port}"],
            listen_host=listen_host,
            listen_port=listen_port,
            # Lazy: the upstream is opened with the client's first bytes (mitmproxy's
            # reverse proxy decides its layer only then). Right when the client speaks first;
            # a protocol whose server may greet first needs it open at once.
            connection_strategy="lazy" if protocols.get(args.protocol).client_speaks_first
            else "eager",
            fifo=args.fifo,
            slug=args.rule,
            protocol=args.protocol,
            seed=args.seed,
            **proxy_option_values(args),
        )
    except Exception as exc:  # option errors are the user's: one line, no traceback
        print(f"wirefault proxy: {exc}", file=sys.stderr)
        return STARTUP_FAILED
    # Every read allocates short-lived frames and commands; the defaults collect the young
    # generation every 700 allocations. Freeze what start-up built so collections skip it.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, master.shutdown)
    await master.run()
    # Connections still open at shutdown are cancelled; asyncio would log each as an error.
    loop.set_exception_handler(_quiet_cancellation)
    return startup.exit_status


def _quiet_cancellation(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_rule(parser, args)
    return run_until_stopped(serve, args)


def run_until_stopped(serve_function: Callable[[argparse.Namespace], Any],
                      args: argparse.Namespace) -> int:
    """Log as `-v` asks, then run `serve_function(args)` on uvloop (asyncio's loop with
    --no-uvloop or without uvloop) until it returns its exit status: what `wirefault
    proxy` and `wirefault serve` share."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    run = asyncio.run
    if not args.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            run = uvloop.run
    try:
        return run(serve_function(args))
    except KeyboardInterrupt:
        return 0


def _check_rule(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a bad --rule before anything starts (the parser needs the protocol)."""
    from . import dsl

    try:
        dsl.parse(args.rule, args.protocol)
    except dsl.CommandError as exc:
        parser.error(f"argument --rule: {exc}")


if __name__ == "__main__":
    sys.exit(main())
