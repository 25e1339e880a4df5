"""The `wirefault` command line.

    wirefault send 'conn.onQuery(query="^COMMIT").kill()'   # exit 1 if rejected
    wirefault dump --format json
    wirefault reset
    wirefault wait-ready --timeout 30                        # exit 2 if no proxy answers
    wirefault proxy --listen 9060 --upstream localhost:5432 --fifo /tmp/wf.fifo

Exit status: 0 on success, 1 when the proxy rejects the command (its message on stderr),
2 when no proxy answers on the FIFO (or the command line is wrong).

`proxy` and `chaos` are handed to their own modules, imported only then, so the client
commands never import mitmproxy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from .client import DEFAULT_TIMEOUT, FaultProxy, TrafficRow, copy_escape, format_copy
from .errors import CommandError, ProxyUnavailable, WirefaultError

FIFO_ENV = "WIREFAULT_FIFO"
EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_UNAVAILABLE = 2

_EXAMPLES = {
    "send": """example:
  wirefault send --fifo /tmp/wf.fifo 'conn.onQuery(query="^COMMIT").after(2).kill()'
  WIREFAULT_FIFO=/tmp/wf.fifo wirefault send 'conn.allow()'
""",
    "dump": """example:
  wirefault dump --fifo /tmp/wf.fifo --format json
""",
    "reset": """example:
  wirefault reset --fifo /tmp/wf.fifo
""",
    "allow": """example:
  wirefault allow --fifo /tmp/wf.fifo
""",
    "wait-ready": """example:
  wirefault proxy --listen 9060 --upstream localhost:5432 --fifo /tmp/wf.fifo &
  wirefault wait-ready --fifo /tmp/wf.fifo --timeout 30 && run_the_suite
""",
}

MAIN_EPILOG = f"""example:
  wirefault proxy --listen 9060 --upstream localhost:5432 --fifo /tmp/wf.fifo &
  export {FIFO_ENV}=/tmp/wf.fifo
  wirefault send 'conn.onQuery(query="^COMMIT").kill()'
  wirefault dump

exit status: 0 success, 1 command rejected by the proxy, 2 no proxy answered
"""


def _lazy_proxy(argv: list[str]) -> int:
    from wirefault.proxy import runner

    return runner.main(argv)


def _lazy_chaos(argv: list[str]) -> int:
    from wirefault.fifo_client import chaos

    return chaos.main(argv)


LAZY_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "proxy": _lazy_proxy,
    "chaos": _lazy_chaos,
}


# -- subcommands ----------------------------------------------------------------------------


def _send(proxy: FaultProxy, args: argparse.Namespace) -> int:
    command = _read_stdin_command() if args.command == "-" else args.command
    reply = proxy.send(command)
    if reply:  # a dump sent by hand
        print(reply)
    return EXIT_OK


def _read_stdin_command() -> str:
    """`wirefault send -`: the command from standard input (too long for an argument)."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(f"the command on standard input is not valid UTF-8 (byte "
                           f"0x{data[exc.start]:02x} at offset {exc.start})") from None


def _wait_ready(proxy: FaultProxy, args: argparse.Namespace) -> int:
    proxy.wait_ready()
    return EXIT_OK


def _dump(proxy: FaultProxy, args: argparse.Namespace) -> int:
    rows = proxy.dump()
    sys.stdout.write(FORMATTERS[args.format](rows))
    return EXIT_OK


def _reset(proxy: FaultProxy, args: argparse.Namespace) -> int:
    proxy.reset_traffic()
    return EXIT_OK


def _allow(proxy: FaultProxy, args: argparse.Namespace) -> int:
    proxy.allow()
    return EXIT_OK


def format_table(rows: list[TrafficRow]) -> str:
    """Aligned columns, one row per line (newlines and tabs in messages shown escaped)."""
    if not rows:
        return ""
    table = [("conn", "source", "message")]
    table += [(str(r.conn), copy_escape(r.source), copy_escape(r.message)) for r in rows]
    conn_width = max(len(line[0]) for line in table)
    source_width = max(len(line[1]) for line in table)
    return "".join(f"{c:>{conn_width}}  {s:<{source_width}}  {m}".rstrip() + "\n"
                   for c, s, m in table)


def format_json(rows: list[TrafficRow]) -> str:
    data = [{"conn": r.conn, "source": r.source, "message": r.message} for r in rows]
    return json.dumps(data, ensure_ascii=False, indent=1) + "\n"


FORMATTERS: dict[str, Callable[[list[TrafficRow]], str]] = {
    "table": format_table,
    "copy": format_copy,
    "json": format_json,
}


# -- the parser -----------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--fifo", metavar="PATH", default=os.environ.get(FIFO_ENV),
                        help=f"the proxy's command FIFO (default: ${FIFO_ENV})")
    common.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT,
                        metavar="SECONDS",
                        help=f"give up when no proxy answers in time (default "
                             f"{DEFAULT_TIMEOUT:g})")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wirefault",
        description="Control a running wirefault proxy, or run one.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    common = _connection_options()

    def add(name: str, run: Callable[[FaultProxy, argparse.Namespace], int],
            help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help_text,
                                  description=help_text + ".", epilog=_EXAMPLES[name],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=run)
        return sub

    add("send", _send, "send one command and print any reply").add_argument(
        "command", metavar="COMMAND",
        help='e.g. conn.onQuery(query="^COMMIT").kill(); - reads it from standard input')
    add("dump", _dump, "print the traffic recorded since the last dump or reset").add_argument(
        "--format", choices=list(FORMATTERS), default="table",
        help="table (default), copy (PostgreSQL COPY text rows) or json")
    add("reset", _reset, "forget the recorded traffic (recorder.reset())")
    add("allow", _allow, "let all traffic through again (conn.allow())")
    add("wait-ready", _wait_ready,
        "wait until a proxy answers on the FIFO (exit 0), or the timeout passes (exit 2)")
    commands.add_parser("proxy", add_help=False,
                        help="run the proxy (wirefault proxy --help for its options)")
    commands.add_parser("chaos", add_help=False,
                        help="run a chaos scenario (wirefault chaos --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in LAZY_COMMANDS:
        return LAZY_COMMANDS[arguments[0]](arguments[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exit_:  # --help, or a usage error already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_UNAVAILABLE
    if not args.fifo:
        print(f"wirefault {args.subcommand}: no FIFO: give --fifo PATH or set {FIFO_ENV}",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    proxy = FaultProxy(args.fifo, timeout=args.timeout)
    try:
        return args.run(proxy, args)
    except CommandError as exc:
        print(f"wirefault {args.subcommand}: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    except ProxyUnavailable as exc:
        print(f"wirefault {args.subcommand}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except WirefaultError as exc:  # e.g. the path is no FIFO
        print(f"wirefault {args.subcommand}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
