"""Checks on loaded CTs: each rule on tiny arrays, and real scans pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from conftest import data_path
from ctfm.io import ScanRecord, load_ct
from ctfm.preprocess import check_ct, hu_statistics, is_usable


def make(array, spacing=(1.0, 1.0, 2.0), modality=None, fmt="nifti"):
    array = np.asarray(array, dtype=np.float32)
    image = MetaTensor(
        torch.from_numpy(array)[None], affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    )
    record = ScanRecord(
        path="x.nii.gz", format=fmt, shape=array.shape, spacing_mm=spacing, orientation="RAS", modality=modality
    )
    return image, record


def ct_like(shape=(16, 16, 8)):
    rng = np.random.default_rng(0)
    array = np.full(shape, -1000.0) + rng.normal(0, 5, shape)
    array[4:12, 4:12, :] = 40.0
    return array


def statuses(image, record):
    return {c.name: c.status for c in check_ct(image, record)}


def test_plausible_ct_is_usable():
    image, record = make(ct_like())
    assert all(s == "ok" for s in statuses(image, record).values())


@pytest.mark.parametrize(
    "mutate, check",
    [
        (lambda a: np.where(a > 0, np.nan, a), "finite"),
        (lambda a: np.full_like(a, -1000.0), "not_constant"),
        (lambda a: np.clip((a + 1000) / 8, 0, 255).round(), "hu_range"),
        (lambda a: np.clip(a + 1024, 0, 4095), "hu_range"),
        (lambda a: a + 2000, "hu_range"),
    ],
    ids=["nan", "constant", "8-bit", "12-bit-raw", "no-negative"],
)
def test_errors(mutate, check):
    image, record = make(mutate(ct_like()))
    result = statuses(image, record)
    assert result[check] == "error"
    assert not is_usable(check_ct(image, record))


def test_spacing_out_of_range_is_an_error():
    image, record = make(ct_like(), spacing=(0.05, 1.0, 12.0))
    assert statuses(image, record)["spacing"] == "error"


def test_mr_is_an_error_and_missing_air_a_warning():
    image, record = make(ct_like(), modality="MR")
    assert statuses(image, record)["modality"] == "error"
    soft = ct_like()
    soft[soft < -500] = -300.0
    image, record = make(soft)
    assert statuses(image, record)["hu_range"] == "warn"
    assert is_usable(check_ct(image, record))


def test_hu_statistics_are_exact_on_small_arrays():
    stats = hu_statistics(np.arange(101, dtype=np.float32) - 50)
    assert stats == {"min": -50.0, "p1": -49.0, "p50": 0.0, "p99": 49.0, "max": 50.0}


@pytest.mark.realdata
@pytest.mark.parametrize(
    "scan",
    [
        "abdomen_3mm/example_ct.nii.gz",
        "lung_tumour_nrrd/lung1_image.nrrd",
        "sarcoma_ct/STS_019/CT_image.nii.gz",
        "abdomen_dicom/dicom",
    ],
)
def test_real_scans_are_usable(scan):
    image, record = load_ct(data_path(scan))
    checks = check_ct(image, record)
    assert is_usable(checks), [c for c in checks if c.status == "error"]
