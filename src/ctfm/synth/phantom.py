"""Labelled synthetic torso CT phantoms with realistic Hounsfield units.

A phantom is a test fixture and the default input of ``ctfm demo``. It is never evidence
about real data: the anatomy is a handful of ellipsoids and tubes, so any number measured
on a phantom (a Dice score, an embedding distance, a timing per patient) says nothing about
how a model or pipeline does on patients.

Coordinates
    Arrays are indexed (X, Y, Z). The affine is ``diag(sx, sy, sz)`` with positive entries,
    which is RAS+ (``nibabel.aff2axcodes`` gives ``('R', 'A', 'S')``): world +x points to
    the patient's Right, +y Anterior, +z Superior. So the patient's left organs (spleen,
    kidney_left, lung_left, aorta) sit at array-x indices *smaller* than the midline and the
    right organs (liver, kidney_right, lung_right) at larger ones; the spine is posterior
    (small y index); the lungs are in the upper part (large z index), the kidneys lower.
    The origin puts the centre of the volume at world (0, 0, 0).

Default grid
    Field of view about 320 x 250 mm in-plane and 200-300 mm in z. The in-plane spacing is
    drawn from 2.5-3.3 mm, so the arrays stay small (94-132 x 73-104 voxels), and the slice
    thickness from ``Z_SPACINGS_MM`` (1-5 mm, 40-300 slices). Such a coarse in-plane grid is
    a deliberate trade for speed (well under a second per phantom); pass
    ``spacing_mm=(0.8, 0.8, 1.0)`` for clinical in-plane sampling (the shape then follows
    from the field of view and gets large), or ``shape`` for tiny arrays.

Anatomy is defined as fractions of the field of view, so a given ``shape`` (or
``shape`` and ``spacing_mm``) keeps the same anatomy scaled into the array.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctfm.errors import OptionError
from ctfm.io.labels import parse_label_table
from ctfm.runtime import atomic_path

# Stable label ids: files written by earlier versions must keep meaning the same thing,
# so never renumber; add new structures at the end.
LABEL_NAMES: dict[int, str] = {
    0: "background",  # air outside the body
    1: "fat",  # subcutaneous fat, plus visceral / mediastinal fat filling the body cavity
    2: "muscle",  # abdominal and chest wall, back muscles, psoas, heart, other soft tissue
    3: "lung_left",
    4: "lung_right",
    5: "liver",
    6: "spleen",
    7: "kidney_left",
    8: "kidney_right",
    9: "aorta",
    10: "vertebrae",
    11: "ribs",
}
LABEL_IDS: dict[str, int] = {name: label_id for label_id, name in LABEL_NAMES.items()}

# RGB 0-255 per label for viewers that read the CaretExtension label table.
LABEL_COLORS: dict[int, tuple[int, int, int]] = {
    1: (230, 220, 110),
    2: (190, 80, 70),
    3: (100, 150, 230),
    4: (60, 110, 200),
    5: (150, 90, 50),
    6: (160, 50, 130),
    7: (230, 150, 60),
    8: (210, 120, 40),
    9: (220, 40, 40),
    10: (240, 240, 225),
    11: (200, 200, 180),
}

Z_SPACINGS_MM: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5, 3.0, 5.0)
INPLANE_SPACING_RANGE_MM: tuple[float, float] = (2.5, 3.3)
FOV_X_RANGE_MM: tuple[float, float] = (310.0, 330.0)
FOV_Y_RANGE_MM: tuple[float, float] = (240.0, 260.0)
Z_EXTENT_RANGE_MM: tuple[float, float] = (200.0, 300.0)
HU_MIN, HU_MAX = -1024.0, 3071.0

_ID = LABEL_IDS


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic torso CT.

    image: float32 (X, Y, Z), Hounsfield units in [-1024, 3071].
    labels: uint8 (X, Y, Z), ids of ``label_names``.
    affine: float64 (4, 4), voxel index -> RAS+ world mm, ``diag(spacing_mm, 1)`` plus origin.
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    spacing_mm: tuple[float, float, float]
    label_names: dict[int, str]
    seed: int

    def __post_init__(self) -> None:
        if self.image.shape != self.labels.shape or self.image.ndim != 3:
            raise ValueError(f"image {self.image.shape} and labels {self.labels.shape} must be the same 3-D shape")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]


# --------------------------------------------------------------------------- geometry


class _Grid:
    """World coordinates (mm) of voxel centres along each axis; volume centred at 0."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape = shape
        self.spacing = spacing
        self.origin = tuple(-(n - 1) / 2.0 * s for n, s in zip(shape, spacing))
        self.axes = tuple(o + s * np.arange(n) for o, s, n in zip(self.origin, spacing, shape))

    def span(self, axis: int, lo: float, hi: float) -> slice:
        """Index slice of the voxels whose centres lie in [lo, hi] along ``axis``."""
        coords = self.axes[axis]
        return slice(int(np.searchsorted(coords, lo, "left")), int(np.searchsorted(coords, hi, "right")))

    def box(self, centre: np.ndarray, half: np.ndarray) -> tuple[slice, slice, slice]:
        spans = tuple(self.span(i, centre[i] - half[i], centre[i] + half[i]) for i in range(3))
        return spans  # type: ignore[return-value]

    def nearest_index(self, point: np.ndarray) -> tuple[int, int, int]:
        return tuple(
            int(np.clip(np.rint((p - o) / s), 0, n - 1))
            for p, o, s, n in zip(point, self.origin, self.spacing, self.shape)
        )  # type: ignore[return-value]


