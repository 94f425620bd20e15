"""Scans as the viewer shows them: reoriented to RAS, windowed, cut into PNG slices.

A scan is loaded once (``ctfm.io.load_ct``), reoriented to its closest-canonical (RAS) grid and
kept as int16 HU: in memory (the last few scans shown) and in the server's own folder as a
memory-mapped ``.npy`` (:func:`save_display`), so that choosing any scan again, or after a
restart, draws its first slice without decoding the source (DICOM, JPEG 2000, gzip) again. Slices follow
radiological convention: axial seen from the feet (patient's right on the viewer's left,
anterior up), coronal seen from the front (right on the left, superior up), sagittal seen from
the patient's left (anterior on the left, superior up).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctfm.errors import OptionError, optional_import

Image = optional_import("PIL.Image", "app")
colormaps = optional_import("matplotlib", "app").colormaps

# name -> (level, width) in HU: the usual presets of a CT workstation.
WINDOWS = {
    "soft": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
AXES = ("sagittal", "coronal", "axial")  # the RAS array axis each view cuts across: 0, 1, 2


@dataclass
class DisplayVolume:
    """One scan on its closest-RAS grid: ``hu`` int16 [X, Y, Z], ``affine`` voxel -> RAS mm."""

    hu: np.ndarray
    affine: np.ndarray
    to_ras: np.ndarray  # nibabel orientation of the source array axes (for grids on the source array)
    source_shape: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)

    @property
    def spacing_mm(self) -> list[float]:
        return [float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0)]

    def geometry(self) -> dict:
        """What the page needs to map clicks to world mm and back."""
        return {
            "shape": list(self.shape),
            "spacing_mm": self.spacing_mm,
            "affine": self.affine.tolist(),
            "inverse_affine": np.linalg.inv(self.affine).tolist(),
            "axes": list(AXES),
        }

    def voxel_of(self, point_mm) -> np.ndarray:
        """Nearest display voxel [3] of a RAS point (may lie outside the grid)."""
        ijk = np.linalg.solve(self.affine, np.append(np.asarray(point_mm, dtype=np.float64), 1.0))[:3]
        return np.round(ijk).astype(int)

    def contains(self, point_mm) -> bool:
        ijk = self.voxel_of(point_mm)
        return bool(np.all(ijk >= 0) and np.all(ijk < np.asarray(self.shape)))

    def reorient(self, volume: np.ndarray) -> np.ndarray:
        """A [X, Y, Z] array on the scan's source grid -> the same array on the display grid."""
        from nibabel.orientations import apply_orientation

        if tuple(volume.shape) != self.source_shape:
            raise ValueError(f"array of shape {volume.shape} is not on the source grid {self.source_shape}")
        return apply_orientation(volume, self.to_ras)

    def view(self, volume: np.ndarray, axis: str, index: int) -> np.ndarray:
        """The [rows, cols] image of a display-grid array for one view, radiological convention."""
        check_axis(axis)
        n = self.shape[AXES.index(axis)]
        if not 0 <= index < n:
            raise OptionError(f"slice index {index} is outside the {axis} range 0..{n - 1}")
        if axis == "axial":
            return volume[::-1, ::-1, index].T
        if axis == "coronal":
            return volume[::-1, index, ::-1].T
        return volume[index, ::-1, ::-1].T

    def pixel_mm(self, axis: str) -> tuple[float, float]:
        """(row, column) pixel size in mm of a view."""
        sx, sy, sz = self.spacing_mm
        return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[axis]


def check_axis(axis: str) -> None:
    if axis not in AXES:
        raise OptionError(f"axis {axis!r}: expected one of {', '.join(AXES)}")


def check_window(window: str) -> tuple[float, float]:
    if window not in WINDOWS:
        raise OptionError(f"window {window!r}: expected one of {', '.join(WINDOWS)}")
    return WINDOWS[window]


