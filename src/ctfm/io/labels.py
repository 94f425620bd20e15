"""Label maps (segmentations) placed on the grid of a loaded CT.

>>> image, _ = load_ct("ct_folder/")                       # doctest: +SKIP
>>> seg = load_labels("seg.nii.gz", image)                 # doctest: +SKIP
>>> seg.labels.shape == image.shape, seg.names[5]          # doctest: +SKIP
(True, 'liver')

Whatever the file, the result lives on the image grid: same [1, X, Y, Z] shape, same affine.
Labels are placed through world coordinates (the two affines), never by assuming that the
file stores its voxels in the same order as the image: a LAS NIfTI written for an LPS DICOM
series holds the same voxels flipped along y, and copying indices would mirror the anatomy.

Supported: NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MHA/MHD, DICOM SEG and DICOM RTSTRUCT.
Where segments or ROIs overlap, the higher segment number / later ROI wins.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ctfm.errors import CTInputError, one_line, optional_import
from ctfm.io.volume import (
    LPS_TO_RAS,
    VOLUME_SUFFIXES,
    check_itk_header,
    quiet_native_stderr,
    quiet_nibabel,
    read_volume,
    volume_format,
)

if TYPE_CHECKING:
    from monai.data import MetaTensor

__all__ = [
    "LabelMap",
    "UnnamedLabelsWarning",
    "check_label_values",
    "label_names",
    "label_values",
    "name_values",
    "named_value",
    "unnamed_label_name",
    "load_labels",
    "rasterize_planar_contours",
    "require_same_grid",
    "resample_labels",
    "same_grid",
]

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.481.3"

_SUPPORTED = "a NIfTI, NRRD or MHA label map, a DICOM SEG or a DICOM RTSTRUCT file"

# A contour must sit within this many voxels of an image slice centre. Half a voxel would
# accept any contour (rounding always lands within 0.5); contours drawn on a finer series
# would then be merged onto one slice, where the even-odd fill lets them cancel each other.
CONTOUR_SLICE_TOLERANCE = 0.25

# Points per chunk in the general resampling path, to bound memory (3 int64 per point).
_RESAMPLE_CHUNK_POINTS = 2_000_000


@dataclass
class LabelMap:
    """A label map on the grid of an image.

    Attributes:
        labels: ``MetaTensor`` [1, X, Y, Z], torch.int16 (or int32 when values need it), with the
            image's affine; 0 is background.
        names: label value -> name; empty when the file names none.
        source_format: ``"nifti"``, ``"nrrd"``, ``"mha"``, ``"dicom-seg"`` or ``"rtstruct"``.
    """

    labels: MetaTensor
    names: dict[int, str]
    source_format: str


def load_labels(path: str | os.PathLike, image) -> LabelMap:
    """Read a label file and place it on the grid of ``image``.

    Args:
        path: NIfTI / NRRD / MHA / MHD label map, DICOM SEG file or DICOM RTSTRUCT file.
        image: ``MetaTensor`` [1, X, Y, Z] whose ``affine`` maps voxel indices to RAS mm.
            If ``image.meta["FrameOfReferenceUID"]`` is set, DICOM SEG / RTSTRUCT files must
            reference the same frame of reference.

    Returns:
        :class:`LabelMap` whose ``labels`` is [1, X, Y, Z] integer on the image grid. Volumes are
        resampled by nearest neighbour (an exact index mapping when the grids differ only by
        axis order and flips); voxels of the image outside the label file are 0. Names come
        from the file (NIfTI Caret/TotalSegmentator label table, Slicer NRRD segment keys, SEG
        SegmentLabel, RTSTRUCT ROIName); beside a volume file, ``<name>.json`` holding
        ``{"labels": {"1": "liver"}}`` adds to or overrides them.

    Raises:
        CTInputError: missing, unreadable or unsupported file; labels that do not overlap the
            image; a SEG/RTSTRUCT of another frame of reference; contours off the image slices.
    """
    path = Path(path)
    grid_affine, grid_shape = _image_grid(image)
    fmt = _detect_format(path)
    if fmt in ("nifti", "nrrd", "mha"):
        array, affine, names = _read_label_volume(path, fmt)
        names.update(_sidecar_names(path))
        labels = _volume_onto_grid(array, affine, grid_affine, grid_shape, path)
    elif fmt == "dicom-seg":
        labels, names = _dicom_seg_onto_grid(path, image, grid_affine, grid_shape)
    else:
        labels, names = _rtstruct_onto_grid(path, image, grid_affine, grid_shape)
    return LabelMap(labels=_to_metatensor(labels, image, path, fmt), names=names, source_format=fmt)


# ----------------------------------------------------------------------------------------------
# Grids and resampling


def label_names(path: str | os.PathLike) -> dict[int, str]:
    """The class names stored with a label file, no voxels read: a NIfTI header's label table (Caret /
    TotalSegmentator), 3D Slicer NRRD/MHA segment keys, DICOM SEG segment labels, RTSTRUCT ROI names,
    and a JSON sidecar beside a volume file (the sidecar wins). ``{}`` when the file names none."""
    path = Path(path)
    fmt = _detect_format(path)
    if fmt == "nifti":
        names = _nifti_header_names(path)
    elif fmt in ("nrrd", "mha"):
        names = _itk_header_names(path)
    else:
        names = _dicom_label_names(path, fmt)
    if fmt in ("nifti", "nrrd", "mha"):
        names.update(_sidecar_names(path))
    return names


class UnnamedLabelsWarning(UserWarning):
    """Label values that no file or class map names were given the names ``label_<value>``."""


_UNNAMED_RE = re.compile(r"label_(-?\d+)")


def unnamed_label_name(value: int) -> str:
    """The name of a label value that nothing names: ``label_<value>`` (``label_1``, ``label_26``)."""
    return f"label_{int(value)}"


def named_value(name: str) -> int | None:
    """The value an unnamed-label name stands for (``label_26`` -> 26), else None."""
    match = _UNNAMED_RE.fullmatch(str(name))
    return int(match.group(1)) if match else None


def name_values(values, names: dict[int, str] | None = None) -> tuple[dict[int, str], list[int]]:
    """``({0: "background", value: name, ...}, the values named label_<value>)`` for the non-zero ``values``.

    Values ``names`` holds keep their names; the others are called ``label_<value>``.
    """
    names = names or {}
    out = {0: names.get(0, "background")}
    unnamed = []
    for value in sorted({int(v) for v in values} - {0}):
        if names.get(value):
            out[value] = names[value]
        else:
            out[value] = unnamed_label_name(value)
            unnamed.append(value)
    return out, unnamed


def label_values(path: str | os.PathLike) -> np.ndarray:
    """Sorted unique integer values of a label file (0 included where present): the voxels of a
    NIfTI / NRRD / MHA label map, the segment numbers of a DICOM SEG or RTSTRUCT.

    Raises:
        CTInputError: a missing or unreadable file, non-integer values (a probability map).
    """
    path = Path(path)
    fmt = _detect_format(path)
    if fmt not in ("nifti", "nrrd", "mha"):
        return np.array(sorted({0, *label_names(path)}), dtype=np.int64)
    array, _, _ = _read_label_volume(path, fmt)
    return np.unique(array).astype(np.int64)


def check_label_values(values: np.ndarray, class_map: dict[int, str], path) -> None:
    """Refuse label values that the class map does not name."""
    present = np.unique(values)
    unknown = [int(v) for v in present if int(v) not in class_map]
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:8]) + (", ..." if len(unknown) > 8 else "")
        raise CTInputError(
            path,
            f"label values {shown} are not in the class map (values {min(class_map)}..{max(class_map)}, "
            f"{len(class_map) - 1} classes)",
            "give the class map these labels were made with (--set class_map=...), or fix the label map",
        )


def require_same_grid(label_path: Path, image) -> None:
    """Refuse a label volume whose voxel grid is not the image's (axis order and flips may differ).

    DICOM SEG / RTSTRUCT are placed by their frame of reference and not checked here.
    """

    if volume_format(label_path) is None:
        return
    array, affine, _ = read_volume(label_path)
    shape = tuple(array.shape[:3])
    grid = np.asarray(
        image.affine.detach().cpu().numpy() if hasattr(image.affine, "detach") else image.affine, dtype=np.float64
    )
    grid_shape = tuple(int(n) for n in image.shape[1:])
    if not same_grid(affine, shape, grid, grid_shape):
        spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
        grid_spacing = np.sqrt((grid[:3, :3] ** 2).sum(axis=0))
        raise CTInputError(
            label_path,
            f"label map on another grid than its image (labels {'x'.join(map(str, shape))} voxels of "
            f"{'x'.join(f'{v:.3g}' for v in spacing)} mm, "
            f"image {'x'.join(map(str, grid_shape))} of {'x'.join(f'{v:.3g}' for v in grid_spacing)} "
            f"mm{', origins differ' if shape == grid_shape else ''})",
            "give the label map made on this scan, or resample it onto the scan's grid first",
        )


def same_grid(affine_a, shape_a, affine_b, shape_b, tolerance: float = 1e-3) -> bool:
    """True when two grids hold the same voxel centres (one may be the other with axes permuted or flipped)."""
    a_to_b = np.linalg.inv(np.asarray(affine_b, dtype=np.float64)) @ np.asarray(affine_a, dtype=np.float64)
    rotation, offset = a_to_b[:3, :3], a_to_b[:3, 3]
    permutation = np.rint(rotation)
    if not (np.all(np.abs(permutation).sum(axis=0) == 1) and np.all(np.abs(permutation).sum(axis=1) == 1)):
        return False
    if np.abs(rotation - permutation).max() * max(max(shape_a), 1) > tolerance:
        return False
    corners_a = np.array(np.meshgrid(*[[0, n - 1] for n in shape_a], indexing="ij")).reshape(3, -1)
    mapped = permutation @ corners_a + offset[:, None]
    if np.abs(mapped - np.rint(mapped)).max() > tolerance * 10:
        return False
    low, high = np.rint(mapped).min(axis=1), np.rint(mapped).max(axis=1)
    return bool(np.all(low == 0) and np.all(high == np.asarray(shape_b) - 1))


def resample_labels(
    labels: np.ndarray, labels_affine: np.ndarray, grid_affine: np.ndarray, grid_shape: Sequence[int]
) -> np.ndarray:
    """Nearest-neighbour resampling of a label array onto another grid; outside is 0.

    Args:
        labels: [I, J, K] integer array.
        labels_affine, grid_affine: 4x4 voxel-index -> world-mm affines (same world convention).
        grid_shape: (X, Y, Z) of the target grid.

    Returns:
        [X, Y, Z] array of ``labels.dtype``.
    """
    return _resample_nearest(labels, labels_affine, grid_affine, tuple(grid_shape))[0]


def _resample_nearest(
    src: np.ndarray,
    src_affine: np.ndarray,
    grid_affine: np.ndarray,
    grid_shape: tuple[int, int, int],
    allow_index_mapping: bool = True,
) -> tuple[np.ndarray, int]:
    """``(resampled [X, Y, Z], number of grid voxels that fall inside the source grid)``."""
    # grid index -> source index
    grid_to_src = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(grid_affine, dtype=np.float64)
    rotation, offset = grid_to_src[:3, :3], grid_to_src[:3, 3]
    permutation = np.rint(rotation)
    # Exact index mapping when the grids differ by axis order, flips and a shift: the error
    # accumulated over the whole grid must stay far below the half voxel where rounding flips.
    is_signed_permutation = (
        np.all(np.abs(permutation).sum(axis=0) == 1)
        and np.all(np.abs(permutation).sum(axis=1) == 1)
        and np.abs(rotation - permutation).max() * max(grid_shape) < 1e-3
    )
    if allow_index_mapping and is_signed_permutation:
        return _index_mapping(src, permutation, offset, grid_shape)
    return _nearest_general(src, rotation, offset, grid_shape)


def _index_mapping(src: np.ndarray, permutation: np.ndarray, offset: np.ndarray, grid_shape) -> tuple[np.ndarray, int]:
    """Copy voxels through a signed axis permutation plus an integer shift (no interpolation)."""
    src_axes = [int(np.argmax(np.abs(permutation[:, axis]))) for axis in range(3)]
    src_t = np.transpose(src, src_axes)  # axis a of src_t runs along grid axis a
    indices, inside = [], []
    for axis, src_axis in enumerate(src_axes):
        sign = permutation[src_axis, axis]
        # floor(sign*i + t + 0.5) == sign*i + floor(t + 0.5) since sign*i is an integer
        index = (sign * np.arange(grid_shape[axis]) + np.floor(offset[src_axis] + 0.5)).astype(np.int64)
        valid = (index >= 0) & (index < src.shape[src_axis])
        indices.append(index[valid])
        inside.append(valid)
    out = np.zeros(grid_shape, dtype=src.dtype)
    n_inside = int(np.prod([valid.sum() for valid in inside]))
    if n_inside:
        out[np.ix_(*inside)] = src_t[np.ix_(*indices)]
    return out, n_inside


def _nearest_general(src: np.ndarray, rotation: np.ndarray, offset: np.ndarray, grid_shape) -> tuple[np.ndarray, int]:
    """Nearest neighbour for any affine relation (oblique, other spacing), chunked along z."""
    out = np.zeros(grid_shape, dtype=src.dtype)
    nx, ny, nz = grid_shape
    xy = np.stack(np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij"), axis=-1).reshape(-1, 2).astype(np.float64)
    src_shape = np.asarray(src.shape)
    step = max(1, _RESAMPLE_CHUNK_POINTS // max(1, nx * ny))
    n_inside = 0
    for z0 in range(0, nz, step):
        zs = np.arange(z0, min(nz, z0 + step), dtype=np.float64)
        points = np.concatenate([np.tile(xy, (len(zs), 1)), np.repeat(zs, nx * ny)[:, None]], axis=1)
        # floor(x + 0.5): round half up, the same rule as the index-mapping path
        index = np.floor(points @ rotation.T + offset + 0.5).astype(np.int64)
        valid = np.all((index >= 0) & (index < src_shape), axis=1)
        n_inside += int(valid.sum())
        chunk = np.zeros(len(points), dtype=src.dtype)
        chunk[valid] = src[index[valid, 0], index[valid, 1], index[valid, 2]]
        # points run y fastest, then x (meshgrid "ij" flattened), then z
        out[:, :, z0 : z0 + len(zs)] = chunk.reshape(len(zs), nx, ny).transpose(1, 2, 0)
    return out, n_inside


def _volume_onto_grid(array, affine, grid_affine, grid_shape, path: Path) -> np.ndarray:
    """Resample a label volume onto the image grid; refuse when the two do not overlap."""
    out, n_inside = _resample_nearest(array, affine, grid_affine, grid_shape)
    if n_inside == 0:
        raise CTInputError(
            path,
            f"the label map does not overlap the image (labels span {_extent_text(affine, array.shape)}, "
            f"the image {_extent_text(grid_affine, grid_shape)}, RAS mm)",
            "give the label map made for this scan; check that both files carry their real origin",
        )
    if not out.any() and array.any():
        warnings.warn(
            f"{path}: no labelled voxel falls inside the image (the grids overlap only in background)", stacklevel=3
        )
    return out


def _extent_text(affine: np.ndarray, shape) -> str:
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    low, high = world.min(axis=1), world.max(axis=1)
    return " x ".join(f"[{a:.0f}, {b:.0f}]" for a, b in zip(low, high))


def _image_grid(image) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RAS affine (4x4 float64) and (X, Y, Z) of a [1, X, Y, Z] image."""
    if getattr(image, "affine", None) is None or getattr(image, "ndim", 0) != 4 or image.shape[0] != 1:
        raise ValueError(
            f"image must be a MetaTensor of shape [1, X, Y, Z] with an affine, got {type(image).__name__} of shape "
            f"{tuple(getattr(image, 'shape', ()))}"
        )
    affine = image.affine
    affine = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine, dtype=np.float64)
    if affine.shape != (4, 4):
        affine = affine.reshape(-1, 4, 4)[0]  # a batched affine of a single image
    return affine, tuple(int(n) for n in image.shape[1:])


