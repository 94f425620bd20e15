"""DICOM CT series: find them in a folder, pick one, and put it on a regular grid.

A folder from an archive is messy: localizers, SEG/RTSTRUCT/SR objects, stray non-DICOM files,
several series. We index the headers once (no pixel data), keep CT image series, and stack the
chosen one by the slice positions along the slice normal. A gantry-tilted or non-uniformly spaced
series is resampled onto a regular grid from the per-slice positions (never stacked as if
uniform); duplicate positions and missing slices are refused.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctfm.errors import CTInputError
from ctfm.io.volume import LPS_TO_RAS

# SOP classes that carry no CT pixels of their own.
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",
    "1.2.840.10008.5.1.4.1.1.481.2": "RTDOSE",
    "1.2.840.10008.5.1.4.1.1.481.5": "RTPLAN",
    "1.2.840.10008.5.1.4.1.1.11.1": "PR",
    "1.2.840.10008.5.1.4.1.1.88.59": "KO",
}
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "SR", "PR", "KO", "REG", "DOC"}
# Multi-frame CT (one file holds every slice, the geometry in per-frame functional groups): refused.
MULTIFRAME_CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT",
}
# The storage SOP class of a single-frame image by Modality, for headers whose SOPClassUID is blank.
SOP_CLASS_BY_MODALITY = {"CT": "1.2.840.10008.5.1.4.1.1.2"}  # CT Image Storage

POSITION_TOLERANCE_MM = 0.01  # positions closer than this along the normal are the same slice
GAP_RELATIVE_TOLERANCE = 0.01  # gaps within 1 % of each other count as uniform


@dataclass
class DicomSeries:
    """One image series of a folder, by SeriesInstanceUID; headers only."""

    uid: str
    modality: str
    description: str
    files: list[Path] = field(default_factory=list)
    headers: list = field(default_factory=list)  # pydicom Datasets without pixel data


@dataclass
class DicomFolderIndex:
    series: list[DicomSeries]
    skipped: Counter  # reason -> count (localizer, SEG, RTSTRUCT, SR, not DICOM, ...)
    unplaced: dict[str, DicomSeries] = field(
        default_factory=dict
    )  # image files without position/orientation, by series
    multiframe: dict[str, DicomSeries] = field(default_factory=dict)  # multi-frame CT files, by series


@contextlib.contextmanager
def quiet_pydicom():
    """Keep pydicom's value warnings ("Invalid value for VR DS: 'nan'") off the terminal: the
    values that matter are checked here and refused with a message that names them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
        yield


def looks_like_dicom_file(path: Path) -> bool:
    """True when the file carries the DICM magic at byte 128 (the standard Part 10 preamble)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: Path):
    """The dataset without pixel data, or ``None`` when the file is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        pass
    except Exception:
        return None
    # Files without the Part 10 preamble still occur in archives; accept them only when they
    # parse into something with the attributes of an image or a DICOM object.
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return None
    if "SOPClassUID" in ds or "ImagePositionPatient" in ds:
        return ds
    return None


def index_dicom_folder(folder: Path) -> DicomFolderIndex:
    """Walk ``folder`` recursively and group image files by SeriesInstanceUID."""
    by_uid: dict[str, DicomSeries] = {}
    unplaced: dict[str, DicomSeries] = {}
    multiframe: dict[str, DicomSeries] = {}
    skipped: Counter = Counter()
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if name.startswith("."):
                skipped["hidden file"] += 1
                continue
            if not os.access(path, os.R_OK):  # one bad file must not stop a whole archive
                skipped["permission denied"] += 1
                continue
            ds = read_header(path)
            if ds is None:
                skipped["not DICOM"] += 1
                continue
            sop_class = str(ds.get("SOPClassUID", ""))
            modality = str(ds.get("Modality", "")).upper()
            kind = NON_IMAGE_SOP_CLASSES.get(sop_class)
            if kind is None and (
                modality in NON_IMAGE_MODALITIES or sop_class.startswith("1.2.840.10008.5.1.4.1.1.88")
            ):
                kind = modality or "SR"
            if kind is not None:
                skipped[kind] += 1
                continue
            image_type = [str(v).upper() for v in ds.get("ImageType", [])]
            if "LOCALIZER" in image_type:
                skipped["localizer"] += 1
                continue
            uid = str(ds.get("SeriesInstanceUID", "unknown"))
            if sop_class in MULTIFRAME_CT_SOP_CLASSES or _frame_count(ds) > 1:
                skipped["multi-frame"] += 1
                entry = multiframe.setdefault(uid, DicomSeries(uid, modality, str(ds.get("SeriesDescription", ""))))
                entry.files.append(path)
                entry.headers.append(ds)
                continue
            if "Rows" not in ds or "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
                skipped["no image geometry"] += 1
                if "Rows" in ds:  # an image that cannot be placed: its series must not load without it
                    unplaced.setdefault(
                        uid, DicomSeries(uid, modality, str(ds.get("SeriesDescription", "")))
                    ).files.append(path)
                continue
            series = by_uid.setdefault(uid, DicomSeries(uid, modality, str(ds.get("SeriesDescription", ""))))
            series.files.append(path)
            series.headers.append(ds)
    return DicomFolderIndex(series=list(by_uid.values()), skipped=skipped, unplaced=unplaced, multiframe=multiframe)


