"""Reading `wirefault serve --config FILE`: YAML in, the proxies' specs out, or every problem.

    proxies:                          # required list (may be empty)
      - name: pg1                     # required: letters, digits, '_', '.', '-'; unique
        listen: 127.0.0.1:9061        # required [HOST:]PORT (default host 127.0.0.1); unique
        upstream: localhost:5432      # required HOST:PORT
        protocol: postgres            # optional: postgres (default), wallaroo, raw
        fifo: /tmp/pg1.fifo           # optional command FIFO (relative: to the file's folder)
        enabled: true                 # optional (default true); a disabled proxy does not listen
        seed: 7                       # optional (default: --seed)
        faults:                       # optional initial commands, conn.* or faults.add(...)
          - faults.add("commit").onQuery(query="^COMMIT").kill()

Problems are reported as `file:line:column: key: problem`, with the machinery chaos
scenarios use too (fifo_client/yaml_reader.py): unknown keys, bad values, duplicates.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import yaml

from wirefault.fifo_client.yaml_reader import (
    ReaderError,
    ReaderErrors,
    YamlReader,
    compose,
    position,
)

from .proxy_registry import PROXY_NAME, ProxySpec

TOP_REQUIRED = ("proxies",)
PROXY_REQUIRED = ("name", "listen", "upstream")
PROXY_OPTIONAL = ("protocol", "fifo", "enabled", "faults", "seed")


class ConfigError(ReaderErrors):
    """Every problem of a config file, in file order; `first_line` is the first one."""

    @property
    def first_line(self) -> str:
        """One line for the start-up contract: the first problem, preferring one that is
        not a missing key (a misspelt key, reported after its mapping's missing one, is
        what explains it)."""
        first = next((e for e in self.errors if not str(e).endswith("missing required key")),
                     self.errors[0])
        more = len(self.errors) - 1
        return str(first) + (f" (and {more} more)" if more else "")


@dataclass(frozen=True)
class ServeConfig:
    path: Path
    proxies: tuple[ProxySpec, ...]


def load_config(path: str | Path) -> ServeConfig:
    """Read and validate a serve config; ConfigError lists every problem found."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError([ReaderError(path, None, None, "", f"cannot read: {reason}")]) \
            from None
    root = compose(path, text, ConfigError)
    if root is None:
        raise ConfigError([ReaderError(path, 1, 1, "", "the config is empty")])
    reader = _ConfigReader(path)
    config = reader.attempt(reader.config, root)
    if reader.errors or config is None:
        raise ConfigError(sorted(reader.errors, key=position))
    return config


class _ConfigReader(YamlReader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.names: set[str] = set()
        self.listens: dict[tuple[str, int], str] = {}

    def config(self, root: yaml.Node) -> ServeConfig | None:
        count = len(self.errors)
        top = self.mapping(root, "", TOP_REQUIRED, ())
        proxies = self.field(top, "proxies", "", self.proxy_list)
        if not self.clean_since(count) or proxies is None:
            return None
        return ServeConfig(self.path, proxies)

    def proxy_list(self, node: yaml.Node, key: str) -> tuple[ProxySpec, ...]:
        items = self.sequence(node, key)
        specs = [self.attempt(self.serve_proxy, item, f"{key}[{index}]")
                 for index, item in enumerate(items)]
        return tuple(spec for spec in specs if spec is not None)

    def serve_proxy(self, node: yaml.Node, key: str) -> ProxySpec | None:
        count = len(self.errors)
        fields = self.mapping(node, key, PROXY_REQUIRED, PROXY_OPTIONAL)
        name = self.field(fields, "name", key, self.new_name)
        where = f"proxies.{name}" if name else key
        listen = self.field(fields, "listen", where, self.address, "127.0.0.1", True)
        if listen is not None:
            self.attempt(self.unique_listen, fields["listen"][1], f"{where}.listen", listen,
                         name or key)
        upstream = self.field(fields, "upstream", where, self.address, None, False)
        protocol = self.field(fields, "protocol", where, self.protocol)
        fifo = self.field(fields, "fifo", where, self.path_in_scenario_folder)
        enabled = self.field(fields, "enabled", where, self.boolean)
        seed = self.field(fields, "seed", where, self.integer, minimum=0)
        if protocol is None and "protocol" not in fields:
            protocol = "postgres"
        faults = None
        if protocol is not None:  # a bad protocol: its faults cannot be checked
            faults = self.field(fields, "faults", where, self.initial_faults, protocol)
        if not self.clean_since(count) or None in (name, listen, upstream, protocol):
            return None
        assert name is not None and listen is not None and upstream is not None
        assert protocol is not None
        return ProxySpec(name=name, listen=listen, upstream=upstream, protocol=protocol,
                         fifo=fifo, enabled=True if enabled is None else enabled,
                         faults=faults or (), seed=seed)

    def new_name(self, node: yaml.Node, key: str) -> str:
        name = self.string(node, key)
        if not PROXY_NAME.fullmatch(name):
            self.fail(node, key, "proxy names use letters, digits, '_', '.', '-'")
        if name in self.names:
            self.fail(node, key, f"duplicate proxy name {name!r}")
        self.names.add(name)
        return name

    def address(self, node: yaml.Node, key: str, default_host: str | None,
                port_only: bool) -> tuple[str, int]:
        from .runner import _host_port

        value = self.scalar(node, key)
        if isinstance(value, int) and not isinstance(value, bool) and port_only:
            value = str(value)
        shape = "[HOST:]PORT" if port_only else "HOST:PORT"
        if not isinstance(value, str) or not value.strip():
            self.fail(node, key, f"expected {shape}, got {self.describe(node, key)}")
        if default_host is None and ":" not in value:
            self.fail(node, key, f"expected {shape}, got {value!r}")
        try:
            host, port = _host_port(value.strip(), default_host or "")
        except argparse.ArgumentTypeError as exc:
            self.fail(node, key, f"{exc}")
        if not host:
            self.fail(node, key, f"expected {shape}, got {value!r}")
        if not port_only and port == 0:
            self.fail(node, key, "port 0 is no upstream")
        return host, port

    def unique_listen(self, node: yaml.Node, key: str, listen: tuple[str, int],
                      name: str) -> None:
        if listen[1] == 0:
            return
        other = self.listens.get(listen)
        if other is not None:
            self.fail(node, key, f"{listen[0]}:{listen[1]} is proxy {other}'s listen "
                                 "address already")
        self.listens[listen] = name

    def boolean(self, node: yaml.Node, key: str) -> bool:
        value = self.scalar(node, key)
        if not isinstance(value, bool):
            self.fail(node, key, f"expected true or false, got {self.describe(node, key)}")
        return value

    def initial_faults(self, node: yaml.Node, key: str, protocol: str) -> tuple[str, ...]:
        commands = [self.attempt(self.initial_fault, item, f"{key}[{index}]", protocol)
                    for index, item in enumerate(self.sequence(node, key))]
        return tuple(command for command in commands if command is not None)

    def initial_fault(self, node: yaml.Node, key: str, protocol: str) -> str:
        from . import dsl

        text = self.string(node, key)
        try:
            parsed = dsl.parse(text, protocol)
        except dsl.CommandError as exc:
            self.fail(node, key, f"{exc} (protocol {protocol})")
        if not (isinstance(parsed, dsl.Rule) or
                (isinstance(parsed, dsl.FaultCommand) and parsed.op == "add")):
            self.fail(node, key, "expected a conn.* or faults.add(...) command")
        return text
