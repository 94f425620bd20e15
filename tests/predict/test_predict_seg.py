"""Segmentation prediction: streamed aggregation vs MONAI, labels back on the input grid
(RAS NIfTI, LPS DICOM, oblique), DICOM SEG read back, statistics, batch behaviour, bad inputs."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn

from ctfm.cli import main
from ctfm.io import load_ct, load_labels
from ctfm.models.segmentation import LoadedSegmentation, load_segmentation_model, save_segmentation_model
from ctfm.predict.aggregation import WindowSettings, monai_logits, streamed_logits
from ctfm.predict.seg import predict_seg, predict_volume
from ctfm.preprocess import PreprocessSpec
from dicom_factory import write_series

SETTINGS = {"roi_size": [16, 32, 32], "overlap": 0.625, "mode": "gaussian", "sigma_scale": 0.125, "sw_batch_size": 2}


class ThresholdNet(nn.Module):
    """Class 1 where the windowed input exceeds 0.5 (HU > 512), else 0: a model whose right answer is known."""

    def forward(self, x):
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 20


def threshold_model(spacing=None) -> LoadedSegmentation:
    spec = PreprocessSpec(name="test", orientation="SPL", spacing_mm=spacing)
    return LoadedSegmentation(
        ThresholdNet(),
        {0: "background", 1: "bone"},
        spec,
        {
            "model": "threshold",
            "weights": {},
            "weights_sha256": None,
            "preprocess_hash": spec.content_hash(),
            "inference": SETTINGS,
        },
    )


def phantom(shape=(30, 26, 22)) -> np.ndarray:
    """Air, a soft-tissue body, an asymmetric bright block (HU 1000) off-centre on every axis."""
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[3:-3, 2:-2, 2:-3] = 40.0
    hu[6:14, 5:9, 12:18] = 1000.0
    return hu


def save(path, hu, affine):
    img = nib.Nifti1Image(hu, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


@pytest.mark.slow
def test_streamed_aggregation_equals_monai():
    torch.manual_seed(0)
    model = load_segmentation_model(None, out_channels=9, init_filters=4, seed=2).model
    settings = WindowSettings(roi_size=(16, 32, 32), sw_batch_size=2)
    for shape in ((40, 50, 37), (12, 40, 30)):  # the second is padded like MONAI pads it
        x = torch.rand(1, 1, *shape)
        ours, ref = streamed_logits(x, model, settings), monai_logits(x, model, settings)
        assert ours.shape == ref.shape == (9, *shape)
        assert torch.allclose(ours, ref, atol=1e-4)
        assert (ours.argmax(0) == ref.argmax(0)).float().mean() >= 0.999


@pytest.mark.parametrize("kind", ["ras", "flipped", "oblique"])
def test_labels_on_the_input_grid_exact(tmp_path, kind):
    hu = phantom()
    affine = np.diag([0.8, 0.9, 1.5, 1.0])
    if kind == "flipped":
        affine = np.array([[0, -0.9, 0, 20], [-0.8, 0, 0, 10], [0, 0, 1.5, -5], [0, 0, 0, 1]], dtype=float)
    if kind == "oblique":
        c, s = np.cos(0.3), np.sin(0.3)
        affine = np.array([[0.8 * c, -0.9 * s, 0, 3], [0.8 * s, 0.9 * c, 0, -4], [0, 0, 1.5, 7], [0, 0, 0, 1]])
    image, _ = load_ct(save(tmp_path / "scan.nii.gz", hu, affine))
    labels = predict_volume(image, threshold_model())
    assert labels.shape == hu.shape and labels.dtype == np.uint8
    assert np.array_equal(labels, (hu > 512).astype(np.uint8))


def test_labels_resampled_back_onto_the_input_grid(tmp_path):
    hu = np.full((48, 44, 36), -1000.0, dtype=np.float32)
    hu[4:-4, 3:-3, 3:-3] = 40.0
    hu[10:30, 8:24, 10:26] = 1000.0
    image, _ = load_ct(save(tmp_path / "scan.nii.gz", hu, np.diag([0.7, 0.7, 1.2, 1.0])))
    # the network grid is 2x coarser in-plane, 1.25x along z; MONAI's Spacing keeps voxel 0 in place,
    # so the coarse samples sit on even input voxels: half an input voxel of shift is the sampling's
    labels = predict_volume(image, threshold_model(spacing=(1.5, 1.4, 1.4)))
    truth = hu > 512
    dice = 2 * np.sum((labels == 1) & truth) / (np.sum(labels == 1) + np.sum(truth))
    assert labels.shape == hu.shape and dice > 0.9
    centre = np.argwhere(labels == 1).mean(0) - np.argwhere(truth).mean(0)
    assert np.all(np.abs(centre) < 0.75)  # voxels of the input grid


def dicom_phantom(folder):
    """An LPS series (rows along -x: a flipped in-plane direction) with a bright block."""

    def values(points):
        x, y, z = points[..., 0], points[..., 1], points[..., 2]
        hu = np.where((np.abs(x) < 9) & (np.abs(y) < 11), 40.0, -1000.0)
        return np.where((x > 1) & (x < 6) & (y > -7) & (y < 0) & (z > 13) & (z < 22), 1000.0, hu)

    positions = [(8.0, -12.0, 10.0 + 2.0 * i) for i in range(8)]
    write_series(
        folder, positions, values=values, rows=24, cols=20, pixel_spacing=(1.0, 1.0), orientation=(-1, 0, 0, 0, 1, 0)
    )
    return folder


def test_dicom_series_nifti_and_dicom_seg_agree(tmp_path):
    folder = dicom_phantom(tmp_path / "dicom")
    summary = predict_seg(
        [folder], threshold_model(), tmp_path / "out", output_format="dicom-seg", statistics=True, progress=False
    )
    assert summary.done == 1 and not summary.failed
    image, record = load_ct(folder)
    name = record.series_uid
    nifti = nib.load(str(tmp_path / "out" / f"{name}.nii.gz"))
    hu = image.numpy()[0]
    assert np.allclose(nifti.affine, np.asarray(image.affine)) and nifti.shape == hu.shape
    written = np.asarray(nifti.dataobj)
    assert np.array_equal(written, (hu > 512).astype(np.uint8)) and written.sum() > 0
    seg = load_labels(tmp_path / "out" / f"{name}.dcm", image)  # highdicom, onto the source grid
    assert seg.names == {1: "bone"} and np.array_equal(seg.labels.numpy()[0], written)
    stats = json.loads((tmp_path / "out" / f"{name}.statistics.json").read_text())["classes"]
    voxel_ml = abs(np.linalg.det(np.asarray(image.affine)[:3, :3])) / 1000
    assert stats[0]["voxels"] == int(written.sum()) and stats[0]["volume_ml"] == pytest.approx(
        written.sum() * voxel_ml, abs=1e-3
    )
    assert stats[0]["mean_hu"] == pytest.approx(float(hu[written == 1].mean()), abs=1e-3) and stats[0][
        "sd_hu"
    ] == pytest.approx(0.0, abs=1e-3)
    assert json.loads((tmp_path / "out" / f"{name}.labels.json").read_text())["labels"] == {
        "0": "background",
        "1": "bone",
    }


@pytest.fixture
def tiny_seg_weights(tmp_path):
    """A random liver/spleen segmentation weights folder (init_filters 2) with this file's window settings."""
    model, names, spec, _ = load_segmentation_model(None, labels="liver,spleen", init_filters=2, seed=0)
    return save_segmentation_model(
        model,
        tmp_path / "weights",
        names,
        spec=PreprocessSpec(name="tiny", spacing_mm=None, foreground_crop=None),
        inference=SETTINGS,
    )


