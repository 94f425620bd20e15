"""Small stores for the app's tests: synthetic phantoms embedded with a narrow random CT-FM."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PHANTOM_SHAPE = (48, 40, 30)  # voxels at 3 mm: 144 x 120 x 90 mm, a few windows per scan
PHANTOM_SPACING = (3.0, 3.0, 3.0)
OVERLAP = 0.5


def build_store(root: Path, tiny_weights: Path, n_scans: int = 3) -> dict:
    """Phantoms ``p0..`` under ``root/scans``, a copy of the random tiny weights folder (init_filters 4,
    64-d vectors) at ``root/weights`` (every path the server knows lies under ``root``) and a
    patches-mode store ``root/store``; returns their paths."""
    import ctfm
    from ctfm.synth import make_phantom, write_phantom

    weights = Path(shutil.copytree(tiny_weights, root / "weights"))
    scans = [
        write_phantom(
            make_phantom(seed, shape=PHANTOM_SHAPE, spacing_mm=PHANTOM_SPACING), root / "scans", stem=f"p{seed}"
        )[0]
        for seed in range(n_scans)
    ]
    store = root / "store"
    run = ctfm.embed(
        [str(p) for p in scans],
        weights=str(weights),
        mode="patches",
        overlap=OVERLAP,
        out=str(store),
        device="cpu",
        return_records=False,
    )
    assert run.totals.done == n_scans and not run.totals.failed, run.totals.failed
    return {"root": root, "scans": scans, "weights": weights, "store": store}


def copy_store(built: dict, target: Path) -> Path:
    """A private copy of a built store, without what a server wrote there (for tests that add scans)."""
    shutil.copytree(built["store"], target, ignore=shutil.ignore_patterns("app-cache", "app-uploads"))
    return target


# ---- real servers: uvicorn on 127.0.0.1 at a free port ---------------------------------------
SERVE_LINE = re.compile(r"at (http://(\S+?):(\d+))(?:/\?token=(\S+))? \(bound to ")


def wait_for_port(port: int, seconds: float = 30.0) -> None:
    """Return once 127.0.0.1:PORT accepts a connection (a server that announced itself listens)."""
    import socket
    import time

    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Server:
    """``ctfm serve STORE --port 0 ...`` in a subprocess; ``url`` (without the token), ``token``
    (when it printed one) and ``pid`` once it listens; ``stop()`` returns what it wrote on stderr."""

    def __init__(self, store, *args: str, device: str = "cpu"):
        import ctfm

        src = str(Path(ctfm.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctfm", "serve", str(store), "--port", "0", "--device", device, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self.proc.stdout.readline()
        match = SERVE_LINE.search(line)
        if not match:
            self.stop()
            raise AssertionError(f"the server did not start: {line}{self.proc.stderr.read()}")
        self.url, self.port, self.token = match.group(1), int(match.group(3)), match.group(4)
        self.banner = line
        self.pid = self.proc.pid
        wait_for_port(self.port)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stderr.read() if self.proc.stderr else ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class InProcessServer:
    """The app served by uvicorn in a thread of this process (no second interpreter to start);
    ``url`` once it listens, ``state`` the server's AppState, ``client()`` an httpx client of it."""

    def __init__(self, store, **kwargs):
        import socket
        import threading
        import time

        import uvicorn

        from ctfm.app import build_app

        app, self.state = build_app(store, **kwargs)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, http="h11"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started, "the in-process server did not start"

    def client(self, **kwargs):
        import httpx

        client = httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 300), **kwargs)
        client.state = self.state
        return client

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