def to_display(image) -> DisplayVolume:
    """A loaded [1, X, Y, Z] HU MetaTensor -> its :class:`DisplayVolume` (closest RAS grid)."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    array = np.asarray(image[0] if image.ndim == 4 else image, dtype=np.float32)
    affine = np.asarray(image.affine, dtype=np.float64)
    ornt = io_orientation(affine)
    hu = apply_orientation(np.clip(np.rint(array), -32768, 32767).astype(np.int16), ornt)
    return DisplayVolume(
        np.ascontiguousarray(hu), affine @ inv_ornt_aff(ornt, array.shape), ornt, tuple(int(s) for s in array.shape)
    )


def windowed(image: np.ndarray, window: str) -> np.ndarray:
    """HU [rows, cols] -> uint8 grey levels of a named window."""
    level, width = check_window(window)
    low = level - width / 2.0
    return (np.clip((image.astype(np.float32) - low) / width, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def png_bytes(pixels: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    """uint8 [rows, cols] (grey) or [rows, cols, 4] (RGBA) -> PNG; ``size`` (w, h) resizes first."""
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if size is not None:
        image = image.resize(size, Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def render_slice(volume: DisplayVolume, axis: str, index: int, window: str, max_size: int | None = None) -> bytes:
    """One view of a scan as a PNG: voxel resolution, or at most ``max_size`` px on the longer
    side with square millimetres (thumbnails)."""
    pixels = windowed(volume.view(volume.hu, axis, index), window)
    return png_bytes(pixels, _thumbnail_size(volume, axis, pixels.shape, max_size))


def _thumbnail_size(volume: DisplayVolume, axis: str, shape, max_size: int | None):
    if max_size is None:
        return None
    row_mm, col_mm = volume.pixel_mm(axis)
    height_mm, width_mm = shape[0] * row_mm, shape[1] * col_mm
    scale = max_size / max(height_mm, width_mm)
    return max(1, round(width_mm * scale)), max(1, round(height_mm * scale))


def colour_overlay(values: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """Similarity [rows, cols] in [0, 1] (NaN: no data) -> RGBA uint8, magma colours; low values
    are transparent so the anatomy stays visible."""
    finite = np.nan_to_num(values, nan=0.0)
    rgba = colormaps["magma"](np.clip(finite, 0.0, 1.0))
    rgba[..., 3] = np.where(np.isfinite(values), opacity * np.clip(finite, 0.0, 1.0) ** 0.5, 0.0)
    return (rgba * 255.0 + 0.5).astype(np.uint8)


def save_display(volume: DisplayVolume, folder: Path, stem: str) -> None:
    """Write a display volume as ``stem.npy`` (int16 HU) + ``stem.json`` (geometry), each
    complete or absent (the JSON is renamed into place last, and marks the entry complete)."""
    import json
    import os
    import uuid

    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    array_tmp, meta_tmp = folder / f".{stem}.{token}.npy", folder / f".{stem}.{token}.json"
    try:
        np.save(array_tmp, volume.hu)
        meta_tmp.write_text(
            json.dumps(
                {
                    "affine": volume.affine.tolist(),
                    "to_ras": volume.to_ras.tolist(),
                    "source_shape": list(volume.source_shape),
                    "shape": list(volume.shape),
                }
            )
        )
        os.replace(array_tmp, folder / f"{stem}.npy")
        os.replace(meta_tmp, folder / f"{stem}.json")
    finally:
        array_tmp.unlink(missing_ok=True)
        meta_tmp.unlink(missing_ok=True)


def load_display(folder: Path, stem: str) -> DisplayVolume | None:
    """A display volume written by :func:`save_display`, memory-mapped; None when absent or damaged."""
    import json

    meta_path, array_path = folder / f"{stem}.json", folder / f"{stem}.npy"
    try:
        meta = json.loads(meta_path.read_text())
        hu = np.load(array_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if list(hu.shape) != meta.get("shape") or hu.dtype != np.int16:
        return None
    return DisplayVolume(
        hu,
        np.asarray(meta["affine"], dtype=np.float64),
        np.asarray(meta["to_ras"], dtype=np.float64),
        tuple(meta["source_shape"]),
    )


class DisplayVolumeCache:
    """The last ``capacity`` scans shown, by store id (loaded at most once at a time each)."""

    def __init__(self, loader, capacity: int = 12):
        self._loader = loader  # scan_id -> DisplayVolume
        self._capacity = capacity
        self._items: OrderedDict[str, DisplayVolume] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, scan_id: str) -> DisplayVolume:
        with self._lock:
            if scan_id in self._items:
                self._items.move_to_end(scan_id)
                return self._items[scan_id]
            gate = self._loading.setdefault(scan_id, threading.Lock())
        with gate:
            with self._lock:
                if scan_id in self._items:
                    return self._items[scan_id]
            volume = self._loader(scan_id)
            with self._lock:
                self._items[scan_id] = volume
                while len(self._items) > self._capacity:
                    self._items.popitem(last=False)
                self._loading.pop(scan_id, None)
            return volume

    def __contains__(self, scan_id: str) -> bool:
        with self._lock:
            return scan_id in self._items
