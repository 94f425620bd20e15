"""Reading CT: one call for NIfTI, NRRD, MHA/MHD and DICOM series folders.

>>> image, record = load_ct("scan.nii.gz")      # doctest: +SKIP
>>> image.shape, image.affine                   # [1, X, Y, Z] float32 HU, RAS affine

``image`` is a MONAI ``MetaTensor`` so that every MONAI transform carries the affine along.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ctfm.errors import CTInputError
from ctfm.io import dicom
from ctfm.io.dicom import looks_like_dicom_file, quiet_pydicom
from ctfm.io.hashing import content_hash, file_sha256
from ctfm.io.labels import load_labels as _load_labels
from ctfm.io.pacs import fetch_series, is_pacs_url, parse_pacs_url
from ctfm.io.record import ScanRecord
from ctfm.io.tables import read_table
from ctfm.io.volume import VOLUME_SUFFIXES, read_volume_file, volume_format
from ctfm.runtime import atomic_path

__all__ = [
    "load_ct",
    "ScanRecord",
    "content_hash",
    "file_sha256",
    "save_nifti",
    "orientation_code",
    "load_labels",
    "read_table",
]


class CTGeometryWarning(UserWarning):
    """The loader changed the geometry of a series (tilt or spacing resampled)."""


def load_ct(path: str | os.PathLike, series_uid: str | None = None):
    """Load one CT as a channel-first MetaTensor in Hounsfield units.

    Args:
        path: a NIfTI / NRRD / MHA / MHD file, a folder holding a DICOM series (searched
            recursively; localizers, SEG/RTSTRUCT/SR and non-DICOM files are skipped), or a PACS
            address of a series (``dicomweb:...``, ``dimse://...``; retrieved into the series cache).
        series_uid: which CT series to load when the folder holds several.

    Returns:
        ``(image, record)``: ``image`` is a ``MetaTensor`` of shape [1, X, Y, Z], float32 HU, whose
        ``affine`` maps voxel indices to RAS millimetres; ``record`` is a :class:`ScanRecord`.

    Raises:
        CTInputError: anything that is not a readable 3D CT (message: path, problem, fix).
    """
    if is_pacs_url(path):
        return _load_pacs_series(str(path), series_uid)
    path = Path(path)
    if not path.exists():
        raise CTInputError(path, "no such file or folder", "check the path")
    if path.is_dir():
        with quiet_pydicom():
            array, affine, record = _load_dicom_folder(path, series_uid)
    else:
        if not os.access(path, os.R_OK):
            raise CTInputError(
                path, "file is not readable (permission denied)", "fix the file permissions, e.g. chmod a+r"
            )
        if path.stat().st_size == 0:
            raise CTInputError(
                path, "empty file (0 bytes)", "the copy or download was interrupted; fetch the file again"
            )
        if volume_format(path) is not None:
            volume = read_volume_file(path)
            array, affine = _as_3d(volume.array, path), volume.affine
            spacing = _spacing(affine)
            if not np.all(np.isfinite(affine)) or min(spacing) <= 0:
                raise CTInputError(
                    path,
                    f"invalid voxel geometry (spacing {', '.join(f'{s:g}' for s in spacing)} mm)",
                    "fix the header's voxel size (pixdim) or affine",
                )
            record = ScanRecord(
                path=str(path),
                format=volume.format,
                shape=array.shape,
                spacing_mm=spacing,
                orientation=orientation_code(affine),
                spacing_source=volume.spacing_source,
            )
            for message, fix in volume.warnings:
                _geometry_warning(record, path, message, fix)
        else:
            if looks_like_dicom_file(path):
                with quiet_pydicom():
                    array, affine, record = _load_dicom_file(path)
            else:
                raise CTInputError(
                    path,
                    "not a CT file this reader knows (by name or content)",
                    f"give a {', '.join(VOLUME_SUFFIXES)} file or a DICOM series folder",
                )
    return _to_metatensor(array, affine, record), record


def _as_3d(array: np.ndarray, path: Path) -> np.ndarray:
    """Squeeze trailing singleton axes; refuse 2D and true 4D images."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 4:
        raise CTInputError(
            path,
            f"4D image of shape {tuple(array.shape)} ({array.shape[-1]} volumes)",
            "split it and give one 3D CT volume at a time",
        )
    if array.ndim > 4:
        raise CTInputError(path, f"{array.ndim}D image of shape {tuple(array.shape)}", "give one 3D CT volume")
    if array.ndim < 3 or min(array.shape) == 1:
        raise CTInputError(
            path, f"2D image of shape {tuple(array.shape)}, not a 3D volume", "give the whole series or a 3D volume"
        )
    return array


def _load_dicom_folder(folder: Path, series_uid: str | None):

    index = dicom.index_dicom_folder(folder)
    series = dicom.select_ct_series(index, folder, series_uid)
    if len(series.files) == 1:
        raise CTInputError(
            folder, "the CT series has a single slice, a 2D image", "give a folder holding the whole series"
        )
    return _load_series(series, folder, dict(index.skipped))


def _load_pacs_series(address: str, series_uid: str | None):
    """A series from a PACS: retrieved into (or found in) the series cache, loaded from there,
    recorded under its PACS address."""
    url = parse_pacs_url(address)
    if series_uid and not url.series_uid:
        url = url.series(url.study_uid, series_uid)
    folder = fetch_series(url)
    with quiet_pydicom():
        array, affine, record = _load_dicom_folder(folder, url.series_uid)
    record.path = str(url) if url.study_uid else address
    return _to_metatensor(array, affine, record), record


def _load_dicom_file(path: Path):

    ds = dicom.read_header(path)
    modality = str(ds.get("Modality", "")) if ds is not None else ""
    if modality and modality != "CT":
        raise CTInputError(path, f"DICOM file of modality {modality}, not CT", "ctfm reads CT only")
    raise CTInputError(
        path, "a single DICOM file is one 2D slice, not a 3D volume", "give the folder that holds the whole series"
    )


def _load_series(series, folder: Path, skipped: dict):

    geometry = dicom.series_geometry(series, folder)
    missing = dicom.missing_slice_gaps(geometry.gaps)
    if missing:
        usual = float(np.median(geometry.gaps))
        where = ", ".join(f"after slice {i} ({geometry.gaps[i]:.2f} mm gap)" for i in missing[:3])
        raise CTInputError(
            folder,
            f"missing slice(s) in series {series.uid}: {where}, usual gap {usual:.2f} mm",
            "re-export the complete series; a gap would be stretched over",
        )
    volume, affine, resampled = dicom.stack_series(series, geometry)
    spacing = _spacing(affine)
    record = ScanRecord(
        path=str(folder),
        format="dicom",
        shape=volume.shape,
        spacing_mm=spacing,
        orientation=orientation_code(affine),
        skipped=skipped,
        resampled=resampled,
        spacing_source=dicom.spacing_source(series, geometry, spacing[2], resampled),
        **dicom.series_record_fields(series, geometry),
    )
    if resampled:
        message = f"{folder}: resampled onto a regular grid from the per-slice positions ({resampled})"
        record.warnings.append(message)
        warnings.warn(message, CTGeometryWarning, stacklevel=3)
    return volume, affine, record


def _geometry_warning(record: ScanRecord, path: Path, message: str, fix: str) -> None:
    """A header geometry read but doubtful: into the record (and its ``ctfm info`` check) and
    out as a :class:`CTGeometryWarning`."""
    record.geometry_warnings.append({"message": message, "fix": fix})
    line = f"{path}: {message} ({fix})"
    record.warnings.append(line)
    warnings.warn(line, CTGeometryWarning, stacklevel=3)


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def orientation_code(affine) -> str:
    """Three-letter orientation code of a RAS affine, e.g. ``"RAS"``, ``"LPS"``, ``"SPL"``."""
    import nibabel as nib

    return "".join(code or "?" for code in nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def _to_metatensor(array: np.ndarray, affine: np.ndarray, record: ScanRecord):
    import torch
    from monai.data import MetaTensor

    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    affine_t = torch.as_tensor(affine, dtype=torch.float64)
    meta = {
        "filename_or_obj": record.path,
        "original_affine": affine_t.clone(),
        "spatial_shape": np.asarray(array.shape),
        "space": "RAS",
        "original_channel_dim": "no_channel",
        "format": record.format,
    }
    if record.frame_of_reference_uid:
        meta["FrameOfReferenceUID"] = record.frame_of_reference_uid
    return MetaTensor(data, affine=affine_t, meta=meta)


def save_nifti(image, path: str | os.PathLike, dtype=np.float32) -> Path:
    """Write a [1, X, Y, Z] (or [X, Y, Z]) tensor with its affine to NIfTI, atomically.

    The file appears complete or not at all (:func:`ctfm.runtime.atomic_path`).
    """
    import nibabel as nib

    path = Path(path)
    array = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    affine = np.asarray(getattr(image, "affine", np.eye(4)), dtype=np.float64)
    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix  # nibabel picks the format by suffix
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, str(tmp))
    return path


def load_labels(path: str | os.PathLike, image):
    """Label map on the grid of ``image``; see :func:`ctfm.io.labels.load_labels`."""

    return _load_labels(path, image)
