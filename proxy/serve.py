"""`wirefault serve`: many proxies in one process, on one event loop, from a config file.

    wirefault serve --config proxies.yaml [--seed N] [--ready-file PATH]

The same master, addon and layer as `wirefault proxy`, which is the case of one proxy: here
each configured proxy is one entry of mitmproxy's `mode` option,
`reverse:tcp://UPSTREAM@HOST:PORT`, so each has its own listener, and the addon picks the
proxy's runtime (engine, recorder, pause) by the listener that accepted a connection.

Start-up contract, as for `wirefault proxy`: once every enabled proxy listens and every FIFO
serves, one line on stdout, `ready NAME=HOST:PORT NAME=HOST:PORT ...` (the enabled proxies,
in config order, with the addresses actually bound), and the same line in `--ready-file`;
any start-up failure exits 2 with one line on stderr and nothing left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys

from .proxy_registry import ProxyError, ProxyRegistry, listen_problem
from .runner import GC_THRESHOLDS, OPTION_FLAGS, _count, _OneLineParser, _quiet_cancellation
from .startup import STARTUP_FAILED, StartupCheck

PROG = "wirefault serve"

EPILOG = """example:
  wirefault serve --config proxies.yaml --ready-file /tmp/wf.ready
  wirefault send --fifo /tmp/pg1.fifo 'conn.onQuery(query="^COMMIT").kill()'
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=PROG,
        description="Run many fault-injection proxies in one process, from a config file.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="the proxies (YAML; see proxy/serve_config.py)")
    parser.add_argument("--seed", type=_count(0), default=0, metavar="N",
                        help="seed of every proxy's randomness unless it has its own "
                             "(default 0)")
    parser.add_argument("--ready-file", metavar="PATH",
                        help="write the ready line to this file (atomically) once serving; "
                             "removed when it stops")
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's default loop")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command")
    return parser


class ServeStartupCheck(StartupCheck):
    """StartupCheck for many listeners: a failure names the proxy; ready names them all."""

    def __init__(self, registry: ProxyRegistry, config: str, ready_file: str | None) -> None:
        super().__init__(PROG, ("", 0), None, ready_file)
        self.registry = registry
        self.config = config

    def fail(self, problem: str) -> None:
        super().fail(f"--config {self.config}: {problem}")

    def _listeners(self) -> dict:
        from mitmproxy import ctx

        from . import mitm_internals

        return mitm_internals.listener_states(ctx.master.addons.get("proxyserver"))

    def _problem(self) -> str | None:
        states = self._listeners()
        for proxy in self.registry.proxies.values():
            if proxy.mode is None:
                continue
            addresses, failure = states.get(proxy.mode, ((), None))
            if not addresses:
                host, port = proxy.spec.listen
                reason = listen_problem(failure, port) if failure else \
                    "the listener did not start"
                return f"proxy {proxy.name}: listen {host}:{port}: {reason}"
        if self._collect.records:
            return self._collect.records[0].getMessage().splitlines()[0]
        return None

    def _announce(self) -> None:
        line = self.ready_line()
        if self.ready_file:
            try:
                self._write_ready_file(line)
            except OSError as exc:
                print(f"{PROG}: --ready-file {self.ready_file}: {exc.strerror or exc}",
                      file=sys.stderr, flush=True)
                self.exit_status = STARTUP_FAILED
                from mitmproxy import ctx

                ctx.master.shutdown()
                return
        print(line, flush=True)

    def ready_line(self) -> str:
        states = self._listeners()
        words = ["ready"]
        for proxy in self.registry.proxies.values():
            if proxy.mode is None:
                continue
            host, port = states[proxy.mode][0][0][:2]
            words.append(f"{proxy.name}={host}:{port}")
        return " ".join(words)


async def serve(args: argparse.Namespace, registry: ProxyRegistry | None = None) -> int:
    """Run until SIGINT or SIGTERM; `registry` lets an in-process caller (a test) hold the
    proxies' registry and change it at run time."""
    from mitmproxy import options
    from mitmproxy.addons import next_layer, proxyserver
    from mitmproxy.master import Master

    from .addon import WirefaultAddon
    from .serve_config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{PROG}: {exc.first_line}", file=sys.stderr)
        return STARTUP_FAILED
    registry = registry if registry is not None else ProxyRegistry()
    opts = options.Options()
    master = Master(opts)
    startup = ServeStartupCheck(registry, args.config, args.ready_file)
    master.addons.add(proxyserver.Proxyserver(), next_layer.NextLayer(),
                      WirefaultAddon(option_names=OPTION_FLAGS, registry=registry), startup)
    try:
        # Lazy by default: each connection of a proxy whose server may speak first is made
        # eager by the addon (client_connected).
        opts.update(mode=[], connection_strategy="lazy", seed=args.seed)
        for spec in config.proxies:
            registry.insert(spec)
        opts.update(mode=registry.modes())
    except ProxyError as exc:
        print(f"{PROG}: --config {args.config}: {exc}", file=sys.stderr)
        return STARTUP_FAILED
    except Exception as exc:  # option errors are the user's: one line, no traceback
        print(f"{PROG}: --config {args.config}: {exc}", file=sys.stderr)
        return STARTUP_FAILED
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, master.shutdown)
    await master.run()
    loop.set_exception_handler(_quiet_cancellation)
    return startup.exit_status


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
