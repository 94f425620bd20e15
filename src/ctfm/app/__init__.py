"""The browser app for semantic search over a store: ``ctfm serve STORE``.

``create_app(state)`` builds the FastAPI application (:mod:`ctfm.app.server`) over an
:class:`~ctfm.app.state.AppState` (the store's run, volumes and encoder kept in memory);
:func:`serve` runs it with uvicorn. The page is static files of this package (``static/``).
"""

from __future__ import annotations

from ctfm.app.server import create_app
from ctfm.app.state import AppState
from ctfm.errors import OptionError, optional_import

__all__ = ["build_app", "serve"]

uvicorn = optional_import("uvicorn", "app")


def build_app(store, **kwargs):
    """``(FastAPI app, AppState)`` for a store; ``kwargs`` go to :class:`ctfm.app.state.AppState`."""

    state = AppState(store, **kwargs)
    return create_app(state), state


def serve(store, host: str = "127.0.0.1", port: int = 8000, on_start=None, **kwargs) -> None:
    """Run the app with uvicorn until interrupted; ``on_start(url, state)`` once it listens."""
    import errno
    import socket

    app, state = build_app(store, **kwargs)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
    )  # a restart need not wait for TIME_WAIT; a live listener still refuses
    try:
        sock.bind((host, port))  # bound here so that the address printed is the one listening (port 0 too)
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
    bound_port = sock.getsockname()[1]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{bound_port}"
    config = uvicorn.Config(app, log_level="warning", access_log=False, limit_concurrency=64)
    server = uvicorn.Server(config)
    if on_start is not None:
        on_start(url, state)
    state.warm_up()  # scans converted for display in the background: first slices from a memory map
    server.run(sockets=[sock])
