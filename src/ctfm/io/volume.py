"""Volume files (NIfTI, NRRD, MHA/MHD) to a voxel array and a RAS affine.

The voxel size is never guessed. nibabel turns a zero pixdim into 1 mm and SimpleITK gives an
axis without a spacing 1 mm, both with at most a log line; so we read each header ourselves
first and refuse a zero, negative, missing or non-finite voxel size before the library sees it.
Header facts that do not stop reading but change the geometry another tool would see (a qform
that disagrees with the sform, no orientation at all) come back as warnings with a fix. The
libraries' own log and console lines are kept off the user's terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctfm.errors import CTInputError, one_line

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES

# DICOM and ITK speak LPS; NIfTI, MONAI and this package speak RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

AXES = "xyz"
MHA_HEADER_BYTES = 1 << 20  # a MetaImage text header is far shorter than this


@dataclass
class VolumeFile:
    """What :func:`read_volume_file` found: voxels, affine and where the voxel size came from.

    ``array`` is in file order (x, y, z[, ...]); ``affine`` the 4x4 voxel-to-world RAS affine in
    mm; ``spacing_source`` names the header fields the voxel size was read from; ``warnings``
    holds ``(message, fix)`` pairs about the geometry that did not stop reading.
    """

    array: np.ndarray
    affine: np.ndarray
    format: str
    spacing_source: str
    warnings: list[tuple[str, str]] = field(default_factory=list)


def volume_format(path: Path) -> str | None:
    """``"nifti"``, ``"nrrd"`` or ``"mha"`` from the file name, ``None`` if it is no volume file."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith((".mha", ".mhd")):
        return "mha"
    return None


def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Read a volume file.

    Returns ``(array, affine, format)``: the voxel array in file order (x, y, z[, ...]) as stored
    values with any scale slope applied, and the 4x4 voxel-to-world affine in RAS millimetres.
    See :func:`read_volume_file` for the geometry checks and warnings.
    """
    volume = read_volume_file(path)
    return volume.array, volume.affine, volume.format


def read_volume_file(path: Path) -> VolumeFile:
    """Read a volume file after checking the voxel size its header gives.

    Raises:
        CTInputError: unreadable file, or a voxel size that is zero, negative, missing or
            not finite on any spatial axis (message: which field, axis and value; the fix).
    """
    path = Path(path)
    fmt = volume_format(path)
    if fmt == "nifti":
        return _read_nifti(path)
    if fmt not in ("nrrd", "mha"):
        raise CTInputError(path, "not a CT volume file", "give a .nii/.nii.gz, .nrrd, .mha/.mhd file or a DICOM folder")
    source, notes = check_itk_header(path)
    array, affine = _read_itk(path)
    return VolumeFile(array, affine, fmt, source, notes)


def check_itk_header(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """Check the voxel size a NRRD or MetaImage header gives, before ITK reads it as 1 mm.

    Returns ``(spacing source, [(warning, fix), ...])``; raises :class:`CTInputError`.
    """
    return _check_nrrd_header(path) if volume_format(path) == "nrrd" else _check_mha_header(path)


# ----------------------------------------------------------------------------------------------
# Keeping the libraries quiet


@contextlib.contextmanager
def quiet_nibabel():
    """Silence nibabel's header-fix log lines ("pixdim[1,2,3] should be non-zero; ...")."""
    logger = logging.getLogger("nibabel.global")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_native_stderr():
    """Send what C++ libraries write straight to file descriptor 2 (ITK's MetaIO and NRRD
    readers print "MetaImage: M_Read: Error parsing file" and the like) to a scratch file.

    The exception those readers raise says the same; the lines would only be unexplained noise.
    """
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to protect
            yield
            return
        try:
            with tempfile.TemporaryFile() as scratch:
                os.dup2(scratch.fileno(), 2)
                try:
                    yield
                finally:
                    os.dup2(saved, 2)
        finally:
            os.close(saved)


# ----------------------------------------------------------------------------------------------
# NIfTI


def _read_nifti(path: Path) -> VolumeFile:
    import nibabel as nib

    raw = _raw_nifti_header(path)
    source, notes = _check_nifti_geometry(raw, path) if raw is not None else ("NIfTI header", [])
    try:
        with quiet_nibabel():
            img = nib.load(str(path))
            # dataobj applies scl_slope/scl_inter; this mirrors MONAI's NibabelReader.
            array = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise CTInputError(
            path, f"unreadable NIfTI ({one_line(exc)})", "check that the file is complete; re-export or re-download it"
        ) from None
    return VolumeFile(array, np.asarray(img.affine, dtype=np.float64), "nifti", source, notes)


