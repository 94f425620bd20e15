"""Hostile scans and inputs: every verb that reads scans refuses what `ctfm embed` refuses, in one
line, exit 2, before it computes and before it writes; an input that yields no scan is an error."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from conftest import data_path
from ctfm.errors import CTInputError
from ctfm.preprocess import get_preset
from ctfm.preprocess.validate import MAX_RESAMPLED_VOXELS, check_scan, load_usable_ct, resampled_voxels


def body(shape=(24, 22, 20)) -> np.ndarray:
    array = np.full(shape, -1000.0, np.float32)
    array[5:-5, 5:-5, 3:-3] = 40.0
    array[8:-8, 8:-8, 6:-6] = 300.0
    return array


def nifti(path, array, spacing=(2.0, 2.0, 2.0), dtype=np.float32):
    nib.save(nib.Nifti1Image(np.asarray(array).astype(dtype), np.diag([*spacing, 1.0])), str(path))
    return path


# name -> (array maker, spacing, the words the error must hold)
BAD_SCANS = {
    "all-nan": (lambda: np.full((24, 22, 20), np.nan, np.float32), (2.0, 2.0, 2.0), "NaN or Inf"),
    "inf": (lambda: np.where(body() > 100, np.inf, body()).astype(np.float32), (2.0, 2.0, 2.0), "NaN or Inf"),
    "constant": (lambda: np.full((24, 22, 20), -200.0, np.float32), (2.0, 2.0, 2.0), "every voxel is -200"),
    "1e-4 mm": (body, (1e-4, 1e-4, 1e-4), "voxel spacing"),
    "977 mm": (body, (977.0, 977.0, 977.0), "voxel spacing"),
}


def bad_scan(tmp_path, name):
    make, spacing, _ = BAD_SCANS[name]
    return nifti(tmp_path / f"{name.replace(' ', '_')}.nii.gz", make(), spacing)


def refused(result, *words):
    """One `error: ...` line on stderr, exit 2, no traceback, and ``words`` in it."""
    code, _out, err = result
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def seg_weights(tmp_path_factory):
    """A random two-class segmentation weights folder (init_filters 2), no resampling."""
    from ctfm.models.segmentation import load_segmentation_model, save_segmentation_model
    from ctfm.preprocess import PreprocessSpec

    model, names, _spec, _ = load_segmentation_model(None, labels="liver,spleen", init_filters=2, seed=0)
    return save_segmentation_model(
        model,
        tmp_path_factory.mktemp("seg") / "weights",
        names,
        spec=PreprocessSpec(name="tiny", spacing_mm=None, foreground_crop=None),
        inference={"roi_size": [16, 16, 16], "sw_batch_size": 1, "overlap": 0.25},
    )


# ---- one function checks every scan -----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BAD_SCANS))
def test_check_scan_refuses_bad_scans(tmp_path, name):
    with pytest.raises(CTInputError, match=BAD_SCANS[name][2].split()[0]):
        load_usable_ct(bad_scan(tmp_path, name))


def test_resampled_size_is_bounded_before_allocating(tmp_path):
    """A scan of sane spacing whose field of view, at the preset's 3x1x1 mm, would exceed the bound."""
    from ctfm.io import load_ct

    path = nifti(tmp_path / "huge_fov.nii.gz", body((64, 64, 40)), (10.0, 10.0, 10.0), np.int16)
    image, record = load_ct(path)
    spec = get_preset("ct-fm-ssl").with_(spacing_mm=(0.2, 0.2, 0.2))
    assert resampled_voxels(record.shape, record.spacing_mm, spec.spacing_mm) > MAX_RESAMPLED_VOXELS
    with pytest.raises(CTInputError, match="voxels once resampled"):
        check_scan(image, record, spec)
    assert check_scan(image, record, get_preset("ct-fm-ssl"))[-1].name == "size"


# ---- predict seg --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BAD_SCANS))
def test_predict_seg_refuses_bad_scan(tmp_path, run_cli, seg_weights, name):
    scan = bad_scan(tmp_path, name)
    out = tmp_path / "out"
    code, stdout, err = run_cli("predict", "seg", scan, "--model", seg_weights, "-o", out, "--no-progress")
    assert code == 1 and "predicted 0 input(s)" in stdout, (code, stdout, err)
    assert BAD_SCANS[name][2] in err and "internal error" not in err
    assert not (out / f"{name.replace(' ', '_')}.nii.gz").exists()
    failures = json.loads((out / "failures.json").read_text())["failures"]
    assert BAD_SCANS[name][2] in next(iter(failures.values()))


# ---- predict cls: the same check through the classifier's input ----------------------------------
def test_predict_cls_input_is_checked(tmp_path):
    from ctfm.finetune.cls import preprocess_input

    with pytest.raises(CTInputError, match="NaN or Inf"):
        preprocess_input(str(bad_scan(tmp_path, "all-nan")), get_preset("ct-fm-ssl"))
    path = nifti(tmp_path / "huge_fov.nii.gz", body((64, 64, 40)), (10.0, 10.0, 10.0), np.int16)
    with pytest.raises(CTInputError, match="voxels once resampled"):
        preprocess_input(str(path), get_preset("ct-fm-ssl").with_(spacing_mm=(0.2, 0.2, 0.2)))


