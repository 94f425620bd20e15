"""The scan record: what a CT file says about itself, kept beside the voxels."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ScanRecord:
    """Provenance and acquisition facts of one loaded CT.

    ``shape`` and ``spacing_mm`` follow the array axes of the returned volume (x, y, z of the
    affine), ``orientation`` is the three-letter code of the RAS affine (e.g. ``"RAS"``,
    ``"LPS"``). DICOM-only fields stay ``None`` for volume files. ``spacing_source`` says where the
    voxel size came from (a header field, or for DICOM slices the derivation from the positions);
    a voxel size is never assumed.
    """

    path: str
    format: str  # "nifti" | "nrrd" | "mha" | "dicom"
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    orientation: str
    modality: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uids: list[str] = field(default_factory=list)
    series_description: str | None = None
    kernel: str | None = None
    slice_thickness_mm: float | None = None
    manufacturer: str | None = None
    body_part: str | None = None
    contrast: str | None = None
    study_date: str | None = None  # DICOM StudyDate, YYYYMMDD
    frame_of_reference_uid: str | None = None
    n_slices_on_disk: int | None = None
    gantry_tilt_deg: float | None = None  # measured from the slice positions, not just the header
    slice_gaps_mm: list[float] = field(default_factory=list)  # distinct gaps along the normal
    resampled: str | None = None  # why the loader resampled onto a regular grid, if it did
    spacing_source: str | None = None  # header fields the voxel size came from, or how it was derived
    geometry_warnings: list[dict[str, str]] = field(
        default_factory=list
    )  # {"message", "fix"}: header geometry read but doubtful
    skipped: dict[str, int] = field(default_factory=dict)  # files left out of a DICOM folder, by reason
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        out["spacing_mm"] = [round(float(s), 6) for s in self.spacing_mm]
        return out