def _raw_nifti_header(path: Path):
    """The NIfTI-1 or NIfTI-2 header exactly as stored (nothing fixed), or ``None`` when it
    cannot be read; nibabel then reports why."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as fobj:
            block = fobj.read(nib.Nifti2Header.sizeof_hdr)
        for klass in (nib.Nifti1Header, nib.Nifti2Header):
            if klass.may_contain_header(block):
                return klass(block[: klass.sizeof_hdr], check=False)
    except Exception:  # damaged or not NIfTI: nib.load gives the message
        return None
    return None


_SILENT_LOGGER = logging.getLogger("ctfm.io.nibabel_fixes")
_SILENT_LOGGER.addHandler(logging.NullHandler())
_SILENT_LOGGER.propagate = False


def _fixed_copy(raw):
    """The header as nibabel will use it (its check_fix applied, without logging)."""
    fixed = raw.copy()
    try:
        fixed.check_fix(logger=_SILENT_LOGGER, error_level=60)
    except Exception:
        pass
    return fixed


def _check_nifti_geometry(raw, path: Path) -> tuple[str, list[tuple[str, str]]]:
    """Refuse a voxel size nibabel would have to invent; return (spacing source, warnings).

    nibabel uses the sform when sform_code > 0, else the qform when qform_code > 0, else pixdim
    alone; only the fields of that affine decide, as only they reach the voxels' positions.
    """
    fixed = _fixed_copy(raw)  # nibabel resets unknown qform/sform codes to 0: decide as it will
    n_spatial = int(min(max(int(raw["dim"][0]), 1), 3))
    sform_code, qform_code = int(fixed["sform_code"]), int(fixed["qform_code"])
    fix = "write the true voxel size in mm into pixdim[1..3], or re-export the scan from its DICOM, e.g. with dcm2niix"
    if sform_code > 0:
        srow = np.stack([raw["srow_x"], raw["srow_y"], raw["srow_z"]]).astype(np.float64)
        if not np.all(np.isfinite(srow)):
            raise CTInputError(
                path,
                f"NIfTI sform (srow_x/y/z) holds NaN or Inf: {_fmt_rows(srow)}",
                "set a valid sform, or sform_code 0 to use the qform, or re-export the scan",
            )
        lengths = np.linalg.norm(srow[:, :3], axis=0)
        for axis in range(n_spatial):
            if lengths[axis] <= 0:
                raise CTInputError(
                    path,
                    f"NIfTI sform gives axis {AXES[axis]} a voxel size of 0 (column {axis} of srow_x/y/z is zero)",
                    "set a valid sform, or sform_code 0 to use the qform, or re-export the scan",
                )
        if n_spatial == 3 and abs(np.linalg.det(srow[:, :3])) <= 1e-9 * float(np.prod(lengths)):
            raise CTInputError(
                path,
                "NIfTI sform axes are not independent (singular 3x3 matrix)",
                "set a valid sform, or sform_code 0 to use the qform, or re-export the scan",
            )
        notes = _qform_disagreement(raw, fixed) if qform_code > 0 else []
        return "NIfTI sform", notes
    pixdim = np.asarray(raw["pixdim"], dtype=np.float64)
    which = "qform voxel size" if qform_code > 0 else "voxel size (no qform or sform)"
    for axis in range(n_spatial):
        value = pixdim[axis + 1]
        if not np.isfinite(value) or value <= 0:
            problem = (
                "not a number"
                if np.isnan(value)
                else "infinite"
                if not np.isfinite(value)
                else "zero"
                if value == 0
                else "negative"
            )
            raise CTInputError(
                path, f"NIfTI {which} pixdim[{axis + 1}] (axis {AXES[axis]}) is {value:g}: {problem}", fix
            )
    if qform_code > 0:
        quat = np.asarray(
            [raw[k] for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")],
            dtype=np.float64,
        )
        if not np.all(np.isfinite(quat)):
            raise CTInputError(
                path, "NIfTI qform quaternion or offset holds NaN or Inf", "set a valid qform, or re-export the scan"
            )
        qfac = float(pixdim[0])
        if qfac < 0 and qfac != -1:
            # nibabel reads this as +1, the NIfTI C library as -1: the slice order is ambiguous.
            raise CTInputError(
                path,
                f"NIfTI qfac pixdim[0] is {qfac:g}, neither 1 nor -1: the slice direction is ambiguous",
                "set pixdim[0] to 1 or -1, as the slice order of the scan says, or re-export it",
            )
        return "NIfTI qform (pixdim)", []
    notes = [
        (
            "NIfTI header has no qform or sform (both codes 0): orientation and origin are not recorded, read as "
            "nibabel's default (LAS, centred)",
            "re-export the scan with its orientation, e.g. from the DICOM with dcm2niix",
        )
    ]
    return "NIfTI pixdim (no qform or sform)", notes


def _qform_disagreement(raw, fixed) -> list[tuple[str, str]]:
    """A warning when the qform puts the volume elsewhere (by > half a voxel) than the rigid
    approximation of the sform that a writer stores as qform (identical for a non-sheared sform)."""
    import nibabel as nib

    try:
        qform, sform = fixed.get_qform(), fixed.get_sform()
        rigid = nib.Nifti1Header()
        rigid.set_qform(sform)
        sform = rigid.get_qform()
    except Exception:
        return [
            (
                "NIfTI qform is invalid; read with the sform (as nibabel and MONAI do), tools that prefer the qform "
                "will fail or differ",
                "re-save the file with the qform set from the sform, e.g. nibabel img.set_qform(img.get_sform())",
            )
        ]
    shape = [max(int(n), 1) for n in raw["dim"][1:4]]
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    shift = float(np.max(np.linalg.norm((qform @ corners - sform @ corners)[:3], axis=0)))
    voxel = float(np.min(np.linalg.norm(sform[:3, :3], axis=0)))
    if not np.isfinite(shift) or shift > 0.5 * voxel:
        return [
            (
                f"NIfTI qform and sform disagree (by up to {shift:.3g} mm); read with the sform as nibabel and MONAI "
                "do, tools that prefer the qform see another geometry",
                "re-save the file with one geometry, e.g. nibabel img.set_qform(img.get_sform())",
            )
        ]
    return []


def _fmt_rows(rows: np.ndarray) -> str:
    return " ".join("(" + ",".join(f"{v:g}" for v in row) + ")" for row in rows)


# ----------------------------------------------------------------------------------------------
# NRRD


def _check_nrrd_header(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """Refuse a NRRD whose header gives no valid voxel size; ITK would read it as 1 mm."""
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception as exc:  # pynrrd raises its own NRRDError and plain ValueErrors
        raise CTInputError(
            path,
            f"unreadable NRRD header ({one_line(exc)})",
            "check that the file is complete; re-export or re-download it",
        ) from None
    dim = int(header.get("dimension", 0) or 0)
    fix = "give the header 'space: left-posterior-superior' and 'space directions', e.g. (0.7,0,0) (0,0.7,0) (0,0,2.5), or re-export the scan"
    n_spatial = min(dim, 3)
    directions = header.get("space directions")
    if directions is not None:
        directions = np.asarray(directions, dtype=np.float64)
        vectors = []
        for axis, row in enumerate(directions):
            if np.all(np.isnan(row)):
                continue  # "none": a non-spatial axis (e.g. vector components)
            if not np.all(np.isfinite(row)):
                raise CTInputError(
                    path, f"NRRD space direction of axis {axis} is ({','.join(f'{v:g}' for v in row)}): not finite", fix
                )
            if np.linalg.norm(row) <= 0:
                raise CTInputError(path, f"NRRD space direction of axis {axis} is zero: a voxel size of 0", fix)
            vectors.append(row)
        if len(vectors) < n_spatial:
            none_axes = [a for a, row in enumerate(directions) if np.all(np.isnan(row))]
            raise CTInputError(
                path, f"NRRD space direction of axis {none_axes[0]} is 'none': that axis has no voxel size", fix
            )
        matrix = np.asarray(vectors)
        if len(vectors) and np.linalg.matrix_rank(matrix, tol=1e-9 * float(np.max(np.abs(matrix)))) < len(vectors):
            raise CTInputError(path, f"NRRD space directions {_fmt_rows(matrix)} are not independent (singular)", fix)
        return "NRRD space directions", []
    spacings = header.get("spacings")
    if spacings is not None:
        spacings = np.asarray(spacings, dtype=np.float64)
        given = [(axis, v) for axis, v in enumerate(spacings) if not np.isnan(v)]  # NaN: no spacing (non-spatial axis)
        if len(given) < n_spatial:
            missing = [axis for axis, v in enumerate(spacings) if np.isnan(v)]
            raise CTInputError(path, f"NRRD spacing of axis {missing[0]} is nan: that axis has no voxel size", fix)
        for axis, value in given:
            if not np.isfinite(value) or value <= 0:
                raise CTInputError(
                    path,
                    f"NRRD spacing of axis {axis} is {value:g}: "
                    f"{'not finite' if not np.isfinite(value) else 'zero' if value == 0 else 'negative'}",
                    fix,
                )
        notes = [
            (
                "NRRD header gives spacings but no space directions: orientation and origin are not recorded, read as "
                "ITK's default (axes along LPS, origin 0)",
                "re-export the scan with 'space', 'space directions' and 'space origin'",
            )
        ]
        return "NRRD spacings", notes
    raise CTInputError(path, "NRRD header gives no voxel size (neither 'space directions' nor 'spacings')", fix)


# ----------------------------------------------------------------------------------------------
# MetaImage (MHA/MHD)


def _mha_header(path: Path) -> dict[str, str]:
    """``key -> value`` of a MetaImage text header, up to and including ElementDataFile."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(MHA_HEADER_BYTES).decode("latin-1")
    except OSError as exc:
        raise CTInputError(path, f"unreadable file ({one_line(exc)})", "check the path and its permissions") from None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            break  # binary data or garbage: the header ended without ElementDataFile
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields
    raise CTInputError(
        path,
        "MetaImage header has no ElementDataFile line (truncated, or not an MHA/MHD file)",
        "check that the file is complete; re-export or re-download it",
    )