# ---- finetune -------------------------------------------------------------------------------------
def test_finetune_seg_refuses_an_all_nan_case_before_training(tmp_path, run_cli):
    good = nifti(tmp_path / "good.nii.gz", body(), dtype=np.int16)
    nan = bad_scan(tmp_path, "all-nan")
    label = nifti(tmp_path / "label.nii.gz", (body() > 100).astype(np.uint8), dtype=np.uint8)
    manifest = tmp_path / "cases.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "split"])
        writer.writerows([[good, label, "train"], [nan, label, "train"], [good, label, "val"]])
    classes = tmp_path / "classes.json"
    classes.write_text('{"0": "background", "1": "bone"}')
    out = tmp_path / "run"
    line = refused(
        run_cli(
            "finetune",
            "seg",
            "--preset",
            "tiny",
            "--set",
            f"data={manifest}",
            "--set",
            f"class_map={classes}",
            "--set",
            f"out={out}",
            "--no-resume",
        ),
        "all-nan.nii.gz",
        "NaN or Inf",
    )
    assert "error: " in line
    assert not (out / "checkpoints").exists() and not (out / "metrics.csv").exists()


def test_finetune_cls_refuses_an_all_nan_case_before_training(tmp_path, run_cli):
    good = [nifti(tmp_path / f"good{i}.nii.gz", body() + i, dtype=np.int16) for i in range(4)]
    nan = bad_scan(tmp_path, "all-nan")
    manifest = tmp_path / "cases.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "abnormal", "split"])
        writer.writerows([[good[0], 0, "train"], [good[1], 1, "train"], [nan, 1, "train"]])
        writer.writerows([[good[2], 0, "val"], [good[3], 1, "val"]])
    out = tmp_path / "run"
    refused(
        run_cli("finetune", "cls", "--preset", "tiny", "--set", f"data={manifest}", "--set", f"out={out}"),
        "all-nan.nii.gz",
        "NaN or Inf",
    )
    assert not (out / "checkpoints").exists()


# ---- zero-shot evaluations that read scans ----------------------------------------------------
@pytest.mark.parametrize("name", ["all-nan", "977 mm"])
def test_saliency_refuses_bad_scan(tmp_path, run_cli, name):
    out = tmp_path / "sal"
    refused(run_cli("evaluate", "saliency", bad_scan(tmp_path, name), "--out", out, "--device", "cpu"))
    assert not out.exists()


def test_saliency_refuses_label_map_before_writing(tmp_path, run_cli):
    """An empty label map used to be refused after saliency.nii.gz and the figure were written."""
    scan = nifti(tmp_path / "scan.nii.gz", body((30, 30, 24)), (3.0, 3.0, 3.0), np.int16)
    empty = nifti(tmp_path / "empty_label.nii.gz", np.zeros((30, 30, 24)), (3.0, 3.0, 3.0), np.uint8)
    out = tmp_path / "sal"
    refused(
        run_cli("evaluate", "saliency", scan, "--labels", empty, "--out", out, "--device", "cpu"),
        "inside and outside",
    )
    assert not out.exists() or not any(out.iterdir())


def test_saliency_refuses_an_output_that_is_a_file(tmp_path, run_cli):
    scan = nifti(tmp_path / "scan.nii.gz", body((30, 30, 24)), (3.0, 3.0, 3.0), np.int16)
    out = tmp_path / "taken"
    out.write_text("not a folder")
    refused(run_cli("evaluate", "saliency", scan, "--out", out, "--device", "cpu"), "taken", "not a folder")
    assert out.read_text() == "not a folder"


def test_concepts_refuses_bad_scan(tmp_path, run_cli):
    out = tmp_path / "concepts"
    refused(
        run_cli("evaluate", "concepts", bad_scan(tmp_path, "constant"), "--out", out, "--device", "cpu"),
        "every voxel",
    )
    assert not out.exists() or not any(out.iterdir())


# ---- embed: the resampled size ---------------------------------------------------------------
def test_embed_refuses_an_oversized_resample(tmp_path, run_cli, tiny_weights):
    """10 mm voxels over 2.5 m: within the spacing range, but 1.5e9+ voxels at 1x1x1 mm."""
    path = nifti(tmp_path / "huge_fov.nii.gz", body((256, 256, 80)), (10.0, 10.0, 10.0), np.int16)
    store = tmp_path / "store"
    code, _out, err = run_cli(
        "embed", path, "--weights", tiny_weights, "--out", store, "--mode", "whole", "--device", "cpu", "--no-progress"
    )
    assert code != 0 and "voxels once resampled" in err and "internal error" not in err, err


# ---- nothing is not success --------------------------------------------------------------------
def test_embed_empty_folder(tmp_path, run_cli, tiny_weights):
    folder = tmp_path / "empty"
    folder.mkdir()
    refused(
        run_cli("embed", folder, "--weights", tiny_weights, "--out", tmp_path / "store", "--device", "cpu"),
        "no 3D CT found",
        "0 files",
    )
    assert not (tmp_path / "store").exists()


