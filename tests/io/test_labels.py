"""Label maps land on the image grid: synthetic grids, then the real files of ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from conftest import data_path
from ctfm.errors import CTInputError
from ctfm.io import load_ct
from ctfm.io.labels import (
    LabelMap,
    _resample_nearest,
    label_names,
    label_values,
    load_labels,
    name_values,
    named_value,
    parse_label_table,
    rasterize_planar_contours,
    resample_labels,
    unnamed_label_name,
)

# The test's own copy of the convention, so that a wrong constant in ctfm would not go unseen.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def grid_image(shape, affine, frame_of_reference_uid: str | None = None) -> MetaTensor:
    """A zero [1, X, Y, Z] image with the given RAS affine."""
    meta = {"FrameOfReferenceUID": frame_of_reference_uid} if frame_of_reference_uid else {}
    return MetaTensor(torch.zeros((1, *shape)), affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


def labels_of(label_map: LabelMap) -> np.ndarray:
    return label_map.labels[0].numpy()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def save_itk(array: np.ndarray, affine_ras: np.ndarray, path: Path) -> Path:
    """Write [I, J, K] with a RAS affine through SimpleITK (which stores LPS)."""
    affine_lps = LPS_TO_RAS @ affine_ras
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((affine_lps[:3, :3] / spacing).flatten().tolist())
    img.SetOrigin(affine_lps[:3, 3].tolist())
    sitk.WriteImage(img, str(path))
    return path


GRID_SHAPE = (6, 7, 8)
GRID_AFFINE = np.array(
    [[-0.8, 0.0, 0.0, 40.0], [0.0, -0.8, 0.0, 120.0], [0.0, 0.0, 2.5, -300.0], [0.0, 0.0, 0.0, 1.0]]
)  # an LPS-stored DICOM-like grid in RAS


def random_labels(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 5, size=shape).astype(np.int16)


# ----------------------------------------------------------------------------------------------
# Synthetic grids


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_permuted_and_flipped_volume_maps_back_exactly(tmp_path, suffix):
    truth = random_labels(GRID_SHAPE)
    # Store the labels with axes (z, x, y), x flipped: file index (k, i', j) holds grid (X-1-i', j, k).
    stored = np.flip(truth, axis=0).transpose(2, 0, 1)
    file_to_grid = np.zeros((4, 4))
    file_to_grid[2, 0] = 1  # file axis 0 -> grid z
    file_to_grid[0, 1] = -1  # file axis 1 -> grid x, reversed
    file_to_grid[0, 3] = GRID_SHAPE[0] - 1
    file_to_grid[1, 2] = 1  # file axis 2 -> grid y
    file_to_grid[3, 3] = 1
    file_affine = GRID_AFFINE @ file_to_grid
    writer = save_nifti if suffix == ".nii.gz" else save_itk
    path = writer(stored.astype(np.uint8), file_affine, tmp_path / f"labels{suffix}")

    result = load_labels(path, grid_image(GRID_SHAPE, GRID_AFFINE))

    assert result.labels.shape == (1, *GRID_SHAPE)
    assert result.labels.dtype == torch.int16
    assert torch.equal(result.labels.affine, torch.as_tensor(GRID_AFFINE))
    np.testing.assert_array_equal(labels_of(result), truth)
    assert not np.array_equal(stored.transpose(1, 2, 0), truth)  # a same-index copy would be wrong


def test_coarser_shifted_grid_maps_by_nearest_neighbour(tmp_path):
    coarse = random_labels((3, 4, 5), seed=1)
    coarse_affine = np.diag([2.0, 2.0, 2.0, 1.0])  # voxel centres at 0, 2, 4, ... mm
    fine_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    fine_affine[:3, 3] = -0.5  # fine centres at -0.5, 0.5, 1.5, ...: two per coarse voxel, no ties
    fine_shape = (8, 8, 10)  # x and z reach past the coarse grid there: must be 0
    path = save_nifti(coarse, coarse_affine, tmp_path / "coarse.nii.gz")

    result = labels_of(load_labels(path, grid_image(fine_shape, fine_affine)))

    expected = np.zeros(fine_shape, dtype=np.int16)
    expected[:6, :8, :10] = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    np.testing.assert_array_equal(result, expected)


def test_index_mapping_agrees_with_general_nearest_neighbour():
    src = random_labels((5, 6, 7), seed=3)
    permutation = np.zeros((4, 4))
    permutation[[1, 2, 0], [0, 1, 2]] = [-1, 1, -1]
    permutation[:3, 3] = [5.3, 6.8, 1.4]  # fractional shifts; some grid voxels fall outside the source
    permutation[3, 3] = 1
    grid_affine = np.diag([1.5, 1.5, 3.0, 1.0])
    src_affine = grid_affine @ np.linalg.inv(permutation)
    fast, n_fast = _resample_nearest(src, src_affine, grid_affine, (7, 5, 6))
    general, n_general = _resample_nearest(src, src_affine, grid_affine, (7, 5, 6), allow_index_mapping=False)
    np.testing.assert_array_equal(fast, general)
    assert 0 < n_fast == n_general < 7 * 5 * 6


def test_oblique_grid_keeps_the_labelled_region_in_place():
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    src_affine = np.eye(4)
    src_affine[:3, :3] = rotation
    src_affine[:3, 3] = [20.0, -10.0, 0.0]
    src = np.zeros((40, 40, 10), dtype=np.int16)
    src[10:30, 10:30, 2:8] = 3  # a 20 x 20 x 6 mm block
    centre_world = src_affine @ np.array([19.5, 19.5, 4.5, 1.0])
    grid_affine = np.eye(4)
    grid_affine[:3, 3] = centre_world[:3] - 25  # the block's centre at grid voxel ~(25, 25, 25)

    result = resample_labels(src, src_affine, grid_affine, (50, 50, 50))

    assert result[25, 25, 25] == 3 and result[0, 0, 25] == 0
    assert abs((result == 3).sum() - 20 * 20 * 6) < 0.1 * 20 * 20 * 6


def test_label_map_outside_the_image_is_refused(tmp_path):
    far = GRID_AFFINE.copy()
    far[2, 3] += 1000.0  # one metre up
    path = save_nifti(random_labels(GRID_SHAPE), far, tmp_path / "elsewhere.nii.gz")
    with pytest.raises(CTInputError, match="does not overlap the image") as info:
        load_labels(path, grid_image(GRID_SHAPE, GRID_AFFINE))
    assert info.value.path == str(path)


def test_unsupported_and_missing_files_are_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a label map")
    image = grid_image(GRID_SHAPE, GRID_AFFINE)
    with pytest.raises(CTInputError, match="not a label file"):
        load_labels(text, image)
    with pytest.raises(CTInputError, match="no such file"):
        load_labels(tmp_path / "missing.nii.gz", image)
    with pytest.raises(CTInputError, match="is a folder"):
        load_labels(tmp_path, image)


def test_probability_map_is_refused(tmp_path):
    path = save_nifti(np.full(GRID_SHAPE, 0.4, dtype=np.float32), GRID_AFFINE, tmp_path / "probs.nii.gz")
    with pytest.raises(CTInputError, match="non-integer values"):
        load_labels(path, grid_image(GRID_SHAPE, GRID_AFFINE))


def test_names_from_sidecar_json_and_label_table(tmp_path):
    path = save_nifti(random_labels(GRID_SHAPE).astype(np.uint8), GRID_AFFINE, tmp_path / "organs.nii.gz")
    (tmp_path / "organs.json").write_text(json.dumps({"labels": {"1": "liver", "2": "spleen"}}))
    result = load_labels(path, grid_image(GRID_SHAPE, GRID_AFFINE))
    assert result.names == {1: "liver", 2: "spleen"} and result.source_format == "nifti"

    table = b'<LabelTable>\n<Label Key="5" Red="0"><![CDATA[liver]]></Label><Label Key="7">a &amp; b</Label></LabelTable>\x00'
    assert parse_label_table(table) == {5: "liver", 7: "a & b"}


def test_slicer_segment_names_from_nrrd(tmp_path):
    path = save_itk(random_labels(GRID_SHAPE), GRID_AFFINE, tmp_path / "seg.nrrd")
    img = sitk.ReadImage(str(path))
    for key, value in {
        "Segment0_Name": "tumour",
        "Segment0_LabelValue": "3",
        "Segment1_Name": "lung",
        "Segment1_LabelValue": "1",
    }.items():
        img.SetMetaData(key, value)
    sitk.WriteImage(img, str(path))
    assert load_labels(path, grid_image(GRID_SHAPE, GRID_AFFINE)).names == {3: "tumour", 1: "lung"}


def test_multi_layer_segmentation_is_refused_as_a_segmentation(tmp_path):
    # Slicer stores overlapping segments as layers: several components per voxel.
    layers = np.stack([random_labels(GRID_SHAPE[::-1], seed) for seed in (1, 2)], axis=-1)
    path = tmp_path / "layers.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(layers, isVector=True), str(path))
    with pytest.raises(CTInputError, match="2 layers"):
        load_labels(path, grid_image(GRID_SHAPE, GRID_AFFINE))


def test_volume_files_under_other_names_and_damaged_files(tmp_path):
    image = grid_image(GRID_SHAPE, GRID_AFFINE)
    nrrd = save_itk(random_labels(GRID_SHAPE), GRID_AFFINE, tmp_path / "seg.nrrd")
    nifti = save_nifti(random_labels(GRID_SHAPE), GRID_AFFINE, tmp_path / "seg.nii.gz")
    with pytest.raises(CTInputError, match="rename it to end in .nrrd"):
        load_labels(nrrd.rename(tmp_path / "seg.labels"), image)
    with pytest.raises(CTInputError, match="rename it to end in .nii.gz"):
        load_labels(nifti.rename(tmp_path / "seg.gz"), image)

    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes((tmp_path / "seg.gz").read_bytes()[:200])
    with pytest.raises(CTInputError, match="unreadable NIfTI"):
        load_labels(truncated, image)


def test_square_contour_fills_the_voxels_whose_centres_it_encloses():
    # Corners halfway between voxel centres, so the answer is unambiguous: x 3..7, y 4..9, z = 4.
    corners_voxel = np.array([[2.5, 3.5, 4.0], [7.5, 3.5, 4.0], [7.5, 9.5, 4.0], [2.5, 9.5, 4.0]])
    to_lps = LPS_TO_RAS @ GRID_AFFINE
    contour_lps = corners_voxel @ to_lps[:3, :3].T + to_lps[:3, 3]
    shape = (12, 12, 8)

    mask = rasterize_planar_contours([contour_lps], GRID_AFFINE, shape)

    assert mask.shape == shape and mask.sum() == 5 * 6
    assert mask[3:8, 4:10, 4].all()

    # An inner contour is a hole (even-odd): remove x 4..5, y 5..6.
    hole_voxel = np.array([[3.5, 4.5, 4.0], [5.5, 4.5, 4.0], [5.5, 6.5, 4.0], [3.5, 6.5, 4.0]])
    hole_lps = hole_voxel @ to_lps[:3, :3].T + to_lps[:3, 3]
    ring = rasterize_planar_contours([contour_lps, hole_lps], GRID_AFFINE, shape)
    assert ring.sum() == 30 - 4 and not ring[4:6, 5:7, 4].any()

    # The same contour on the same grid stored with axes (z, x, y): the same voxels, permuted.
    new_to_old = np.zeros((4, 4))
    new_to_old[[2, 0, 1, 3], [0, 1, 2, 3]] = 1
    permuted = rasterize_planar_contours([contour_lps], GRID_AFFINE @ new_to_old, (8, 12, 12))
    np.testing.assert_array_equal(permuted, mask.transpose(2, 0, 1))

    # Between two slices: the structure set was drawn on another series.
    off_slice = contour_lps.copy()
    off_slice[:, 2] += 0.4 * GRID_AFFINE[2, 2]
    with pytest.raises(CTInputError, match="does not match the image slices"):
        rasterize_planar_contours([off_slice], GRID_AFFINE, shape)


# ----------------------------------------------------------------------------------------------
# Real data (../shared/data)


@pytest.mark.realdata
def test_totalsegmentator_labels_on_their_own_grid():
    folder = data_path("abdomen_3mm")
    result = load_labels(folder / "example_seg.nii.gz", load_ct(folder / "example_ct_sm.nii.gz")[0])
    seg = np.asarray(nib.load(str(folder / "example_seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(labels_of(result), seg)
    assert result.names[5] == "liver" and result.source_format == "nifti"
    assert set(np.unique(seg)) - {0} <= set(result.names)


@pytest.mark.realdata
def test_totalsegmentator_labels_on_the_full_scan_grid():
    # example_ct_sm's header repeats the full scan's affine although it holds slices 82..111, so
    # the world coordinates in the seg header do not say where the anatomy really is: only check
    # that the labels come back on the full grid.
    folder = data_path("abdomen_3mm")
    image, _ = load_ct(folder / "example_ct.nii.gz")
    result = load_labels(folder / "example_seg.nii.gz", image)
    assert result.labels.shape == image.shape and labels_of(result).any()


@pytest.mark.realdata
def test_las_nifti_on_lps_dicom_is_flipped_not_copied():
    folder = data_path("abdomen_dicom")
    image, _ = load_ct(folder / "dicom")
    seg_img = nib.load(str(folder / "seg.nii.gz"))
    seg = np.asarray(seg_img.dataobj)

    result = load_labels(folder / "seg.nii.gz", image)
    labels = labels_of(result)

    liver = next(value for value, name in result.names.items() if name == "liver")
    centroid_file = seg_img.affine @ np.append(np.argwhere(seg == liver).mean(axis=0), 1)
    centroid_image = image.affine.numpy() @ np.append(np.argwhere(labels == liver).mean(axis=0), 1)
    voxel_size = np.linalg.norm(image.affine.numpy()[:3, :3], axis=0)
    assert np.all(np.abs(centroid_file - centroid_image)[:3] <= voxel_size)
    assert (labels == liver).sum() == (seg == liver).sum()
    assert not np.array_equal(labels, seg)  # the naive same-index copy mirrors anterior/posterior
    np.testing.assert_array_equal(labels, np.flip(seg, axis=1))  # LAS vs LPS: y reversed


@pytest.mark.realdata
def test_dicom_seg_agrees_with_nrrd_labels():
    folder = data_path("liver_3slice_dicomseg")
    image, _ = load_ct(folder / "dicom")
    from_seg = load_labels(folder / "liver_seg_DICOMSEG.dcm", image)
    from_nrrd = load_labels(folder / "liver_seg.nrrd", image)
    assert from_seg.names == {1: "Liver"} and from_seg.source_format == "dicom-seg"
    assert from_nrrd.source_format == "nrrd"
    assert from_seg.labels.shape == image.shape and from_seg.labels.dtype in (torch.int16, torch.int32)
    liver_seg, liver_nrrd = labels_of(from_seg) == 1, labels_of(from_nrrd) == 1
    assert liver_seg.any() and dice(liver_seg, liver_nrrd) > 0.99  # measured: 1.0


@pytest.mark.realdata
def test_dicom_seg_of_another_frame_of_reference_is_refused():
    folder = data_path("liver_3slice_dicomseg")
    image, _ = load_ct(folder / "dicom")
    image.meta["FrameOfReferenceUID"] = "1.2.3.4"
    with pytest.raises(CTInputError, match="frame of reference"):
        load_labels(folder / "liver_seg_DICOMSEG.dcm", image)


@pytest.mark.realdata
def test_ct_slice_is_not_a_label_file():
    folder = data_path("liver_3slice_dicomseg/dicom")
    with pytest.raises(CTInputError, match="not a segmentation"):
        load_labels(folder / "01.dcm", load_ct(folder)[0])


@pytest.mark.realdata
def test_rtstruct_rasterises_like_the_reference_mask():
    folder = data_path("sarcoma_ct/STS_019")
    image, _ = load_ct(folder / "dicom" / "image")
    from_rtstruct = load_labels(folder / "dicom" / "mask" / "RS.dcm", image)
    from_nifti = load_labels(folder / "CT_mask.nii.gz", image)
    assert from_rtstruct.names == {1: "GTV_Mass_CT"} and from_rtstruct.source_format == "rtstruct"
    gtv_rt, gtv_nifti = labels_of(from_rtstruct) == 1, labels_of(from_nifti) == 1
    assert gtv_rt.any() and dice(gtv_rt, gtv_nifti) > 0.9  # measured: 1.0 (voxel for voxel)


# ----------------------------------------------------------------------------------------------
# Label maps that name no classes: label_<value>


def test_unnamed_values_are_called_label_value():
    names, unnamed = name_values(np.array([0, 1, 3, 3, 26]), {3: "tumour"})
    assert names == {0: "background", 1: "label_1", 3: "tumour", 26: "label_26"} and unnamed == [1, 26]
    assert name_values([0])[0] == {0: "background"}
    assert unnamed_label_name(26) == "label_26" and named_value("label_26") == 26
    assert named_value("liver") is None and named_value("label_x") is None and named_value("my_label_2") is None


def test_label_values_and_the_non_integer_refusal_name_the_file(tmp_path):
    values = np.zeros(GRID_SHAPE, np.uint8)
    values[1, 1, 1], values[2, 2, 2] = 4, 9
    path = save_nifti(values, GRID_AFFINE, tmp_path / "mask.nii.gz")
    assert label_values(path).tolist() == [0, 4, 9] and label_names(path) == {}
    half = values.astype(np.float32)
    half[3, 3, 3] = 0.5
    soft = save_nifti(half, GRID_AFFINE, tmp_path / "soft.nii.gz")
    with pytest.raises(CTInputError, match="non-integer values, e.g. 0.5") as error:
        label_values(soft)
    assert str(error.value).startswith(f"{soft}: ") and "\n" not in str(error.value)


def test_label_names_reads_nrrd_segment_keys_without_the_voxels(tmp_path):
    path = save_itk(random_labels(GRID_SHAPE), GRID_AFFINE, tmp_path / "seg.nrrd")
    assert label_names(path) == {}
    img = sitk.ReadImage(str(path))
    img.SetMetaData("Segment0_Name", "tumour")
    img.SetMetaData("Segment0_LabelValue", "3")
    sitk.WriteImage(img, str(path))
    assert label_names(path) == {3: "tumour"} == load_labels(path, grid_image(GRID_SHAPE, GRID_AFFINE)).names


@pytest.mark.realdata
def test_real_unnamed_label_maps_get_label_value_names(tmp_path):
    named = data_path("abdomen_3mm/vertebrae.nii.gz")  # its header's label table names 26..50
    assert name_values(label_values(named), label_names(named)) == (
        {0: "background", 26: "vertebrae_S1", **{27 + i: f"vertebrae_L{5 - i}" for i in range(5)}, 32: "vertebrae_T12"}
        | {33: "vertebrae_T11"},
        [],
    )
    # the same voxels without the header's names, as an nnU-Net export holds them
    source = nib.load(str(named))
    vertebrae = tmp_path / "vertebrae.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj), source.affine), str(vertebrae))
    assert label_names(vertebrae) == {}
    names, unnamed = name_values(label_values(vertebrae), label_names(vertebrae))
    assert unnamed == list(range(26, 34)) and names[26] == "label_26" and names[33] == "label_33"
    for relative in ("lung_tumour_nrrd/lung1_label.nrrd", "sarcoma_ct/STS_019/CT_mask.nii.gz"):
        path = data_path(relative)
        assert label_names(path) == {} and name_values(label_values(path))[0] == {0: "background", 1: "label_1"}


@pytest.mark.realdata
def test_label_names_of_dicom_seg_and_rtstruct_match_the_loader():
    seg = data_path("liver_3slice_dicomseg/liver_seg_DICOMSEG.dcm")
    assert label_names(seg) == {1: "Liver"}
    assert label_names(data_path("sarcoma_ct/STS_019/dicom/mask/RS.dcm")) == {1: "GTV_Mass_CT"}
