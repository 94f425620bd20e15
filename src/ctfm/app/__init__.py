"""The browser app for semantic search over a store: ``ctfm serve STORE``.

``create_app(state)`` builds the FastAPI application (:mod:`ctfm.app.server`) over an
:class:`~ctfm.app.state.AppState` (the store's run, volumes and encoder kept in memory);
:func:`serve` runs it with uvicorn. The page is static files of this package (``static/``).
Who may use it is :mod:`ctfm.app.security`: the Host and Origin checks, and a token when the
server is bound to anything but a loopback address.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys

from ctfm.app.security import Access, is_loopback, is_wildcard, new_token, read_token_file
from ctfm.app.server import create_app
from ctfm.app.state import AppState
from ctfm.errors import OptionError, optional_import

__all__ = ["build_app", "serve"]

uvicorn = optional_import("uvicorn", "app")


def build_app(store, host: str = "127.0.0.1", token: str | None = None, allow_hosts=(), debug: bool = False, **kwargs):
    """``(FastAPI app, AppState)`` for a store served on ``host`` (its access policy: the token,
    more ``allow_hosts`` names; :class:`ctfm.app.security.Access`); ``kwargs`` go to
    :class:`ctfm.app.state.AppState`."""

    access = Access(host, token=token, allow_hosts=allow_hosts)
    state = AppState(store, **kwargs)
    return create_app(state, access, debug=debug), state


def check_address(host: str, port) -> None:
    """Refuse (one line) a ``--host`` or ``--port`` that cannot be served."""
    if not isinstance(host, str) or not host.strip() or any(c.isspace() or c in "/?#@" for c in host):
        raise OptionError(f"--host {host!r}: expected an address of this machine, e.g. 127.0.0.1 (0.0.0.0: every one)")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise OptionError(f"--port {port}: expected 0..65535 (0 picks a free one)")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one); a one-line error when it cannot be."""
    check_address(host, port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
    )  # a restart need not wait for TIME_WAIT; a live listener still refuses
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OptionError(
                f"--port {port}: {host}:{port} is already in use (choose another port, or --port 0 for a free one)"
            ) from None
        raise OptionError(
            f"--host {host}: cannot bind {host}:{port} ({exc.strerror or exc}; give an address of this machine, e.g. "
            "127.0.0.1)"
        ) from None
    sock.listen(128)  # connections wait in the backlog from now on, before uvicorn accepts them
    return sock


def serve(
    store,
    host: str = "127.0.0.1",
    port: int = 8000,
    on_start=None,
    token_file=None,
    allow_hosts=(),
    debug: bool = False,
    **kwargs,
) -> None:
    """Run the app with uvicorn until interrupted; ``on_start(url, state)`` once it listens.

    Bound to a loopback address, the Host and Origin checks guard it; bound to any other, every
    API request needs a token too: read from ``token_file``, or made here, in which case the
    ``url`` handed to ``on_start`` carries it (``http://HOST:PORT/?token=...``). ``debug`` logs
    the traceback of an internal error (one line otherwise).
    """
    check_address(host, port)
    host = host.strip("[]")
    if token_file is not None:
        token = read_token_file(token_file)
    else:
        token = None if is_loopback(host) else new_token()
    app, state = build_app(store, host=host, token=token, allow_hosts=allow_hosts, debug=debug, **kwargs)
    sock = bind(host, port)
    bound_port = sock.getsockname()[1]
    shown = socket.gethostname() if is_wildcard(host) else host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{bound_port}"
    _console_log(debug)
    config = uvicorn.Config(app, log_level="warning", access_log=False, limit_concurrency=64, http="h11")
    server = uvicorn.Server(config)
    if on_start is not None:
        on_start(f"{url}/?token={token}" if token is not None and token_file is None else url, state)
    state.warm_up()  # scans converted for display in the background: first slices from a memory map
    server.run(sockets=[sock])


def _console_log(debug: bool) -> None:
    """The app's console lines: ``ctfm serve: LEVEL: message``, one per event (tracebacks with debug)."""
    logger = logging.getLogger("ctfm.app")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("ctfm serve: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
