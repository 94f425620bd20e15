"""DICOM series: discovery, selection, stacking, and resampling of tilted / non-uniform series."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from conftest import data_path
from ctfm.errors import CTInputError
from ctfm.io import CTGeometryWarning, load_ct
from dicom_factory import axial_positions, write_series

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def linear_hu(world_lps: np.ndarray) -> np.ndarray:
    """A linear HU field: linear interpolation reproduces it exactly, so resampling can be checked."""
    return -500.0 + 3.0 * world_lps[..., 0] - 2.0 * world_lps[..., 1] + 5.0 * world_lps[..., 2]


def expected_at_voxels(image) -> np.ndarray:
    """The linear field evaluated at every voxel centre of a loaded image (via its RAS affine)."""
    shape = image.shape[1:]
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    ras = idx @ np.asarray(image.affine)[:3, :3].T + np.asarray(image.affine)[:3, 3]
    lps = ras * np.array([-1.0, -1.0, 1.0])
    return linear_hu(lps).reshape(shape)


def test_uniform_series_stacks_exactly(tmp_path):
    write_series(tmp_path, axial_positions(6, gap=2.0)[::-1], values=linear_hu)  # files in reverse order
    image, record = load_ct(tmp_path)
    assert image.shape == (1, 10, 12, 6)
    assert record.spacing_mm == pytest.approx((1.0, 1.5, 2.0))
    assert record.orientation == "LPS" and record.resampled is None
    np.testing.assert_allclose(image[0].numpy(), expected_at_voxels(image), atol=0.51)  # stored as integers


def test_tilted_series_is_resampled_from_slice_positions(tmp_path):
    # Gantry tilt: the slice planes are oblique (columns tilted about x), slice origins step along z.
    tilt = math.radians(20.0)
    orientation = (1, 0, 0, 0, math.cos(tilt), -math.sin(tilt))
    positions = [(0.0, 0.0, 4.0 * k) for k in range(8)]
    write_series(tmp_path, positions, values=linear_hu, orientation=orientation, rows=16, cols=8)
    with pytest.warns(CTGeometryWarning, match="gantry tilt 20.0 deg"):
        image, record = load_ct(tmp_path)
    assert record.resampled and record.gantry_tilt_deg == pytest.approx(20.0, abs=0.01)
    values = image[0].numpy()
    expected = expected_at_voxels(image)
    covered = values > values.min()  # voxels outside every acquired slice hold the fill value
    assert covered.mean() > 0.5
    np.testing.assert_allclose(values[covered], expected[covered], atol=0.6)


def test_stacking_a_tilted_series_as_uniform_would_be_wrong(tmp_path):
    """Guard for the test above: naive stacking of the same slices disagrees with the true field."""
    tilt = math.radians(20.0)
    orientation = (1, 0, 0, 0, math.cos(tilt), -math.sin(tilt))
    write_series(
        tmp_path, [(0.0, 0.0, 4.0 * k) for k in range(8)], values=linear_hu, orientation=orientation, rows=16, cols=8
    )
    import pydicom

    files = sorted(tmp_path.glob("*.dcm"))
    naive = np.stack([pydicom.dcmread(f).pixel_array.T.astype(float) - 1024 for f in files], axis=-1)
    normal_gap = 4.0 * math.cos(tilt)
    affine = np.eye(4)
    affine[:3, 0] = [1, 0, 0]
    affine[:3, 1] = np.array(orientation[3:]) * 1.5
    affine[:3, 2] = np.cross(orientation[:3], orientation[3:]) * normal_gap

    class Naive:
        shape = (1, *naive.shape)

    Naive.affine = LPS_TO_RAS @ affine
    assert np.abs(naive - expected_at_voxels(Naive)).max() > 10


def test_non_uniform_spacing_is_resampled(tmp_path):
    depths = [0, 2, 4, 6, 8, 11, 14, 17, 20]  # 2 mm then 3 mm
    write_series(tmp_path, [(0.0, 0.0, float(z)) for z in depths], values=linear_hu)
    with pytest.warns(CTGeometryWarning, match="non-uniform slice spacing"):
        image, record = load_ct(tmp_path)
    assert record.spacing_mm[2] == pytest.approx(2.0)
    assert image.shape[-1] == 11  # 20 mm / 2 mm + 1
    np.testing.assert_allclose(image[0].numpy(), expected_at_voxels(image), atol=0.6)


def test_missing_slice_is_refused(tmp_path):
    positions = axial_positions(10, gap=2.0)
    del positions[5]
    write_series(tmp_path, positions)
    with pytest.raises(CTInputError, match="missing slice"):
        load_ct(tmp_path)


def test_duplicate_positions_are_refused(tmp_path):
    positions = axial_positions(6)
    write_series(tmp_path, positions + [positions[2]])
    with pytest.raises(CTInputError, match="duplicate slice position"):
        load_ct(tmp_path)


def test_several_series_are_listed_and_one_can_be_chosen(tmp_path):
    write_series(tmp_path / "a", axial_positions(5), series_uid="1.2.3.4.1", description="soft tissue")
    write_series(tmp_path / "b", axial_positions(7), series_uid="1.2.3.4.2", description="lung")
    with pytest.raises(CTInputError) as err:
        load_ct(tmp_path)
    message = str(err.value)
    assert (
        "1.2.3.4.1 'soft tissue' 5 slices" in message
        and "1.2.3.4.2 'lung' 7 slices" in message
        and "--series" in message
    )
    image, record = load_ct(tmp_path, series_uid="1.2.3.4.2")
    assert image.shape[-1] == 7 and record.series_uid == "1.2.3.4.2"


def test_localizers_and_non_dicom_files_are_skipped(tmp_path):
    write_series(tmp_path, axial_positions(5))
    write_series(tmp_path, [(0.0, 0.0, 0.0)], image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), prefix="scout")
    (tmp_path / "notes.txt").write_text("not a DICOM file")
    (tmp_path / "DICOMDIR.bak").write_bytes(b"\x00" * 300)
    image, record = load_ct(tmp_path)
    assert image.shape[-1] == 5
    assert record.skipped["localizer"] == 1 and record.skipped["not DICOM"] == 2


def test_mr_series_is_refused(tmp_path):
    write_series(tmp_path, axial_positions(5), modality="MR")
    with pytest.raises(CTInputError, match="MR"):
        load_ct(tmp_path)


def test_record_fields(tmp_path):
    write_series(tmp_path, axial_positions(4), series_uid="1.2.3.9")
    _, record = load_ct(tmp_path)
    assert record.series_uid == "1.2.3.9" and record.modality == "CT" and record.kernel == "B30f"
    assert record.slice_thickness_mm == 2.0 and record.manufacturer == "TEST" and record.body_part == "CHEST"
    assert len(record.sop_uids) == 4 and record.study_uid


@pytest.mark.realdata
def test_jpeg2000_series_matches_simpleitk():
    import SimpleITK as sitk

    folder = data_path("abdomen_dicom/dicom")
    image, record = load_ct(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    ref_array = sitk.GetArrayFromImage(ref).transpose(2, 1, 0).astype(np.float32)
    ref_origin_ras = np.asarray(ref.GetOrigin()) * [-1, -1, 1]
    # SimpleITK stacks in file order (descending z here); compare world geometry, then voxels.
    if np.allclose(np.asarray(image.affine)[:3, 3], ref_origin_ras, atol=1e-3):
        np.testing.assert_array_equal(image[0].numpy(), ref_array)
    else:
        np.testing.assert_array_equal(image[0].numpy(), ref_array[:, :, ::-1])
    assert record.format == "dicom" and record.kernel.startswith("Br38f") and record.manufacturer == "SIEMENS"
    assert record.shape == (512, 512, 20) and record.spacing_mm == pytest.approx((0.9765625, 0.9765625, 2.0))


@pytest.mark.realdata
def test_real_tilted_head_series():
    folder = data_path("head_tilt_dicom/dicom")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, record = load_ct(folder)
    assert any(issubclass(w.category, CTGeometryWarning) for w in caught)
    assert record.gantry_tilt_deg == pytest.approx(18.5, abs=0.05)
    assert "gantry tilt" in record.resampled and "non-uniform" in record.resampled
    assert record.spacing_mm[2] == pytest.approx(4.0, abs=0.01)  # finest recurring gap along the normal
    # World extent along the normal is kept: first to last slice, 144 mm.
    assert (image.shape[-1] - 1) * record.spacing_mm[2] == pytest.approx(144.0, abs=4.1)
    assert float(image.max()) > 1000 and float(image.min()) <= -1000


@pytest.mark.realdata
def test_rtstruct_is_skipped_in_a_folder_with_its_ct():
    _, record = load_ct(data_path("sarcoma_ct/STS_019/dicom"))
    assert record.skipped == {"RTSTRUCT": 1} and record.n_slices_on_disk == 47
