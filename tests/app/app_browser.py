"""Helpers for driving the app in a real browser: the server as a subprocess, Debian's Chromium
through Playwright (the system browser, never a downloaded one)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from app_fixtures import InProcessServer, Server  # noqa: F401  (the servers, for the browser tests and benchmarks)

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
