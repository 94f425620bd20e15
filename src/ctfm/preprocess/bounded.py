"""The same preprocessing in bounded memory, for scans of any size.

MONAI's eager ``Spacing`` resamples the whole volume at once in float64 (a 1024x1024x251 scan
peaks near 8 GB). For specs without a foreground crop (e.g. ``ct-fm-1mm-320``) the output grid
depends only on the input's geometry, not its values, so we:

1. let MONAI compute that grid: the spec's transforms (orientation, spacing, pad/crop), called
   with ``lazy=True``, yield the final affine and shape without touching a voxel — the geometry
   is MONAI's own, not a re-derivation;
2. fill the output a slab of rows at a time with MONAI's ``SpatialResample`` (the resampler
   ``Spacing`` itself calls, same mode, padding and float64 precision), each from the smallest
   input block that holds every sample the slab needs (plus one voxel for linear interpolation),
   so that no value changes;
3. fill what the chain would pad with the pad value, and apply the window(s).

The result equals :func:`ctfm.preprocess.preprocess` (tests gate on 1e-5); peak memory is the
input, the output and one slab's block.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ctfm.preprocess import preprocess
from ctfm.preprocess.spec import PreprocessSpec
from ctfm.preprocess.transforms import AboveThreshold, window_transform

AXES = (("L", "R"), ("P", "A"), ("I", "S"))


def supports_bounded(spec: PreprocessSpec) -> bool:
    """Bounded execution needs a value-independent grid: no foreground crop, constant padding."""
    return (
        spec.foreground_crop is None
        and spec.pad_mode == "constant"
        and spec.size_policy in ("none", "pad", "pad_or_crop")
    )


def _geometry(image, spec: PreprocessSpec):
    """(spacing-grid affine, spacing-grid shape, final affine, final shape) from MONAI's transforms
    called one by one with ``lazy=True``: they record their geometry and touch no voxel (a lazy
    ``Compose`` would resample at its end)."""
    from monai.transforms import Orientation, ResizeWithPadOrCrop, Spacing, SpatialPad

    x = Orientation(axcodes=spec.orientation, labels=AXES, lazy=True)(image)
    if spec.spacing_mm is not None:
        x = Spacing(pixdim=spec.spacing_mm, mode=spec.interpolation, lazy=True)(x)
    grid_affine = torch.as_tensor(x.peek_pending_affine(), dtype=torch.float64)
    grid_shape = tuple(int(s) for s in x.peek_pending_shape())
    size = spec.patch_size_voxels
    if spec.size_policy == "pad":
        x = SpatialPad(spatial_size=size, lazy=True)(x)
    elif spec.size_policy == "pad_or_crop":
        x = ResizeWithPadOrCrop(spatial_size=size, lazy=True)(x)
    return (
        grid_affine,
        grid_shape,
        torch.as_tensor(x.peek_pending_affine(), dtype=torch.float64),
        tuple(int(s) for s in x.peek_pending_shape()),
    )


def _translate(affine: torch.Tensor, offset) -> torch.Tensor:
    out = affine.clone()
    out[:3, 3] = affine[:3, :3] @ torch.as_tensor(offset, dtype=torch.float64) + affine[:3, 3]
    return out


SLAB_BYTES = 256e6  # resampling working set per slab (float64 grid, coordinates and values)


def supports_bounded_crop(spec: PreprocessSpec) -> bool:
    """A foreground crop *after* resampling, nothing padded, one window: the resampled grid is
    value-independent, so it can be filled slab by slab and cropped afterwards (in HU, as the chain
    crops before windowing)."""
    crop = spec.foreground_crop
    return (
        crop is not None
        and not crop.before_resampling
        and spec.size_policy == "none"
        and len(spec.windows) == 1
        and spec.pad_mode == "constant"
    )


def preprocess_large(image, spec: PreprocessSpec):
    """``preprocess(image, spec)`` in bounded memory wherever the spec allows, else eagerly.

    The eager chain holds the input several times over in float64 while resampling (about 6.5 GB
    for a 512 x 512 x 800 CT); the bounded paths hold the input, the output and one slab.
    """
    from monai.transforms import CropForeground

    if supports_bounded(spec) and len(spec.windows) == 1:
        return preprocess_bounded(image, spec)
    if supports_bounded_crop(spec):
        hu = preprocess_bounded(image, spec.with_(foreground_crop=None), apply_window=False)
        crop = CropForeground(
            select_fn=AboveThreshold(spec.foreground_crop.threshold_hu), margin=spec.foreground_crop.margin_voxels
        )
        return window_transform(spec.windows[0])(crop(hu))
    return preprocess(image, spec)


def preprocess_bounded(image, spec: PreprocessSpec, rows_per_slab: int | None = None, apply_window: bool = True):
    """``preprocess(image, spec)`` computed a slab at a time; [1, X, Y, Z] HU -> [1, D, H, W].

    ``rows_per_slab`` defaults to what fits SLAB_BYTES (about 48 bytes per output voxel).
    ``apply_window=False`` returns the resampled HU (for a crop that the chain applies before the window).
    """
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    if not supports_bounded(spec):
        raise ValueError(
            f"spec {spec.name!r} has a foreground crop or non-constant padding: use ctfm.preprocess.preprocess"
        )
    if len(spec.windows) != 1:
        raise ValueError("bounded preprocessing supports one HU window")
    grid_affine, grid_shape, final_affine, final_shape = _geometry(image, spec)
    # final voxel j is spacing-grid voxel j + offset (offset < 0 where the chain pads)
    offset = np.rint((torch.linalg.inv(grid_affine) @ final_affine)[:3, 3].numpy()).astype(int)
    valid_lo = [max(0, -o) for o in offset]
    valid_hi = [min(f, n - o) for f, n, o in zip(final_shape, grid_shape, offset)]

    out = torch.full((1, *final_shape), float(spec.pad_value_hu), dtype=torch.float32)
    if rows_per_slab is None:
        rows_per_slab = max(1, int(SLAB_BYTES // (48 * final_shape[1] * final_shape[2])))
    src = image.as_tensor() if hasattr(image, "as_tensor") else image
    src_affine = torch.as_tensor(image.affine, dtype=torch.float64)
    to_src = torch.linalg.inv(src_affine) @ final_affine  # final voxel -> input voxel
    resample = SpatialResample(mode=spec.interpolation, padding_mode="border", align_corners=False, dtype=torch.float64)
    if all(hi > lo for lo, hi in zip(valid_lo, valid_hi)):
        for r0 in range(valid_lo[0], valid_hi[0], rows_per_slab):
            r1 = min(valid_hi[0], r0 + rows_per_slab)
            lo = [r0, valid_lo[1], valid_lo[2]]
            hi = [r1, valid_hi[1], valid_hi[2]]
            block, block_affine = _input_block(src, src_affine, to_src, lo, hi)
            slab = resample(
                MetaTensor(block, affine=block_affine),
                dst_affine=_translate(final_affine, lo),
                spatial_size=[high - low for low, high in zip(lo, hi)],
            )
            out[:, r0:r1, lo[1] : hi[1], lo[2] : hi[2]] = torch.as_tensor(slab, dtype=torch.float32)
    if apply_window:
        out = window_transform(spec.windows[0])(out)
    return MetaTensor(
        out,
        affine=final_affine.to(torch.float64),
        meta={"filename_or_obj": image.meta.get("filename_or_obj", "") if hasattr(image, "meta") else ""},
    )


def _input_block(src: torch.Tensor, src_affine: torch.Tensor, to_src: torch.Tensor, lo, hi):
    """The smallest input block holding every sample of final voxels [lo, hi), with its affine.

    Linear interpolation reads floor(c) and floor(c) + 1 around each sample coordinate c; the
    block is clamped to the input, where border padding then behaves as on the whole input.
    """
    corners = np.array(
        [[a, b, c, 1.0] for a in (lo[0], hi[0] - 1) for b in (lo[1], hi[1] - 1) for c in (lo[2], hi[2] - 1)]
    )
    coords = (to_src.numpy() @ corners.T)[:3]
    n = src.shape[1:]
    start = [max(0, int(math.floor(coords[i].min())) - 1) for i in range(3)]
    stop = [min(n[i], int(math.floor(coords[i].max())) + 3) for i in range(3)]
    start = [min(s, max(0, e - 1)) for s, e in zip(start, stop)]
    if any(e <= s for s, e in zip(start, stop)):  # the slab samples only beyond one border: clamp to it
        start = [min(max(s, 0), n[i] - 1) for i, s in enumerate(start)]
        stop = [max(e, s + 1) for s, e in zip(start, stop)]
    block = src[:, start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
    return block, _translate(src_affine, start)
