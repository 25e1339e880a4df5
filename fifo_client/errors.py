"""The exceptions the client raises."""

from __future__ import annotations


class WirefaultError(Exception):
    """Base class of every error the wirefault client raises."""


class CommandError(WirefaultError):
    """The proxy (or the local check, which words it identically) rejected a command.

    `str(error)` and `error.message` are the proxy's one-line message, e.g.
    `column 6: unknown message type 'Qury' for protocol postgres; did you mean 'Query'?`.
    """

    def __init__(self, message: str, command: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.command = command


class UnknownMethodError(CommandError, AttributeError):
    """A builder attribute that is no method of the command language (`conn.onQury`).

    It is also an `AttributeError`, so `hasattr(conn, "onQury")` is simply False.
    """


class ProxyUnavailable(WirefaultError):
    """No proxy answered on the FIFO within the timeout."""

    def __init__(self, message: str, fifo_path: str) -> None:
        super().__init__(message)
        self.fifo_path = fifo_path


__all__ = ["CommandError", "ProxyUnavailable", "UnknownMethodError", "WirefaultError"]
