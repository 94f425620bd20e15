"""What a segmentation prediction writes: ``<name>.nii.gz`` (uint8/uint16 labels on the input
grid), ``<name>.labels.json`` (index -> name and provenance), ``<name>.dcm`` (DICOM SEG
referencing the source series) and ``<name>.statistics.json``/``.csv`` (per class: voxels,
volume in ml, mean and sd HU on the input grid). Every file is written all or nothing."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from ctfm.errors import CTInputError, optional_import
from ctfm.evaluate.reports.report import provenance as base
from ctfm.io import dicom
from ctfm.models.labelmaps import labels_to_json
from ctfm.runtime import atomic_path, write_text_atomic


def output_paths(out: Path, name: str, output_format: str, statistics: bool) -> list[Path]:
    paths = [out / f"{name}.nii.gz", out / f"{name}.labels.json"]
    if output_format == "dicom-seg":
        paths.append(out / f"{name}.dcm")
    if statistics:
        paths += [out / f"{name}.statistics.json", out / f"{name}.statistics.csv"]
    return paths


def prediction_provenance(loaded, source, record, settings, precision: str) -> dict:

    return base(
        model=loaded.info["model"],
        weights=loaded.info["weights"],
        weights_sha256=loaded.info["weights_sha256"],
        preprocess=loaded.spec.name,
        preprocess_hash=loaded.info["preprocess_hash"],
        inference={
            "roi_size": list(settings.roi_size),
            "overlap": settings.overlap,
            "mode": settings.mode,
            "sigma_scale": settings.sigma_scale,
            "sw_batch_size": settings.sw_batch_size,
            "precision": precision,
        },
        input={
            "source": Path(source.path).name,
            "series_uid": source.series_uid,
            "shape": list(record.shape),
            "spacing_mm": list(record.spacing_mm),
            "orientation": record.orientation,
        },
    )


def write_prediction(
    out: Path,
    name: str,
    labels: np.ndarray,
    image,
    names: dict[int, str],
    provenance: dict,
    output_format: str = "nifti",
    source=None,
    statistics: bool = False,
) -> None:
    """Write every output of one input; the labels.json last (it marks the NIfTI as complete)."""
    affine = np.asarray(image.affine, dtype=np.float64)
    dcm = None
    if output_format == "dicom-seg":
        dcm = dicom_seg_bytes(labels, names, source, provenance)
    write_label_nifti(out / f"{name}.nii.gz", labels, affine)
    if dcm is not None:
        with atomic_path(out / f"{name}.dcm") as tmp:
            tmp.write_bytes(dcm)
    if statistics:
        rows = class_statistics(labels, image, names)
        write_text_atomic(
            out / f"{name}.statistics.json", json.dumps({"classes": rows, "provenance": provenance}, indent=2) + "\n"
        )
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer, fieldnames=list(rows[0]) if rows else ["value", "name", "voxels", "volume_ml", "mean_hu", "sd_hu"]
        )
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(out / f"{name}.statistics.csv", buffer.getvalue())
    write_text_atomic(
        out / f"{name}.labels.json",
        json.dumps({"labels": labels_to_json(names), "provenance": provenance}, indent=2) + "\n",
    )


def write_label_nifti(path: Path, labels: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(labels, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_intent("label")
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))
    return path


def class_statistics(labels: np.ndarray, image, names: dict[int, str]) -> list[dict]:
    """Per class (background excluded): voxel count, volume (ml), mean and sd HU of the input voxels."""
    hu = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)[0]
    voxel_ml = abs(float(np.linalg.det(np.asarray(image.affine, dtype=np.float64)[:3, :3]))) / 1000.0
    flat = labels.ravel()
    values = np.array(sorted(k for k in names if k != 0), dtype=np.int64)
    count = np.bincount(flat, minlength=int(values.max(initial=0)) + 1).astype(np.int64)
    hu_flat = hu.ravel().astype(np.float64)
    total = np.bincount(flat, weights=hu_flat, minlength=len(count))
    square = np.bincount(flat, weights=hu_flat * hu_flat, minlength=len(count))
    rows = []
    for v in values:
        n = int(count[v]) if v < len(count) else 0
        mean = total[v] / n if n else None
        sd = float(np.sqrt(max(square[v] / n - mean * mean, 0.0))) if n else None
        rows.append(
            {
                "value": int(v),
                "name": names[int(v)],
                "voxels": n,
                "volume_ml": round(n * voxel_ml, 4),
                "mean_hu": None if mean is None else round(float(mean), 3),
                "sd_hu": None if sd is None else round(sd, 3),
            }
        )
    return rows


def _series_datasets(source):
    """The source series' headers in the volume's slice order (load_ct stacks them that way)."""

    folder = Path(source.path)
    with dicom.quiet_pydicom():
        index = dicom.index_dicom_folder(folder)
        series = dicom.select_ct_series(index, folder, source.series_uid)
        geometry = dicom.series_geometry(series, folder)
    import pydicom

    datasets = [pydicom.dcmread(str(series.files[i]), stop_before_pixels=True) for i in geometry.order]
    for ds in datasets:  # type 2 patient/study attributes a SEG copies: empty where the source lacks them
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return datasets, geometry


_TYPE2_COPIED = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "AccessionNumber",
)


def dicom_seg_bytes(labels: np.ndarray, names: dict[int, str], source, provenance: dict) -> bytes:
    """A DICOM SEG (highdicom, BINARY) of ``labels`` [X, Y, Z] referencing the source series.

    Segment k (1..) is the k-th non-background class of ``names``; its SegmentLabel is the name.
    """
    hd = optional_import("highdicom", "dicom-seg", "--format dicom-seg")
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    if source is None or not Path(source.path).is_dir():
        raise CTInputError(
            getattr(source, "path", None),
            "--format dicom-seg needs a DICOM series as input",
            "use --format nifti for volume files",
        )
    datasets, geometry = _series_datasets(source)
    if labels.shape[2] != len(datasets) or labels.shape[:2] != (int(datasets[0].Columns), int(datasets[0].Rows)):
        raise CTInputError(
            source.path,
            "the series was resampled onto a regular grid when loaded (gantry tilt or uneven slices), so its slices do "
            "not carry the label frames",
            "use --format nifti for this series",
        )
    values = [k for k in sorted(names) if k != 0]
    frames = np.zeros((len(datasets), labels.shape[1], labels.shape[0]), dtype=np.uint16)
    for number, value in enumerate(values, start=1):
        frames[np.transpose(labels, (2, 1, 0)) == value] = number
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=names[value][:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="ctfm " + str(provenance.get("model", "")),
                version=str(provenance.get("ctfm_version", "")),
                family=codes.DCM.ArtificialIntelligence,
            ),
            tracking_uid=generate_uid(),
            tracking_id=names[value][:64],
        )
        for number, value in enumerate(values, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="ctfm",
        manufacturer_model_name=str(provenance.get("model", "ct-fm-segresnet")),
        software_versions=str(provenance.get("ctfm_version", "")),
        device_serial_number="0",
        omit_empty_frames=True,
    )
    buffer = io.BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()


def read_failures(path: Path) -> dict[str, str]:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")).get("failures", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def write_failures(path: Path, failures: dict[str, str]) -> None:
    if failures or path.exists():
        write_text_atomic(path, json.dumps({"failures": failures}, indent=2) + "\n")
