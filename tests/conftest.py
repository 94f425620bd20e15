"""Shared test helpers: where the real CT data lives, and tiny synthetic volumes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

# The app's test helpers (stores of phantoms, real servers) serve tests/app and the hostile corpus;
# test folders are not packages, so their folder goes on the path once, here.
APP_TEST_HELPERS = str(Path(__file__).resolve().parent / "app")
if APP_TEST_HELPERS not in sys.path:
    sys.path.insert(0, APP_TEST_HELPERS)

# The real scans live beside the repository (../shared/data), never inside it.
SHARED_DATA = Path(os.environ.get("CTFM_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def data_path(relative: str) -> Path:
    """Path of a real scan under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(
            f"real CT data not found at {path} (tests read ../shared/data beside the repository; set CTFM_TEST_DATA to "
            "point elsewhere)"
        )
    return path


@pytest.fixture
def shared_data():
    return data_path


@pytest.fixture(scope="session")
def app_store(tmp_path_factory, tiny_weights):
    """A small patches-mode store of phantoms for the app's API and browser tests (built once)."""
    from app_fixtures import build_store

    return build_store(tmp_path_factory.mktemp("app"), tiny_weights)


class CliRun(NamedTuple):
    """What one ``ctfm`` command gave: unpacks as ``code, out, err``."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys):
    """``run_cli(*argv)``: ``ctfm.cli.main(argv)`` in this process, with only that command's output
    (arguments may be paths or numbers). Tests launch ``python -m ctfm`` only where the process is the point."""
    from ctfm.cli import main

    def run(*argv) -> CliRun:
        capsys.readouterr()  # what came before is not this command's output
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's own refusals, as the process would exit
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliRun(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A narrow random CT-FM weights folder (``ctfm models init ct-fm --seed 0 --init-filters 4``: 64-d
    vectors), written once per session; tests only read it."""
    from ctfm.cli import main

    folder = tmp_path_factory.mktemp("tiny_weights") / "ct-fm"
    assert main(["models", "init", "ct-fm", "--seed", "0", "--out", str(folder), "--init-filters", "4"]) == 0
    return folder


@pytest.fixture(scope="session")
def hostile_store(tmp_path_factory, tiny_weights):
    """A clean patches-mode store for the hostile cases (tests/hostile/), built once; tests copy it
    (``shutil.copytree``) before damaging it. Two phantoms and one unreadable file embedded with
    ``tiny_weights`` (compacted: scans, patches and failures.parquet), then one pending part pair
    (a second write of the first scan, same vectors) and a scan-level FAISS index. A dict:
    ``store``, ``scans`` (the two phantom paths), ``broken`` (the unreadable input), ``weights``."""
    from hostile_stores import build_hostile_store

    return build_hostile_store(tmp_path_factory.mktemp("hostile"), tiny_weights)
