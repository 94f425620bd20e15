"""Who may talk to the app, and how much: the Host and Origin checks, the token, body limits.

The app answers only requests that a browser sends for its own page (the model is Jupyter
Server's, with code of our own):

- **Host**: the ``Host`` header must name this server at the port it listens on: ``localhost``
  or a loopback address, the bound address, and when bound to all interfaces any IP address of
  the machine, its host name, and the names given with ``--allow-host``. A page of another site
  whose name was rebound to 127.0.0.1 (DNS rebinding) sends its own name and gets 403.
- **Origin**: a request that changes state or computes (every method but GET and HEAD, and every
  ``/api/`` request) gets 403 when its ``Origin`` is not this server's, or, without an Origin,
  when ``Sec-Fetch-Site`` says cross-site or same-site or the ``Referer`` is another site. The app
  sends no CORS headers, so no other site may read an answer either.
- **Token**: bound to anything but a loopback address, every request but the page's own files
  needs the server's token, as ``Authorization: token T`` (or ``Bearer T``) or as the cookie the
  server sets (``HttpOnly; SameSite=Strict``) when the page is opened as ``/?token=T``. Tokens
  are compared in constant time and never logged.
- **Bodies**: JSON bodies are limited to :data:`JSON_BODY_LIMIT` bytes (by Content-Length, and
  counted as they arrive when there is none); uploads need a Content-Length within the upload
  limit. Error messages echo at most :data:`ECHO_LIMIT` characters of any input.

:class:`Guard` is the ASGI middleware that applies all of it, adds headers that keep other sites
from framing or embedding the app's answers, and turns an unexpected exception into a one-line
500 reply and one console line (the traceback only with ``--debug``).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import secrets
import socket
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ctfm import __version__
from ctfm.errors import OptionError, one_line

log = logging.getLogger("ctfm.app")

JSON_BODY_LIMIT = 64 * 1024  # bytes: every request body but an upload's
ECHO_LIMIT = 200  # characters of any input that an error message repeats
MULTIPART_ENVELOPE = 2**20  # bytes allowed around an uploaded file (boundaries, part headers)
TOKEN_MIN_LENGTH = 16
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_.~-]+")  # safe unquoted in a URL and a cookie
UPLOAD_PATH = "/api/scans"
PUBLIC_PATHS = ("/", "/docs", "/favicon.ico")  # the page and its files need no token (they hold no data)
SAFE_METHODS = ("GET", "HEAD")
SINGLE_HEADERS = {"host", "origin", "referer", "sec-fetch-site", "authorization", "content-length"}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"referrer-policy", b"same-origin"),
]


def echo(value, limit: int = ECHO_LIMIT) -> str:
    """``repr`` of a piece of input for an error message, cut to ``limit`` characters."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def is_loopback(host: str) -> bool:
    """Whether an address or name reaches this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


def split_host(value: str, default_port: int) -> tuple[str, int] | None:
    """``Host``-header syntax (``name``, ``name:port``, ``[v6]:port``) -> ``(name, port)``; None
    when malformed."""
    value = value.strip().lower()
    match = re.fullmatch(r"(\[[0-9a-f:.]+\]|[^\s:/\[\]@]+)(?::(\d{1,5}))?", value)
    if not match:
        return None
    port = int(match.group(2)) if match.group(2) else default_port
    return match.group(1).strip("[]"), port


def new_token() -> str:
    """A fresh random token (``secrets.token_urlsafe``: 256 bits)."""
    return secrets.token_urlsafe(32)


def check_token(token: str, where: str) -> str:
    if len(token) < TOKEN_MIN_LENGTH or not TOKEN_PATTERN.fullmatch(token):
        raise OptionError(
            f"{where}: the token must be at least {TOKEN_MIN_LENGTH} characters of A-Z a-z 0-9 _ . ~ - (e.g. python -c "
            "'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def read_token_file(path) -> str:
    """The token kept in a file (its first line, without surrounding whitespace)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"--token-file {path}: cannot read it ({one_line(exc, 120)})") from None
    lines = text.strip().splitlines()
    return check_token(lines[0].strip() if lines else "", f"--token-file {path}")


