"""One command/reply exchange with a proxy of `wirefault serve` over its HTTP API, bounded by
a deadline: `POST /api/proxies/NAME/commands {"command": TEXT}` answers `{"reply": TEXT}`,
the exact text the proxy's FIFO would reply (200 even when the command is rejected: the
reply is then the error line, parsed by the client as it parses the FIFO's).

Standard library only (urllib). Environment proxies (`$http_proxy`) are not used: the API is
a control channel, usually on loopback.

Until the deadline, the exchange is retried while nothing could have acted on it: the
connection is refused, the host does not resolve (yet), the proxy does not exist (yet: 404
"no proxy named ..."), a gateway answers 502/503/504. Once a request may have reached the
proxy (a reset or a timeout while waiting for the reply) it is never sent again:
`ProxyUnavailable`. A refused token (401/403) or something that is no wirefault API is a
`WirefaultError` at once.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request

from .errors import CommandError, ProxyUnavailable, WirefaultError
from .transport import Backoff, Deadline

TOKEN_ENV = "WIREFAULT_API_TOKEN"
READ_CHUNK = 64 * 1024
_RETRY_STATUSES = {502, 503, 504}

# http://HOST:PORT[/PREFIX][/api]/proxies/NAME[/]
_PROXY_URL = re.compile(r"(?P<base>https?://[^/?#]+(?:/[^?#]*?)??)(?:/api)?/proxies/"
                        r"(?P<name>[^/?#]+)/?", re.I)


def is_api_url(target: str) -> bool:
    """Whether `FaultProxy(target)` names an API URL rather than a FIFO path."""
    return bool(re.match(r"https?://", target, re.I))


def parse_proxy_url(url: str) -> tuple[str, str]:
    """`(base, name)` of a proxy's URL, `http://HOST:PORT/proxies/NAME` (Toxiproxy's shape)
    or `http://HOST:PORT/api/proxies/NAME`; `ValueError` for anything else.

    >>> parse_proxy_url("http://127.0.0.1:8474/proxies/pg")
    ('http://127.0.0.1:8474', 'pg')
    >>> parse_proxy_url("http://h:8474/api/proxies/pg/")
    ('http://h:8474', 'pg')
    """
    match = _PROXY_URL.fullmatch(url.strip())
    if not match:
        raise ValueError(f"not a proxy's API URL (http://HOST:PORT/proxies/NAME): {url!r}")
    return match["base"].rstrip("/"), urllib.parse.unquote(match["name"])


def proxy_url(api: str, name: str) -> str:
    """The URL of proxy `name` of the API at `api` (`http://HOST:PORT`, with or without a
    trailing `/api`; `HOST:PORT` means http).

    >>> proxy_url("127.0.0.1:8474", "pg")
    'http://127.0.0.1:8474/proxies/pg'
    """
    api = api.strip()
    if not is_api_url(api):
        api = "http://" + api
    base = api.rstrip("/")
    base = base[:-4] if base.lower().endswith("/api") else base
    return f"{base}/proxies/{urllib.parse.quote(name, safe='')}"


class HttpChannel:
    """The commands endpoint of one proxy: `exchange(text, deadline) -> reply text` (with
    its final newline, as the FIFO sends it)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        base, self.name = parse_proxy_url(url)
        self.url = url
        self.endpoint = f"{base}/api/proxies/{urllib.parse.quote(self.name, safe='')}/commands"
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _unavailable(self, deadline: Deadline, why: str) -> ProxyUnavailable:
        return ProxyUnavailable(
            f"no proxy answered at {self.url} within {deadline.seconds:g} s ({why})", self.url)

    def exchange(self, text: str, deadline: Deadline) -> str:
        (text + "\n").encode("utf-8")  # what the FIFO client would refuse, refused alike
        data = json.dumps({"command": text}).encode("ascii")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        backoff, why = Backoff(deadline), "the deadline passed"
        while not deadline.passed:
            try:
                result = self._attempt(data, headers, deadline)
            except _Gone as gone:  # the request may have arrived: never sent again
                earlier = f"; before that: {why}" if why != "the deadline passed" else ""
                raise self._unavailable(deadline, f"{gone}{earlier}") from None
            if not isinstance(result, str):
                return self._reply(*result, text)
            why = result
            if not backoff.wait():
                break
        raise self._unavailable(deadline, why)

    def _attempt(self, data: bytes, headers: dict[str, str],
                 deadline: Deadline) -> str | tuple[int, bytes]:
        """`(status, body)`, or why to try again (nothing can have acted on the request)."""
        request = urllib.request.Request(self.endpoint, data=data, headers=headers,
                                         method="POST")
        try:
            with self._opener.open(request, timeout=max(deadline.remaining(), 0.001)) as response:
                return response.status, self._read(response, deadline)
        except urllib.error.HTTPError as error:
            try:
                with error:
                    body = error.read()  # short: bounded by the socket's timeout
            except (OSError, http.client.HTTPException):
                body = b""
            if error.code in _RETRY_STATUSES:
                return f"HTTP {error.code}"
            if error.code == 404 and _error_text(body).startswith("no proxy named"):
                return _error_text(body)
            return error.code, body
        except urllib.error.URLError as error:
            reason = error.reason
            if isinstance(reason, ConnectionRefusedError) or \
                    getattr(reason, "errno", None) == errno.ECONNREFUSED:
                return "connection refused"
            if isinstance(reason, socket.gaierror):
                return f"cannot resolve the host: {reason.strerror or reason}"
            if isinstance(reason, TimeoutError):
                raise _Gone("no connection") from None
            raise _Gone(str(reason)) from None
        except TimeoutError:
            raise _Gone("no complete reply") from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Gone(f"the connection failed: {exc or type(exc).__name__}") from None

    def _read(self, response, deadline: Deadline) -> bytes:  # type: ignore[no-untyped-def]
        chunks = []
        while chunk := response.read(READ_CHUNK):
            chunks.append(chunk)
            if deadline.passed:
                raise TimeoutError
        return b"".join(chunks)

    def _reply(self, status: int, body: bytes, text: str) -> str:
        if status == 200:
            try:
                reply = json.loads(body)["reply"]
            except (ValueError, UnicodeDecodeError, TypeError, KeyError):
                reply = None
            if not isinstance(reply, str):
                raise WirefaultError(f"{self.endpoint}: not a wirefault reply: "
                                     f"{body[:200]!r}")
            return reply
        error = _error_text(body) or f"HTTP {status}"
        if status == 400:  # a request the route refused (this client sends none)
            column = _error_field(body, "column")
            raise CommandError(f"column {column}: {error}" if isinstance(column, int)
                               else error, text)
        if status in (401, 403):
            raise WirefaultError(f"{self.url}: the API refused the request (HTTP {status}): "
                                 f"{error}; give the token with token=... or "
                                 f"${TOKEN_ENV}")
        raise WirefaultError(f"{self.endpoint}: HTTP {status}: {error}")


class _Gone(Exception):
    """An attempt failed after the request may have reached the proxy."""


def _error_field(body: bytes, key: str) -> object:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def _error_text(body: bytes) -> str:
    error = _error_field(body, "error")
    return error if isinstance(error, str) else ""


__all__ = ["TOKEN_ENV", "HttpChannel", "is_api_url", "parse_proxy_url", "proxy_url"]