def _rotation(yaw_deg: float, pitch_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """3x3 rotation: yaw about z, then pitch about y, then roll about x (columns = local axes)."""
    yaw, pitch, roll = np.deg2rad([yaw_deg, pitch_deg, roll_deg])
    cz, sz = np.cos(yaw), np.sin(yaw)
    cy, sy = np.cos(pitch), np.sin(pitch)
    cx, sx = np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


def _ellipsoid(
    grid: _Grid,
    centre: np.ndarray,
    radii: np.ndarray,
    rotation: np.ndarray | None = None,
    taper: np.ndarray | None = None,
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """Deformed ellipsoid, evaluated only inside its bounding box.

    ``taper`` (3, 3): local radius j is scaled by ``1 + sum_k taper[j, k] * q_k / r_k``, which
    turns the ellipsoid into an egg or wedge (e.g. the liver, thick on the right).
    Returns the bounding-box slices and a bool mask of the box's shape.
    """
    rotation = np.eye(3) if rotation is None else rotation
    taper = np.zeros((3, 3)) if taper is None else taper
    grow = 1.0 + np.abs(taper).sum(axis=1)  # the taper can only widen a radius this much
    half = np.sqrt(((rotation * (radii * grow)) ** 2).sum(axis=1))
    box = grid.box(centre, half)
    d = [(grid.axes[i][box[i]] - centre[i]).reshape([-1 if j == i else 1 for j in range(3)]) for i in range(3)]
    # Local coordinates q = R^T (p - c), scaled by the radii.
    q = [(rotation[0, j] * d[0] + rotation[1, j] * d[1] + rotation[2, j] * d[2]) / radii[j] for j in range(3)]
    total = 0.0
    for j in range(3):
        scale = 1.0 + taper[j, 0] * q[0] + taper[j, 1] * q[1] + taper[j, 2] * q[2]
        total = total + (q[j] / np.maximum(scale, 0.1)) ** 2
    return box, np.broadcast_to(total <= 1.0, tuple(s.stop - s.start for s in box))


def _paint(
    labels: np.ndarray,
    box: tuple[slice, slice, slice],
    mask: np.ndarray,
    label_id: int,
    within: np.ndarray | None = None,
) -> None:
    """labels[box][mask & within[box]] = label_id (in place)."""
    if mask.size == 0:
        return
    if within is not None:
        mask = mask & within[box]
    labels[box][mask] = label_id


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


# --------------------------------------------------------------------------- public API


def _resolve_grid(
    rng: np.random.Generator,
    shape: tuple[int, int, int] | None,
    spacing_mm: tuple[float, float, float] | None,
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    # Always draw every grid parameter, so the random stream (and so the anatomy) of a seed
    # does not depend on which arguments the caller gave.
    inplane = round(_u(rng, *INPLANE_SPACING_RANGE_MM), 2)
    z_spacing = float(rng.choice(Z_SPACINGS_MM))
    fov = np.array([_u(rng, *FOV_X_RANGE_MM), _u(rng, *FOV_Y_RANGE_MM), _u(rng, *Z_EXTENT_RANGE_MM)])

    if shape is not None:
        shape = tuple(int(n) for n in shape)  # type: ignore[assignment]
        if len(shape) != 3 or min(shape) < 8:
            raise OptionError(f"shape must be 3 sizes of at least 8 voxels, got {shape}")
    if spacing_mm is not None:
        spacing_mm = tuple(float(s) for s in spacing_mm)  # type: ignore[assignment]
        if len(spacing_mm) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing_mm):
            raise OptionError(f"spacing_mm must be 3 positive numbers, got {spacing_mm}")

    if shape is None:
        spacing = np.array(spacing_mm if spacing_mm is not None else (inplane, inplane, z_spacing))
        shape = tuple(max(8, int(round(f / s))) for f, s in zip(fov, spacing))  # type: ignore[assignment]
    elif spacing_mm is None:
        spacing = fov / np.array(shape)
    else:
        spacing = np.array(spacing_mm)
    return shape, tuple(float(s) for s in spacing)  # type: ignore[return-value]


def make_phantom(
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    spacing_mm: tuple[float, float, float] | None = None,
) -> Phantom:
    """Make one labelled torso phantom; the same seed always gives identical arrays.

    shape: (X, Y, Z) voxels; default follows from a ~320 x 250 x 200-300 mm field of view
        and the spacing (see the module docstring). Given alone, the field of view is kept
        and the spacing follows; each size must be at least 8.
    spacing_mm: (sx, sy, sz); default drawn per seed (in-plane 2.5-3.3 mm, z from
        ``Z_SPACINGS_MM``). Given with ``shape``, the anatomy is scaled into shape * spacing.
    Returns a ``Phantom`` whose image is float32 (X, Y, Z) HU and labels uint8 (X, Y, Z).
    """
    from scipy.ndimage import gaussian_filter

    seed = int(seed)
    rng = np.random.default_rng(seed)
    shape, spacing = _resolve_grid(rng, shape, spacing_mm)
    grid = _Grid(shape, spacing)
    gx, gy, gz = grid.axes
    fov = np.array(shape) * np.array(spacing)
    height = float(fov[2])  # z extent; z positions below are fractions of it
    z_bottom = float(gz[0]) - spacing[2] / 2

    labels = np.zeros(shape, dtype=np.uint8)
    centres: dict[int, np.ndarray] = {}  # where to put a label that a coarse grid missed

    # ---- body outline: an elliptic cylinder, flattened at the back (the patient lies on
    # the table), with a few low-order harmonics and a slow change of size along z.
    a = _u(rng, 0.78, 0.90) * fov[0] / 2  # half-width, mm
    b = _u(rng, 0.72, 0.86) * fov[1] / 2  # half-depth, mm
    cx = _u(rng, -0.04, 0.04) * fov[0]
    cy = _u(rng, -0.04, 0.04) * fov[1]
    harmonics = rng.uniform(-0.02, 0.02, size=3)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    flatten = _u(rng, 0.04, 0.10)
    z_taper = _u(rng, 0.02, 0.07)
    fat_frac = _u(rng, 0.08, 0.20)
    wall_frac = _u(rng, 0.10, 0.15)

    dx2 = (gx - cx)[:, None]
    dy2 = (gy - cy)[None, :]
    theta = np.arctan2(dy2 / b, dx2 / a)
    wobble = 1.0 + sum(h * np.cos((k + 2) * theta + p) for k, (h, p) in enumerate(zip(harmonics, phases)))
    wobble = wobble - flatten * np.clip(-np.sin(theta), 0, None) ** 4
    w_mid = (gz - (z_bottom + height / 2)) / (height / 2)  # -1 at the bottom .. +1 at the top
    z_scale = (1.0 - z_taper * w_mid**2).astype(np.float32)

    def layer(inset: float) -> np.ndarray:
        """bool (X, Y, Z): inside the body outline shrunk by ``inset`` mm."""
        rho = np.sqrt((dx2 / (a - inset)) ** 2 + (dy2 / (b - inset)) ** 2) / wobble
        return rho.astype(np.float32)[:, :, None] <= z_scale[None, None, :]

    fat_mm = fat_frac * min(a, b)
    wall_mm = wall_frac * min(a, b)
    a_c, b_c = a - fat_mm - wall_mm, b - fat_mm - wall_mm  # body cavity half-axes
    body = layer(0.0)
    muscle_wall = layer(fat_mm)
    cavity = layer(fat_mm + wall_mm)
    labels[body] = _ID["fat"]
    labels[muscle_wall] = _ID["muscle"]
    labels[cavity] = _ID["fat"]  # visceral and mediastinal fat; organs are painted over it
    centres[_ID["fat"]] = np.array([cx, cy + b - fat_mm / 2, 0.0])
    centres[_ID["muscle"]] = np.array([cx, cy + b - fat_mm - wall_mm / 2, 0.0])

    # Dome of the left hemidiaphragm; the right one sits higher, over the liver.
    z_diaphragm = z_bottom + _u(rng, 0.55, 0.62) * height

    def at(u: float, v: float, w: float) -> np.ndarray:
        """World point from cavity-relative fractions (u: +right, v: +anterior, w: of height)."""
        return np.array([cx + u * a_c, cy + v * b_c, z_diaphragm + w * height])

    def radii(ru: float, rv: float, rw: float) -> np.ndarray:
        return np.array([ru * a_c, rv * b_c, rw * height])

    def jitter(scale: float = 0.1, n: int = 3) -> np.ndarray:
        return 1.0 + rng.uniform(-scale, scale, size=n)

    # ---- spine geometry (needed by muscles, aorta and bones below)
    spine_x = cx + _u(rng, -0.02, 0.02) * a
    spine_y = cy - _u(rng, 0.22, 0.28) * b  # centre of the vertebral bodies
    vert_rx, vert_ry = _u(rng, 0.12, 0.15) * a, _u(rng, 0.15, 0.19) * b
    vert_period = _u(rng, 0.10, 0.13) * height
    vert_phase = _u(rng, 0, 1) * vert_period

    # ---- back muscles (paraspinal, full height) and psoas (lower abdomen)
    for side in (-1, 1):
        half = np.array([_u(rng, 0.09, 0.12) * a, _u(rng, 0.14, 0.18) * b, height])
        centre = np.array([spine_x + side * _u(rng, 0.11, 0.14) * a, spine_y - _u(rng, 0.32, 0.38) * b, 0.0])
        box, mask = _ellipsoid(grid, centre, half)
        _paint(labels, box, mask, _ID["muscle"], within=body)
        centre = np.array([spine_x + side * (vert_rx + 0.05 * a), spine_y, z_diaphragm - 0.45 * height])
        box, mask = _ellipsoid(grid, centre, np.array([0.06 * a, 0.09 * b, 0.25 * height]) * jitter(0.15))
        _paint(labels, box, mask, _ID["muscle"], within=cavity)

    # ---- lungs: elliptic columns that narrow towards the apex, standing on a paraboloid
    # diaphragm dome whose rim dips lower (the costophrenic recesses); cut to the cavity.
    for name, side, dome in (("lung_left", -1, 0.0), ("lung_right", 1, _u(rng, 0.02, 0.05))):
        r = radii(0.44, 0.9, 1.0) * jitter(0.06)
        centre = at(side * _u(rng, 0.47, 0.53), _u(rng, -0.08, 0.0), dome)
        recess = _u(rng, 0.08, 0.14) * height
        apex = _u(rng, 0.6, 0.8) * height  # dome top to lung apex
        xs = grid.span(0, centre[0] - r[0], centre[0] + r[0])
        ys = grid.span(1, centre[1] - r[1], centre[1] + r[1])
        zs = grid.span(2, centre[2] - recess, centre[2] + apex)
        radial = ((gx[xs] - centre[0]) / r[0])[:, None, None] ** 2
        radial = radial + ((gy[ys] - centre[1]) / r[1])[None, :, None] ** 2
        rise = (gz[zs] - centre[2])[None, None, :]
        narrowing = 1.0 - (np.clip(rise, 0, None) / apex) ** 2
        mask = (radial <= narrowing) & (rise >= -recess * radial)
        _paint(labels, (xs, ys, zs), mask, _ID[name], within=cavity)
        centres[_ID[name]] = centre + np.array([0, 0, 0.1 * height])

    # ---- heart, labelled muscle: carves the cardiac notch out of the left lung
    heart = at(-_u(rng, 0.12, 0.2), _u(rng, 0.2, 0.3), _u(rng, 0.13, 0.18))
    box, mask = _ellipsoid(grid, heart, radii(0.4, 0.45, 0.14) * jitter(0.1), _rotation(_u(rng, 15, 35)))
    _paint(labels, box, mask, _ID["muscle"], within=cavity)

    # ---- abdominal organs. The liver is painted after the lungs, so its dome pushes up into
    # the right lung base and leaves the lung's costophrenic recess around it.
    liver = at(_u(rng, 0.32, 0.42), _u(rng, -0.05, 0.08), -_u(rng, 0.10, 0.14))
    liver_taper = np.zeros((3, 3))
    liver_taper[1, 0] = _u(rng, 0.15, 0.3)  # thicker (antero-posteriorly) on the patient's right
    liver_taper[2, 0] = _u(rng, 0.1, 0.25)
    liver_radii = radii(0.55, 0.72, 0.26) * jitter(0.08)
    box, mask = _ellipsoid(grid, liver, liver_radii, _rotation(_u(rng, -10, 10), _u(rng, -5, 5)), liver_taper)
    _paint(labels, box, mask, _ID["liver"], within=cavity)
    centres[_ID["liver"]] = liver

    spleen = at(-_u(rng, 0.58, 0.66), -_u(rng, 0.25, 0.35), -_u(rng, 0.10, 0.14))
    box, mask = _ellipsoid(
        grid, spleen, radii(0.16, 0.32, 0.17) * jitter(0.12), _rotation(_u(rng, -45, -25), _u(rng, -10, 10))
    )
    _paint(labels, box, mask, _ID["spleen"], within=cavity)
    centres[_ID["spleen"]] = spleen

    for name, side, drop in (("kidney_left", -1, 0.37), ("kidney_right", 1, 0.41)):
        kidney = at(side * _u(rng, 0.36, 0.44), -_u(rng, 0.34, 0.42), -drop + _u(rng, -0.02, 0.02))
        # Long axis tilted: upper poles lean medially, hila face antero-medially.
        rotation = _rotation(side * _u(rng, 15, 30), 0.0, 0.0) @ _rotation(0.0, side * _u(rng, 5, 12))
        box, mask = _ellipsoid(grid, kidney, radii(0.2, 0.3, 0.19) * jitter(0.1), rotation)
        _paint(labels, box, mask, _ID[name], within=cavity)
        centres[_ID[name]] = kidney

    # ---- aorta: a tube in front of and left of the spine, drifting further left (smaller x)
    # in the thorax, where it becomes the descending aorta beside the spine.
    aorta_r = _u(rng, 0.07, 0.09) * a
    drift = _u(rng, 0.05, 0.12) * a
    w_dia = (gz - z_diaphragm) / height
    aorta_x = spine_x - _u(rng, 0.08, 0.12) * a - drift * np.clip(w_dia / 0.3, 0, 1)
    aorta_y = spine_y + vert_ry + aorta_r * 1.1 - 0.5 * vert_ry * np.clip(w_dia / 0.3, 0, 1)
    xs = grid.span(0, aorta_x.min() - aorta_r, aorta_x.max() + aorta_r)
    ys = grid.span(1, aorta_y.min() - aorta_r, aorta_y.max() + aorta_r)
    tube = ((gx[xs, None, None] - aorta_x) ** 2 + (gy[None, ys, None] - aorta_y) ** 2) <= aorta_r**2
    _paint(labels, (xs, ys, slice(None)), tube, _ID["aorta"], within=cavity)
    centres[_ID["aorta"]] = np.array([aorta_x[len(gz) // 2], aorta_y[len(gz) // 2], gz[len(gz) // 2]])

    # ---- vertebrae: body + neural arch around the canal + spinous process, interrupted by
    # intervertebral discs (left as soft tissue, labelled muscle). Discs are thinner than a
    # vertebra, so a coarse z grid still samples bone.
    disc = np.float32(_u(rng, 0.2, 0.28))
    in_disc = ((gz - z_bottom - vert_phase) % vert_period) < disc * vert_period
    canal_y = spine_y - vert_ry - 0.09 * b
    canal_r = 0.075 * b
    ex = (gx - spine_x)[:, None]
    vert_2d = (ex / vert_rx) ** 2 + ((gy - spine_y)[None, :] / vert_ry) ** 2 <= 1.0
    arch = (ex / (canal_r * 1.9)) ** 2 + ((gy - canal_y)[None, :] / (canal_r * 1.7)) ** 2 <= 1.0
    spinous_rx = max(0.03 * a, 0.6 * spacing[0])  # keep the thin process visible on coarse grids
    spinous = (ex / spinous_rx) ** 2 + ((gy - (canal_y - 0.16 * b))[None, :] / (0.12 * b)) ** 2 <= 1.0
    canal = (ex / canal_r) ** 2 + ((gy - canal_y)[None, :] / canal_r) ** 2 <= 1.0
    spine_2d = (vert_2d | arch | spinous) & ~canal
    spine_3d = spine_2d[:, :, None] & ~in_disc[None, None, :]
    labels[(vert_2d | arch | spinous)[:, :, None] & in_disc[None, None, :]] = _ID["muscle"]
    labels[np.broadcast_to(canal[:, :, None], shape)] = _ID["muscle"]  # cord and CSF
    labels[spine_3d] = _ID["vertebrae"]
    bone_slices = np.flatnonzero(~in_disc)
    bone_z = gz[bone_slices[len(bone_slices) // 2]] if bone_slices.size else 0.0
    centres[_ID["vertebrae"]] = np.array([spine_x, spine_y, bone_z])

    # ---- ribs: thin bands in the middle of the chest wall, sloping down anteriorly, from the
    # lower costal margin up; the anterior gap (costal cartilage) widens lower down.
    rib_period = _u(rng, 0.09, 0.11) * height
    rib_height = max(0.035 * height, 1.05 * spacing[2])
    rib_thick = max(0.55 * wall_mm, 1.05 * max(spacing[0], spacing[1]))
    rib_slope = _u(rng, 0.25, 0.45)
    rib_phase = _u(rng, 0, 1) * rib_period
    rib_lowest = z_diaphragm - _u(rng, 0.25, 0.3) * height
    a_r, b_r = a - fat_mm - wall_mm / 2, b - fat_mm - wall_mm / 2
    rho_r = np.sqrt((dx2 / a_r) ** 2 + (dy2 / b_r) ** 2)
    ray = a_r * b_r / np.sqrt((b_r * np.cos(theta)) ** 2 + (a_r * np.sin(theta)) ** 2)  # radius along theta
    rho_r = (rho_r / wobble).astype(np.float32)
    ring_offset = np.abs(rho_r[:, :, None] - z_scale[None, None, :])
    ring = ring_offset * ray.astype(np.float32)[:, :, None] <= rib_thick / 2
    sin_t = np.sin(theta)[:, :, None]
    gap = 0.75 - 0.9 * np.clip((z_diaphragm + 0.15 * height - gz) / (0.4 * height), 0, 1)  # sin(theta) limit
    z_eff = gz[None, :] + rib_slope * (gy - cy)[:, None]  # (Y, Z): constant along one rib
    band = ((z_eff - rib_phase) % rib_period) < rib_height
    ribs = ring & (sin_t < gap[None, None, :]) & band[None, :, :] & (gz >= rib_lowest)[None, None, :]
    labels[ribs] = _ID["ribs"]
    centres[_ID["ribs"]] = np.array([cx + a_r, cy, z_diaphragm])

    # ---- every label must exist: on a very coarse grid a thin structure can fall between
    # voxel centres, so keep it as at least the voxel nearest its nominal centre.
    present = np.bincount(labels.ravel(), minlength=len(LABEL_NAMES))
    for label_id, centre in centres.items():
        if present[label_id] == 0:
            labels[grid.nearest_index(centre)] = label_id
    present = np.bincount(labels.ravel(), minlength=len(LABEL_NAMES))
    if not present[1:].all():
        missing = [LABEL_NAMES[i] for i in range(1, len(LABEL_NAMES)) if present[i] == 0]
        raise OptionError(f"shape {shape} is too small to hold every organ (missing {missing})")

    # ---- intensities. Contrast phase c scales the enhancing organs (portal venous ~ c=1).
    contrast = _u(rng, 0.6, 1.0)
    mean_hu = np.zeros(len(LABEL_NAMES), dtype=np.float32)
    mean_hu[_ID["background"]] = -1000.0
    mean_hu[_ID["fat"]] = _u(rng, -110, -90)
    mean_hu[_ID["muscle"]] = _u(rng, 35, 55)
    mean_hu[[_ID["lung_left"], _ID["lung_right"]]] = _u(rng, -870, -830)
    mean_hu[_ID["liver"]] = 55 + 50 * contrast + _u(rng, -5, 5)
    mean_hu[_ID["spleen"]] = 45 + 60 * contrast + _u(rng, -5, 5)
    mean_hu[[_ID["kidney_left"], _ID["kidney_right"]]] = 60 + 120 * contrast + _u(rng, -10, 10)
    mean_hu[_ID["aorta"]] = 50 + 180 * contrast + _u(rng, -10, 10)
    cancellous = _u(rng, 620, 780)
    cortical = _u(rng, 950, 1150)
    mean_hu[[_ID["vertebrae"], _ID["ribs"]]] = cancellous
    noise_sigma = _u(rng, 10, 20)

    image = mean_hu[labels]

    # Pulmonary vessels: small soft-tissue tubes inside the lungs (label stays lung).
    lung = (labels == _ID["lung_left"]) | (labels == _ID["lung_right"])
    for _ in range(24):
        side = 1 if rng.random() < 0.5 else -1
        centre = at(side * _u(rng, 0.2, 0.75), _u(rng, -0.6, 0.6), _u(rng, 0.05, 0.5))
        r = np.array([_u(rng, 1.5, 3.0), _u(rng, 1.5, 3.0), _u(rng, 8, 20)])
        box, mask = _ellipsoid(grid, centre, r, _rotation(_u(rng, 0, 180), _u(rng, -60, 60)))
        vessel = mask & lung[box]
        image[box][vessel] = mean_hu[_ID["muscle"]]

    # Cortical shell: bone voxels with a non-bone face neighbour.
    bone = (labels == _ID["vertebrae"]) | (labels == _ID["ribs"])
    # Faces on the volume border count as bone-continuing: a cut is not a cortex.
    interior = bone.copy()
    for axis in range(3):
        lower = [slice(None)] * 3
        upper = [slice(None)] * 3
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        interior[tuple(upper)] &= bone[tuple(lower)]
        interior[tuple(lower)] &= bone[tuple(upper)]
    image[bone & ~interior] = cortical

    # Partial-volume blur of ~half a voxel, then white quantum noise.
    image = gaussian_filter(image, sigma=0.5, mode="nearest", truncate=3.0)
    image += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_sigma)
    np.clip(image, HU_MIN, HU_MAX, out=image)

    affine = np.diag([*spacing, 1.0]).astype(np.float64)
    affine[:3, 3] = grid.origin
    return Phantom(
        image=image.astype(np.float32, copy=False),
        labels=labels,
        affine=affine,
        spacing_mm=spacing,
        label_names=dict(LABEL_NAMES),
        seed=seed,
    )


def make_cohort(n: int, seed: int = 0, **kw: Any) -> list[Phantom]:
    """``n`` phantoms with seeds ``seed .. seed + n - 1``; ``kw`` go to ``make_phantom``."""
    if n < 0:
        raise OptionError(f"n must be >= 0, got {n}")
    return [make_phantom(seed + i, **kw) for i in range(n)]


# --------------------------------------------------------------------------- files


def _caret_label_xml(label_names: dict[int, str]) -> str:
    """TotalSegmentator-style CaretExtension XML holding the label table (background left out)."""
    rows = []
    for label_id, name in sorted(label_names.items()):
        if label_id == 0:
            continue
        if "]]>" in name:
            raise ValueError(f"label name {name!r} cannot be stored in a CDATA section")
        red, green, blue = LABEL_COLORS.get(label_id, (128, 128, 128))
        rows.append(
            f'<Label Key="{label_id}" Red="{red / 255:.4g}" Green="{green / 255:.4g}" '
            f'Blue="{blue / 255:.4g}" Alpha="1"><![CDATA[{name}]]></Label>'
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?> <CaretExtension>  '
        '<Date><![CDATA[2013-07-14T05:45:09]]></Date>   <VolumeInformation Index="0">   <LabelTable>\n'
        + "\n".join(rows)
        + "\n  </LabelTable>  <StudyMetaDataLinkSet>  </StudyMetaDataLinkSet>  "
        "<VolumeType><![CDATA[Label]]></VolumeType>   </VolumeInformation></CaretExtension>\n"
    )


def read_label_table(source: str | os.PathLike | Any) -> dict[int, str]:
    """Label names from a NIfTI's CaretExtension header extension (TotalSegmentator style).

    source: a path or a loaded ``nibabel.Nifti1Image``. Returns {} when there is no table.
    The parsing is :func:`ctfm.io.labels.parse_label_table`, the reader every label file uses.
    """
    import nibabel as nib

    image = nib.load(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else source
    for extension in image.header.extensions:
        names = parse_label_table(extension.get_content())
        if names:
            return names
    return {}


def write_phantom(phantom: Phantom, out_dir: str | os.PathLike, stem: str = "phantom") -> tuple[Path, Path]:
    """Write ``{stem}.nii.gz`` (int16 HU), ``{stem}_labels.nii.gz`` (uint8) and ``{stem}_labels.json``.

    The label names travel inside the label file as a TotalSegmentator-style CaretExtension
    (NIfTI extension code 0) and in the JSON sidecar ``{"labels": {"1": "fat", ...}}``.
    Each file is written under a temporary name in ``out_dir`` and then renamed, so an error
    never leaves a half-written file. Returns (image path, label path).
    """
    import nibabel as nib

    if not stem or stem in {".", ".."} or any(sep and sep in stem for sep in (os.sep, os.altsep)):
        raise OptionError(f"stem must be a plain file name, got {stem!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_path = out / f"{stem}.nii.gz"
    labels_path = out / f"{stem}_labels.nii.gz"
    json_path = out / f"{stem}_labels.json"

    affine = np.asarray(phantom.affine, dtype=np.float64)
    hu = np.clip(np.rint(phantom.image), HU_MIN, HU_MAX).astype(np.int16)
    image = nib.Nifti1Image(hu, affine)
    labels = nib.Nifti1Image(np.asarray(phantom.labels, dtype=np.uint8), affine)
    for img in (image, labels):
        img.header.set_qform(affine, code=1)  # 1 = scanner anatomical
        img.header.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_slope_inter(1.0, 0.0)
        img.header["descrip"] = f"ctfm.synth phantom seed={phantom.seed}".encode()[:80]
    labels.header.set_intent("label")
    labels.header.extensions.append(
        nib.nifti1.Nifti1Extension(0, _caret_label_xml(phantom.label_names).encode("utf-8"))
    )
    sidecar = {
        "labels": {str(k): v for k, v in sorted(phantom.label_names.items()) if k != 0},
        "synthetic": True,  # a fixture, never evidence about real data
        "seed": phantom.seed,
    }

    # All three or none: each goes to a temporary name (keeping its suffix, so nibabel still
    # gzips ".nii.gz"); the renames happen only once all three are written.
    with contextlib.ExitStack() as stack:
        image_tmp, labels_tmp, json_tmp = (
            stack.enter_context(
                atomic_path(final, suffix=".nii.gz" if final.name.endswith(".nii.gz") else final.suffix)
            )
            for final in (image_path, labels_path, json_path)
        )
        nib.save(image, image_tmp)
        nib.save(labels, labels_tmp)
        json_tmp.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return image_path, labels_path