def test_embed_folder_of_2d_slices(tmp_path, run_cli, tiny_weights):
    folder = data_path("single_slices")
    refused(
        run_cli("embed", folder, "--weights", tiny_weights, "--out", tmp_path / "store", "--device", "cpu"),
        "no 3D CT found",
        "single 2D slice",
    )
    assert not (tmp_path / "store").exists()


def test_embed_folder_of_other_files(tmp_path, run_cli, tiny_weights):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    (folder / "b.png").write_bytes(b"\x89PNG")
    refused(
        run_cli("embed", folder, "--weights", tiny_weights, "--out", tmp_path / "store", "--device", "cpu"),
        "no 3D CT found",
        "2 files",
    )


def test_embed_header_only_manifest(tmp_path, run_cli, tiny_weights):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,series_uid\n")
    refused(
        run_cli("embed", manifest, "--weights", tiny_weights, "--out", tmp_path / "store", "--device", "cpu"),
        "m.csv",
        "no rows",
    )


def test_embed_manifest_of_blank_rows(tmp_path, run_cli, tiny_weights):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,series_uid\n,\n , \n,\n")
    refused(
        run_cli("embed", manifest, "--weights", tiny_weights, "--out", tmp_path / "store", "--device", "cpu"),
        "m.csv",
    )


def test_embed_manifest_of_unusable_rows(tmp_path, run_cli, tiny_weights):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,error\na.nii.gz,unreadable\n,\n")
    # the blank row is dropped on reading; the other one is marked unreadable
    line = refused(
        run_cli("embed", manifest, "--weights", tiny_weights, "--out", tmp_path / "store", "--device", "cpu"),
        "m.csv",
        "no scan",
    )
    assert "1 marked unreadable" in line


def test_predict_seg_empty_folder(tmp_path, run_cli, seg_weights):
    folder = tmp_path / "empty"
    folder.mkdir()
    refused(run_cli("predict", "seg", folder, "--model", seg_weights, "-o", tmp_path / "out"), "no 3D CT found")
    assert not (tmp_path / "out").exists()


def test_predict_seg_folder_of_2d_slices(tmp_path, run_cli, seg_weights):
    refused(
        run_cli("predict", "seg", data_path("single_slices"), "--model", seg_weights, "-o", tmp_path / "out"),
        "single 2D slice",
    )


def test_cohort_scan_empty_folder(tmp_path, run_cli):
    folder = tmp_path / "empty"
    folder.mkdir()
    refused(run_cli("cohort", "scan", folder, "--out", tmp_path / "inventory.parquet"), "no 3D CT found")
    assert not (tmp_path / "inventory.parquet").exists()


def test_predict_cls_output_must_be_csv(tmp_path, run_cli):
    refused(run_cli("predict", "cls", tmp_path, "--model", tmp_path / "run", "-o", tmp_path / "preds.png"), ".csv")


def test_predict_cls_empty_folder(tmp_path, run_cli):
    folder = tmp_path / "empty"
    folder.mkdir()
    refused(run_cli("predict", "cls", folder, "--model", tmp_path / "run", "-o", tmp_path / "p.csv"), "no 3D CT found")


def test_finetune_seg_bounds_the_resampled_size(tmp_path, run_cli):
    """10 mm voxels over 2.5 m: at the tiny preset's 4 mm fine, at 0.5 mm far past the bound."""
    big = nifti(tmp_path / "big.nii.gz", body((256, 256, 40)), (10.0, 10.0, 10.0), np.int16)
    label = nifti(tmp_path / "big_label.nii.gz", (body((256, 256, 40)) > 100).astype(np.uint8), (10.0,) * 3, np.uint8)
    manifest = tmp_path / "cases.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["image", "label", "split"], [big, label, "train"]])
    classes = tmp_path / "classes.json"
    classes.write_text('{"0": "background", "1": "bone"}')
    out = tmp_path / "run"
    refused(
        run_cli(
            "finetune",
            "seg",
            "--preset",
            "tiny",
            "--set",
            f"data={manifest}",
            "--set",
            f"class_map={classes}",
            "--set",
            "spacing_mm=[0.5,0.5,0.5]",
            "--set",
            "val_fraction=0",
            "--set",
            f"out={out}",
        ),
        "big.nii.gz",
        "voxels once resampled",
    )
    assert not (out / "checkpoints").exists()


# --------------------------------------------------------------------------- a full disk outside the store


def test_a_write_past_the_file_size_limit_is_one_line_in_any_verb(tmp_path):
    """EFBIG (a write past ``ulimit -f``) is the user's disk, not a bug: one line, exit 2, in a verb
    that writes no store (``ctfm synth``), as ENOSPC is."""
    from hostile_stores import run_limited

    result = run_limited(64 * 1024, "sys.exit(main(sys.argv[2:]))", "synth", "--out", tmp_path / "phantoms")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], result.stderr
    assert "free space" in lines[0]
