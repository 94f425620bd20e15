"""A corpus of broken inputs, made here: each gives one `error: <path>: <problem> (<fix>)` line on
stderr, exit status 2, no traceback and no output file, for `ctfm info` and `ctfm preprocess`."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import SHARED_DATA
from ctfm.cli import main
from dicom_factory import axial_positions, write_series


def nifti(path: Path, array, spacing=(1.0, 1.0, 2.0), dtype=np.int16) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array).astype(dtype), np.diag([*spacing, 1.0])), str(path))
    return path


def zero_slice_axis(path: Path, array) -> Path:
    """A NIfTI whose sform gives the third axis no length (a singular affine)."""
    header = nib.Nifti1Image(np.asarray(array, np.int16), np.eye(4)).header
    header["srow_z"] = [0.0, 0.0, 0.0, 5.0]
    header["sform_code"], header["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(np.asarray(array, np.int16), None, header), str(path))
    return path


def body(shape=(16, 16, 8)) -> np.ndarray:
    array = np.full(shape, -1000.0)
    array[4:12, 4:12, :] = 40.0
    return array


def build_corpus(root: Path) -> dict[str, Path]:
    """name -> broken input (file or folder), all under ``root``."""
    corpus: dict[str, Path] = {}

    def add(name: str, path: Path) -> None:
        corpus[name] = path

    add("zero-byte nii.gz", (root / "empty.nii.gz"))
    corpus["zero-byte nii.gz"].write_bytes(b"")
    good = nifti(root / "good.nii.gz", body())
    add("truncated nii.gz", root / "truncated.nii.gz")
    corpus["truncated nii.gz"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    add("gzip of garbage", root / "garbage.nii.gz")
    corpus["gzip of garbage"].write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    add("wrong extension (text)", root / "notes.txt")
    corpus["wrong extension (text)"].write_text("patient notes, not an image\n")
    add("text named .nrrd", root / "fake.nrrd")
    corpus["text named .nrrd"].write_text("hello\n")
    add("2D image", nifti(root / "slice2d.nii.gz", body()[:, :, 0]))
    add("3D with one slice", nifti(root / "oneslice.nii.gz", body()[:, :, :1]))
    add("4D image", nifti(root / "fourd.nii.gz", np.stack([body(), body()], axis=-1)))
    add("NaN voxels", nifti(root / "nan.nii.gz", np.where(body() > 0, np.nan, body()), dtype=np.float32))
    add("constant volume", nifti(root / "constant.nii.gz", np.full((16, 16, 8), -1000.0)))
    add("8-bit export", nifti(root / "export8.nii.gz", np.clip((body() + 1000) / 8, 0, 255), dtype=np.uint8))
    add("raw 12-bit without rescale", nifti(root / "raw12.nii.gz", np.clip(body() + 1024, 0, 4095), dtype=np.uint16))
    add("absurd spacing", nifti(root / "spacing.nii.gz", body(), spacing=(1.0, 1.0, 50.0)))
    add("zero voxel size", zero_slice_axis(root / "zero_spacing.nii.gz", body()))
    write_series(root / "mr", axial_positions(6), modality="MR")
    add("MR series", root / "mr")
    positions = axial_positions(6)
    write_series(root / "dup", positions + [positions[3]])
    add("duplicate positions", root / "dup")
    positions = axial_positions(10)
    del positions[4]
    write_series(root / "gap", positions)
    add("missing slice", root / "gap")
    write_series(root / "mixed", axial_positions(5), description="a")
    write_series(root / "mixed", axial_positions(6), description="b", prefix="other")
    add("mixed series", root / "mixed")
    (root / "empty_dir").mkdir()
    add("empty folder", root / "empty_dir")
    (root / "text_dir").mkdir()
    (root / "text_dir" / "readme.txt").write_text("nothing here")
    add("folder without DICOM", root / "text_dir")
    add("missing path", root / "does_not_exist.nii.gz")
    seg = SHARED_DATA / "liver_3slice_dicomseg" / "liver_seg_DICOMSEG.dcm"
    if seg.exists():
        (root / "seg_only").mkdir()
        shutil.copy(seg, root / "seg_only" / "seg.dcm")
        add("SEG-only folder", root / "seg_only")
    singles = SHARED_DATA / "single_slices"
    if singles.exists():
        add("single_slices folder", singles)
        add("single DICOM slice file", singles / "cq500_CT-310_693_UNCR.dcm")
        add("single JPEG 2000 slice file", singles / "J2K_pixelrep_mismatch.dcm")
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("bad"))


def test_corpus_is_large_enough(corpus):
    assert len(corpus) >= 20, sorted(corpus)
    assert set(corpus) <= set(CORPUS_NAMES)


CORPUS_NAMES = sorted(
    [
        "zero-byte nii.gz",
        "truncated nii.gz",
        "gzip of garbage",
        "wrong extension (text)",
        "text named .nrrd",
        "2D image",
        "3D with one slice",
        "4D image",
        "NaN voxels",
        "constant volume",
        "8-bit export",
        "raw 12-bit without rescale",
        "absurd spacing",
        "zero voxel size",
        "MR series",
        "duplicate positions",
        "missing slice",
        "mixed series",
        "empty folder",
        "folder without DICOM",
        "missing path",
        "SEG-only folder",
        "single_slices folder",
        "single DICOM slice file",
        "single JPEG 2000 slice file",
    ]
)


def assert_one_error_line(err: str, path: Path) -> None:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    assert lines[0].endswith(")") and " (" in lines[0], lines[0]  # the way out, in parentheses
    assert "Traceback" not in err


def _get(corpus, name):
    if name not in corpus:
        pytest.skip(f"{name}: needs ../shared/data")
    return corpus[name]


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_info_refuses(name, corpus, capsys):
    path = _get(corpus, name)
    code = main(["info", str(path)])
    captured = capsys.readouterr()
    assert code == 2
    assert_one_error_line(captured.err, path)


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_preprocess_refuses_and_writes_nothing(name, corpus, capsys, tmp_path):
    path = _get(corpus, name)
    out = tmp_path / "out.nii.gz"
    code = main(["preprocess", str(path), "--preset", "ct-fm-ssl", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert_one_error_line(captured.err, path)
    assert list(tmp_path.iterdir()) == []  # no output, no partial file


def _unreadable_file_command(path: Path) -> list[str]:
    """Run as an unprivileged user when we are root (root reads any file regardless of mode)."""
    command = [sys.executable, "-m", "ctfm", "info", str(path)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    return command


@pytest.mark.slow
def test_unreadable_file_is_refused_in_a_real_process():
    folder = Path(tempfile.mkdtemp())
    try:
        folder.chmod(0o755)
        path = nifti(folder / "locked.nii.gz", body())
        path.chmod(0o000)
        result = subprocess.run(_unreadable_file_command(path), capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert_one_error_line(result.stderr, path)
        assert "permission denied" in result.stderr
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "-m", "ctfm", "preprocess", str(path), "-o", str(tmp_path / "o.nii.gz")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {path}: empty file (0 bytes) (the copy or download was interrupted; fetch the file again)"
    )
    assert not (tmp_path / "o.nii.gz").exists()
