"""Hostile input, commands: generated and mutated commands through the parser, through a
running proxy's FIFO and through `wirefault serve`'s HTTP API.

Commands come from the grammar (proxy/dsl_vocabulary.py: every root, step, action and
command with its parameters, each argument drawn valid, out of range, of the wrong type,
missing, unknown or extra; `on<Message>` filters with the catalogue's fields and unknown
ones) and from mutations of the Citus corpus (tests/data/citus_commands.txt: characters
deleted, inserted, swapped, duplicated; numbers made huge, negative or not numbers; strings
unterminated; chains repeated thousands of times; nesting past any parser's depth).

What must hold: the parser either accepts a command or raises `CommandError`, whose text is
one line, `column N: ...`, with N inside the command; never another exception. A proxy
answers every command; a rejection is one such line (never `internal error`), and after it
the proxy's faults (`faults.list()`) and status are exactly what they were.
"""

from __future__ import annotations

import json
import random
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from campaign import FULL, Row, Size, part

from wirefault import protocols
from wirefault.proxy import dsl
from wirefault.proxy.dsl_vocabulary import (
    ACTIONS,
    FAULT_COMMANDS,
    FILTER_PREFIX,
    FILTERS,
    PROXY_COMMANDS,
    RECORDER_COMMANDS,
    MethodSpec,
    Param,
)

CORPUS = Path(__file__).resolve().parents[1] / "data" / "citus_commands.txt"
SHARED_CORPUS = Path("/work/shared/corpus/citus_commands.txt")
ERROR_LINE = re.compile(r"column (\d+): \S.*")
PROTOCOL_NAMES = ("postgres", "wallaroo", "raw")


# --- generation -----------------------------------------------------------------------------


def _regex(rng: random.Random) -> str:
    return rng.choice(["^BEGIN", "COMMIT", "(a|b)*c", "[", "(a+)+$", "\\d{2,}", "", ".*",
                       "x" * rng.randint(0, 300), "(?P<n>a)", "\\", "é€", "a{99999}"])


def _number(param: Param, rng: random.Random) -> Any:
    number = param.number
    assert number is not None
    low, high = number.low, number.high if number.high is not None else 10_000
    return rng.choice([
        rng.randint(low, high) if number.integer else rng.uniform(low, high),
        low, high, low - 1, (high or 0) + 1, -5, 1.5, 10**30, "1", None, True,
        float("nan"), float("inf"), "ms", [1]])


def _literal(value: Any) -> str:
    if isinstance(value, float) and value != value:
        return "float('nan')"
    if value == float("inf"):
        return "1e999"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _arguments(spec: MethodSpec, rng: random.Random, fields: tuple[str, ...] = ()) -> str:
    params = spec.params
    if spec.alternatives and rng.random() < 0.5:
        params = rng.choice(spec.alternatives)
    args: list[str] = []
    for index, param in enumerate(params):
        if not param.required and rng.random() < 0.5:
            continue
        if param.required and rng.random() < 0.05:
            continue  # missing
        value = _number(param, rng) if param.number else (
            rng.randint(-3, 2**32) if param.name == "pid" else _regex(rng))
        keyword = not param.required or rng.random() < 0.3 or spec.name == "where"
        if keyword or index != len(args):
            args.append(f"{param.name}={_literal(value)}")
        else:
            args.append(_literal(value))
    for name in fields:
        if rng.random() < 0.5:
            args.append(f"{name}={_literal(_regex(rng))}")
    if rng.random() < 0.05:
        args.append(rng.choice(["unknown=1", "1", "x", "**{}", "*[]", "a=1, a=2"]))
    return f"{spec.name}({', '.join(args)})"


def _step(protocol: protocols.ProtocolSpec, rng: random.Random) -> str:
    if rng.random() < 0.5:
        name = rng.choice([*protocol.messages, "Nonsense", "query"])
        message = protocol.messages.get(name)
        fields = tuple(rng.sample(message.fields, min(len(message.fields), rng.randint(0, 2))))\
            if message else ()
        fields += protocol.derived_fields.get(name, ())[:1]
        if rng.random() < 0.05:
            fields += ("no_such_field",)
        spec = MethodSpec(FILTER_PREFIX + name, (), "")
        return _arguments(spec, rng, fields)
    return _arguments(rng.choice(list(FILTERS.values())), rng)


