"""Helpers for driving the app in a real browser: the server as a subprocess, Debian's Chromium
through Playwright (the system browser, never a downloaded one)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def chromium_path() -> str:
    """The system Chromium, or skip the test saying how to get it."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        "no chromium on PATH: the browser tests drive Debian's chromium package (apt-get install chromium; .ci/run "
        "installs it)"
    )


def artefact_dir() -> Path:
    """Where browser tests keep screenshots: $CTFM_TEST_ARTEFACTS, else test-artefacts/ in the repository."""
    folder = Path(os.environ.get("CTFM_TEST_ARTEFACTS", REPO / "test-artefacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Server:
    """``ctfm serve STORE --port 0 ...`` in a subprocess; ``url`` once it listens."""

    def __init__(self, store, *args: str):
        import ctfm

        src = str(Path(ctfm.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctfm", "serve", str(store), "--port", "0", "--device", "cpu", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self.proc.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+) ", line)
        if not match:
            self.stop()
            raise AssertionError(f"the server did not start: {line}{self.proc.stderr.read()}")
        self.url = match.group(1)
        self.banner = line

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
    ``url`` once it listens, ``state`` the server's AppState."""

    def __init__(self, store, **kwargs):
        import socket
        import threading

        import uvicorn

        from ctfm.app import build_app

        app, self.state = build_app(store, **kwargs)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        import time

        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started, "the in-process server did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def launch(playwright):
    """Headless system Chromium (no sandbox: tests may run as root in a container)."""
    return playwright.chromium.launch(
        executable_path=chromium_path(),
        headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
    )


SNAPSHOT_JS = """(sel) => {
  const c = document.querySelector(sel);
  window._ctfmSnapshot = Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
  return window._ctfmSnapshot.length;
}"""

CHANGED_PIXELS_JS = """(sel) => {
  const c = document.querySelector(sel);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, before = window._ctfmSnapshot;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (Math.abs(d[i] - before[i]) + Math.abs(d[i + 1] - before[i + 1]) + Math.abs(d[i + 2] - before[i + 2]) > 30) n++;
  }
  return n / (c.width * c.height);
}"""