def _frame_count(ds) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _refuse_multiframe(series: DicomSeries, folder: Path) -> None:
    """Multi-frame CT is refused in one line at indexing time, before any pixel is read."""
    first = series.headers[0]
    kind = MULTIFRAME_CT_SOP_CLASSES.get(str(first.get("SOPClassUID", "")), "multi-frame")
    frames = sum(_frame_count(h) for h in series.headers)
    raise CTInputError(
        folder,
        f"series {series.uid or '(blank SeriesInstanceUID)'} is a {kind} image ({len(series.files)} file(s), "
        f"{frames} frames in one object); ctfm reads CT series stored one slice per file",
        "convert it to single-frame CT Image Storage first (e.g. dcm4che's emf2sf) or export the classic series "
        "from the PACS",
    )


def _refuse_unplaced(index: DicomFolderIndex, series: DicomSeries, folder: Path) -> None:
    """A series with image files that give no slice position is refused, not loaded without them."""
    files = index.unplaced.get(series.uid)
    if files:
        raise CTInputError(
            folder,
            f"{len(files.files)} image file(s) of series {series.uid} have no "
            f"ImagePositionPatient/ImageOrientationPatient (e.g. {files.files[0].name}): their slices cannot be placed",
            "re-export the series with its slice positions; ctfm never guesses one",
        )


def select_ct_series(index: DicomFolderIndex, folder: Path, series_uid: str | None) -> DicomSeries:
    """The one CT series to load, or a clear error saying which exist and how to choose."""
    if series_uid is not None:
        if series_uid in index.multiframe and not any(s.uid == series_uid for s in index.series):
            _refuse_multiframe(index.multiframe[series_uid], folder)
        for s in index.series:
            if s.uid == series_uid:
                if s.modality != "CT":
                    raise CTInputError(
                        folder,
                        f"series {series_uid} is {s.modality or 'of unknown modality'}, not CT",
                        "ctfm reads CT only; choose a CT series",
                    )
                _refuse_unplaced(index, s, folder)
                return s
        if series_uid in index.unplaced:
            _refuse_unplaced(index, index.unplaced[series_uid], folder)
        known = ", ".join(s.uid for s in index.series) or "none"
        raise CTInputError(
            folder,
            f"no series with UID {series_uid} (series here: {known})",
            "pass one of the listed UIDs with --series",
        )
    ct = [s for s in index.series if s.modality == "CT"]
    if not ct:
        multiframe_ct = [s for s in index.multiframe.values() if s.modality == "CT"]
        if multiframe_ct:
            _refuse_multiframe(multiframe_ct[0], folder)
        unplaced_ct = [s for s in index.unplaced.values() if s.modality == "CT"]
        if len(unplaced_ct) == 1:
            _refuse_unplaced(index, unplaced_ct[0], folder)
        if index.series:
            found = "; ".join(f"{s.modality or '?'} series {s.uid} ({len(s.files)} files)" for s in index.series)
            raise CTInputError(
                folder, f"no CT series here, only {found}", "ctfm reads CT only; point it at a CT series"
            )
        if index.skipped:
            what = ", ".join(f"{n} {k}" for k, n in sorted(index.skipped.items()))
            raise CTInputError(
                folder,
                f"no CT image files here (found {what})",
                "point to the folder of the CT image series, not its segmentation or report",
            )
        raise CTInputError(folder, "empty folder: no DICOM files", "point to a folder holding a DICOM CT series")
    volumes = [s for s in ct if len(s.files) > 1]
    if not volumes:
        what = "a single slice" if len(ct) == 1 else f"{len(ct)} series of one slice each"
        raise CTInputError(
            folder, f"only {what}: a 2D image, not a 3D volume", "give the folder that holds a whole CT series"
        )
    ct = volumes
    if len(ct) > 1:
        listing = "; ".join(f"{s.uid} '{s.description}' {len(s.files)} slices" for s in ct)
        raise CTInputError(
            folder,
            f"{len(ct)} CT series in this folder: {listing}",
            "choose one with --series UID (series_uid= in Python)",
        )
    _refuse_unplaced(index, ct[0], folder)
    return ct[0]


