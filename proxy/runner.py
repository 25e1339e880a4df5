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

from .recorder import DEFAULT_CLIENT_LABEL, DEFAULT_LIMIT, DEFAULT_SERVER_LABEL
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


def build_parser() -> argparse.ArgumentParser:
    from wirefault import protocols

    parser = argparse.ArgumentParser(
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
    parser.add_argument("--rule", default=DEFAULT_RULE, metavar="COMMAND",
                        help="the rule in force at start")
    parser.add_argument("--fifo-reply-timeout", type=float, default=DEFAULT_REPLY_TIMEOUT,
                        metavar="SECONDS",
                        help="how long a FIFO client may take to read its reply")
    parser.add_argument("--kill-grace", type=float, default=DEFAULT_KILL_GRACE,
                        metavar="SECONDS")
    parser.add_argument("--max-frame", type=int, default=0, metavar="BYTES",
                        help="largest frame accepted before the direction turns opaque "
                             "(default: the protocol's own, 1 GiB for postgres, 64 MiB for "
                             "wallaroo)")
    parser.add_argument("--recorder-limit", type=int, default=DEFAULT_LIMIT, metavar="FRAMES")
    parser.add_argument("--source-labels", metavar="CLIENT,SERVER",
                        default=f"{DEFAULT_CLIENT_LABEL},{DEFAULT_SERVER_LABEL}")
    parser.add_argument("--flows", action="store_true",
                        help="create mitmproxy flows and fire tcp_* hooks (slower)")
    parser.add_argument("--no-fast-path", action="store_true",
                        help="relay every read through mitmproxy's connection handler")
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's default loop")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command")
    return parser


async def serve(args: argparse.Namespace) -> int:
    from mitmproxy import options
    from mitmproxy.addons import next_layer, proxyserver
    from mitmproxy.master import Master

    from .addon import WirefaultAddon

    listen_host, listen_port = args.listen
    up_host, up_port = args.upstream
    opts = options.Options()
    master = Master(opts)
    master.addons.add(proxyserver.Proxyserver(), next_layer.NextLayer(), WirefaultAddon())
    try:
        opts.update(
            mode=[f"reverse:tcp://{up_host}:{up_port}"],
            listen_host=listen_host,
            listen_port=listen_port,
            connection_strategy="lazy",
            fifo=args.fifo,
            slug=args.rule,
            protocol=args.protocol,
            kill_grace=str(args.kill_grace),
            fifo_reply_timeout=str(args.fifo_reply_timeout),
            recorder_limit=args.recorder_limit,
            max_frame=args.max_frame,
            source_labels=args.source_labels,
            wirefault_flows=args.flows,
            fast_path=not args.no_fast_path,
        )
    except Exception as exc:  # option errors are the user's: one line, no traceback
        print(f"wirefault proxy: {exc}", file=sys.stderr)
        return 2
    # Every read allocates short-lived frames and commands; the defaults collect the young
    # generation every 700 allocations. Freeze what start-up built so collections skip it.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, master.shutdown)
    ready = asyncio.ensure_future(_announce(master, args))
    await master.run()
    ready.cancel()
    # Connections still open at shutdown are cancelled; asyncio would log each as an error.
    loop.set_exception_handler(_quiet_cancellation)
    return 0


def _quiet_cancellation(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)


async def _announce(master, args: argparse.Namespace) -> None:
    ps = master.addons.get("proxyserver")
    while not ps.is_running or not ps.listen_addrs():
        await asyncio.sleep(0.02)
    addrs = ", ".join(f"{h}:{p}" for h, p, *_ in ps.listen_addrs())
    print(f"wirefault proxy: listening on {addrs}, upstream {args.upstream[0]}:"
          f"{args.upstream[1]}, protocol {args.protocol}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        return run(serve(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
