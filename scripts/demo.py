"""`make demo`: a throwaway PostgreSQL, wirefault in front of it, a COMMIT killed on cue.

Every step prints what it does and what the client and the server saw.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import psycopg  # noqa: E402
from pgserver import PostgresUnavailable, running_server  # noqa: E402
from proxy_helpers import running_proxy  # noqa: E402

from wirefault.fifo_client import CommandError, FaultProxy  # noqa: E402

RULE = 'conn.onQuery(query="^COMMIT").kill()'


def step(number: int, text: str) -> None:
    print(f"\n== {number}. {text}", flush=True)


def show(text: str) -> None:
    print(f"   {text}", flush=True)


def count_rows(pg) -> int:
    with pg.connect() as direct:
        return direct.execute("SELECT count(*) FROM demo").fetchone()[0]


def insert_and_commit(pg, port: int, value: int) -> None:
    conn = pg.connect(port=port)
    try:
        conn.execute("INSERT INTO demo VALUES (%s)", (value,))
        show(f"INSERT INTO demo VALUES ({value})  -> ok")
        conn.commit()
        show("COMMIT                          -> ok")
    except psycopg.OperationalError as exc:
        first_line = str(exc).strip().splitlines()[0]
        show(f"COMMIT                          -> client error: {first_line}")
    finally:
        conn.close()


def main() -> int:
    try:
        server_cm = running_server()
        pg = server_cm.__enter__()
    except PostgresUnavailable as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    try:
        step(1, f"A throwaway PostgreSQL on 127.0.0.1:{pg.port} ({pg.basedir})")
        with pg.connect(autocommit=True) as direct:
            direct.execute("CREATE TABLE demo (v int)")
        show("CREATE TABLE demo (v int)")
        with running_proxy(pg.port) as proxy:
            control = FaultProxy(proxy.fifo)
            step(2, f"wirefault proxy on 127.0.0.1:{proxy.port} -> {pg.port}, "
                    f"commands on {proxy.fifo}")
            with pg.connect(port=proxy.port) as conn:
                value = conn.execute("SELECT 'through the proxy'").fetchone()[0]
            show(f"SELECT 'through the proxy'      -> {value!r}")

            step(3, f"Arm the fault: {RULE}")
            control.send(RULE)
            show("proxy replied: ok")
            insert_and_commit(pg, proxy.port, 1)
            show(f"rows on the server (direct): {count_rows(pg)}  "
                 "<- the COMMIT never reached it")

            step(4, "Disarm: conn.allow()")
            control.allow()
            insert_and_commit(pg, proxy.port, 2)
            show(f"rows on the server (direct): {count_rows(pg)}")

            step(5, "A bad command is refused with its position; the rule in force stays")
            try:
                control.send("conn.onQury().kill()")
            except CommandError as exc:
                show(f"proxy replied: {exc}")

            step(6, "Traffic dump (recorder.dump()): conn | source | message")
            for row in control.dump():
                if row.message.startswith(("ParameterStatus", "Authentication", "BackendKey")):
                    continue  # startup chatter, left out for readability
                show(f"{row.conn:>2} | {row.source:<11} | {row.message[:90]}")
    finally:
        server_cm.__exit__(None, None, None)
    print("\nDone: the server and the proxy were stopped and removed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