@dataclass
class SeriesGeometry:
    """Where each slice of a series lies, sorted along the slice normal."""

    order: np.ndarray  # (S,) indices into the series' files, sorted by position along the normal
    row_dir: np.ndarray  # (3,) LPS unit vector along a row (increasing column index)
    col_dir: np.ndarray  # (3,) LPS unit vector along a column (increasing row index)
    normal: np.ndarray  # (3,) row_dir x col_dir
    col_spacing: float  # mm between columns (PixelSpacing[1])
    row_spacing: float  # mm between rows (PixelSpacing[0])
    positions: np.ndarray  # (S, 3) ImagePositionPatient in LPS, sorted
    depths: np.ndarray  # (S,) position along the normal, ascending
    inplane_offsets: np.ndarray  # (S, 2) offset of each slice origin along (row_dir, col_dir) from the first
    gaps: np.ndarray  # (S-1,) distance between consecutive slices along the normal
    tilt_deg: float  # angle between the stacking direction and the normal


def series_geometry(series: DicomSeries, folder: Path) -> SeriesGeometry:
    """Sort slices along the normal and measure gaps, tilt and in-plane shifts."""
    headers = series.headers
    orientations = {tuple(round(float(v), 4) for v in h.ImageOrientationPatient) for h in headers}
    if len(orientations) > 1:
        raise CTInputError(
            folder,
            f"series {series.uid} mixes {len(orientations)} slice orientations",
            "export each orientation as its own series, or choose another series with --series",
        )
    sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(sizes) > 1:
        raise CTInputError(
            folder,
            f"series {series.uid} mixes slice sizes {sorted(sizes)}",
            "re-export the series with one matrix size",
        )
    row_dir, col_dir = _orientation(headers[0], series, folder)
    normal = np.cross(row_dir, col_dir)
    row_spacing, col_spacing = _pixel_spacing(series, folder)
    positions = _positions(series, folder)
    depths = positions @ normal
    order = np.argsort(depths, kind="stable")
    positions, depths = positions[order], depths[order]
    gaps = np.diff(depths)

    duplicates = int(np.sum(gaps < POSITION_TOLERANCE_MM))
    if duplicates:
        raise CTInputError(
            folder,
            f"{duplicates} duplicate slice position(s) in series {series.uid}",
            "the folder mixes acquisitions or copies of slices; keep one file per position or choose a series with "
            "--series",
        )

    rel = positions - positions[0]
    inplane = np.stack([rel @ row_dir, rel @ col_dir], axis=1)
    extent = depths[-1] - depths[0]
    shift = float(np.linalg.norm(inplane[-1]))
    tilt_deg = math.degrees(math.atan2(shift, extent)) if extent > 0 else 0.0
    return SeriesGeometry(
        order, row_dir, col_dir, normal, col_spacing, row_spacing, positions, depths, inplane, gaps, tilt_deg
    )


def _floats(value, n: int) -> np.ndarray | None:
    """``n`` floats from a DICOM multi-value (NaN where unparsable), ``None`` when not ``n``."""
    try:
        values = list(value) if type(value).__name__ == "MultiValue" or isinstance(value, (list, tuple)) else [value]
    except TypeError:
        return None
    if len(values) != n:
        return None
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(float("nan"))
    return np.asarray(out, dtype=np.float64)


