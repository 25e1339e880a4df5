"""`wirefault serve`: many proxies in one process, on one event loop, from a config file.

    wirefault serve [--config proxies.yaml] [--api [HOST:]PORT] [--api-token-file PATH]
                    [--seed N] [--ready-file PATH] [--kill-grace S] [--idle-timeout S] ...

The options after --ready-file are `wirefault proxy`'s, for every proxy of the process.
Without --config the process starts with no proxy (as Toxiproxy's server does) and the
HTTP API adds them.

The same master, addon and layer as `wirefault proxy`, which is the case of one proxy: here
each configured proxy is one entry of mitmproxy's `mode` option,
`reverse:tcp://UPSTREAM@HOST:PORT`, so each has its own listener, and the addon picks the
proxy's runtime (engine, recorder, pause) by the listener that accepted a connection.

Start-up contract, as for `wirefault proxy`: once every enabled proxy listens and every FIFO
serves, one line on stdout, `ready NAME=HOST:PORT NAME=HOST:PORT ...` (the enabled proxies,
in config order, with the addresses actually bound, then `api=HOST:PORT` when the HTTP API
listens), and the same line in `--ready-file`; any start-up failure exits 2 with one line on
stderr and nothing left behind.

The HTTP API (proxy/http_api.py) listens on `--api` (default 127.0.0.1:8474; `none` or ''
for no API) on the same event loop. Any address other than loopback needs
`--api-token-file`: every request then carries `Authorization: Bearer TOKEN`.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import ipaddress
import signal
import sys

from .proxy_registry import ProxyRegistry, listen_problem
from .runner import (
    GC_THRESHOLDS,
    OPTION_FLAGS,
    _count,
    _OneLineParser,
    _quiet_cancellation,
    add_proxy_options,
    proxy_option_values,
    run_until_stopped,
)
from .startup import STARTUP_FAILED, StartupCheck

PROG = "wirefault serve"
DEFAULT_API = "127.0.0.1:8474"

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
    parser.add_argument("--config", metavar="FILE",
                        help="the proxies at start (YAML; see proxy/serve_config.py); "
                             "without it, none: the API adds them")
    parser.add_argument("--api", type=api_address, default=api_address(DEFAULT_API),
                        metavar="[HOST:]PORT",
                        help=f"where the HTTP API listens (default {DEFAULT_API}; 'none': no "
                             "API); an address other than loopback needs --api-token-file")
    parser.add_argument("--api-token-file", metavar="PATH",
                        help="file holding the bearer token every API request must carry")
    parser.add_argument("--seed", type=_count(0), default=0, metavar="N",
                        help="seed of every proxy's randomness unless it has its own "
                             "(default 0)")
    parser.add_argument("--ready-file", metavar="PATH",
                        help="write the ready line to this file (atomically) once serving; "
                             "removed when it stops")
    add_proxy_options(parser)
    return parser


def api_address(text: str) -> tuple[str, int] | None:
    """`--api`: [HOST:]PORT (default host 127.0.0.1), or none / '' for no API."""
    from .runner import _host_port

    if text.strip().lower() in ("", "none"):
        return None
    return _host_port(text.strip(), "127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _api_word(address: tuple[str, int]) -> str:
    host, port = address
    return f"--api {f'[{host}]' if ':' in host else host}:{port}"


def read_api_token(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The API's token and the start-up problem (one line), from --api / --api-token-file."""
    api, path = getattr(args, "api", None), getattr(args, "api_token_file", None)
    if api is None:
        return None, None
    token = None
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            return None, f"--api-token-file {path}: cannot read: {reason}"
        if not token or any(c.isspace() for c in token):
            return None, f"--api-token-file {path}: expected one token (no spaces), got " + \
                ("an empty file" if not token else "several words")
    if token is None and not is_loopback(api[0]):
        return None, (f"{_api_word(api)}: an address other than loopback needs "
                      "--api-token-file (a bearer token every request must carry)")
    return token, None


def start_api(registry: ProxyRegistry, args: argparse.Namespace, token: str | None):
    """The HTTP API, listening; (None, problem) when it cannot bind."""
    from .http_api import ApiServer
    from .ports import explain_address_in_use

    host, port = args.api
    server = ApiServer(registry, host, port, token)
    try:
        server.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return None, (f"{_api_word(args.api)}: address already in use: "
                          f"{explain_address_in_use(port)}")
        return None, f"{_api_word(args.api)}: cannot listen: {exc.strerror or exc}"
    return server, None


class ServeStartupCheck(StartupCheck):
    """StartupCheck for many listeners: a failure names the proxy; ready names them all."""

    def __init__(self, registry: ProxyRegistry, config: str | None,
                 ready_file: str | None) -> None:
        super().__init__(PROG, ("", 0), None, ready_file)
        self.registry = registry
        self.config = config
        self.api_word: str | None = None
        """`api=HOST:PORT` once the HTTP API listens."""

    def fail(self, problem: str) -> None:
        super().fail(f"--config {self.config}: {problem}" if self.config else problem)

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
        if self.api_word:
            words.append(self.api_word)
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
        specs = load_config(args.config).proxies if args.config else []
    except ConfigError as exc:
        print(f"{PROG}: {exc.first_line}", file=sys.stderr)
        return STARTUP_FAILED
    token, problem = read_api_token(args)
    if problem:
        print(f"{PROG}: {problem}", file=sys.stderr)
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
        opts.update(mode=[], connection_strategy="lazy", seed=args.seed,
                    **proxy_option_values(args))
    except Exception as exc:  # option errors are the user's: one line, no traceback
        print(f"{PROG}: {exc}", file=sys.stderr)
        return STARTUP_FAILED
    where = f"--config {args.config}: " if args.config else ""
    try:
        for spec in specs:
            registry.insert(spec)
        opts.update(mode=registry.modes())
    except Exception as exc:  # ProxyError, or an option error: one line, no traceback
        print(f"{PROG}: {where}{exc}", file=sys.stderr)
        return STARTUP_FAILED
    api = None
    if getattr(args, "api", None) is not None:
        api, problem = start_api(registry, args, token)
        if api is None:
            print(f"{PROG}: {problem}", file=sys.stderr)
            return STARTUP_FAILED
        startup.api_word = api.ready_word
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, master.shutdown)
    try:
        await master.run()
    finally:
        if api is not None:
            await api.stop()
    loop.set_exception_handler(_quiet_cancellation)
    return startup.exit_status


def main(argv: list[str] | None = None) -> int:
    return run_until_stopped(serve, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