def test_cli_batch_resume_failures_and_bad_inputs(tmp_path, capsys, tiny_seg_weights):
    weights = tiny_seg_weights
    scan = save(tmp_path / "a.nii.gz", phantom((20, 18, 16)), np.diag([1.0, 1.0, 2.0, 1.0]))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "out"
    argv = [
        "predict",
        "seg",
        str(scan),
        str(tmp_path / "broken.nii.gz"),
        "--model",
        str(weights),
        "-o",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "predicted 1 input(s)" in captured.out and "broken.nii.gz" in captured.err
    assert "broken.nii.gz" in json.loads((out / "failures.json").read_text())["failures"].popitem()[0]
    written = nib.load(str(out / "a.nii.gz"))
    assert (
        written.shape == (20, 18, 16)
        and np.allclose(written.affine, np.diag([1.0, 1.0, 2.0, 1.0]))
        and written.get_data_dtype() == np.uint8
    )
    assert main(argv[:3] + argv[4:]) == 0 and "skipped 1 already done" in capsys.readouterr().out
    # the weights have 3 channels, totalseg-v2 has 118 classes: one line, exit 2
    assert (
        main(
            [
                "predict",
                "seg",
                str(scan),
                "--model",
                str(weights),
                "--labels",
                "totalseg-v2",
                "-o",
                str(tmp_path / "o2"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "3 output channels" in err and "118 classes" in err
    assert (
        main(["predict", "seg", str(scan), "--model", str(weights), "--classes", "heart", "-o", str(tmp_path / "o3")])
        == 2
    )
    assert "unknown class name(s) heart" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                "seg",
                str(scan),
                "--model",
                str(weights),
                "--format",
                "dicom-seg",
                "-o",
                str(tmp_path / "o4"),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err  # refused before any work: one line, no output folder made
    assert "needs a DICOM series" in err and err.count("\n") == 1 and not (tmp_path / "o4").exists()
