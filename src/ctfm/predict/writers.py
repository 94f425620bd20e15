"""What a segmentation prediction writes: ``<name>.nii.gz`` (uint8/uint16 labels on the input
grid), ``<name>.labels.json`` (index -> name and provenance), ``<name>.dcm`` (DICOM SEG
referencing the source series) and ``<name>.statistics.json``/``.csv`` (per class: voxels,
volume in ml, mean and sd HU on the input grid). Every file is written all or nothing."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctfm.errors import CTInputError, UserError, optional_import
from ctfm.evaluate.reports.report import provenance as base
from ctfm.io import dicom
from ctfm.io.volume import LPS_TO_RAS
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
    dcm, uid_record = None, None
    if output_format == "dicom-seg":
        seg_source = dicom_seg_source(source)
        dcm = dicom_seg_bytes(labels, affine, names, seg_source, provenance)
        uid_record = seg_source.uid_record()
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
        json.dumps(
            {
                "labels": labels_to_json(names),
                "provenance": provenance,
                **({"dicom_source": uid_record} if uid_record else {}),
            },
            indent=2,
        )
        + "\n",
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


@dataclass
class SegSource:
    """The source series a DICOM SEG references: its headers in the volume's slice order (as
    load_ct sorts them) with blank UIDs filled (:func:`ctfm.io.dicom.fill_blank_uids`), their
    files, and ``derived`` ({keyword: value} of the UIDs ctfm derived; empty when none)."""

    folder: Path
    datasets: list
    files: list[Path]
    derived: dict[str, str] = field(default_factory=dict)

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    def uid_record(self) -> dict:
        """What the labels.json sidecar records of the source's UIDs (and how blank ones were derived)."""
        record = {
            "series_instance_uid": self.series_uid,
            "study_instance_uid": str(self.datasets[0].StudyInstanceUID),
        }
        if self.derived:
            record["derived"] = sorted(self.derived)
            record["method"] = dicom.DERIVED_UID_METHOD
            record["instances"] = {f.name: str(ds.SOPInstanceUID) for f, ds in zip(self.files, self.datasets)}
        return record


def dicom_seg_source(source) -> SegSource:
    """Check that a DICOM SEG can be built over ``source`` and read the headers it references.

    The pre-flight of ``--format dicom-seg``: headers and stored pixel bytes only, no decoding.
    Raises :class:`CTInputError` for a volume file, a series ctfm cannot read (multi-frame, no
    positions, ...), an image without pixel data, or a blank SOPClassUID of an unknown modality.
    """
    import pydicom

    if source is None or not Path(source.path).is_dir():
        raise CTInputError(
            getattr(source, "path", None),
            "--format dicom-seg needs a DICOM series as input: a SEG references the instances of its source",
            "use --format nifti for volume files",
        )
    folder = Path(source.path)
    with dicom.quiet_pydicom():
        index = dicom.index_dicom_folder(folder)
        series = dicom.select_ct_series(index, folder, source.series_uid)
        geometry = dicom.series_geometry(series, folder)
        files = [series.files[i] for i in geometry.order]
        datasets = [series.headers[i].copy() for i in geometry.order]
        for path in files:  # large values are skipped, not read: a cheap test that pixels exist
            if "PixelData" not in pydicom.dcmread(path, defer_size=1024):
                raise CTInputError(path, "the image has no pixel data", "re-export the series with its pixel data")
        derived = dicom.fill_blank_uids(datasets, files)
        for ds in datasets:
            _complete_copied_attributes(ds)
    return SegSource(folder, datasets, files, derived)


def source_series_uid(source) -> str | None:
    """The SeriesInstanceUID of a DICOM source, derived from its content when blank; ``None`` for
    a volume file or a series that cannot be read (its load fails with the reason)."""
    if source.series_uid:
        return source.series_uid
    if not Path(source.path).is_dir():
        return None
    try:
        return dicom_seg_source(source).series_uid
    except UserError:
        return None


# Type 2 patient/study attributes a SEG copies from its source: empty where the source lacks them,
# cut to their VR's maximum length where the source overruns it (dciodvfy refuses an SH of 17).
_TYPE2_COPIED = {
    "PatientID": 64,
    "PatientName": 64 * 5,
    "PatientBirthDate": 8,
    "PatientSex": 16,
    "StudyID": 16,
    "StudyDate": 8,
    "StudyTime": 16,
    "ReferringPhysicianName": 64 * 5,
    "AccessionNumber": 16,
}


def _complete_copied_attributes(ds) -> None:
    for keyword, limit in _TYPE2_COPIED.items():
        if keyword not in ds or ds.get(keyword) is None:
            setattr(ds, keyword, "")
        elif len(str(ds.get(keyword))) > limit:
            setattr(ds, keyword, str(ds.get(keyword))[:limit])
    # PatientIdentityRemoved YES requires a de-identification method (type 1C), which some
    # anonymisers leave blank; the SEG copies both.
    if str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not (
        str(ds.get("DeidentificationMethod", "") or "").strip() or ds.get("DeidentificationMethodCodeSequence")
    ):
        ds.DeidentificationMethod = "not recorded in the source"


