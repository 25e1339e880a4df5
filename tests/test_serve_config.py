"""`wirefault serve --config FILE`: what the config reader accepts, and how it says no."""

from __future__ import annotations

from pathlib import Path

import pytest

from wirefault.proxy.proxy_registry import ProxySpec
from wirefault.proxy.serve_config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proxies.yaml"
    path.write_text(text)
    return path


def test_a_full_config_and_the_defaults(tmp_path):
    path = write(tmp_path, """\
proxies:
  - name: pg1
    listen: 127.0.0.1:9061
    upstream: localhost:5432
    fifo: pg1.fifo
    seed: 7
    faults:
      - faults.add("commit").onQuery(query="^COMMIT").kill()
      - conn.onQuery(query="^SELECT").delay(10)
  - name: raw
    listen: 9063
    upstream: 10.0.0.1:25
    protocol: raw
    enabled: false
""")
    config = load_config(path)
    assert config.proxies == (
        ProxySpec("pg1", ("127.0.0.1", 9061), ("localhost", 5432), "postgres",
                  str(tmp_path / "pg1.fifo"), True,
                  ('faults.add("commit").onQuery(query="^COMMIT").kill()',
                   'conn.onQuery(query="^SELECT").delay(10)'), 7),
        ProxySpec("raw", ("127.0.0.1", 9063), ("10.0.0.1", 25), "raw", enabled=False),
    )
    assert config.proxies[0].mode == "reverse:tcp://localhost:5432@127.0.0.1:9061"
    assert load_config(write(tmp_path, "proxies: []\n")).proxies == ()


@pytest.mark.parametrize(("text", "expected"), [
    ("proxies:\n  - name: a\n    listen: 1\n    upstream: h:1\n    colour: red\n",
     ":5:5: proxies[0].colour: unknown key (expected name, listen, upstream, protocol, fifo, "
     "enabled, faults, seed)"),
    ("proxies:\n  - name: a\n    listen: 1\n    upstrem: h:1\n",
     ":4:5: proxies[0].upstrem: unknown key (expected name, listen, upstream, protocol, fifo, "
     "enabled, faults, seed); did you mean 'upstream'?"),
    ("proxy: []\n", ":1:1: proxy: unknown key (expected proxies); did you mean 'proxies'?"),
    ("proxies:\n  - name: a\n    listen: 1\n    upstream: nohost\n",
     ":4:15: proxies.a.upstream: expected HOST:PORT, got 'nohost'"),
    ("proxies:\n  - name: a\n    listen: 70000\n    upstream: h:1\n",
     ":3:13: proxies.a.listen: port out of range: 70000"),
    ("proxies:\n  - name: a\n    listen: 1\n    upstream: h:1\n    enabled: maybe\n",
     ":5:14: proxies.a.enabled: expected true or false, got 'maybe'"),
    ("proxies:\n  - name: a\n    listen: 1\n    upstream: h:1\n    protocol: mysql\n",
     ":5:15: proxies.a.protocol: unknown protocol 'mysql'"),
    ("proxies:\n  - name: a\n    listen: 1\n    upstream: h:1\n    faults: ['conn.kil()']\n",
     ":5:14: proxies.a.faults[0]: "),
    ("proxies:\n  - name: a\n    listen: 1\n    upstream: h:1\n    faults: ['recorder.dump()']\n",
     ":5:14: proxies.a.faults[0]: expected a conn.* or faults.add(...) command"),
    ("proxies:\n  - {name: a, listen: 1, upstream: 'h:1'}\n"
     "  - {name: a, listen: 2, upstream: 'h:1'}\n",
     ":3:12: proxies[1].name: duplicate proxy name 'a'"),
    ("proxies:\n  - {name: a, listen: 9, upstream: 'h:1'}\n"
     "  - {name: b, listen: '127.0.0.1:9', upstream: 'h:1'}\n",
     ":3:23: proxies.b.listen: 127.0.0.1:9 is proxy a's listen address already"),
    ("proxies:\n  - {name: 'a b', listen: 1, upstream: 'h:1'}\n",
     ":2:12: proxies[0].name: proxy names use letters, digits"),
    ("proxies: [\n", ":2:1: invalid YAML"),
])
def test_problems_name_file_line_and_column(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    line = caught.value.first_line
    assert line.startswith(f"{path}{expected}"), line
    assert "\n" not in line


def test_every_problem_is_found_and_a_misspelt_key_comes_first(tmp_path):
    path = write(tmp_path, "proxies:\n  - name: a\n    listen: 1\n    upstrem: h:1\n"
                           "  - name: b\n    listen: x\n    upstream: h:1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert [f"{e.line}:{e.column}" for e in caught.value.errors] == ["2:5", "4:5", "6:13"]
    assert caught.value.first_line.startswith(f"{path}:4:5: proxies[0].upstrem: unknown key")
    assert caught.value.first_line.endswith("(and 2 more)")


def test_an_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "missing.yaml")
    assert caught.value.first_line == f"{tmp_path / 'missing.yaml'}: cannot read: " \
                                      "No such file or directory"


def test_the_readme_example_is_a_valid_config(tmp_path):
    from test_readme import blocks

    (example,) = [b for b in blocks("yaml") if "name: worker1" in b and "listen:" in b]
    config = load_config(write(tmp_path, example))
    assert [p.name for p in config.proxies] == ["worker1", "worker2"]
    assert [p.enabled for p in config.proxies] == [True, False]