def _numbers(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split()]
    except ValueError:
        return [float("nan")]


def _check_mha_header(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """Refuse an MHA/MHD without a positive, finite ElementSpacing (ITK would read 1 mm)."""
    fields = _mha_header(path)
    try:
        ndims = int(fields.get("NDims", "0"))
    except ValueError:
        ndims = 0
    n_spatial = min(ndims, 3) if ndims else 3
    fix = "set ElementSpacing in the header, e.g. 'ElementSpacing = 0.7 0.7 2.5', or re-export the scan"
    key = "ElementSpacing" if "ElementSpacing" in fields else "ElementSize" if "ElementSize" in fields else None
    if key is None:
        raise CTInputError(path, "MetaImage header gives no voxel size (no ElementSpacing line)", fix)
    tokens = fields[key].split()
    if len(tokens) < n_spatial:
        raise CTInputError(
            path, f"MetaImage {key} '{fields[key]}' gives {len(tokens)} value(s) for {n_spatial} axes", fix
        )
    for axis in range(n_spatial):
        value = _numbers(tokens[axis])[0]
        if not np.isfinite(value) or value <= 0:
            what = "not a finite number" if not np.isfinite(value) else "zero" if value == 0 else "negative"
            raise CTInputError(path, f"MetaImage {key} of axis {AXES[axis]} is {tokens[axis]}: {what}", fix)
    for name in ("TransformMatrix", "Rotation", "Orientation"):
        if name in fields:
            matrix = _numbers(fields[name])
            if len(matrix) == ndims * ndims and ndims >= 2:
                m = np.asarray(matrix).reshape(ndims, ndims)
                if not np.all(np.isfinite(m)) or abs(np.linalg.det(m)) < 1e-6:
                    raise CTInputError(
                        path,
                        f"MetaImage {name} '{fields[name]}' is not a valid rotation (singular or not finite)",
                        "set it to the direction cosines of the scan, e.g. 1 0 0 0 1 0 0 0 1, or re-export it",
                    )
    return f"MetaImage {key}", []


# ----------------------------------------------------------------------------------------------
# Reading through SimpleITK


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    try:
        with quiet_native_stderr():
            img = sitk.ReadImage(str(path))
    except Exception as exc:
        raise CTInputError(
            path,
            f"unreadable image file ({_itk_reason(exc)})",
            "check that the file is complete; re-export or re-download it",
        ) from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise CTInputError(
            path,
            f"image has {img.GetNumberOfComponentsPerPixel()} components per voxel",
            "a CT has one value per voxel; export a scalar volume",
        )
    dim = img.GetDimension()
    # SimpleITK arrays are (z, y, x); reverse to the (x, y, z) order of the affine.
    array = sitk.GetArrayViewFromImage(img).transpose(tuple(range(dim))[::-1]).copy()
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    affine_lps = np.eye(4)
    k = min(dim, 3)
    affine_lps[:k, :k] = (direction * spacing)[:k, :k]
    affine_lps[:k, 3] = origin[:k]
    return array, LPS_TO_RAS @ affine_lps


def _itk_reason(exc: BaseException) -> str:
    """The useful part of a SimpleITK exception: the text after its last "ERROR:" marker,
    without the source-file locations and object addresses around it."""
    import re

    text = " ".join(str(exc).split())
    tail = re.split(r"(?:sitk::|itk::|ITK )ERROR: ", text)[-1]
    tail = re.sub(r"^\w+\(0x[0-9a-fA-F]+\): ", "", tail)
    return one_line(tail or text)
