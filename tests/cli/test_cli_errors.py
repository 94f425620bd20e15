"""Exit codes: a user error is one `error:` line and exit 2; a bug is one `internal error` line and
exit 1 (the traceback with --debug); `ctfm embed` and `ctfm.embed` share their defaults."""

from __future__ import annotations

import numpy as np
import pytest

import ctfm
import ctfm.cli.info
from ctfm.errors import CTInputError, MissingDependencyError, OptionError, UserError
from ctfm.synth import make_phantom, write_phantom


@pytest.fixture
def buggy_info(monkeypatch):
    """`ctfm info` with an implementation that raises: a stand-in for a bug."""

    def broken(args):
        {}["missing key"]

    monkeypatch.setattr(ctfm.cli.info, "run", broken)


def test_user_error_types():
    assert issubclass(CTInputError, UserError) and issubclass(CTInputError, ValueError)
    assert issubclass(OptionError, UserError) and issubclass(OptionError, ValueError)
    assert issubclass(MissingDependencyError, UserError) and issubclass(MissingDependencyError, ImportError)


def test_a_bug_is_not_reported_as_bad_input(tmp_path, buggy_info, run_cli):
    result = run_cli("info", tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("internal error (a bug in ctfm") and "KeyError" in lines[0] and "--debug" in lines[0]
    assert not lines[0].startswith("error:")


def test_debug_shows_the_traceback(tmp_path, buggy_info, run_cli):
    result = run_cli("--debug", "info", tmp_path)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "broken" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("internal error")


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, message",
    [
        (["embed", "NOFILE", "--out", "STORE", "--mode", "patches", "--overlap", "1.5"], "overlap 1.5"),
        (
            ["embed", "NOFILE", "--out", "STORE", "--preset", "no-such-preset"],
            "unknown preprocessing preset 'no-such-preset'",
        ),
        (["finetune"], "ctfm finetune needs a task: cls or seg"),
        (["predict"], "ctfm predict needs a task: cls or seg"),
        # Checks every fine-tuning task shares (RunConfig), for classification as for segmentation.
        (
            ["finetune", "cls", "--preset", "tiny", "--set", "freeze=trunk", "--set", "out=STORE"],
            "freeze 'trunk': expected a list of parameter-name prefixes",
        ),
        (
            ["finetune", "seg", "--preset", "tiny", "--set", "percentage=0", "--set", "out=STORE"],
            "percentage 0: expected a share of the cases in (0, 100]",
        ),
    ],
    ids=["embed-overlap", "embed-preset", "finetune-no-task", "predict-no-task", "cls-freeze", "seg-percentage"],
)
def test_bad_option_values_are_user_errors(tmp_path, argv, message, run_cli):
    scan = write_phantom(make_phantom(0, shape=(24, 20, 16), spacing_mm=(3.0, 3.0, 3.0)), tmp_path, stem="p")[0]
    argv = [
        str(scan)
        if a == "NOFILE"
        else str(tmp_path / "store")
        if a == "STORE"
        else a.replace("out=STORE", f"out={tmp_path / 'store'}")
        for a in argv
    ]
    result = run_cli(*argv)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("*.parquet"))


@pytest.mark.slow
def test_cli_and_api_share_the_random_init_and_defaults(tmp_path, run_cli):
    """Without weights both use seed 0 and the same device default, so they give the same vector."""
    scan = write_phantom(make_phantom(1, shape=(40, 32, 24), spacing_mm=(3.0, 3.0, 3.0)), tmp_path, stem="p")[0]
    store = tmp_path / "store"
    result = run_cli("embed", scan, "--mode", "patches", "--out", store, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "warning: no weights given: ct-fm with random weights (seed 0)" in result.stderr
    with pytest.warns(UserWarning, match="random weights"):
        (api,) = ctfm.embed(str(scan), mode="patches")
    from ctfm.store import EmbeddingStore

    (row,) = EmbeddingStore(store).scans().to_pylist()
    np.testing.assert_allclose(api["embedding"], row["embedding"], atol=1e-6)
    assert api["weights_sha256"] == row["weights_sha256"]