def generated_command(protocol: protocols.ProtocolSpec, rng: random.Random) -> str:
    """One command from the grammar, with arguments valid or not."""
    draw = rng.random()
    if draw < 0.15:
        table = rng.choice([FAULT_COMMANDS, RECORDER_COMMANDS, PROXY_COMMANDS])
        root = {id(FAULT_COMMANDS): "faults", id(RECORDER_COMMANDS): "recorder",
                id(PROXY_COMMANDS): "proxy"}[id(table)]
        spec = rng.choice(list(table.values()))
        if spec.name == "add":
            return f"{root}.{_arguments(spec, rng)}"
        return f"{root}.{_arguments(spec, rng)}"
    head = "conn" if draw < 0.6 else f"faults.add({_literal(_fault_name(rng))}" + (
        f", seed={rng.randint(-1, 99)})" if rng.random() < 0.3 else ")")
    steps = [_step(protocol, rng) for _ in range(rng.randint(0, 3))]
    action = _arguments(rng.choice(list(ACTIONS.values())), rng)
    if rng.random() < 0.03:
        action = ""  # no action
    return ".".join([head, *steps, action] if action else [head, *steps])


def _fault_name(rng: random.Random) -> str:
    return rng.choice(["f1", "commit-kill", "a" * 64, "a" * 65, "", "-x", "x y", "é", "f.1:2"])


_INSERTS = [*"().,=\"'\\ _-[]{}*#0123456789", "\0", "\x01", "\n", "é", "\udcff", "€",
                                                    "\u202e", "conn.", "faults.", "None"]


def mutated_command(line: str, rng: random.Random) -> str:
    """`line` (a corpus command) broken one way or another."""
    kind = rng.randrange(10)
    at = rng.randint(0, len(line))
    if kind == 0:
        return line[:at] + line[at + rng.randint(1, 5):]
    if kind == 1:
        return line[:at] + rng.choice(_INSERTS) + line[at:]
    if kind == 2 and len(line) > 2:
        j = rng.randint(0, len(line) - 2)
        return line[:j] + line[j + 1] + line[j] + line[j + 2:]
    if kind == 3:
        return line[:at]
    if kind == 4:
        return re.sub(r"\d+", lambda _: rng.choice(["99999999999999999999", "-1", "1.5e308",
                                                   "0x10", "1_000", "nan", ""]), line)
    if kind == 5:
        return line.replace('"', rng.choice(["", "'", '"""', '\\"']), 1)
    if kind == 6:
        head, _, rest = line.partition(".")
        step = rest.split(".", 1)[0]
        return ".".join([head, *[step] * rng.choice((2, 50, 5000)), rest])
    if kind == 7:
        depth = rng.choice((10, 200, 100_000))
        return line[:at] + "(" * depth + line[at:] + ")" * depth
    if kind == 8:
        return line + rng.choice(["; import os", " or 1", "[0]", ".__class__", "()", " #"])
    return line[:at] + line[at:at + rng.randint(1, 40)] * rng.randint(2, 30) + line[at:]


def corpus() -> list[str]:
    lines: list[str] = []
    for path in (CORPUS, SHARED_CORPUS):
        if path.exists():
            lines += [line for line in path.read_text().splitlines() if line.strip()]
    return lines


def commands(count: int, seed: int) -> list[tuple[str, str]]:
    """(protocol, command): half from the grammar, half mutated from the corpus (postgres)."""
    rng = random.Random(seed)
    lines = corpus()
    out = []
    for index in range(count):
        if index % 2 or not lines:
            name = rng.choice(PROTOCOL_NAMES)
            out.append((name, generated_command(protocols.get(name), rng)))
        else:
            out.append(("postgres", mutated_command(rng.choice(lines), rng)))
    return out


def error_problem(command: str, error: str) -> str | None:
    """Why `error` is not an acceptable rejection of `command`; None when it is."""
    if "\n" in error.rstrip("\n"):
        return "a multi-line error"
    if "internal error" in error:
        return "internal error"
    match = ERROR_LINE.fullmatch(error.rstrip("\n"))
    if match is None:
        return "no column"
    if not 1 <= int(match.group(1)) <= max(len(command.strip()), 1) + 1:
        return f"column {match.group(1)} outside the command"
    return None


# --- the parser -----------------------------------------------------------------------------


def through_parser(count: int, seed: int) -> Row:
    started = time.perf_counter()
    rejected = accepted = 0
    problems: list[str] = []
    slowest = 0.0
    for name, command in commands(count, seed):
        before = time.perf_counter()
        try:
            dsl.parse(command, name)
            accepted += 1
        except dsl.CommandError as exc:
            rejected += 1
            problem = error_problem(command, str(exc))
            if problem:
                problems.append(f"{problem}: {command[:80]!r} -> {str(exc)[:120]!r}")
        except Exception as exc:  # the bug this row hunts
            problems.append(f"{type(exc).__name__} for {command[:80]!r}: {exc}")
        slowest = max(slowest, time.perf_counter() - before)
    seconds = time.perf_counter() - started
    return Row("hostile input", "commands from the grammar and the mutated Citus corpus, "
               "through the parser", f"{count:,} commands", "; ".join(problems[:3]) or "nothing",
               f"{accepted:,} accepted, {rejected:,} rejected with a one-line error and its "
               f"column; {count / seconds:,.0f} commands/s, slowest {slowest * 1000:.1f} ms",
               not problems)