def check_host_name(name: str) -> str:
    """A name for ``--allow-host`` (a DNS name or an IP address, no port)."""
    value = name.strip().lower().strip("[]")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not re.fullmatch(r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?", value):
        raise OptionError(f"--allow-host {echo(name)}: expected a host name or an IP address, without a port")
    return value


class Access:
    """The server's access policy: which ``Host`` names it answers to and its token.

    Args:
        host: the address the server is bound to (``127.0.0.1``, ``::1``, ``0.0.0.0``, ...).
        token: the token every non-page request needs, or None (loopback only).
        allow_hosts: more names the server may be reached by (e.g. behind a DNS name).
    """

    def __init__(self, host: str = "127.0.0.1", token: str | None = None, allow_hosts=()):
        self.host = host
        self.loopback = is_loopback(host)
        self.wildcard = is_wildcard(host)
        if token is None and not self.loopback:
            raise OptionError(
                f"--host {host}: a server other machines can reach needs a token (ctfm serve makes one; give --token-file "
                "to choose it)"
            )
        self.token = check_token(token, "token") if token is not None else None
        names = {"localhost", host.strip("[]").lower()} | {check_host_name(h) for h in allow_hosts}
        if not self.loopback:
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.names = frozenset(n for n in names if n)

    def cookie_name(self, port: int) -> str:
        return f"ctfm-token-{port}"  # cookies ignore ports: one name per server of a machine

    def host_allowed(self, name: str) -> bool:
        if name in self.names or is_loopback(name):
            return True
        if self.wildcard:  # an IP literal cannot be rebound: the page came from this address
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False

    def token_given(self, headers: dict, port: int) -> str | None:
        """The token a request carries (header first, then the cookie), or None."""
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() in ("token", "bearer") and value.strip():
            return value.strip()
        raw = headers.get("cookie")
        if raw:
            jar = SimpleCookie()
            try:
                jar.load(raw)
            except CookieError:
                return None
            morsel = jar.get(self.cookie_name(port))
            if morsel is not None:
                return morsel.value
        return None

    def token_matches(self, given: str | None) -> bool:
        if self.token is None:
            return True
        if given is None:
            return False
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode("utf-8"))


def cross_site(headers: dict, host: tuple[str, int], scheme: str) -> str | None:
    """Why a request comes from another site (a phrase), or None when it is the app's own or
    carries no browser header that says otherwise (a script, curl)."""
    default = 443 if scheme == "https" else 80
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin.strip())
        theirs = split_host(parts.netloc, 443 if parts.scheme == "https" else 80) if parts.netloc else None
        if parts.scheme != scheme or theirs != host:
            return f"its Origin {echo(origin, 100)} is not this server's"
        return None
    site = headers.get("sec-fetch-site", "").lower()
    if site in ("cross-site", "same-site"):
        return f"the browser says it comes from another site (Sec-Fetch-Site: {site})"
    referer = headers.get("referer")
    if referer:
        parts = urlsplit(referer.strip())
        theirs = split_host(parts.netloc, 443 if parts.scheme == "https" else default) if parts.netloc else None
        if theirs != host:
            return "its Referer is another site"
    return None