def _orientation(header, series: DicomSeries, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Unit row and column directions (LPS) from ImageOrientationPatient; refused when invalid."""
    iop = _floats(header.ImageOrientationPatient, 6)
    fix = "re-export the series with a valid ImageOrientationPatient, the direction cosines of rows and columns"
    if iop is None or not np.all(np.isfinite(iop)):
        raise CTInputError(
            folder,
            f"ImageOrientationPatient {_shown(header.ImageOrientationPatient)} of series {series.uid} is not six finite "
            "numbers",
            fix,
        )
    lengths = np.linalg.norm(iop[:3]), np.linalg.norm(iop[3:])
    if min(lengths) < 1e-6:
        raise CTInputError(
            folder,
            f"ImageOrientationPatient {_shown(header.ImageOrientationPatient)} of series {series.uid} has a zero "
            "direction",
            fix,
        )
    row_dir, col_dir = iop[:3] / lengths[0], iop[3:] / lengths[1]
    if abs(float(row_dir @ col_dir)) > 0.01:
        raise CTInputError(
            folder,
            f"ImageOrientationPatient {_shown(header.ImageOrientationPatient)} of series {series.uid}: row and column "
            "directions are not perpendicular",
            fix,
        )
    return row_dir, col_dir


def _pixel_spacing(series: DicomSeries, folder: Path) -> tuple[float, float]:
    """(between rows, between columns) in mm from PixelSpacing, the same on every slice."""
    fix = "re-export the series with its PixelSpacing, the mm between rows and between columns"
    seen, first = set(), None
    for path, header in zip(series.files, series.headers):
        if "PixelSpacing" not in header or header.PixelSpacing in (None, ""):
            raise CTInputError(folder, f"series {series.uid} has no PixelSpacing ({path.name})", fix)
        values = _floats(header.PixelSpacing, 2)
        if values is None or not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise CTInputError(
                folder,
                f"PixelSpacing {_shown(header.PixelSpacing)} of series {series.uid} ({path.name}) is not two positive "
                "numbers",
                fix,
            )
        seen.add(tuple(np.round(values, 6)))
        first = values if first is None else first
    if len(seen) > 1:
        shown = ", ".join("\\".join(f"{v:g}" for v in s) for s in sorted(seen))
        raise CTInputError(
            folder,
            f"series {series.uid} mixes pixel spacings {shown} mm",
            "export each pixel spacing as its own series, or choose another series with --series",
        )
    return float(first[0]), float(first[1])


def _positions(series: DicomSeries, folder: Path) -> np.ndarray:
    """(S, 3) ImagePositionPatient of every slice, LPS mm; refused when one is not 3 finite numbers."""
    positions = []
    for path, header in zip(series.files, series.headers):
        values = _floats(header.ImagePositionPatient, 3)
        if values is None or not np.all(np.isfinite(values)):
            raise CTInputError(
                folder,
                f"ImagePositionPatient {_shown(header.ImagePositionPatient)} of {path.name} (series {series.uid}) is "
                "not three finite numbers",
                "re-export the series with its slice positions; ctfm never guesses one",
            )
        positions.append(values)
    return np.asarray(positions)


def _shown(value) -> str:
    if value is None:
        return "(empty)"
    if type(value).__name__ == "MultiValue" or isinstance(value, (list, tuple)):
        return "\\".join(str(v) for v in value) or "(empty)"
    return str(value) or "(empty)"


def missing_slice_gaps(gaps: np.ndarray) -> list[int]:
    """Indices of isolated gaps that are whole multiples of the usual gap: a slice was dropped.

    A change of spacing between two regular runs (e.g. 4.2 mm then 7.4 mm) is not a missing
    slice: only a gap of about 2x, 3x, ... the median whose neighbours are regular counts.
    """
    if len(gaps) < 3:
        return []
    usual = float(np.median(gaps))
    regular = np.abs(gaps - usual) <= GAP_RELATIVE_TOLERANCE * usual + 1e-3
    found = []
    for i, gap in enumerate(gaps):
        ratio = gap / usual
        if ratio < 1.5 or abs(ratio - round(ratio)) > 0.1:
            continue
        neighbours_regular = all(regular[j] for j in (i - 1, i + 1) if 0 <= j < len(gaps))
        if neighbours_regular:
            found.append(i)
    return found


def read_pixels_hu(path: Path) -> np.ndarray:
    """One slice as float32 HU, (rows, columns); applies RescaleSlope/Intercept."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as exc:
        message = " ".join(str(exc).split())[:160]
        fix = (
            "install pylibjpeg and pylibjpeg-openjpeg for JPEG 2000"
            if "decode" in message.lower() or "plugin" in message.lower()
            else "re-export or re-download the series"
        )
        raise CTInputError(path, f"cannot decode pixel data ({message})", fix) from None
    if pixels.ndim != 2:
        raise CTInputError(
            path, f"multi-frame or colour pixel data of shape {pixels.shape}", "export the CT as one 2D slice per file"
        )
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return (pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def stack_series(series: DicomSeries, geometry: SeriesGeometry) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Stack (or resample) the slices into a regular volume.

    Returns ``(volume, affine_ras, resample_reason)``; ``volume`` is float32 HU of shape
    (columns, rows, slices), i.e. array axes along (row_dir, col_dir, normal).
    """
    g = geometry
    rows, cols = int(series.headers[0].Rows), int(series.headers[0].Columns)
    slices = [read_pixels_hu(series.files[i]) for i in g.order]

    tilted = float(np.max(np.abs(g.inplane_offsets))) > POSITION_TOLERANCE_MM
    usual_gap = float(np.median(g.gaps))
    nonuniform = bool(np.any(np.abs(g.gaps - usual_gap) > GAP_RELATIVE_TOLERANCE * usual_gap + 1e-3))

    if not tilted and not nonuniform:
        volume = np.stack([s.T for s in slices], axis=-1)  # (cols, rows, slices)
        affine = _lps_affine(g, origin=g.positions[0], slice_gap=usual_gap)
        return volume, LPS_TO_RAS @ affine, None

    reasons = []
    if tilted:
        reasons.append(f"gantry tilt {g.tilt_deg:.1f} deg")
    if nonuniform:
        reasons.append(
            "non-uniform slice spacing " + "/".join(f"{v:.2f}" for v in sorted(set(np.round(g.gaps, 2)))) + " mm"
        )
    volume, affine = _resample_to_regular_grid(slices, g, rows, cols)
    return volume, LPS_TO_RAS @ affine, " and ".join(reasons)


def output_slice_gap(gaps: np.ndarray) -> float:
    """Slice spacing of the regular grid: the finest gap that recurs in the series.

    Taking the finest *recurring* gap keeps the resolution of the finest run of slices (4 mm
    then 7 mm gives 4 mm) without letting a single odd transition gap (1.1 mm between two runs of
    overlapping thick slices, as in a real head series) blow the volume up.
    """
    rounded = np.round(gaps, 2)
    values, counts = np.unique(rounded, return_counts=True)
    recurring = values[counts >= 2]
    return float(np.median(gaps[np.isin(rounded, recurring.min())])) if len(recurring) else float(np.median(gaps))


def _lps_affine(g: SeriesGeometry, origin: np.ndarray, slice_gap: float) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 0] = g.row_dir * g.col_spacing
    affine[:3, 1] = g.col_dir * g.row_spacing
    affine[:3, 2] = g.normal * slice_gap
    affine[:3, 3] = origin
    return affine


def _resample_to_regular_grid(
    slices: list[np.ndarray], g: SeriesGeometry, rows: int, cols: int
) -> tuple[np.ndarray, np.ndarray]:
    """Resample slices with per-slice origins onto one orthogonal grid.

    The output axes are (row_dir, col_dir, normal): in-plane spacing as acquired, slice spacing
    from :func:`output_slice_gap`, field of view the union of all slices.
    Each output slice interpolates linearly between the two acquired slices around it, each
    shifted in-plane by its own origin offset (bilinear), so a tilted series is de-sheared.
    Voxels no slice covers get the lowest value of the series.
    """
    from scipy.ndimage import map_coordinates

    fill = float(min(s.min() for s in slices))
    u_min, v_min = g.inplane_offsets.min(axis=0)
    u_max, v_max = g.inplane_offsets.max(axis=0)
    out_cols = int(round((u_max - u_min) / g.col_spacing)) + cols
    out_rows = int(round((v_max - v_min) / g.row_spacing)) + rows
    gap = output_slice_gap(g.gaps)
    extent = g.depths[-1] - g.depths[0]
    n_out = int(math.floor(extent / gap + 1e-6)) + 1
    out_depths = g.depths[0] + gap * np.arange(n_out)

    grid_r, grid_c = np.meshgrid(
        np.arange(out_rows, dtype=np.float64), np.arange(out_cols, dtype=np.float64), indexing="ij"
    )
    shifted_cache: dict[int, np.ndarray] = {}

    def shifted(s: int) -> np.ndarray:
        # Output pixel (r, c) sits at in-plane offset (u_min + c*dc, v_min + r*dr) from the first
        # slice origin; in slice s that is column (u_min + c*dc - u_s)/dc, row likewise.
        if s not in shifted_cache:
            du = (u_min - g.inplane_offsets[s, 0]) / g.col_spacing
            dv = (v_min - g.inplane_offsets[s, 1]) / g.row_spacing
            shifted_cache[s] = map_coordinates(
                slices[s], [grid_r + dv, grid_c + du], order=1, cval=fill, prefilter=False
            ).astype(np.float32)
            if len(shifted_cache) > 4:  # slices are visited in order; keep memory flat
                shifted_cache.pop(min(shifted_cache))
        return shifted_cache[s]

    volume = np.empty((out_cols, out_rows, n_out), dtype=np.float32)
    upper = np.searchsorted(g.depths, out_depths, side="right")
    for k, depth in enumerate(out_depths):
        hi = int(min(max(upper[k], 1), len(g.depths) - 1))
        lo = hi - 1
        w = float((depth - g.depths[lo]) / (g.depths[hi] - g.depths[lo]))
        w = min(max(w, 0.0), 1.0)
        plane = shifted(lo) if w < 1e-6 else shifted(hi) if w > 1 - 1e-6 else (1 - w) * shifted(lo) + w * shifted(hi)
        volume[:, :, k] = plane.T

    origin = g.positions[0] + u_min * g.row_dir + v_min * g.col_dir
    return volume, _lps_affine(g, origin=origin, slice_gap=gap)


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _number(ds, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def spacing_source(series: DicomSeries, geometry: SeriesGeometry, slice_spacing: float, resampled: str | None) -> str:
    """How the voxel size of a series was found: PixelSpacing in-plane, and the slice spacing
    derived from ImagePositionPatient (with what the header's SliceThickness and
    SpacingBetweenSlices say beside it, which are never used for it)."""
    first = series.headers[int(geometry.order[0])]
    thickness, between = _number(first, "SliceThickness"), _number(first, "SpacingBetweenSlices")
    how = "finest recurring gap" if resampled else "gap"
    return (
        f"PixelSpacing {geometry.row_spacing:g}\\{geometry.col_spacing:g} mm; slice spacing {slice_spacing:.4g} mm "
        "derived from ImagePositionPatient "
        f"({how} along the slice normal; SliceThickness {f'{thickness:g}' if thickness is not None else 'absent'}, "
        f"SpacingBetweenSlices {f'{between:g}' if between is not None else 'absent'})"
    )


def series_record_fields(series: DicomSeries, geometry: SeriesGeometry) -> dict:
    """Scan-record fields from the headers of a series (first slice in sorted order)."""
    first = series.headers[int(geometry.order[0])]
    return {
        "modality": series.modality,
        "study_uid": _text(first, "StudyInstanceUID"),
        "series_uid": series.uid,
        "sop_uids": [str(series.headers[i].get("SOPInstanceUID", "")) for i in geometry.order],
        "series_description": series.description or None,
        "kernel": _text(first, "ConvolutionKernel"),
        "slice_thickness_mm": _number(first, "SliceThickness"),
        "manufacturer": _text(first, "Manufacturer"),
        "body_part": _text(first, "BodyPartExamined"),
        "contrast": _text(first, "ContrastBolusAgent"),
        "study_date": _text(first, "StudyDate"),
        "frame_of_reference_uid": _text(first, "FrameOfReferenceUID"),
        "n_slices_on_disk": len(series.files),
        "gantry_tilt_deg": round(geometry.tilt_deg, 3),
        "slice_gaps_mm": sorted({round(float(v), 3) for v in geometry.gaps}),
    }


def slice_affine_lps(ds) -> np.ndarray:
    """4x4 map of one slice's pixel ``(column, row, 0, 1)`` to LPS mm, from its own
    ImagePositionPatient, ImageOrientationPatient and PixelSpacing (PS3.3 C.7.6.2.1.1)."""
    ipp, iop, spacing = (
        _floats(ds.ImagePositionPatient, 3),
        _floats(ds.ImageOrientationPatient, 6),
        _floats(ds.PixelSpacing, 2),
    )
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1]  # along a row: the column index, PixelSpacing[1] apart
    affine[:3, 1] = col_dir * spacing[0]  # along a column: the row index, PixelSpacing[0] apart
    affine[:3, 2] = np.cross(row_dir, col_dir)
    affine[:3, 3] = ipp
    return affine


# The UIDs a derived object (a DICOM SEG) must reference; anonymisers sometimes blank them.
SOURCE_UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")
DERIVED_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root, as generate_uid uses it
DERIVED_UID_METHOD = (
    "blank UIDs derived by ctfm: SOPInstanceUID = pydicom generate_uid(entropy = 'ctfm:SOPInstanceUID', "
    "sha256 of the instance's PixelData bytes, its ImagePositionPatient); SeriesInstanceUID, StudyInstanceUID and "
    "FrameOfReferenceUID likewise over every instance of the series in slice order; SOPClassUID from the Modality"
)


def _blank(ds, keyword: str) -> bool:
    return not str(ds.get(keyword, "") or "").strip()


def blank_uid_keywords(datasets) -> list[str]:
    """Which of :data:`SOURCE_UID_KEYWORDS` are blank or absent in any of ``datasets``."""
    return [k for k in SOURCE_UID_KEYWORDS if any(_blank(ds, k) for ds in datasets)]


def pixel_data_sha256(path: Path) -> str:
    """Hex sha256 of one instance's PixelData bytes as stored (compressed ones undecoded)."""
    import hashlib

    import pydicom

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise CTInputError(path, "the image has no pixel data", "re-export the series with its pixel data")
    return hashlib.sha256(ds.PixelData).hexdigest()


def fill_blank_uids(datasets, files) -> dict[str, str]:
    """Fill the blank UIDs of a series' headers in place, deterministically from their content.

    ``datasets``: the headers in slice order, ``files``: their files. The same files give the same
    UIDs (see :data:`DERIVED_UID_METHOD`); UIDs present are kept. A series-level UID blank on some
    instances only takes the one value the others share. Returns ``{keyword: value or "per
    instance"}`` for each keyword filled, empty when nothing was blank.
    """
    from pydicom.uid import generate_uid

    missing = blank_uid_keywords(datasets)
    if not missing:
        return {}
    filled: dict[str, str] = {}
    if "SOPClassUID" in missing:
        modality = str(datasets[0].get("Modality", "")).upper()
        sop_class = SOP_CLASS_BY_MODALITY.get(modality)
        if sop_class is None:
            raise CTInputError(
                files[0].parent,
                f"blank SOPClassUID and Modality {modality or '(blank)'}: the storage class cannot be told",
                "fill in the SOPClassUID of the series",
            )
        for ds in datasets:
            if _blank(ds, "SOPClassUID"):
                ds.SOPClassUID = sop_class
        filled["SOPClassUID"] = sop_class
    if missing == ["SOPClassUID"]:
        return filled
    keys = [
        (pixel_data_sha256(f), "\\".join(f"{v:.6f}" for v in _floats(ds.ImagePositionPatient, 3)))
        for ds, f in zip(datasets, files)
    ]
    if "SOPInstanceUID" in missing:
        for ds, (digest, position) in zip(datasets, keys):
            if _blank(ds, "SOPInstanceUID"):
                ds.SOPInstanceUID = generate_uid(DERIVED_UID_ROOT, ["ctfm:SOPInstanceUID", digest, position])
        filled["SOPInstanceUID"] = "per instance"
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        if keyword not in missing:
            continue
        present = {str(ds.get(keyword)) for ds in datasets if not _blank(ds, keyword)}
        if len(present) == 1:
            value = present.pop()
        else:
            value = generate_uid(DERIVED_UID_ROOT, [f"ctfm:{keyword}", *(d + "@" + p for d, p in keys)])
        for ds in datasets:
            if _blank(ds, keyword):
                setattr(ds, keyword, value)
        filled[keyword] = value
    return filled
