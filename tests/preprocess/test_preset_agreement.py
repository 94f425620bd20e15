"""Each preset equals CT-FM's MONAI reference chain (tests/reference_chains.py) on every 3D scan of ../shared/data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import data_path
from ctfm.io import load_ct
from ctfm.preprocess import get_preset, preprocess
from reference_chains import REFERENCE_CHAINS, load_reference

# (scan, how the reference loads it). The reference loads files with MONAI's LoadImage as CT-FM
# did; for the gantry-tilted series MONAI's reader would stack slices as if uniform (the bug our
# loader exists to avoid), so there both chains start from our correctly resampled volume.
SCANS = [
    ("abdomen_3mm/example_ct.nii.gz", None),
    ("abdomen_3mm/example_ct_sm.nii.gz", None),
    ("abdomen_dicom/dicom", "PydicomReader"),
    ("lung_tumour_nrrd/lung1_image.nrrd", "NrrdReader"),
    ("head_tilt_dicom/dicom", "ours"),
    ("sarcoma_ct/STS_019/CT_image.nii.gz", None),
    ("sarcoma_ct/STS_019/dicom/image", "PydicomReader"),
    ("sarcoma_ct/STS_025/CT_image.nii.gz", None),
    ("whole_scans_1p5mm/neck_a.nii.gz", None),
    ("whole_scans_1p5mm/lumbar_pelvis.nii.gz", None),
    ("liver_3slice_dicomseg/dicom", "PydicomReader"),
]
TOLERANCE = 1e-5


def agreement(scan: str, reader: str | None, preset: str) -> tuple[float, tuple, tuple]:
    """(max abs difference, our shape, reference shape) for one scan and preset."""
    path = data_path(scan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours_in, _ = load_ct(path)
        ref_in = ours_in.clone() if reader == "ours" else load_reference(path, reader=reader)
        ours = preprocess(ours_in, get_preset(preset))
        ref = REFERENCE_CHAINS[preset](ref_in)
    if ours.shape != ref.shape:
        return float("inf"), tuple(ours.shape), tuple(ref.shape)
    diff = float(torch.max(torch.abs(torch.as_tensor(ours) - torch.as_tensor(ref))))
    return diff, tuple(ours.shape), tuple(ref.shape)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("preset", sorted(REFERENCE_CHAINS))
@pytest.mark.parametrize("scan,reader", SCANS, ids=[s for s, _ in SCANS])
def test_preset_equals_reference_chain(scan, reader, preset):
    diff, ours_shape, ref_shape = agreement(scan, reader, preset)
    assert ours_shape == ref_shape
    assert diff <= TOLERANCE, f"{preset} on {scan}: max abs difference {diff:.3g}"


@pytest.mark.slow
@pytest.mark.realdata
def test_ssl_preset_affine_matches_reference():
    path = data_path("abdomen_3mm/example_ct.nii.gz")
    ours = preprocess(load_ct(path)[0], get_preset("ct-fm-ssl"))
    ref = REFERENCE_CHAINS["ct-fm-ssl"](load_reference(path))
    np.testing.assert_allclose(np.asarray(ours.affine), np.asarray(ref.affine), atol=1e-6)
