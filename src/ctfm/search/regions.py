"""From window similarities to a world point, and to a similarity volume.

A scan's windows lie on a grid (their start voxels in the preprocessed SPL volume, their
centres in RAS mm). The best window says roughly where the query is; two refinements say where
exactly:

- :func:`weighted_centre` (no model needed): the centre of the best window and of the windows
  overlapping it, weighted by ``exp((s - s_best) / temperature)`` over the ``top`` best of them.
  Moves the answer off the window grid, towards where similarity is high; an exact match
  (cosine 1) keeps its own centre.
- :func:`pattern_search` (needs the encoder and the preprocessed target): windows at candidate
  positions are embedded and compared; from the best window and the weighted centre, the
  best candidate moves among its 26 neighbours by steps that start at half the grid stride and
  halve down to one voxel, and the best position ever scored is the answer.

A hit is "the same place relative to the query's window": the click's offset from the centre of
the query window, in that window's voxel axes (:func:`window_axes`), is carried to the matched
window of each scan through that scan's own axes.
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


def weighted_centre(
    centres_mm: np.ndarray,
    scores: np.ndarray,
    half_extent_mm: np.ndarray,
    top: int = 8,
    sharpness: float = 10.0,
    ceiling: float | None = 1.0,
) -> tuple[np.ndarray, int]:
    """``(point [3] RAS mm, index of the best window)`` from one scan's windows.

    ``centres_mm`` [n, 3], ``scores`` [n] (higher is better). The ``top`` best windows that
    overlap the best one are averaged with weights ``exp(-sharpness * (s_best - s) / spread)``,
    ``spread`` = best minus median score of the scan: scale-free, so a flat similarity landscape
    (an untrained encoder) and a peaked one are treated alike. ``ceiling`` is the highest score
    there is (cosine: 1): no position can beat the best window by more than ``ceiling - s_best``,
    so the spread is at most that gap, and an exact match keeps its own centre.
    """
    best = int(np.argmax(scores))
    near = np.all(np.abs(centres_mm - centres_mm[best]) < 2 * half_extent_mm - 1e-6, axis=1)
    candidates = np.flatnonzero(near)
    candidates = candidates[np.argsort(-scores[candidates], kind="stable")[:top]]
    spread = float(scores[best] - np.median(scores))
    if ceiling is not None:
        spread = min(spread, float(ceiling) - float(scores[best]))
    if spread <= 1e-9:
        return centres_mm[best].astype(np.float64), best
    weights = np.exp(-sharpness * (scores[best] - scores[candidates]) / spread)
    point = (weights[:, None] * centres_mm[candidates]).sum(0) / weights.sum()
    return point, best


AXIS_CODES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def nominal_axes(spec) -> np.ndarray:
    """[3, 3] RAS mm per voxel step along each axis of a spec's grid (column j: axis j), from its
    orientation code and spacing, as if the scan had no obliquity."""
    spacing = np.asarray(spec.spacing_mm or (1.0, 1.0, 1.0), dtype=np.float64)
    axes = np.zeros((3, 3))
    for j, code in enumerate(spec.orientation.upper()):
        world, sign = AXIS_CODES[code]
        axes[world, j] = sign * spacing[j]
    return axes


def window_axes(centres_mm: np.ndarray, starts: np.ndarray, nominal: np.ndarray) -> np.ndarray:
    """[3, 3] RAS mm per voxel step of a scan's preprocessed grid, read off its windows
    (``centres_mm = starts @ axes.T + origin``, least squares); an axis along which every window
    starts at the same voxel keeps the ``nominal`` column."""
    axes = np.array(nominal, dtype=np.float64)
    starts = np.asarray(starts, dtype=np.float64)
    varying = [j for j in range(3) if len(starts) > 1 and np.ptp(starts[:, j]) > 0]
    if varying:
        design = np.column_stack([starts[:, varying], np.ones(len(starts))])
        fitted, *_ = np.linalg.lstsq(design, np.asarray(centres_mm, dtype=np.float64), rcond=None)
        for row, j in enumerate(varying):
            axes[:, j] = fitted[row]
    return axes


def grid_stride(starts: np.ndarray, size) -> np.ndarray:
    """Per-axis stride of a window grid (voxels); a quarter window where the grid has one window."""
    stride = np.zeros(3)
    for axis in range(3):
        values = np.unique(starts[:, axis])
        steps = np.diff(values)
        stride[axis] = steps[steps > 0].min() if np.any(steps > 0) else max(1.0, size[axis] / 4.0)
    return stride


def pattern_search(
    score_at, starts_vox, initial_step: np.ndarray, max_evaluations: int = 400, ceiling: float | None = None
) -> tuple[np.ndarray, float, int]:
    """Coarse-to-fine neighbourhood search for the window position that maximises ``score_at``.

    ``score_at(positions [m, 3]) -> scores [m]`` scores windows at voxel positions (batched).
    From the best of ``starts_vox`` ([s, 3] candidate positions), the 26 neighbours at the
    current step (per axis) are scored; the search moves to a better one, or halves the step,
    until the step is below one voxel. The answer is the best position ever scored, so it never
    scores below a start; it stops early at ``ceiling`` (cosine: 1, nothing scores higher).
    Returns ``(best position [3], its score, evaluations)``.
    """
    starts = np.round(np.atleast_2d(np.asarray(starts_vox, dtype=np.float64)))
    scores = np.asarray(score_at(starts))
    used = len(starts)
    centre, best = starts[int(np.argmax(scores))], float(np.max(scores))
    step = np.maximum(np.round(np.asarray(initial_step, dtype=np.float64)), 0)
    offsets = np.array(
        [[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)],
        dtype=np.float64,
    )
    done = ceiling is not None and best >= ceiling - 1e-6
    while np.any(step >= 1) and used < max_evaluations and not done:
        moves = np.unique(centre + offsets * step, axis=0)
        moves = moves[np.any(moves != centre, axis=1)]
        scores = np.asarray(score_at(moves))
        used += len(moves)
        i = int(np.argmax(scores))
        if scores[i] > best + 1e-7:
            best, centre = float(scores[i]), moves[i]
            done = ceiling is not None and best >= ceiling - 1e-6
        else:
            step = np.floor(step / 2.0)
    return centre, best, used


def window_cells(starts: np.ndarray, scores: np.ndarray, size, shape) -> tuple[list[np.ndarray], np.ndarray]:
    """The mean similarity of the windows covering each voxel, as the piecewise-constant function
    it is: ``(edges, means)``: per axis the cell edges (voxel indices, from 0 to ``shape``), and
    ``means`` [cells0, cells1, cells2] (NaN where no window reaches). Voxel ``v`` lies in cell
    ``searchsorted(edges, v, "right") - 1`` on each axis."""
    edges = []
    for axis in range(3):
        cut = np.concatenate([[0, shape[axis]], starts[:, axis], starts[:, axis] + size[axis]])
        edges.append(np.unique(np.clip(cut, 0, shape[axis])))
    total = np.zeros([len(e) - 1 for e in edges], dtype=np.float64)
    count = np.zeros_like(total)
    for start, score in zip(starts, scores):
        box = tuple(
            slice(
                np.searchsorted(edges[a], min(start[a], shape[a])),
                np.searchsorted(edges[a], min(start[a] + size[a], shape[a])),
            )
            for a in range(3)
        )
        total[box] += score
        count[box] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return edges, np.where(count > 0, total / np.maximum(count, 1), np.nan)


def window_similarity_grid(starts: np.ndarray, scores: np.ndarray, size, shape) -> np.ndarray:
    """Mean similarity of the windows covering each voxel of a preprocessed grid ``shape``
    (NaN where no window reaches), at full voxel resolution."""
    edges, means = window_cells(starts, scores, size, shape)
    index = [np.searchsorted(e, np.arange(n), side="right") - 1 for e, n in zip(edges, shape)]
    return means[np.ix_(*index)].astype(np.float32)


def similarity_on_grid(
    starts: np.ndarray, scores: np.ndarray, size, prepared_shape, prepared_affine: np.ndarray, shape, affine: np.ndarray
) -> np.ndarray:
    """[X, Y, Z] float32 on the grid ``shape``/``affine`` (RAS): each voxel takes the covering
    mean of the preprocessed voxel nearest it (NaN outside the windows).

    The preprocessed grid is the target's own axes reordered and resampled, so the map between
    the two grids is an axis permutation with scales: then the lookup is one gather per axis
    (about a second for 512x512x300); an oblique map falls back to a general resampling.
    """
    edges, means = window_cells(starts, scores, size, prepared_shape)
    to_prepared = np.linalg.solve(prepared_affine, affine)  # target voxel -> preprocessed voxel
    m, offset = to_prepared[:3, :3], to_prepared[:3, 3]
    source_axis = np.argmax(np.abs(m), axis=0)  # for each target axis
    separable = len(set(source_axis.tolist())) == 3 and all(
        np.sum(np.abs(m[:, t]) > 1e-6 * np.abs(m).max()) == 1 for t in range(3)
    )
    if not separable:
        from scipy.ndimage import affine_transform

        grid = window_similarity_grid(starts, scores, size, prepared_shape)
        return affine_transform(
            grid,
            matrix=m,
            offset=offset,
            output_shape=tuple(int(v) for v in shape),
            order=0,
            mode="constant",
            cval=np.nan,
        ).astype(np.float32)
    index, valid = [], []
    for t in range(3):
        a = source_axis[t]
        voxel = np.round(m[a, t] * np.arange(shape[t]) + offset[a]).astype(np.int64)
        inside = (voxel >= 0) & (voxel < prepared_shape[a])
        index.append(np.clip(np.searchsorted(edges[a], voxel, side="right") - 1, 0, means.shape[a] - 1))
        valid.append(inside)
    permuted = np.transpose(means.astype(np.float32), axes=source_axis)  # axis t: the source axis of target axis t
    out = permuted[np.ix_(*index)]
    out[~valid[0], :, :] = np.nan
    out[:, ~valid[1], :] = np.nan
    out[:, :, ~valid[2]] = np.nan
    return out
