"""Bounded (slab-wise) preprocessing equals the MONAI chain and never loads the whole grid."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from conftest import data_path
from ctfm.io import load_ct
from ctfm.preprocess import ForegroundCrop, get_preset, preprocess
from ctfm.preprocess.bounded import preprocess_bounded, supports_bounded


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize(
    "scan",
    [
        "abdomen_3mm/example_ct.nii.gz",
        "whole_scans_1p5mm/neck_a.nii.gz",
        "head_tilt_dicom/dicom",
        "liver_3slice_dicomseg/dicom",
    ],
)
def test_equals_the_chain_on_real_scans(scan):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image, _ = load_ct(data_path(scan))
    spec = get_preset("ct-fm-1mm-320")
    eager = preprocess(image, spec)
    bounded = preprocess_bounded(image, spec, rows_per_slab=37)  # slabs that do not divide 320
    assert bounded.shape == eager.shape
    assert float((bounded - eager).abs().max()) <= 1e-6
    np.testing.assert_allclose(np.asarray(bounded.affine), np.asarray(eager.affine), atol=1e-9)


@pytest.mark.parametrize("policy", ["none", "pad", "pad_or_crop"])
def test_equals_the_chain_on_an_oblique_tiny_volume(policy):
    rng = np.random.default_rng(0)
    affine = torch.tensor(
        [[-0.7, 0.1, 0.0, 30.0], [0.05, 0.8, 0.2, -10.0], [0.0, -0.1, 2.5, 5.0], [0, 0, 0, 1.0]], dtype=torch.float64
    )
    image = MetaTensor(torch.from_numpy(rng.normal(0, 400, (1, 30, 26, 12)).astype(np.float32)), affine=affine)
    spec = get_preset("ct-fm-1mm-320").with_(
        spacing_mm=(1.5, 1.0, 1.2), size_policy=policy, patch_size_mm=(30.0, 20.0, 28.0)
    )
    eager = preprocess(image, spec)
    for rows in (1, 4, 100):
        bounded = preprocess_bounded(image, spec, rows_per_slab=rows)
        assert bounded.shape == eager.shape
        assert float((bounded - eager).abs().max()) <= 1e-6


def test_specs_with_a_foreground_crop_are_not_bounded():
    assert not supports_bounded(get_preset("ct-fm-ssl"))
    assert supports_bounded(get_preset("ct-fm-1mm-320"))
    with pytest.raises(ValueError, match="foreground crop"):
        preprocess_bounded(
            MetaTensor(torch.zeros(1, 4, 4, 4)), get_preset("ct-fm-1mm-320").with_(foreground_crop=ForegroundCrop())
        )


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("scan", ["abdomen_3mm/example_ct.nii.gz"])
def test_a_crop_after_resampling_runs_bounded_and_equals_the_chain(scan):
    """Prediction's spec (ct-fm-patches without a size policy: resample, then crop HU > 0)."""
    from ctfm.preprocess.bounded import preprocess_large, supports_bounded_crop

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image, _ = load_ct(data_path(scan))
    spec = get_preset("ct-fm-patches")
    assert spec.size_policy == "none" and supports_bounded_crop(spec) and not supports_bounded(spec)
    eager = preprocess(image, spec)
    large = preprocess_large(image, spec)
    assert large.shape == eager.shape
    assert float((large - eager).abs().max()) <= 1e-6
    np.testing.assert_allclose(np.asarray(large.affine), np.asarray(eager.affine), atol=1e-6)
    # a crop before resampling (head-ct) or padding after it is not value-independent: left to the chain
    assert not supports_bounded_crop(get_preset("head-ct")) and not supports_bounded_crop(get_preset("ct-fm-ssl"))
