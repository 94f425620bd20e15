"""Shared test helpers: where the real CT data lives, and tiny synthetic volumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The real scans live beside the repository (../shared/data), never inside it.
SHARED_DATA = Path(os.environ.get("CTFM_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def data_path(relative: str) -> Path:
    """Path of a real scan under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real CT data not found at {path} (tests read ../shared/data beside the repository; set CTFM_TEST_DATA to point elsewhere)")
    return path


@pytest.fixture
def shared_data():
    return data_path


@pytest.fixture(scope="session")
def app_store(tmp_path_factory):
    """A small patches-mode store of phantoms for the app's API and browser tests (built once)."""
    from app_fixtures import build_store

    return build_store(tmp_path_factory.mktemp("app"))