def _to_metatensor(labels: np.ndarray, image, path: Path, fmt: str):
    import torch
    from monai.data import MetaTensor

    image_meta = getattr(image, "meta", {}) or {}
    affine = torch.as_tensor(_image_grid(image)[0], dtype=torch.float64)
    original_affine = image_meta.get("original_affine", affine)
    meta = {
        "filename_or_obj": str(path),
        # the labels share the image's grid, hence its original orientation for saving
        "original_affine": original_affine.clone() if hasattr(original_affine, "clone") else np.array(original_affine),
        "spatial_shape": np.asarray(labels.shape),
        "space": image_meta.get("space", "RAS"),
        "original_channel_dim": "no_channel",
        "format": fmt,
    }
    if image_meta.get("FrameOfReferenceUID"):
        meta["FrameOfReferenceUID"] = image_meta["FrameOfReferenceUID"]
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(labels))[None], affine=affine, meta=meta)


# ----------------------------------------------------------------------------------------------
# File types


def _detect_format(path: Path) -> str:
    """``"nifti"``, ``"nrrd"``, ``"mha"``, ``"dicom-seg"`` or ``"rtstruct"``, by name then content."""
    if not path.exists():
        raise CTInputError(path, "no such file", "check the path")
    if path.is_dir():
        raise CTInputError(path, "is a folder, not a label file", f"give {_SUPPORTED}")
    fmt = volume_format(path)
    if fmt is not None:
        return fmt
    try:
        with open(path, "rb") as fh:
            head = fh.read(352)
    except OSError as exc:
        raise CTInputError(path, f"cannot read the file ({exc.strerror})", "check the file permissions") from None
    # The volume readers pick the format by file name; name such files rather than fail later.
    if head[:4] == b"NRRD":
        raise CTInputError(path, "a NRRD file whose name does not end in .nrrd or .nhdr", "rename it to end in .nrrd")
    gzipped = head[:2] == b"\x1f\x8b"
    if gzipped:
        try:
            with gzip.open(path, "rb") as fh:
                head = fh.read(352)
        except OSError:
            head = b""
    if head[344:348] in (b"n+1\x00", b"ni1\x00"):
        raise CTInputError(
            path,
            "a NIfTI file whose name does not end in .nii or .nii.gz",
            f"rename it to end in {'.nii.gz' if gzipped else '.nii'}",
        )
    return _dicom_kind(path, head)