# --- a running proxy ------------------------------------------------------------------------


def _over_a_proxy(count: int, seed: int, exchange: Any, transport: str) -> Row:
    """`exchange(command) -> reply` to a postgres proxy; the row of checking every reply."""
    problems: list[str] = []
    accepted = rejected = 0
    sample = [(n, c) for n, c in commands(count * 3, seed) if n == "postgres"][:count]
    state = exchange("faults.list()"), exchange("proxy.status()")
    longest = 0.0
    for _, command in sample:
        command = command.replace("\n", " ")  # a FIFO line is one command
        before = time.perf_counter()
        try:
            reply = exchange(command)
        except Exception as exc:  # no answer is the worst answer
            problems.append(f"no reply ({type(exc).__name__}) to {command[:120]!r}")
            continue
        longest = max(longest, time.perf_counter() - before)
        if command.strip().startswith(("recorder.dump", "faults.list", "proxy.status",
                                       "proxy.ping")) and not ERROR_LINE.match(reply):
            continue  # data, not a verdict
        if reply in ("", "\n"):
            accepted += 1
            state = exchange("faults.list()"), exchange("proxy.status()")
            continue
        rejected += 1
        problem = error_problem(command, reply)
        # the FIFO's documented answers to bytes that are no command: one line, naming the
        # limit or the byte offset (command_channel.py), before any parsing
        if problem and not reply.startswith(("command longer than",
                                             "command is not valid UTF-8 at byte offset")):
            problems.append(f"{problem}: {command[:80]!r} -> {reply[:120]!r}")
        now = exchange("faults.list()"), exchange("proxy.status()")
        if now != state:
            problems.append(f"a rejected command changed the proxy: {command[:80]!r}")
            state = now
    return Row("hostile input", f"commands through {transport} of a running proxy",
               f"{len(sample):,} commands", "; ".join(problems[:3]) or "nothing",
               f"{accepted:,} accepted, {rejected:,} rejected, each with faults.list() and "
               f"proxy.status() unchanged after it; slowest reply {longest * 1000:.1f} ms",
               not problems)


def through_fifo(count: int, seed: int) -> Row:
    from pgserver import free_port
    from proxy_helpers import running_proxy

    from wirefault.fifo_client import FaultProxy, transport

    with running_proxy(free_port()) as proxy:
        FaultProxy(proxy.fifo, timeout=30).wait_ready()

        def exchange(command: str) -> str:
            # as FaultProxy does, but a lone surrogate goes as the byte it escapes: the
            # proxy gets invalid UTF-8 too
            deadline = transport.Deadline(30)
            with transport.exclusive_lock(proxy.fifo, deadline):
                reply = transport.exchange(
                    proxy.fifo, (command + "\n").encode("utf-8", "surrogateescape"), deadline)
            return reply.decode("utf-8", "replace")

        row = _over_a_proxy(count, seed, exchange, "the FIFO")
        if proxy.process.poll() is not None:
            row.passed, row.lost = False, "the proxy exited"
    return row


def through_http(count: int, seed: int, work: Path) -> Row:
    from pgserver import free_port
    from proxy_helpers import running_serve

    config = work / "serve.yaml"
    config.write_text(f"proxies:\n  - name: pg\n    listen: 127.0.0.1:{free_port()}\n"
                      f"    upstream: 127.0.0.1:{free_port()}\n")
    with running_serve(config) as serve:
        # running_serve pipes stderr, where serve logs each rejected command: unread, the
        # pipe fills and serve blocks writing its log (as any process would)
        url = f"{serve.api}/api/proxies/pg/commands"

        def exchange(command: str) -> str:
            body = json.dumps({"command": command}).encode()
            request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as reply:
                return json.load(reply)["reply"]

        row = _over_a_proxy(count, seed, exchange, "the HTTP API")
        if serve.process.poll() is not None:
            row.passed, row.lost = False, "wirefault serve exited"
    return row


@part("input-commands")
def run(size: Size, work: Path) -> list[Row]:
    full = size == FULL
    return [through_parser(100_000 if full else 5_000, 15),
            through_fifo(10_000 if full else 300, 16),
            through_http(10_000 if full else 300, 17, work)]
