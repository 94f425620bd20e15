"""Figures: three orthogonal slices of volumes, shown in radiological convention."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ctfm.errors import optional_import
from ctfm.runtime import atomic_path


def to_ras_array(image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorder a [1, X, Y, Z] (or [X, Y, Z]) MetaTensor/array with an affine into RAS voxel order.

    Returns ``(array, spacing)`` with ``array`` of shape (R-L, P-A, I-S) axes increasing towards
    R, A, S, and the voxel spacing along those axes.
    """
    import nibabel as nib

    array = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image, dtype=np.float32)
    if array.ndim == 4:
        array = array[0]
    affine = np.asarray(getattr(image, "affine", np.eye(4)), dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(array, ornt)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spacing_ras = tuple(float(spacing[int(axis)]) for axis in np.argsort(ornt[:, 0]))
    return ras, spacing_ras


def _views(ras: np.ndarray) -> list[tuple[str, np.ndarray, int]]:
    """Centre axial, coronal and sagittal slices; rows top-down, columns left-right on screen.

    Radiological convention: patient right on the viewer's left, anterior and superior at the top.
    The third item says which pair of RAS axes the slice shows (for the aspect ratio).
    """
    x, y, z = (s // 2 for s in ras.shape)
    return [
        ("axial", ras[::-1, ::-1, z].T, 0),  # rows: A->P, cols: R->L
        ("coronal", ras[::-1, y, ::-1].T, 1),  # rows: S->I, cols: R->L
        ("sagittal", ras[x, ::-1, ::-1].T, 2),  # rows: S->I, cols: A->P
    ]


def orthogonal_slices_figure(
    panels: list[tuple[str, object, tuple[float, float]]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Save a PNG with one row per panel: (label, image with affine, (vmin, vmax)).

    Each row shows the centre axial, coronal and sagittal slices with true physical aspect.
    """
    matplotlib = optional_import("matplotlib", "eval")

    matplotlib.use("Agg")
    plt = optional_import("matplotlib.pyplot", "eval")

    fig, axes = plt.subplots(len(panels), 3, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for row, (label, image, (vmin, vmax)) in enumerate(panels):
        ras, (sx, sy, sz) = to_ras_array(image)
        aspects = {0: sy / sx, 1: sz / sx, 2: sz / sy}
        for col, (view, plane, kind) in enumerate(_views(ras)):
            ax = axes[row][col]
            ax.imshow(plane, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspects[kind], interpolation="nearest")
            ax.set_title(f"{label}: {view}", fontsize=9)
            ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90)
    finally:
        plt.close(fig)
    return path


def pyplot():
    matplotlib = optional_import("matplotlib", "eval")

    matplotlib.use("Agg")
    plt = optional_import("matplotlib.pyplot", "eval")

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG, all or nothing, and close it."""
    plt = pyplot()
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def grouped_bars(
    series: dict[str, dict[str, float]], path: str | os.PathLike, title: str = "", ylabel: str = ""
) -> Path:
    """One group of bars per metric, one bar per series (e.g. ours beside the paper's)."""
    plt = pyplot()
    metrics = list(dict.fromkeys(m for values in series.values() for m in values))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(metrics) * max(1, len(series)) / 2 + 2), 3.6))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [m + i * width for m in range(len(metrics))]
        ax.bar(xs, [values.get(m, np.nan) for m in metrics], width=width, label=name)
    ax.set_xticks(
        [m + width * (len(series) - 1) / 2 for m in range(len(metrics))], metrics, rotation=30, ha="right", fontsize=8
    )
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def scatter_labelled(points: np.ndarray, labels, path: str | os.PathLike, title: str = "") -> Path:
    """2-D points [N, 2] coloured by label, with a legend."""
    plt = pyplot()
    labels = np.asarray([str(v) for v in labels])
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(sorted(set(labels))):
        mask = labels == name
        ax.scatter(points[mask, 0], points[mask, 1], s=10, color=cmap(i % 20), label=name)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    return save_figure(fig, path)


def histograms(samples: dict[str, np.ndarray], path: str | os.PathLike, title: str = "", xlabel: str = "") -> Path:
    """Overlaid density histograms of a few samples (e.g. pair vs non-pair cosine)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    values = [np.asarray(v, dtype=float) for v in samples.values() if len(v)]
    lo = min(float(v.min()) for v in values) if values else 0.0
    hi = max(float(v.max()) for v in values) if values else 1.0
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 40)
    for name, v in samples.items():
        if len(v):
            ax.hist(np.asarray(v, dtype=float), bins=bins, alpha=0.55, density=True, label=f"{name} (n={len(v)})")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """[X, Y, Z, ...] on ``affine``'s grid reordered so that its first three axes run towards R, A, S."""
    import nibabel as nib

    return nib.orientations.apply_orientation(array, nib.orientations.io_orientation(np.asarray(affine, np.float64)))


def overlay_figure(
    base: np.ndarray,
    overlay: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    title: str = "",
    centre_voxel=None,
    base_range: tuple[float, float] = (0.0, 1.0),
    cmap: str = "magma",
    alpha=0.5,
) -> Path:
    """Axial, coronal and sagittal slices of ``base`` [X, Y, Z] with ``overlay`` on the same grid
    ([X, Y, Z] scalars in [0, 1] drawn with ``cmap``, or [X, Y, Z, 3] RGB drawn where non-zero),
    in radiological convention with true physical aspect, through ``centre_voxel`` (default the
    centre). ``affine`` maps the grid's voxels to world mm."""
    plt = pyplot()
    affine = np.asarray(affine, np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ornt = __import__("nibabel").orientations.io_orientation(affine)
    order = np.argsort(ornt[:, 0])
    sx, sy, sz = (float(spacing[int(i)]) for i in order)
    marker = np.zeros(base.shape, np.float32)
    centre = [s // 2 for s in base.shape] if centre_voxel is None else [int(v) for v in centre_voxel]
    marker[tuple(centre)] = 1.0
    base_r, over_r, mark_r = _ras(base, affine), _ras(overlay, affine), _ras(marker, affine)
    x, y, z = (int(v[0]) for v in np.nonzero(mark_r))
    rgb = over_r.ndim == 4
    views = [
        ("axial", base_r[::-1, ::-1, z].T, np.swapaxes(over_r[::-1, ::-1, z], 0, 1), sy / sx),
        ("coronal", base_r[::-1, y, ::-1].T, np.swapaxes(over_r[::-1, y, ::-1], 0, 1), sz / sx),
        ("sagittal", base_r[x, ::-1, ::-1].T, np.swapaxes(over_r[x, ::-1, ::-1], 0, 1), sz / sy),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (name, plane, heat, aspect) in zip(axes, views):
        ax.imshow(plane, cmap="gray", vmin=base_range[0], vmax=base_range[1], aspect=aspect, interpolation="nearest")
        if rgb:
            ax.imshow(
                np.dstack([np.clip(heat, 0, 1), (heat.sum(axis=-1) > 0) * float(alpha)]),
                aspect=aspect,
                interpolation="nearest",
            )
        else:
            ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