def _dicom_kind(path: Path, head: bytes) -> str:
    import pydicom

    ds = None
    # Files without the Part 10 preamble occur; accept them when named .dcm.
    if head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            ds = None
    sop_class = str(getattr(ds, "SOPClassUID", "")) if ds is not None else ""
    if sop_class == SEG_SOP_CLASS_UID:
        return "dicom-seg"
    if sop_class == RTSTRUCT_SOP_CLASS_UID:
        return "rtstruct"
    if ds is not None and sop_class:
        kind = getattr(ds.SOPClassUID, "name", sop_class)
        raise CTInputError(
            path, f"DICOM {kind} (modality {ds.get('Modality', '?')}), not a segmentation", f"give {_SUPPORTED}"
        )
    raise CTInputError(path, "not a label file this reader knows (by name or content)", f"give {_SUPPORTED}")


# ----------------------------------------------------------------------------------------------
# Label volumes: NIfTI, NRRD, MHA


def _read_label_volume(path: Path, fmt: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """``(integer array [I, J, K], RAS affine, names)`` of a volume file."""
    names = _nifti_header_names(path) if fmt == "nifti" else _itk_header_names(path)
    array, affine, _ = read_volume(path)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise CTInputError(
            path,
            f"label map of shape {tuple(array.shape)} holds several volumes",
            "give one 3D label map (combine the channels into label values)",
        )
    return _integer_labels(array, path), affine, names


def _nifti_header_names(path: Path) -> dict[int, str]:
    """Names from the Caret / TotalSegmentator label table in the header extensions (no voxels read)."""
    import nibabel as nib

    try:
        with quiet_nibabel():
            extensions = nib.load(str(path)).header.extensions
    except Exception as exc:  # nibabel raises many types for damaged files
        raise CTInputError(
            path, f"unreadable NIfTI header ({one_line(exc)})", "check that the file is complete; re-export it"
        ) from None
    names: dict[int, str] = {}
    for extension in extensions:
        names.update(parse_label_table(extension.get_content()))
    return names


def _itk_header_names(path: Path) -> dict[int, str]:
    """Names from 3D Slicer NRRD keys (header only); refuses multi-layer segmentations."""
    import SimpleITK as sitk

    check_itk_header(path)  # a voxel size ITK would invent is refused as such, not as "unreadable"
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_native_stderr():
            reader.ReadImageInformation()
    except Exception as exc:
        raise CTInputError(
            path, f"unreadable image header ({one_line(exc)})", "check that the file is complete; re-export it"
        ) from None
    if reader.GetNumberOfComponents() != 1:
        # read_volume would refuse it too, but as a CT; say what it means for a segmentation.
        raise CTInputError(
            path,
            f"segmentation with {reader.GetNumberOfComponents()} layers (overlapping segments)",
            "export a single labelmap, e.g. in 3D Slicer: Segmentations > Export to files > labelmap",
        )
    return _slicer_segment_names({key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()})


def _integer_labels(array: np.ndarray, path: Path) -> np.ndarray:
    """int16 (int32 when needed) copy; refuse non-integer values such as probability maps."""
    if array.dtype == bool:
        return array.astype(np.int16)
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all() or not np.array_equal(np.rint(array), array):
            sample = array[finite & (np.rint(array) != array)]
            example = f", e.g. {float(sample.flat[0]):.3g}" if sample.size else " (NaN or infinite)"
            raise CTInputError(
                path,
                f"label map holds non-integer values{example}; a probability map or an interpolated image?",
                "threshold it or export an integer label map",
            )
    elif array.dtype.kind not in "iu":
        raise CTInputError(path, f"label map of data type {array.dtype}", "export an integer label map")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low >= np.iinfo(np.int16).min and high <= np.iinfo(np.int16).max:
        return array.astype(np.int16)
    if low >= np.iinfo(np.int32).min and high <= np.iinfo(np.int32).max:
        return array.astype(np.int32)
    raise CTInputError(path, f"label values up to {high} do not fit in int32", "renumber the labels")


_LABEL_RE = re.compile(r"<Label\b([^>]*)>\s*(?:<!\[CDATA\[(.*?)\]\]>|([^<]*?))\s*</Label>", re.DOTALL | re.IGNORECASE)
_KEY_RE = re.compile(r"\bKey\s*=\s*\"(-?\d+)\"", re.IGNORECASE)


def parse_label_table(content: bytes | str) -> dict[int, str]:
    """Names from a Caret / TotalSegmentator NIfTI header extension (XML ``<LabelTable>``).

    Entries look like ``<Label Key="5" Red="0" ...><![CDATA[liver]]></Label>``; anything else
    yields ``{}``.
    """
    text = content.decode("utf-8", errors="replace") if isinstance(content, bytes) else str(content)
    if "<Label" not in text:
        return {}
    names = {}
    for attributes, cdata, plain in _LABEL_RE.findall(text):
        key = _KEY_RE.search(attributes)
        name = cdata if cdata else html.unescape(plain)
        if key and name.strip():
            names[int(key.group(1))] = name.strip()
    return names


def _slicer_segment_names(metadata: dict[str, str]) -> dict[int, str]:
    """Names from 3D Slicer segmentation NRRD keys ``SegmentN_Name`` / ``SegmentN_LabelValue``."""
    names = {}
    for key, value in metadata.items():
        match = re.fullmatch(r"Segment(\d+)_Name", key)
        if not match:
            continue
        label = metadata.get(f"Segment{match.group(1)}_LabelValue", "").strip()
        if label.lstrip("-").isdigit():
            names[int(label)] = value.strip()
    return names


def _sidecar_names(path: Path) -> dict[int, str]:
    """Names from ``<file without .nii.gz/.nrrd/...>.json`` holding ``{"labels": {"1": "liver"}}``."""
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    sidecar = path.with_name(name + ".json")
    if not sidecar.is_file():
        return {}
    try:
        table = json.loads(sidecar.read_text(encoding="utf-8"))
        table = table.get("labels", table)
        return {int(key): str(value) for key, value in table.items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise CTInputError(
            sidecar,
            f"label names file is not a JSON object of label -> name ({one_line(exc)})",
            'write {"labels": {"1": "liver", ...}}',
        ) from None


# ----------------------------------------------------------------------------------------------
# DICOM SEG


def _dicom_seg_onto_grid(path: Path, image, grid_affine, grid_shape) -> tuple[np.ndarray, dict[int, str]]:
    """Label array [X, Y, Z] and names of a DICOM SEG; the higher segment number wins overlaps."""
    hd = optional_import("highdicom", "dicom-seg", "reading DICOM SEG labels")
    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:
        raise CTInputError(
            path, f"unreadable DICOM SEG ({one_line(exc)})", "check that the file is complete; re-export it"
        ) from None
    _check_frame_of_reference(path, "DICOM SEG", [getattr(seg, "FrameOfReferenceUID", None)], image)
    numbers = sorted(int(n) for n in seg.segment_numbers)
    if not numbers:
        raise CTInputError(path, "DICOM SEG holds no segments", "re-export the segmentation")
    names = {n: str(seg.get_segment_description(n).SegmentLabel) for n in numbers}
    try:
        if seg.segmentation_type.value == "FRACTIONAL":
            # Each segment is a probability/occupancy in [0, 1]: keep >= 0.5, higher number wins.
            volume = seg.get_volume(combine_segments=False, segment_numbers=numbers, dtype=np.float32)
            array = np.zeros(volume.spatial_shape, dtype=np.int32)
            for channel, number in enumerate(numbers):
                array[volume.array[..., channel] >= 0.5] = number
        else:
            # skip_overlap_checks: highdicom then lets the highest segment number win overlaps.
            volume = seg.get_volume(combine_segments=True, skip_overlap_checks=True, dtype=np.int32)
            array = volume.array
    except Exception as exc:  # highdicom raises ValueError/RuntimeError for irregular frame sets
        raise CTInputError(
            path,
            f"the frames of the DICOM SEG do not form a regular 3D volume ({one_line(exc)})",
            "re-export the segmentation on the slices of a regular CT series",
        ) from None
    # highdicom's Volume: array axes (slice, row, column), affine from those indices to LPS mm.
    labels = _volume_onto_grid(_integer_labels(array, path), LPS_TO_RAS @ volume.affine, grid_affine, grid_shape, path)
    return labels, names


def _dicom_label_names(path: Path, fmt: str) -> dict[int, str]:
    """Segment labels of a DICOM SEG (by segment number) or ROI names of an RTSTRUCT (1..N, the order
    :func:`load_labels` gives them), read from the header only."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if fmt == "dicom-seg":
            return {
                int(item.SegmentNumber): str(item.get("SegmentLabel", f"segment {item.SegmentNumber}"))
                for item in ds.get("SegmentSequence", [])
            }
        return {
            index + 1: str(roi.get("ROIName", f"ROI {roi.ROINumber}"))
            for index, roi in enumerate(ds.get("StructureSetROISequence", []))
        }
    except Exception as exc:
        raise CTInputError(
            path, f"unreadable {fmt} header ({one_line(exc)})", "check that the file is complete; re-export it"
        ) from None


def _check_frame_of_reference(path: Path, kind: str, uids, image) -> None:
    meta = getattr(image, "meta", None) or {}
    image_uid = meta.get("FrameOfReferenceUID")
    if isinstance(image_uid, (list, tuple)):  # collated batch of one
        image_uid = image_uid[0] if image_uid else None
    if not image_uid:
        return
    others = sorted({str(uid) for uid in uids if uid and str(uid) != str(image_uid)})
    if others:
        raise CTInputError(
            path,
            f"{kind} references frame of reference {others[0]}, the image is in {image_uid}",
            "give the segmentation made on this scan (same FrameOfReferenceUID), or register it first",
        )


# ----------------------------------------------------------------------------------------------
# DICOM RTSTRUCT


def _rtstruct_onto_grid(path: Path, image, grid_affine, grid_shape) -> tuple[np.ndarray, dict[int, str]]:
    """Rasterise every ROI; label = position of the ROI in StructureSetROISequence (1..N)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True)
        rois = list(ds.get("StructureSetROISequence", []))
        label_of_roi = {int(roi.ROINumber): index + 1 for index, roi in enumerate(rois)}
        names = {index + 1: str(roi.get("ROIName", f"ROI {roi.ROINumber}")) for index, roi in enumerate(rois)}
        contours: dict[int, list[np.ndarray]] = {}
        for roi_contour in ds.get("ROIContourSequence", []):
            label = label_of_roi.get(int(roi_contour.ReferencedROINumber))
            for contour in roi_contour.get("ContourSequence", []):
                # POINT and OPEN_PLANAR contours enclose nothing; only closed planar ones are filled.
                if label is None or contour.get("ContourGeometricType", "CLOSED_PLANAR") != "CLOSED_PLANAR":
                    continue
                contours.setdefault(label, []).append(np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3))
    except Exception as exc:
        raise CTInputError(
            path, f"unreadable RTSTRUCT ({one_line(exc)})", "check that the file is complete; re-export it"
        ) from None
    if not rois:
        raise CTInputError(path, "RTSTRUCT holds no ROIs", "re-export the structure set")
    frame_uids = [roi.get("ReferencedFrameOfReferenceUID") for roi in rois]
    _check_frame_of_reference(path, "RTSTRUCT", frame_uids, image)
    if not contours:
        raise CTInputError(
            path, "RTSTRUCT holds no closed planar contours", "re-export the structure set with its contours"
        )
    dtype = np.int16 if len(rois) <= np.iinfo(np.int16).max else np.int32
    labels = np.zeros(grid_shape, dtype=dtype)
    drawn = 0
    for label in sorted(contours):  # ascending, so the later ROI wins where ROIs overlap
        mask, n_drawn = _rasterize(contours[label], grid_affine, grid_shape, path)
        labels[mask] = label
        drawn += n_drawn
    if drawn == 0:
        raise CTInputError(
            path, "no RTSTRUCT contour lies within the image's slices", "give the RTSTRUCT drawn on this scan"
        )
    if not labels.any():
        warnings.warn(f"{path}: the RTSTRUCT contours enclose no voxel centre of the image", stacklevel=3)
    return labels, names


