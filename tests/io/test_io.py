"""load_ct on volume files: formats agree on geometry and values; records; real scans; saving."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import data_path
from ctfm.errors import CTInputError
from ctfm.io import load_ct, orientation_code, save_nifti

# An oblique, anisotropic affine with a non-trivial origin (RAS).
RAS_AFFINE = np.array(
    [
        [-0.8, 0.05, 0.0, 120.0],
        [0.0, 0.75, 0.3, -40.5],
        [0.04, 0.0, 2.5, 300.25],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def volume(shape=(9, 7, 5)) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(-1024, 2000, size=shape).astype(np.int16)


def write_itk(path, array, affine_ras):
    """Write with SimpleITK, which stores LPS direction/origin and (z, y, x) arrays."""
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    spacing = np.sqrt((affine_lps[:3, :3] ** 2).sum(axis=0))
    img = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((affine_lps[:3, :3] / spacing).ravel().tolist())
    img.SetOrigin(affine_lps[:3, 3].tolist())
    sitk.WriteImage(img, str(path))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_every_volume_format_gives_the_same_image(tmp_path, suffix):
    array = volume()
    path = tmp_path / f"scan{suffix}"
    if suffix.startswith(".nii"):
        nib.save(nib.Nifti1Image(array, RAS_AFFINE), str(path))
    else:
        write_itk(path, array, RAS_AFFINE)
    image, record = load_ct(path)
    assert image.shape == (1, *array.shape) and image.dtype.is_floating_point
    np.testing.assert_array_equal(image[0].numpy(), array.astype(np.float32))
    np.testing.assert_allclose(np.asarray(image.affine), RAS_AFFINE, atol=1e-5)
    assert record.format == {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".mha": "mha", ".mhd": "mha"}[suffix]
    assert record.shape == array.shape
    assert record.spacing_mm == pytest.approx(tuple(np.sqrt((RAS_AFFINE[:3, :3] ** 2).sum(axis=0))), abs=1e-5)
    assert record.orientation == orientation_code(RAS_AFFINE) == "LAS"


def test_nifti_scale_slope_is_applied(tmp_path):
    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(5, 4, 3), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    image, _ = load_ct(tmp_path / "scaled.nii.gz")
    assert float(image.min()) == -1024.0 and float(image.max()) == 59 * 2 - 1024


def test_trailing_singleton_axis_is_squeezed(tmp_path):
    nib.save(nib.Nifti1Image(volume()[..., None], np.eye(4)), str(tmp_path / "x.nii.gz"))
    assert load_ct(tmp_path / "x.nii.gz")[0].shape == (1, 9, 7, 5)


def test_save_nifti_round_trip_leaves_no_partial_file(tmp_path):
    image, _ = load_ct(_written(tmp_path))
    out = save_nifti(image, tmp_path / "nested" / "copy.nii.gz")
    again, _ = load_ct(out)
    np.testing.assert_array_equal(again.numpy(), image.numpy())
    np.testing.assert_allclose(np.asarray(again.affine), np.asarray(image.affine), atol=1e-6)
    assert [p.name for p in (tmp_path / "nested").iterdir()] == ["copy.nii.gz"]


def _written(tmp_path):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume(), RAS_AFFINE), str(path))
    return path


def test_missing_and_unknown_paths(tmp_path):
    with pytest.raises(CTInputError, match="no such file"):
        load_ct(tmp_path / "nope.nii.gz")
    (tmp_path / "a.csv").write_text("path\n")
    with pytest.raises(CTInputError, match="not a CT file"):
        load_ct(tmp_path / "a.csv")


@pytest.mark.realdata
def test_real_nifti_and_nrrd_records():
    image, record = load_ct(data_path("abdomen_3mm/example_ct.nii.gz"))
    assert record.shape == (122, 101, 112) and record.spacing_mm == pytest.approx((3.0, 3.0, 3.0))
    assert record.orientation == "RAS" and image.dtype.is_floating_point
    image, record = load_ct(data_path("lung_tumour_nrrd/lung1_image.nrrd"))
    assert record.format == "nrrd" and record.shape == (512, 512, 48)
    assert record.spacing_mm == pytest.approx((0.5703125, 0.5703125, 5.0))
    # MONAI's own NRRD reader (pynrrd) gives the same voxels and affine.
    from monai.transforms import LoadImage

    ref = LoadImage(image_only=True, reader="NrrdReader")(str(data_path("lung_tumour_nrrd/lung1_image.nrrd")))
    np.testing.assert_array_equal(image[0].numpy(), ref.numpy())
    np.testing.assert_allclose(np.asarray(image.affine), np.asarray(ref.affine), atol=1e-5)


@pytest.mark.realdata
def test_small_crop_keeps_the_full_scan_affine_trap():
    """example_ct_sm is slices 82..111 of example_ct but carries the full scan's affine (a trap of the test data):
    we report what the header says; the voxels equal the full scan's slices 82..111."""
    full, _ = load_ct(data_path("abdomen_3mm/example_ct.nii.gz"))
    small, _ = load_ct(data_path("abdomen_3mm/example_ct_sm.nii.gz"))
    np.testing.assert_array_equal(small[0].numpy(), full[0, :, :, 82:112].numpy())
    np.testing.assert_allclose(np.asarray(small.affine), np.asarray(full.affine))
