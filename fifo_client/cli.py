"""The `wirefault` command line.

    wirefault send 'conn.onQuery(query="^COMMIT").kill()'   # exit 1 if rejected
    wirefault faults add slow 'onQuery(query="^SELECT").delay(200)'
    wirefault faults list [--json]
    wirefault faults remove slow
    wirefault faults clear
    wirefault status [--json]                                # status line and faults table
    wirefault dump --format json
    wirefault reset
    wirefault wait-ready --timeout 30                        # exit 2 if no proxy answers
    wirefault proxy --listen 9060 --upstream localhost:5432 --fifo /tmp/wf.fifo
    wirefault serve --config proxies.yaml                    # many proxies, one process

Every client command takes `--fifo PATH` (default $WIREFAULT_FIFO), or `--api URL --proxy
NAME` (or `--api http://HOST:PORT/proxies/NAME`) for a proxy of `wirefault serve`.

Exit status: 0 on success, 1 when the proxy rejects the command (its message on stderr),
or there is no fault of that name to remove, 2 when no proxy answers on the FIFO or the API
(or the command line is wrong).

`proxy`, `serve` and `chaos` are handed to their own modules, imported only then, so the client
commands never import mitmproxy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from . import http_transport
from .client import (
    DEFAULT_TIMEOUT,
    FaultInfo,
    FaultProxy,
    TrafficRow,
    copy_escape,
    format_copy,
    format_timestamp,
)
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
    "faults add": """example:
  wirefault faults add --fifo /tmp/wf.fifo commit-kill 'onQuery(query="^COMMIT").kill()'
  wirefault faults add --fifo /tmp/wf.fifo slow '.onQuery().delay(100, jitter=50)' --seed 7
  wirefault faults add --fifo /tmp/wf.fifo flaky 'conn.onQuery().probability(0.1).reset()'

The chain may start with conn, with the dot or with the first step; - reads it from
standard input. A fault of the same name is replaced.
""",
    "faults list": """example:
  wirefault faults list --fifo /tmp/wf.fifo
  wirefault faults list --fifo /tmp/wf.fifo --json
""",
    "faults remove": """example:
  wirefault faults remove --fifo /tmp/wf.fifo commit-kill   # exit 1 if there is none
""",
    "faults clear": """example:
  wirefault faults clear --fifo /tmp/wf.fifo
""",
    "status": """example:
  wirefault status --fifo /tmp/wf.fifo
  wirefault status --fifo /tmp/wf.fifo --json
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
  wirefault faults add slow 'onQuery().delay(100)'
  wirefault status
  wirefault dump

