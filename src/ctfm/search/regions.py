"""From window similarities to a world point, and to a similarity volume.

A scan's windows lie on a grid (their start voxels in the preprocessed SPL volume, their
centres in RAS mm). The best window says roughly where the query is; two refinements say where
exactly:

- :func:`weighted_centre` (no model needed): the centre of the best window and of the windows
  overlapping it, weighted by ``exp((s - s_best) / temperature)`` over the ``top`` best of them.
  Moves the answer off the window grid, towards where similarity is high.
- :func:`pattern_search` (needs the encoder and the preprocessed target): windows at candidate
  positions are embedded and compared; from the best window and the weighted centre, the
  best candidate moves among its 26 neighbours by steps that start at half the grid stride and
  halve down to one voxel. This recovers the point to within a voxel
  when the same anatomy is present, wherever the grid happens to fall.
"""

from __future__ import annotations

import numpy as np


def window_half_extent_mm(spec, size) -> np.ndarray:
    """Half the window's extent along world x, y, z (RAS) for a spec in S/P/L axis order."""
    spacing = np.asarray(spec.spacing_mm or (1.0, 1.0, 1.0), dtype=np.float64)
    extent_spl = np.asarray(size, dtype=np.float64) * spacing
    order = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}
    half = np.zeros(3)
    for axis, code in enumerate(spec.orientation.upper()):
        half[order[code]] = extent_spl[axis] / 2.0
    return half


def weighted_centre(centres_mm: np.ndarray, scores: np.ndarray, half_extent_mm: np.ndarray, top: int = 8, sharpness: float = 10.0) -> tuple[np.ndarray, int]:
    """``(point [3] RAS mm, index of the best window)`` from one scan's windows.

    ``centres_mm`` [n, 3], ``scores`` [n] (higher is better). The ``top`` best windows that
    overlap the best one are averaged with weights ``exp(-sharpness * (s_best - s) / spread)``,
    ``spread`` = best minus median score of the scan: scale-free, so a flat similarity landscape
    (an untrained encoder) and a peaked one are treated alike.
    """
    best = int(np.argmax(scores))
    near = np.all(np.abs(centres_mm - centres_mm[best]) < 2 * half_extent_mm - 1e-6, axis=1)
    candidates = np.flatnonzero(near)
    candidates = candidates[np.argsort(-scores[candidates], kind="stable")[:top]]
    spread = float(scores[best] - np.median(scores))
    if spread <= 0:
        return centres_mm[best].astype(np.float64), best
    weights = np.exp(-sharpness * (scores[best] - scores[candidates]) / spread)
    point = (weights[:, None] * centres_mm[candidates]).sum(0) / weights.sum()
    return point, best


def grid_stride(starts: np.ndarray, size) -> np.ndarray:
    """Per-axis stride of a window grid (voxels); a quarter window where the grid has one window."""
    stride = np.zeros(3)
    for axis in range(3):
        values = np.unique(starts[:, axis])
        steps = np.diff(values)
        stride[axis] = steps[steps > 0].min() if np.any(steps > 0) else max(1.0, size[axis] / 4.0)
    return stride


def pattern_search(score_at, starts_vox, initial_step: np.ndarray, max_evaluations: int = 400) -> tuple[np.ndarray, float, int]:
    """Coarse-to-fine neighbourhood search for the window position that maximises ``score_at``.

    ``score_at(positions [m, 3]) -> scores [m]`` scores windows at voxel positions (batched).
    From the best of ``starts_vox`` ([s, 3] candidate positions), the 26 neighbours at the
    current step (per axis) are scored; the search moves to a better one, or halves the step,
    until the step is below one voxel. Returns ``(best position [3], its score, evaluations)``.
    """
    starts = np.round(np.atleast_2d(np.asarray(starts_vox, dtype=np.float64)))
    scores = np.asarray(score_at(starts))
    used = len(starts)
    centre, best = starts[int(np.argmax(scores))], float(np.max(scores))
    step = np.maximum(np.round(np.asarray(initial_step, dtype=np.float64)), 0)
    offsets = np.array([[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)], dtype=np.float64)
    while np.any(step >= 1) and used < max_evaluations:
        moves = np.unique(centre + offsets * step, axis=0)
        moves = moves[np.any(moves != centre, axis=1)]
        scores = np.asarray(score_at(moves))
        used += len(moves)
        i = int(np.argmax(scores))
        if scores[i] > best + 1e-7:
            best, centre = float(scores[i]), moves[i]
        else:
            step = np.floor(step / 2.0)
    return centre, best, used


def window_similarity_grid(starts: np.ndarray, scores: np.ndarray, size, shape) -> np.ndarray:
    """Mean similarity of the windows covering each voxel of a preprocessed grid ``shape``
    (NaN where no window reaches)."""
    full = np.maximum(np.asarray(shape), (starts + np.asarray(size)).max(0))
    total = np.zeros(full, dtype=np.float32)
    count = np.zeros(full, dtype=np.float32)
    for (a, b, c), s in zip(starts, scores):
        region = (slice(a, a + size[0]), slice(b, b + size[1]), slice(c, c + size[2]))
        total[region] += s
        count[region] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = total / count
    return grid[: shape[0], : shape[1], : shape[2]]


def resample_to_grid(values: np.ndarray, values_affine: np.ndarray, shape, affine: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """``values`` (on ``values_affine``'s grid) sampled trilinearly at every voxel of the grid
    ``shape``/``affine`` (world mm, RAS), slice by slice along the last axis."""
    from scipy.ndimage import map_coordinates

    to_values = np.linalg.solve(values_affine, affine)  # target voxel -> values voxel
    finite = np.isfinite(values)
    filled = np.where(finite, values, 0.0).astype(np.float32)
    weight = finite.astype(np.float32)
    out = np.empty(tuple(shape), dtype=np.float32)
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    for k in range(shape[2]):
        ijk = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k), np.ones(ii.size)])
        coords = (to_values @ ijk)[:3]
        v = map_coordinates(filled, coords, order=1, mode="constant", cval=0.0)
        w = map_coordinates(weight, coords, order=1, mode="constant", cval=0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, :, k] = np.where(w > 0.5, v / np.maximum(w, 1e-6), fill).reshape(shape[0], shape[1])
    return out