def labels_on_source_slices(labels: np.ndarray, affine: np.ndarray, datasets) -> np.ndarray:
    """Labels [S, rows, columns] of each source slice, nearest neighbour from ``labels`` [X, Y, Z]
    on the grid of ``affine`` (RAS).

    Each pixel's patient position comes from its own slice's ImagePositionPatient,
    ImageOrientationPatient and PixelSpacing, and goes through the inverse of ``affine``; pixels
    outside the grid are background. For a series load_ct stacked as it is, every pixel lands on a
    voxel centre (the identity); for a tilted or unevenly spaced series (resampled when loaded)
    this is the way back onto the acquired slices.
    """
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    c, r = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
    pixels = np.stack([c.ravel(), r.ravel(), np.zeros(c.size), np.ones(c.size)])  # [4, rows*cols]
    to_index = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ LPS_TO_RAS
    out = np.zeros((len(datasets), rows, cols), dtype=labels.dtype)
    shape = np.asarray(labels.shape)[:, None]
    for s, ds in enumerate(datasets):
        index = np.rint((to_index @ dicom.slice_affine_lps(ds) @ pixels)[:3]).astype(np.int64)
        inside = np.all((index >= 0) & (index < shape), axis=0)
        flat = np.zeros(rows * cols, dtype=labels.dtype)
        flat[inside] = labels[index[0, inside], index[1, inside], index[2, inside]]
        out[s] = flat.reshape(rows, cols)
    return out


def dicom_seg_bytes(
    labels: np.ndarray, affine: np.ndarray, names: dict[int, str], source: SegSource, provenance: dict
) -> bytes:
    """A DICOM SEG (highdicom, BINARY) of ``labels`` [X, Y, Z] (on the grid of ``affine``, RAS),
    one frame per source slice (:func:`labels_on_source_slices`), each referencing its instance.

    Segment k (1..) is the k-th non-background class of ``names``; its SegmentLabel is the name.
    The SEG's UIDs are derived from the source series, the weights and the frames: the same
    prediction gives the same UIDs.
    """
    hd = optional_import("highdicom", "dicom-seg", "--format dicom-seg")
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    values = [k for k in sorted(names) if k != 0]
    on_slices = labels_on_source_slices(labels, affine, source.datasets)
    frames = np.zeros(on_slices.shape, dtype=np.uint16)
    for number, value in enumerate(values, start=1):
        frames[on_slices == value] = number
    entropy = [
        source.series_uid,
        str(provenance.get("weights_sha256")),
        str(provenance.get("preprocess_hash")),
        json.dumps(labels_to_json(names), sort_keys=True),
        hashlib.sha256(frames.tobytes()).hexdigest(),
    ]

    def uid(kind: str) -> str:
        return generate_uid(dicom.DERIVED_UID_ROOT, [f"ctfm:seg:{kind}", *entropy])

    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=names[value][:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=("ctfm " + str(provenance.get("model", "")))[:64],
                version=str(provenance.get("ctfm_version", ""))[:64],
                family=codes.DCM.ArtificialIntelligence,
            ),
            tracking_uid=uid(f"tracking:{value}"),
            tracking_id=names[value][:64],
        )
        for number, value in enumerate(values, start=1)
    ]
    # SeriesDescription and ContentDescription are LO (64 characters): the full record of derived
    # source UIDs is in the labels.json sidecar.
    derived = " (source UIDs derived, see labels.json)" if source.derived else ""
    with dicom.quiet_pydicom(), warnings.catch_warnings():  # the source's value warnings (a long StudyID: cut above)
        warnings.filterwarnings("ignore", message="The string .* is unlikely to represent the intended person name")
        seg = hd.seg.Segmentation(
            source_images=source.datasets,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=uid("series"),
            series_number=900,
            sop_instance_uid=uid("instance"),
            instance_number=1,
            manufacturer="ctfm",
            manufacturer_model_name=str(provenance.get("model", "ct-fm-segresnet"))[:64],
            software_versions=str(provenance.get("ctfm_version", ""))[:64],
            device_serial_number="0",
            omit_empty_frames=True,
            series_description=("ctfm segmentation" + derived)[:64],
            content_description="blank source UIDs derived from content" if derived else "ctfm segmentation",
            content_label="CTFM",
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


def check_output_folder(out: Path) -> None:
    """Refuse an output folder that cannot be made or written, before any work (nothing is created)."""
    if out.exists() and not out.is_dir():
        raise CTInputError(out, "the output path is a file, not a folder", "give a folder with -o")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CTInputError(out, f"cannot write into {parent} (permission denied)", "choose a writable folder with -o")


def preflight(sources, output_format: str) -> dict:
    """``{source: one-line reason}`` of the sources whose output cannot be written in
    ``output_format``, found from headers alone; raises the reason itself when every source is
    refused (a run with nothing to do is an unusable argument, not a batch of failures)."""
    if output_format != "dicom-seg":
        return {}
    refused, first = {}, None
    for source in sources:
        try:
            dicom_seg_source(source)
        except UserError as exc:
            refused[source] = str(exc)
            first = first or exc
    if sources and len(refused) == len(sources):
        if len(sources) == 1:
            raise first
        raise CTInputError(
            None,
            f"none of the {len(sources)} inputs can be written as a DICOM SEG; the first: {first}",
            "give DICOM CT series, or use --format nifti",
        )
    return refused