exit status: 0 success, 1 command rejected by the proxy (or no fault of that name),
2 no proxy answered
"""


def _lazy_proxy(argv: list[str]) -> int:
    from wirefault.proxy import runner

    return runner.main(argv)


def _lazy_serve(argv: list[str]) -> int:
    from wirefault.proxy import serve

    return serve.main(argv)


def _lazy_chaos(argv: list[str]) -> int:
    from wirefault.fifo_client import chaos

    return chaos.main(argv)


LAZY_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "proxy": _lazy_proxy,
    "serve": _lazy_serve,
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
    """`wirefault send -`, `faults add NAME -`: the command from standard input (too long
    for an argument)."""
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


def _faults_add(proxy: FaultProxy, args: argparse.Namespace) -> int:
    chain = _read_stdin_command() if args.chain == "-" else args.chain
    proxy.add_fault(args.name, chain, args.seed)
    return EXIT_OK


def _faults_list(proxy: FaultProxy, args: argparse.Namespace) -> int:
    infos = proxy.faults()
    if args.json:
        sys.stdout.write(json.dumps([fault_json(info) for info in infos], ensure_ascii=False,
                                    indent=1) + "\n")
    else:
        sys.stdout.write(format_faults(infos))
    return EXIT_OK


def _faults_remove(proxy: FaultProxy, args: argparse.Namespace) -> int:
    proxy.remove_fault(args.name)
    return EXIT_OK


def _faults_clear(proxy: FaultProxy, args: argparse.Namespace) -> int:
    proxy.clear_faults()
    return EXIT_OK


def _status(proxy: FaultProxy, args: argparse.Namespace) -> int:
    # Two exchanges, so a fault may come or go between them: `faults=` is the proxy's own
    # count at the first, the table what the second found.
    status = proxy.status()
    infos = proxy.faults()
    if args.json:
        data = {"status": status, "faults": [fault_json(info) for info in infos]}
        sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
        return EXIT_OK
    line = " ".join(f"{key}={value}" for key, value in status.items())
    table = format_faults(infos)
    sys.stdout.write(line + "\n" + ("\n" + table if table else ""))
    return EXIT_OK


def fault_json(info: FaultInfo) -> dict[str, object]:
    return {"name": info.name, "matched": info.matched, "fired": info.fired,
            "added": format_timestamp(info.added), "state": info.state,
            "command": info.command}


def format_faults(infos: list[FaultInfo]) -> str:
    """Aligned columns, one fault per line, numbers on the right; '' without faults."""
    if not infos:
        return ""
    table = [("name", "state", "matched", "fired", "added", "command")]
    table += [(info.name, info.state, str(info.matched), str(info.fired),
               format_timestamp(info.added), info.command) for info in infos]
    widths = [max(len(line[column]) for line in table) for column in range(5)]
    lines = []
    for name, state, matched, fired, added, command in table:
        lines.append(f"{name:<{widths[0]}}  {state:<{widths[1]}}  {matched:>{widths[2]}}  "
                     f"{fired:>{widths[3]}}  {added:<{widths[4]}}  {command}".rstrip())
    return "\n".join(lines) + "\n"


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
    common.add_argument("--fifo", metavar="PATH", default=None,
                        help=f"the proxy's command FIFO (default: ${FIFO_ENV})")
    common.add_argument("--api", metavar="URL",
                        help="instead of a FIFO, the HTTP API of wirefault serve: "
                             "http://HOST:PORT with --proxy NAME, or "
                             "http://HOST:PORT/proxies/NAME (token: $WIREFAULT_API_TOKEN)")
    common.add_argument("--proxy", metavar="NAME",
                        help="with --api URL: the proxy of wirefault serve to drive")
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
            help_text: str, group: argparse._SubParsersAction | None = None,
            label: str | None = None) -> argparse.ArgumentParser:
        label = label or name
        sub = (group or commands).add_parser(
            name, parents=[common], help=help_text, description=help_text + ".",
            epilog=_EXAMPLES[label], formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=run, label=label)
        return sub

    add("send", _send, "send one command and print any reply").add_argument(
        "command", metavar="COMMAND",
        help='e.g. conn.onQuery(query="^COMMIT").kill(); - reads it from standard input')
    add("dump", _dump, "print the traffic recorded since the last dump or reset").add_argument(
        "--format", choices=list(FORMATTERS), default="table",
        help="table (default), copy (PostgreSQL COPY text rows) or json")
    add("reset", _reset, "forget the recorded traffic (recorder.reset())")
    add("allow", _allow, "let all traffic through again (conn.allow(): removes every fault)")
    _add_faults_commands(commands, add)
    add("status", _status, "print the proxy's status line and the faults in force").add_argument(
        "--json", action="store_true", help="one JSON object: status and faults")
    add("wait-ready", _wait_ready,
        "wait until a proxy answers on the FIFO (exit 0), or the timeout passes (exit 2)")
    commands.add_parser("proxy", add_help=False,
                        help="run the proxy (wirefault proxy --help for its options)")
    commands.add_parser("serve", add_help=False,
                        help="run many proxies from a config file (wirefault serve --help)")
    commands.add_parser("chaos", add_help=False,
                        help="run a chaos scenario (wirefault chaos --help)")
    return parser


def _add_faults_commands(commands: argparse._SubParsersAction,
                         add: Callable[..., argparse.ArgumentParser]) -> None:
    """`wirefault faults add|list|remove|clear`: named faults, several in force at once."""
    faults = commands.add_parser(
        "faults", help="add, list, remove or clear named faults",
        description="Named faults: several are in force at once, each added, replaced or "
                    "removed by its name.",
        epilog="wirefault faults COMMAND --help shows each command's options and an example.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    group = faults.add_subparsers(dest="faults_command", metavar="COMMAND", required=True)
    sub = add("add", _faults_add, "add a named fault, or replace the fault of that name",
              group, "faults add")
    sub.add_argument("name", metavar="NAME",
                     help="a letter or digit, then up to 63 letters, digits, '_', '.', ':', '-'")
    sub.add_argument("chain", metavar="CHAIN",
                     help='its steps and action, e.g. onQuery(query="^COMMIT").kill() (a '
                          'leading conn or dot is fine); - reads it from standard input')
    sub.add_argument("--seed", type=int, metavar="N",
                     help="seed its random choices (probability, jitter) for a repeatable run")
    add("list", _faults_list, "print the faults in force, in the order they were added",
        group, "faults list").add_argument("--json", action="store_true",
                                           help="a JSON list instead of a table")
    add("remove", _faults_remove, "remove the fault of that name (exit 1 if there is none)",
        group, "faults remove").add_argument("name", metavar="NAME")
    add("clear", _faults_clear, "remove every fault", group, "faults clear")


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
    target, problem = _target(args)
    if problem is not None:
        print(f"wirefault {args.label}: {problem}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return _run(args, target)


def _target(args: argparse.Namespace) -> tuple[str, str | None]:
    """What `FaultProxy` is given (a FIFO path or a proxy's API URL), or the usage problem:
    `--api URL --proxy NAME`, `--api URL/proxies/NAME`, `--fifo PATH`, `$WIREFAULT_FIFO`."""
    if args.api is None:
        if args.proxy is not None:
            return "", "--proxy NAME needs --api URL"
        fifo = args.fifo or os.environ.get(FIFO_ENV)
        if not fifo:
            return "", f"no FIFO: give --fifo PATH or set {FIFO_ENV}"
        return fifo, None
    if args.fifo is not None:
        return "", "give --fifo PATH or --api URL, not both"
    api = args.api if http_transport.is_api_url(args.api) else f"http://{args.api}"
    try:
        name: str | None = http_transport.parse_proxy_url(api)[1]
    except ValueError:
        name = None
    if args.proxy is None:
        if name is None:
            return "", (f"--api {args.api}: which proxy? give --proxy NAME or a URL "
                        "ending in /proxies/NAME")
        return api, None
    if name is not None:
        if name != args.proxy:
            return "", f"--api {args.api} names proxy {name!r}, --proxy {args.proxy!r}"
        return api, None
    if not args.proxy:
        return "", "--proxy: expected a proxy name"
    return http_transport.proxy_url(api, args.proxy), None


def _run(args: argparse.Namespace, target: str) -> int:
    try:
        proxy = FaultProxy(target, timeout=args.timeout)
    except ValueError as exc:
        print(f"wirefault {args.label}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        return args.run(proxy, args)
    except CommandError as exc:
        print(f"wirefault {args.label}: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    except ProxyUnavailable as exc:
        print(f"wirefault {args.label}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except WirefaultError as exc:  # e.g. the path is no FIFO
        print(f"wirefault {args.label}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
