"""Test peers speaking the Wallaroo connector protocol: a file source, a worker stand-in and a
committing sink, wired as `source -> worker -> sink` (each arrow one TCP connection, the
left side the client).

Each module runs as `python -m peers.<name> ...` (from the `tests` directory) or through its
`run_*` coroutine. They speak the protocol through `wirefault.protocols.wallaroo` (its
framer and `encode`), never through a codec of their own. `wire` holds the shared parts.
"""