def rasterize_planar_contours(
    contours_lps: Sequence[np.ndarray],
    grid_affine: np.ndarray,
    grid_shape: Sequence[int],
    source: str | os.PathLike | None = None,
) -> np.ndarray:
    """Fill closed planar contours on a grid with the even-odd rule (inner contours are holes).

    Args:
        contours_lps: each an [N, 3] array of points in DICOM LPS mm (RTSTRUCT ContourData).
        grid_affine: 4x4 voxel index -> RAS mm affine of the grid.
        grid_shape: (X, Y, Z).
        source: file named in errors.

    Returns:
        [X, Y, Z] bool mask: voxels whose centre lies inside. Contours beyond the grid's slice
        range are skipped.

    Raises:
        CTInputError: a contour does not lie on a slice of the grid (within
            ``CONTOUR_SLICE_TOLERANCE`` voxels).
    """
    return _rasterize(contours_lps, np.asarray(grid_affine, dtype=np.float64), tuple(grid_shape), source)[0]


def _rasterize(contours_lps, grid_affine, grid_shape, source) -> tuple[np.ndarray, int]:
    """``(mask [X, Y, Z], number of contours inside the grid's slice range)``."""
    world_to_voxel = np.linalg.inv(grid_affine) @ LPS_TO_RAS
    polygons_by_slice: dict[tuple[int, int], list[np.ndarray]] = {}
    for points in contours_lps:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        if len(points) < 3:
            continue
        voxels = points @ world_to_voxel[:3, :3].T + world_to_voxel[:3, 3]
        slice_axis, slice_index, off = _contour_slice(voxels)
        if off > CONTOUR_SLICE_TOLERANCE:
            raise CTInputError(
                source,
                f"the RTSTRUCT does not match the image slices: a contour lies {off:.2f} voxel off the nearest slice "
                f"(near z = {points[0, 2]:.2f} mm LPS)",
                "give the image series the structure set was drawn on",
            )
        if 0 <= slice_index < grid_shape[slice_axis]:
            plane_axes = [axis for axis in range(3) if axis != slice_axis]
            polygons_by_slice.setdefault((slice_axis, slice_index), []).append(voxels[:, plane_axes])
    mask = np.zeros(grid_shape, dtype=bool)
    for (slice_axis, slice_index), polygons in polygons_by_slice.items():
        plane_shape = tuple(n for axis, n in enumerate(grid_shape) if axis != slice_axis)
        index = [slice(None)] * 3
        index[slice_axis] = slice_index
        mask[tuple(index)] = _fill_even_odd(polygons, plane_shape)
    return mask, sum(len(polygons) for polygons in polygons_by_slice.values())


