"""DICOM SEG output on real series: tilted (frames resampled back onto each acquired slice),
anonymised (blank UIDs derived from content), plain; multi-frame CT refused; refusals before any
prediction. Every SEG is read back with highdicom and pydicom and checked with dciodvfy."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from test_predict_seg import threshold_model

from conftest import data_path
from ctfm.io import dicom, load_ct
from ctfm.io.sources import ScanSource
from ctfm.io.volume import LPS_TO_RAS
from ctfm.models.segmentation import load_segmentation_model, save_segmentation_model
from ctfm.predict import writers
from ctfm.predict.seg import predict_seg
from ctfm.preprocess import PreprocessSpec
from dicom_factory import write_series

hd = pytest.importorskip("highdicom")

SETTINGS = {"roi_size": [32, 64, 64], "overlap": 0.25, "mode": "gaussian", "sigma_scale": 0.125, "sw_batch_size": 2}


@pytest.fixture(scope="module")
def seg_weights(tmp_path_factory):
    """A random liver/spleen SegResNetDS folder (init_filters 2) on a 4 mm grid: fast on real scans."""
    model, names, _, _ = load_segmentation_model(None, labels="liver,spleen", init_filters=2, seed=0)
    spec = PreprocessSpec(name="tiny-4mm", orientation="SPL", spacing_mm=(4.0, 4.0, 4.0), foreground_crop=None)
    return save_segmentation_model(
        model, tmp_path_factory.mktemp("seg") / "weights", names, spec=spec, inference=SETTINGS
    )


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines dciodvfy (dicom3tools) prints for a DICOM file; skips where it is absent."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    assert any(line.strip() == "Segmentation" for line in lines), lines  # it recognised the IOD
    return [line for line in lines if line.startswith("Error")]


def expected_frames(nifti: Path, files: list[Path]) -> dict[Path, np.ndarray]:
    """Per source file, the NIfTI labels resampled nearest neighbour onto that slice by SimpleITK
    (each slice read as its own image: origin, direction and spacing from its header)."""
    labels = sitk.ReadImage(str(nifti))
    out = {}
    for f in files:
        ref = sitk.ReadImage(str(f))
        moved = sitk.Resample(labels, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
        out[f] = sitk.GetArrayFromImage(moved)[0]
    return out


def read_back(dcm: Path, uids: dict[Path, str]) -> dict[Path, np.ndarray]:
    """Labels (segment numbers) per source file from the SEG, by the SOPInstanceUID each frame references."""
    raw = pydicom.dcmread(dcm)
    assert raw.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and raw.SegmentationType == "BINARY"
    by_frame = [
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for item in raw.PerFrameFunctionalGroupsSequence
    ]
    assert set(by_frame) <= set(uids.values())  # every frame references a source instance
    position = {uid: pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient for f, uid in uids.items()}
    for uid, item in zip(by_frame, raw.PerFrameFunctionalGroupsSequence):  # ... and lies where that slice lies
        assert np.allclose(item.PlanePositionSequence[0].ImagePositionPatient, position[uid], atol=1e-3)
    seg = hd.seg.segread(dcm)
    out = {}
    for f, uid in uids.items():
        if uid in by_frame:
            out[f] = seg.get_pixels_by_source_instance([uid], combine_segments=True, skip_overlap_checks=True)[0]
        else:  # an empty slice: frames without a segment pixel are omitted
            out[f] = None
    return out


def check_seg(out: Path, folder: Path, uids: dict[Path, str] | None = None) -> tuple[Path, dict]:
    """The SEG of ``out`` equals, slice by slice, the NIfTI labels resampled onto each source slice.
    Returns the SEG path and the labels.json (each test ends with dciodvfy, which may skip)."""
    (dcm,) = out.glob("*.dcm")
    (nifti,) = out.glob("*.nii.gz")
    files = sorted(f for f in folder.iterdir() if f.is_file())
    uids = uids or {f: str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    expected = expected_frames(nifti, files)
    got = read_back(dcm, uids)
    labelled = 0
    for f in files:
        frame = got[f] if got[f] is not None else np.zeros_like(expected[f])
        assert np.array_equal(frame, expected[f]), f.name
        labelled += int((frame > 0).sum())
    assert labelled > 0
    return dcm, json.loads(next(out.glob("*.labels.json")).read_text())


@pytest.mark.slow
def test_plain_series_seg_equals_nifti(tmp_path, run_cli, seg_weights):
    folder = data_path("sarcoma_ct/STS_019/dicom/image")
    code, stdout, err = run_cli(
        "predict", "seg", str(folder), "--model", str(seg_weights), "--format", "dicom-seg", "-o", str(tmp_path)
    )
    assert code == 0, err
    dcm, sidecar = check_seg(tmp_path, folder)
    image, record = load_ct(folder)
    assert dcm.name == f"{record.series_uid}.dcm" and "derived" not in sidecar["dicom_source"]
    # an untilted series: the frames are the NIfTI's slices themselves, voxel for voxel
    nifti = np.asarray(nib.load(str(tmp_path / f"{record.series_uid}.nii.gz")).dataobj)
    seg = hd.seg.segread(dcm)
    for k, sop in enumerate(record.sop_uids):
        frame = seg.get_pixels_by_source_instance([sop], combine_segments=True, skip_overlap_checks=True)[0]
        assert np.array_equal(frame, nifti[:, :, k].T)
    assert seg.StudyID == "IBSI_1_STS_019_C" and len(seg.StudyID) == 16  # the source's 17 characters, cut to SH
    assert dciodvfy_errors(dcm) == []  # last: it skips where dciodvfy is absent


@pytest.mark.slow
def test_tilted_series_frames_on_the_acquired_slices(tmp_path):
    folder = data_path("head_tilt_dicom/dicom")
    summary = predict_seg(
        [folder], threshold_model(spacing=(4.0, 2.0, 2.0)), tmp_path, output_format="dicom-seg", progress=False
    )
    assert summary.done == 1 and not summary.failed
    dcm, _ = check_seg(tmp_path, folder)  # frames = NIfTI labels resampled by SimpleITK onto each tilted slice

    # how far the frames are from the regular grid: each acquired pixel takes the label of the
    # voxel centre nearest to it, at most half a voxel diagonal away (docs/segmentation.md)
    image, record = load_ct(folder)
    affine = np.asarray(image.affine, dtype=np.float64)
    datasets = writers.dicom_seg_source(ScanSource(str(folder), record.series_uid)).datasets
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    c, r = np.meshgrid(np.arange(cols, dtype=float), np.arange(rows, dtype=float))
    pixels = np.stack([c.ravel(), r.ravel(), np.zeros(c.size), np.ones(c.size)])
    distances = []
    for ds in datasets:
        index = (np.linalg.inv(affine) @ LPS_TO_RAS @ dicom.slice_affine_lps(ds) @ pixels)[:3]
        inside = np.all((np.rint(index) >= 0) & (np.rint(index) < np.array(image.shape[1:])[:, None]), axis=0)
        distances.append(np.linalg.norm(affine[:3, :3] @ (index - np.rint(index))[:, inside], axis=0))
    distances = np.concatenate(distances)
    half_diagonal = 0.5 * float(np.linalg.norm(record.spacing_mm))
    assert record.gantry_tilt_deg > 18 and distances.max() <= half_diagonal + 1e-6
    assert 1.9 < distances.max() < 2.0 and 0.5 < distances.mean() < 0.6  # the figures the docs give

    # in label terms: a threshold label map (bone > 300 HU, 0-100 HU tissue) on the resampled grid,
    # taken back onto the slices, against the same threshold of the acquired pixels
    def threshold(hu):
        return np.where(hu > 300, 1, np.where((hu > 0) & (hu < 100), 2, 0)).astype(np.uint8)

    grid = threshold(image.numpy()[0])
    source = writers.dicom_seg_source(ScanSource(str(folder), record.series_uid))
    frames = writers.labels_on_source_slices(grid, affine, source.datasets)
    changed = labelled = 0
    for f, frame in zip(source.files, frames):
        acquired = threshold(dicom.read_pixels_hu(f))
        mask = (acquired > 0) | (frame > 0)
        changed, labelled = changed + int((acquired != frame)[mask].sum()), labelled + int(mask.sum())
    assert 0.05 < changed / labelled < 0.065  # 5.8 %: boundaries moved by the loader's inter-slice interpolation
    # and grid -> slices -> grid, nearest neighbour both ways (nearest slice along the normal, then pixel)
    axes = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    voxels = np.stack([a.ravel() for a in axes] + [np.ones(grid.size, dtype=np.int64)]).astype(np.float64)
    lps = np.linalg.inv(LPS_TO_RAS) @ affine @ voxels
    slice_affines = [dicom.slice_affine_lps(ds) for ds in source.datasets]
    normal = slice_affines[0][:3, 2]
    depths = np.array([a[:3, 3] @ normal for a in slice_affines])  # ascending: slice order
    along = lps[:3].T @ normal
    upper = np.clip(np.searchsorted(depths, along), 1, len(depths) - 1)
    nearest = np.where(along - depths[upper - 1] <= depths[upper] - along, upper - 1, upper)
    back = np.zeros(grid.size, dtype=np.uint8)
    for s, slice_affine in enumerate(slice_affines):
        take = nearest == s
        col, row = np.rint((np.linalg.inv(slice_affine) @ lps[:, take])[:2]).astype(np.int64)
        ok = (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
        values = np.zeros(int(take.sum()), dtype=np.uint8)
        values[ok] = frames[s][row[ok], col[ok]]
        back[take] = values
    back = back.reshape(grid.shape)
    mask = (grid > 0) | (back > 0)
    assert 0.045 < (grid != back)[mask].mean() < 0.065  # 5.4 % of the grid's labelled voxels
    assert dciodvfy_errors(dcm) == []  # last: it skips where dciodvfy is absent


@pytest.mark.slow
def test_anonymised_series_gets_derived_uids(tmp_path):
    folder = data_path("abdomen_dicom/dicom")
    files = sorted(f for f in folder.iterdir() if f.is_file())
    assert all(not pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files)  # the trap
    summary = predict_seg(
        [folder], threshold_model(spacing=(4.0, 2.0, 2.0)), tmp_path, output_format="dicom-seg", progress=False
    )
    assert summary.done == 1 and not summary.failed, summary.failed
    sidecar = json.loads(next(tmp_path.glob("*.labels.json")).read_text())["dicom_source"]
    assert sidecar["derived"] == [
        "SOPClassUID",
        "SOPInstanceUID",
        "SeriesInstanceUID",
        "StudyInstanceUID",
    ]
    assert "sha256" in sidecar["method"]
    uids = {f: sidecar["instances"][f.name] for f in files}
    assert len(set(uids.values())) == len(files)
    dcm, _ = check_seg(tmp_path, folder, uids)
    series_uid = sidecar["series_instance_uid"]
    assert dcm.name == f"{series_uid}.dcm"  # the output name is the derived series UID, not the folder's
    raw = pydicom.dcmread(dcm)
    assert raw.StudyInstanceUID == sidecar["study_instance_uid"]
    assert raw.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert "derived" in raw.SeriesDescription and "derived" in raw.ContentDescription
    # the same files give the same UIDs: a second derivation, from scratch, agrees
    again = writers.dicom_seg_source(ScanSource(str(folder), ""))
    assert again.series_uid == series_uid and [str(d.SOPInstanceUID) for d in again.datasets] == [
        uids[f] for f in again.files
    ]
    assert all(d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" for d in again.datasets)  # CT Image Storage
    assert dciodvfy_errors(dcm) == []  # last: it skips where dciodvfy is absent


def enhanced_ct(folder: Path) -> Path:
    """A Legacy Converted Enhanced CT (one multi-frame file) made by highdicom from the plain real series."""
    source = data_path("sarcoma_ct/STS_019/dicom/image")
    datasets = [pydicom.dcmread(f) for f in sorted(source.iterdir())]
    for ds in datasets:
        ds.StudyID = str(ds.StudyID)[:16]
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets, series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(), instance_number=1
    )
    folder.mkdir()
    image.save_as(folder / "enhanced.dcm")
    return folder


@pytest.mark.slow
def test_multiframe_ct_refused_in_one_line(tmp_path, run_cli, seg_weights):
    folder = enhanced_ct(tmp_path / "enhanced")
    with pytest.raises(Exception, match="Legacy Converted Enhanced CT image .*one slice per file"):
        load_ct(folder)
    for output_format, expected_code in (("dicom-seg", 2), ("nifti", 1)):
        out = tmp_path / output_format
        code, _, err = run_cli(
            "predict",
            "seg",
            str(folder),
            "--model",
            str(seg_weights),
            "--format",
            output_format,
            "-o",
            str(out),
            "--no-progress",
        )
        assert code == expected_code and err.count("\n") == 1 and "Legacy Converted Enhanced CT" in err, err
        assert not list(out.glob("*.nii.gz"))


def test_refusals_come_before_the_model_is_read(tmp_path, run_cli, seg_weights):
    """A doomed run spends no compute: with the weights file made unreadable garbage the refusal is
    still about the input or the output folder (the model was never opened), and nothing is written."""
    broken = tmp_path / "broken-weights"
    shutil.copytree(seg_weights, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    scan = data_path("abdomen_3mm/example_ct_sm.nii.gz")
    out = tmp_path / "out"
    start = time.perf_counter()
    code, _, err = run_cli("predict", "seg", str(scan), "--model", str(broken), "--format", "dicom-seg", "-o", str(out))
    assert code == 2 and "needs a DICOM series" in err and err.count("\n") == 1 and time.perf_counter() - start < 5
    assert not out.exists()
    (tmp_path / "a-file").write_text("")
    code, _, err = run_cli(
        "predict",
        "seg",
        str(data_path("sarcoma_ct/STS_019/dicom/image")),
        "--model",
        str(broken),
        "-o",
        str(tmp_path / "a-file"),
    )
    assert code == 2 and "a file, not a folder" in err
    # the same broken weights on a good input: now the model is read, and refused
    code, _, err = run_cli("predict", "seg", str(scan), "--model", str(broken), "-o", str(out))
    assert code == 2 and "model.safetensors" in err, err


def tilted_phantom(folder: Path, blank_uids: bool = False) -> Path:
    """A small series tilted 20 deg along y with two slice gaps (2 mm, then 3 mm) and a bright block."""

    def values(points):
        x, y, z = points[..., 0], points[..., 1], points[..., 2]
        hu = np.where((np.abs(x) < 9) & (np.abs(y) < 11), 40.0, -1000.0)
        return np.where((x > -4) & (x < 5) & (y > -6) & (y < 3) & (z > 13) & (z < 22), 1000.0, hu)

    depths = [10.0, 12.0, 14.0, 16.0, 18.0, 21.0, 24.0, 27.0]
    positions = [(-10.0, -12.0 + np.tan(np.radians(20)) * (d - 10.0), d) for d in depths]
    write_series(folder, positions, values=values, rows=24, cols=20, pixel_spacing=(1.0, 1.0))
    if blank_uids:
        for f in folder.iterdir():
            ds = pydicom.dcmread(f)
            for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
                setattr(ds, keyword, "")
            ds.save_as(f)
    return folder


def test_synthetic_tilted_series_seg(tmp_path):
    folder = tilted_phantom(tmp_path / "tilted")
    runs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        summary = predict_seg([folder], threshold_model(), out, output_format="dicom-seg", progress=False)
        assert summary.done == 1 and not summary.failed, summary.failed
        runs.append(out)
    _, record = load_ct(folder)
    assert record.resampled and record.gantry_tilt_deg == pytest.approx(20, abs=0.1)
    dcm, _ = check_seg(runs[0], folder)
    # the frames carry the block where the acquired pixels are bright, up to its boundary voxels
    files = sorted(folder.iterdir())
    headers = [pydicom.dcmread(f) for f in files]
    frames = read_back(dcm, {f: str(ds.SOPInstanceUID) for f, ds in zip(files, headers)})
    bright = 0
    for f, ds in zip(files, headers):
        truth = (ds.pixel_array.astype(float) + float(ds.RescaleIntercept)) > 512
        frame = frames[f] > 0 if frames[f] is not None else np.zeros_like(truth)
        assert (frame == truth).mean() > 0.9, f.name
        bright += int(truth.sum())
    assert bright > 0
    # the same prediction gives the same SEG UIDs (sending it twice does not make two objects)
    first, second = (pydicom.dcmread(next(r.glob("*.dcm"))) for r in runs)
    assert first.SOPInstanceUID == second.SOPInstanceUID and first.SeriesInstanceUID == second.SeriesInstanceUID
    assert dciodvfy_errors(dcm) == []  # last: it skips where dciodvfy is absent


def test_blank_uids_filled_deterministically(tmp_path):
    folder = tilted_phantom(tmp_path / "anon", blank_uids=True)
    first = writers.dicom_seg_source(ScanSource(str(folder), ""))
    second = writers.dicom_seg_source(ScanSource(str(folder), ""))
    assert set(first.derived) == {"SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"}
    assert [str(d.SOPInstanceUID) for d in first.datasets] == [str(d.SOPInstanceUID) for d in second.datasets]
    assert len({str(d.SOPInstanceUID) for d in first.datasets}) == len(first.datasets)
    assert first.series_uid != first.datasets[0].StudyInstanceUID
    assert all(str(d.FrameOfReferenceUID) == str(first.datasets[0].FrameOfReferenceUID) for d in first.datasets)
    # other pixels give other UIDs
    f = first.files[0]
    ds = pydicom.dcmread(f)
    ds.PixelData = (ds.pixel_array + 1).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(f)
    third = writers.dicom_seg_source(ScanSource(str(folder), ""))
    assert third.datasets[0].SOPInstanceUID != first.datasets[0].SOPInstanceUID
    assert third.series_uid != first.series_uid
    assert (
        "derived" in third.uid_record() and third.uid_record()["instances"][f.name] == third.datasets[0].SOPInstanceUID
    )
