"""Is this a usable CT in Hounsfield units? Checks with ok / warn / error and a message each."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ctfm.errors import CTInputError
from ctfm.io import load_ct

OK, WARN, ERROR = "ok", "warn", "error"
SPACING_RANGE_MM = (0.1, 10.0)
MAX_VOXELS_FOR_PERCENTILES = 4_000_000
# The most voxels a scan may have once resampled to a preset's spacing (float32: 6 GB). A whole-body
# CT at 1 mm is about 0.2e9; past this bound the header's geometry is wrong, not the patient.
MAX_RESAMPLED_VOXELS = 1_500_000_000


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok" | "warn" | "error"
    message: str
    fix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def hu_statistics(image) -> dict[str, float]:
    """min, p1, p50, p99, max of the voxel values (percentiles on an even subsample of large scans)."""
    values = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image, dtype=np.float32).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"min": float("nan"), "p1": float("nan"), "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    step = max(1, finite.size // MAX_VOXELS_FOR_PERCENTILES)
    p1, p50, p99 = np.percentile(finite[::step], [1, 50, 99])
    return {
        "min": float(finite.min()),
        "p1": float(p1),
        "p50": float(p50),
        "p99": float(p99),
        "max": float(finite.max()),
    }


def check_ct(image, record, stats: dict[str, float] | None = None) -> list[Check]:
    """Run every check on a loaded CT ([1, X, Y, Z] MetaTensor) and its ScanRecord."""
    stats = stats if stats is not None else hu_statistics(image)
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    checks = []
    spatial = tuple(int(s) for s in array.shape[-3:])

    small = [s for s in spatial if s < 2]
    checks.append(
        Check("3d", ERROR, f"shape {spatial} is not a 3D volume", "give the whole series or a 3D volume")
        if small
        else Check("3d", OK, f"3D volume {spatial[0]}x{spatial[1]}x{spatial[2]}")
    )

    n_bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    checks.append(
        Check("finite", ERROR, f"{n_bad} NaN or Inf voxels", "re-export the scan; NaN/Inf are not HU values")
        if n_bad
        else Check("finite", OK, "no NaN or Inf")
    )

    if np.isfinite(stats["min"]) and stats["max"] - stats["min"] == 0:
        checks.append(
            Check("not_constant", ERROR, f"every voxel is {stats['min']:g}", "the image is blank; check the export")
        )
    else:
        checks.append(Check("not_constant", OK, "values vary"))

    bad_spacing = [s for s in record.spacing_mm if not SPACING_RANGE_MM[0] <= s <= SPACING_RANGE_MM[1]]
    spacing_text = "x".join(f"{s:.3g}" for s in record.spacing_mm)
    if bad_spacing:
        checks.append(
            Check(
                "spacing",
                ERROR,
                f"voxel spacing {spacing_text} mm outside {SPACING_RANGE_MM[0]}-{SPACING_RANGE_MM[1]} mm",
                "fix the header's spacing (pixdim) or the export",
            )
        )
    else:
        checks.append(Check("spacing", OK, f"{spacing_text} mm"))

    notes = getattr(record, "geometry_warnings", None) or []
    if notes:
        checks.append(
            Check("geometry", WARN, "; ".join(n["message"] for n in notes), "; ".join(n["fix"] for n in notes))
        )
    else:
        source = getattr(record, "spacing_source", None)
        checks.append(Check("geometry", OK, f"voxel size from {source}" if source else "voxel size from the header"))

    checks.append(_check_hu(stats))

    modality = (record.modality or "").upper()
    if not modality:
        checks.append(Check("modality", OK, f"not recorded in {record.format} (assumed CT)"))
    elif modality == "CT":
        checks.append(Check("modality", OK, "CT"))
    else:
        checks.append(Check("modality", ERROR, f"modality {modality}, not CT", "ctfm reads CT only"))

    tilt = record.gantry_tilt_deg or 0.0
    if record.format == "dicom" and tilt > 0.01:
        checks.append(
            Check(
                "tilt", WARN, f"gantry tilt {tilt:.1f} deg: resampled onto an orthogonal grid from the slice positions"
            )
        )
    else:
        checks.append(Check("tilt", OK, "no gantry tilt" if record.format == "dicom" else "regular grid"))

    gaps = record.slice_gaps_mm
    if record.format == "dicom" and record.resampled and "spacing" in record.resampled:
        checks.append(
            Check(
                "uniform_spacing",
                WARN,
                f"slice gaps {', '.join(f'{g:g}' for g in gaps)} mm: resampled to {record.spacing_mm[2]:.3g} mm",
            )
        )
    else:
        checks.append(Check("uniform_spacing", OK, "uniform slice spacing"))

    if record.format == "dicom":
        checks.append(Check("slices", OK, f"{record.n_slices_on_disk} slices, no duplicate or missing positions"))
    else:
        checks.append(Check("slices", OK, "single volume file"))
    return checks


def _check_hu(stats: dict[str, float]) -> Check:
    lo, hi = stats["min"], stats["max"]
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return Check("hu_range", ERROR, "no finite values", "re-export the scan")
    if lo >= 0 and hi <= 255:
        return Check(
            "hu_range",
            ERROR,
            f"values {lo:g}..{hi:g} are not HU: a label map, or an 8-bit (0-255) export",
            "give the CT image itself, in Hounsfield units (the original DICOM or a volume export)",
        )
    if lo >= 0 and hi <= 4095:
        return Check(
            "hu_range",
            ERROR,
            f"values {lo:g}..{hi:g} look like raw stored values (0-4095) without RescaleIntercept",
            "apply the rescale slope/intercept (HU = slope*value + intercept) or export in HU",
        )
    if lo >= 0:
        return Check(
            "hu_range",
            ERROR,
            f"no negative values (min {lo:g}): air would be about -1000 HU",
            "export in Hounsfield units",
        )
    if stats["p1"] > -800 and lo > -900:
        return Check("hu_range", WARN, f"no air near -1000 HU (min {lo:g}): a tight field of view, or not HU")
    return Check("hu_range", OK, f"air near -1000 HU present (min {lo:g}, p1 {stats['p1']:g})")


def is_usable(checks: list[Check]) -> bool:
    return all(c.status != ERROR for c in checks)


def require_usable(checks: list[Check], path) -> None:
    """Raise the first error as a :class:`CTInputError` (used before preprocessing)."""
    for c in checks:
        if c.status == ERROR:
            raise CTInputError(path, c.message, c.fix or "fix the input")


def resampled_voxels(shape, spacing_mm, target_mm) -> int:
    """How many voxels a volume of ``shape`` at ``spacing_mm`` has once resampled to ``target_mm``
    (``None``: kept as it is), computed from the geometry alone, before anything is allocated.
    The field of view (shape x spacing) is divided by the target's voxel volume, so the axis
    order of the target does not matter."""
    shape = [max(1, int(s)) for s in shape]
    if target_mm is None:
        return math.prod(shape)
    extent_mm3 = math.prod(float(n) * abs(float(sp)) for n, sp in zip(shape, spacing_mm))
    return int(math.ceil(extent_mm3 / math.prod(float(t) for t in target_mm)))


def check_size(shape, spacing_mm, spec) -> Check:
    """The voxel count of a scan of ``shape`` at ``spacing_mm`` after ``spec``'s resampling, bounded
    by :data:`MAX_RESAMPLED_VOXELS`."""
    target = getattr(spec, "spacing_mm", None)
    n = resampled_voxels(shape[-3:], spacing_mm, target)
    at = "x".join(f"{t:g}" for t in target) + " mm" if target is not None else "its own spacing"
    if n > MAX_RESAMPLED_VOXELS:
        return Check(
            "size",
            ERROR,
            f"{n:.3g} voxels once resampled to {at} ({spec.name}), more than {MAX_RESAMPLED_VOXELS:.3g}",
            "check the header's spacing and shape, or crop the scan",
        )
    return Check("size", OK, f"{n:.3g} voxels at {at}")


def require_size(image, spec, path) -> None:
    """:func:`check_size` of a loaded image (its shape and the spacing of its affine), raised as a
    :class:`CTInputError` naming ``path``: for callers that hold the image without its record."""
    affine = np.asarray(image.affine if hasattr(image, "affine") else np.eye(4), dtype=np.float64)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    require_usable([check_size(tuple(image.shape[-3:]), spacing, spec)], path)


def check_scan(image, record, spec=None, path=None) -> list[Check]:
    """The checks every verb applies to a scan before it computes: :func:`check_ct` (3D, finite,
    not constant, sane spacing, HU, modality) and, given the ``spec`` it will be preprocessed with,
    the voxel count after resampling. Raises a :class:`CTInputError` naming ``path`` (default: the
    record's path) and the first error; returns the checks when the scan is usable."""
    checks = check_ct(image, record)
    if spec is not None and is_usable(checks):
        checks.append(check_size(record.shape, record.spacing_mm, spec))
    require_usable(checks, path if path is not None else record.path)
    return checks


def load_usable_ct(path, series_uid: str | None = None, spec=None):
    """``load_ct`` + :func:`check_scan`; ``(image, record)`` or a :class:`CTInputError` naming the
    first error. With ``spec``, the voxel count after its resampling is bounded too. Geometry
    warnings stay in ``record.warnings`` (batch jobs keep stderr for failures)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image, record = load_ct(path, series_uid=series_uid)
    check_scan(image, record, spec, path)
    return image, record


def describe_ct(loaded) -> dict:
    """The ``ctfm info`` report of a loaded CT (``(image, record)`` from :func:`ctfm.io.load_ct`) as
    a dict: path, format, shape, spacing_mm, orientation, hu, record, checks, usable."""
    image, record = loaded
    stats = hu_statistics(image)
    checks = check_ct(image, record, stats)
    return {
        "path": record.path,
        "format": record.format,
        "shape": list(record.shape),
        "spacing_mm": [round(s, 6) for s in record.spacing_mm],
        "orientation": record.orientation,
        "hu": {k: round(v, 3) for k, v in stats.items()},
        "record": record.to_dict(),
        "checks": [c.to_dict() for c in checks],
        "usable": all(c.status != "error" for c in checks),
    }