def _contour_slice(voxels: np.ndarray) -> tuple[int, int, float]:
    """``(slice axis, slice index, distance in voxels of the farthest point from that slice)``.

    The slice axis is z when the contour lies on a z slice (axial contours on an axial series);
    otherwise x or y, so that contours also land on images stored sagittally or coronally. When
    the contour lies on no slice, the z answer is returned for the error message.
    """
    candidates = []
    for axis in (2, 0, 1):
        index = int(np.floor(voxels[:, axis].mean() + 0.5))
        off = float(np.abs(voxels[:, axis] - index).max())
        if off <= CONTOUR_SLICE_TOLERANCE:
            return axis, index, off
        candidates.append((axis, index, off))
    return candidates[0]


def _fill_even_odd(polygons: Sequence[np.ndarray], plane_shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of polygons [N, 2] (voxel coordinates (a, b)) on a plane [A, B].

    A voxel is inside when its centre (integer coordinates) is. We scan lines of constant b:
    each polygon edge that crosses a line toggles every voxel at and beyond the crossing, so the
    parity of the toggles marks the inside, and overlapping contours (holes) cancel.
    PIL's ImageDraw.polygon would be shorter but rounds vertices to whole voxels and fills the
    boundary, which grows small ROIs by up to a voxel on each side.
    """
    size_a, size_b = plane_shape
    toggles = np.zeros((size_b, size_a + 1), dtype=np.int32)
    for polygon in polygons:
        start = polygon
        end = np.roll(polygon, -1, axis=0)
        (a0, b0), (a1, b1) = start.T, end.T
        low, high = np.minimum(b0, b1), np.maximum(b0, b1)
        lines = np.arange(size_b, dtype=np.float64)
        # half-open [low, high) so a vertex shared by two edges is counted once; flat edges never cross
        crosses = (lines[:, None] >= low[None, :]) & (lines[:, None] < high[None, :])
        line_index, edge_index = np.nonzero(crosses)
        if line_index.size == 0:
            continue
        t = (lines[line_index] - b0[edge_index]) / (b1[edge_index] - b0[edge_index])
        a_cross = a0[edge_index] + t * (a1[edge_index] - a0[edge_index])
        first_inside = np.clip(np.ceil(a_cross), 0, size_a).astype(np.int64)
        np.add.at(toggles, (line_index, first_inside), 1)
    inside = (np.cumsum(toggles, axis=1)[:, :size_a] % 2) == 1
    return inside.T  # [A, B]
