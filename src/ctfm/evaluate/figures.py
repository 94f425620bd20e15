"""Figures: three orthogonal slices of volumes, shown in radiological convention."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

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


def orthogonal_slices_figure(panels: list[tuple[str, object, tuple[float, float]]], path: str | os.PathLike, title: str = "") -> Path:
    """Save a PNG with one row per panel: (label, image with affine, (vmin, vmax)).

    Each row shows the centre axial, coronal and sagittal slices with true physical aspect.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