class Guard:
    """ASGI middleware applying an :class:`Access` policy and the body limits (module docstring).

    Args:
        app: the ASGI application inside.
        access: the :class:`Access` policy.
        upload_limit: the largest uploaded file, bytes (the multipart envelope is allowed on top).
        debug: log tracebacks of unexpected errors (one line each otherwise).
    """

    def __init__(self, app, access: Access, upload_limit: int, debug: bool = False):
        self.app = app
        self.access = access
        self.upload_limit = int(upload_limit)
        self.debug = debug

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers, repeated = {}, set()
        for key, value in scope.get("headers", ()):
            name = key.decode("latin-1").lower()
            text = value.decode("latin-1")
            if name in headers and name in SINGLE_HEADERS:
                repeated.add(name)
            headers[name] = f"{headers[name]}; {text}" if name == "cookie" and name in headers else text
        if repeated:  # which one would a check read? none: a browser sends each once
            return await _reply(send, 400, {"error": f"the request repeats its {', '.join(sorted(repeated))} header"})
        method, path, scheme = scope["method"], scope.get("path", ""), scope.get("scheme", "http")
        server = scope.get("server") or (None, None)
        port = int(server[1]) if server[1] is not None else (443 if scheme == "https" else 80)

        refusal = self._refusal(scope, headers, method, path, scheme, port)
        if refusal is not None:
            status, message, extra = refusal
            if status in (401, 403):
                log.warning("refused %s %s: %s", method, echo(path, 80), message)
            return await _reply(send, status, {"error": message}, extra)

        if method not in SAFE_METHODS and not (method == "POST" and path == UPLOAD_PATH):
            body, too_large = await _read_body(receive, JSON_BODY_LIMIT)
            if too_large:
                return await _reply(send, 413, {"error": _body_message()})
            receive = _replay(body, receive)

        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                kept = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")]
                message = {**message, "headers": kept + SECURITY_HEADERS}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:  # the one place an unexpected error becomes a reply and a console line
            log.error(
                "internal error on %s %s: %s",
                method,
                echo(path, 80),
                one_line(exc, 300, with_type=True),
                exc_info=exc if self.debug else None,
            )
            if not started:
                await _reply(
                    send,
                    500,
                    {
                        "error": f"internal error in ctfm {__version__} ({type(exc).__name__}): the server's console "
                        "has the details"
                    },
                )

    def _refusal(self, scope, headers, method, path, scheme, port):
        """``(status, message, extra headers)`` for a request that is refused here, or None."""
        host_header = headers.get("host")
        host = split_host(host_header, 443 if scheme == "https" else 80) if host_header else None
        if host is None:
            return 400 if host_header else 403, "the request has no valid Host header", []
        if host[1] != port or not self.access.host_allowed(host[0]):
            return (
                403,
                f"Host {echo(host_header, 100)} is not this server's name (the app answers to localhost and its own "
                "address only; start it with --allow-host NAME to add a name)",
                [],
            )
        page = method in SAFE_METHODS and (path in PUBLIC_PATHS or path.startswith("/static/"))
        if self.access.token is not None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if path == "/" and method in SAFE_METHODS and "token" in query:
                if not self.access.token_matches(query["token"][0]):
                    return 403, "the token in the address is not this server's (open the address it printed)", []
                cookie = f"{self.access.cookie_name(port)}={self.access.token}; HttpOnly; SameSite=Strict; Path=/"
                return 303, "signed in: the page is at /", [(b"location", b"/"), (b"set-cookie", cookie.encode())]
            if not page and not self.access.token_matches(self.access.token_given(headers, port)):
                return (
                    403,
                    "this server needs its token (open the address with ?token= that it printed at start, or send "
                    "Authorization: token TOKEN)",
                    [],
                )
        if method not in SAFE_METHODS or path.startswith("/api/") or path == "/openapi.json":
            why = cross_site(headers, host, scheme)
            if why is not None:
                return 403, f"cross-site request refused: {why} (the app answers its own page only)", []
        if method == "POST" and path == UPLOAD_PATH:
            length = headers.get("content-length")
            if length is None or not length.isdigit() or "transfer-encoding" in headers:
                return 411, "an upload needs a Content-Length header (send the file as multipart/form-data)", []
            if int(length) > self.upload_limit + MULTIPART_ENVELOPE:
                return (
                    413,
                    f"upload of {int(length) / 2**20:.1f} MiB is larger than the limit of {self.upload_limit / 2**20:g} "
                    "MiB (upload a smaller file or start the server with a larger --max-upload-mb)",
                    [],
                )
        elif method not in SAFE_METHODS:
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > JSON_BODY_LIMIT):
                return 413, _body_message(), []
        return None


def _body_message() -> str:
    return f"request body larger than the limit of {JSON_BODY_LIMIT // 1024} KiB (a search body is a few hundred bytes)"


async def _read_body(receive, limit: int) -> tuple[list[dict], bool]:
    """The body messages of a request, up to ``limit`` bytes; ``(messages, True)`` past it."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, False
        size += len(message.get("body", b""))
        if size > limit:
            return messages, True
        if not message.get("more_body", False):
            return messages, False


def _replay(messages: list[dict], receive):
    pending = list(messages)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def _reply(send, status: int, body: dict, extra=()) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*headers, *extra, *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": data})
