"""Multi-crop, two-view inputs of intra-sample contrastive learning (docs/recipe.md, Pretraining).

Per scan: ``num_crops`` (15) fixed-size crops of 32x128x128 voxels at uniformly random positions
of the ``ct-fm-ssl`` volume (MONAI's ``RandSpatialCropSamples`` with ``random_size=False``), each
copied into two views, and every view augmented independently with CT-FM's transforms:

1. random resized crop: s ~ U(0.33, 1); crop every axis to ceil(s x size) at a random position
   (MONAI ``RandScaleCrop``), resize back to the crop size, trilinear;
2. flip along axis 0 (superior-inferior), p = 0.5;
3. histogram shift with 5 control points, p = 0.5;
4. Gaussian smoothing, MONAI's default sigma range (0.25, 1.5) per axis, p = 0.5.

Randomness comes from one ``numpy.random.RandomState`` per (seed, epoch, sample): a sample is
the same whichever worker, rank or resumed run draws it. As in TorchIO (``get_params``), the
random parameters are drawn apart from the deterministic transform: ``get_params(state)``
returns a dataclass of everything drawn (crop positions, scale, flip, control points, sigmas),
``apply(..., params)`` uses only it, and ``__call__`` is the two in turn. The draws follow
MONAI's transforms (``RandScaleCrop``, ``RandFlip``, ``RandHistogramShift``,
``RandGaussianSmooth``) one for one, so a seed gives the views it gave when MONAI drew them. Crops are read from the preprocessed
cache (:class:`ctfm.pretrain.cache.VolumeCache`) so that only the voxels a step uses are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ctfm.errors import OptionError
from ctfm.preprocess import get_preset

CROP_SIZE = get_preset("ct-fm-ssl").patch_size_voxels  # (32, 128, 128): 64x128x128 mm at 3x1x1 mm, multiple of 16
NUM_CROPS = 15


def sample_state(seed: int, epoch: int, index: int) -> np.random.RandomState:
    """The RandomState of one sample: a pure function of (seed, epoch, index)."""
    mixed = np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0]
    return np.random.RandomState(int(mixed))


@dataclass(frozen=True)
class HistogramParams:
    """MONAI ``RandHistogramShift``'s draws: control points in [0, 1] of the intensity range."""

    reference: tuple[float, ...]  # evenly spaced, 0 ... 1
    floating: tuple[float, ...]  # where each reference point moves to (monotone, same ends)


class HistogramShift:
    """MONAI's ``RandHistogramShift`` (same random draws, same mapping) without its sort search.

    The reference control points are evenly spaced over [min, max] of the image, so the segment
    of a value is ``floor((x - min) / step)``: one multiply-add per voxel instead of a
    ``searchsorted`` over the whole crop (about 4x faster). Values agree with MONAI's to float
    rounding (tests compare them).
    """

    def __init__(self, num_control_points: int = 5, prob: float = 0.5):
        if num_control_points <= 2:
            raise OptionError(f"num_control_points {num_control_points}: the histogram shift needs at least 3")
        self.num_control_points = int(num_control_points)
        self.prob = min(max(float(prob), 0.0), 1.0)

    def get_params(self, state: np.random.RandomState) -> HistogramParams | None:
        """Draw as ``RandHistogramShift.randomize`` does; None when the shift does not fire."""
        if not state.rand() < self.prob:
            return None
        n = state.randint(self.num_control_points, self.num_control_points + 1)
        reference = np.linspace(0, 1, n)
        floating = np.copy(reference)
        for i in range(1, n - 1):
            floating[i] = state.uniform(floating[i - 1], floating[i + 1])
        return HistogramParams(tuple(float(v) for v in reference), tuple(float(v) for v in floating))

    @staticmethod
    def apply(img: torch.Tensor, params: HistogramParams | None) -> torch.Tensor:
        """[C, D, H, W] -> the piecewise-linear intensity map of ``params`` (``img`` when None)."""
        if params is None:
            return img
        lo, hi = img.min(), img.max()
        if lo == hi:  # MONAI returns a constant image unchanged
            return img
        reference = torch.as_tensor(np.asarray(params.reference), dtype=img.dtype)
        floating = torch.as_tensor(np.asarray(params.floating), dtype=img.dtype)
        xp = reference * (hi - lo) + lo
        fp = floating * (hi - lo) + lo
        slope = (fp[1:] - fp[:-1]) / (xp[1:] - xp[:-1])
        offset = fp[:-1] - slope * xp[:-1]
        segments = len(slope)
        index = ((img - lo) * (segments / (hi - lo))).to(torch.long).clamp_(0, segments - 1)
        return slope[index] * img + offset[index]

    def __call__(self, img: torch.Tensor, state: np.random.RandomState) -> torch.Tensor:
        return self.apply(img, self.get_params(state))


SMOOTH_SIGMA = (0.25, 1.5)  # MONAI RandGaussianSmooth's default range, per axis


@dataclass(frozen=True)
class ViewParams:
    """Everything drawn for one view of one crop.

    scale: s ~ U(scale range); the random resized crop keeps ``crop_size`` = ceil(s x size)
    voxels per axis starting at ``crop_start`` (inside the crop), then resizes back.
    flip: flipped along axis 0. histogram: the shift's control points, None when it does not
    fire. smooth_sigma: Gaussian sigmas (voxels, per axis), None when smoothing does not fire.
    """

    scale: float
    crop_start: tuple[int, int, int]
    crop_size: tuple[int, int, int]
    flip: bool
    histogram: HistogramParams | None
    smooth_sigma: tuple[float, float, float] | None


class ViewAugment:
    """One view's augmentation chain (MONAI array transforms), [1, D, H, W] -> [1, D, H, W]."""

    def __init__(self, size=CROP_SIZE, scale=(0.33, 1.0), flip_p=0.5, histogram_p=0.5, smooth_p=0.5):
        from monai.transforms import Flip, Resize

        self.size = tuple(size)
        self.scale = scale
        self.flip_p = min(max(float(flip_p), 0.0), 1.0)
        self.smooth_p = min(max(float(smooth_p), 0.0), 1.0)
        self.resize = Resize(spatial_size=self.size, mode="trilinear")
        self.flipper = Flip(spatial_axis=[0])
        self.histogram = HistogramShift(num_control_points=5, prob=histogram_p)

    def get_params(self, state: np.random.RandomState) -> ViewParams:
        """Draw one view's parameters, in the order (and with the calls) of the MONAI chain
        ``RandScaleCrop -> RandFlip -> RandHistogramShift -> RandGaussianSmooth``."""
        s = state.uniform(*self.scale)
        roi = tuple(min(c, math.ceil(s * c)) for c in self.size)  # RandScaleCrop's size, within the crop
        start = tuple(int(state.randint(0, c - r + 1)) if c > r else 0 for c, r in zip(self.size, roi))
        flip = bool(state.rand() < self.flip_p)
        histogram = self.histogram.get_params(state)
        sigma = tuple(float(state.uniform(*SMOOTH_SIGMA)) for _ in range(3)) if state.rand() < self.smooth_p else None
        return ViewParams(float(s), start, roi, flip, histogram, sigma)  # type: ignore[arg-type]

    def apply(self, view: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """[1, D, H, W] -> [1, D, H, W] float32, deterministic given ``params``."""
        from monai.transforms import GaussianSmooth, SpatialCrop

        crop = SpatialCrop(roi_slices=[slice(a, a + n) for a, n in zip(params.crop_start, params.crop_size)])
        view = self.resize(crop(view))
        if params.flip:
            view = self.flipper(view)
        view = HistogramShift.apply(view, params.histogram)
        if params.smooth_sigma is not None:
            view = GaussianSmooth(sigma=params.smooth_sigma, approx="erf")(view)
        return torch.as_tensor(view, dtype=torch.float32)

    def __call__(self, view: torch.Tensor, state: np.random.RandomState) -> torch.Tensor:
        return self.apply(view, self.get_params(state))


def crop_starts(shape, size, n: int, state: np.random.RandomState) -> np.ndarray:
    """[n, 3] uniformly random starts of ``size`` crops inside ``shape`` (crops never leave it)."""
    high = [max(1, s - c + 1) for s, c in zip(shape, size)]
    return np.stack([state.randint(0, h, size=n) for h in high], axis=1)


@dataclass(frozen=True)
class MultiCropParams:
    """Everything drawn for one sample: ``starts`` [num_crops, 3] (crop corners in the volume)
    and ``views[i][v]`` the :class:`ViewParams` of view v of crop i."""

    starts: np.ndarray
    views: tuple[tuple[ViewParams, ViewParams], ...]


class MultiCropViews:
    """Scan volume -> [num_crops, 2, 1, *crop_size] views (float32, values in [0, 1] before
    augmentation). ``read(start, size)`` returns the crop [D, H, W] of the scan."""

    def __init__(
        self,
        num_crops: int = NUM_CROPS,
        crop_size=CROP_SIZE,
        scale=(0.33, 1.0),
        flip_p=0.5,
        histogram_p=0.5,
        smooth_p=0.5,
    ):
        if num_crops < 2:
            raise OptionError(
                f"num_crops {num_crops}: intra-sample contrast needs at least 2 crops (negatives come from the other "
                "crops)"
            )
        self.num_crops = num_crops
        self.crop_size = tuple(int(c) for c in crop_size)
        self.augment = ViewAugment(
            self.crop_size, tuple(scale), flip_p=flip_p, histogram_p=histogram_p, smooth_p=smooth_p
        )

    def get_params(self, state: np.random.RandomState, shape) -> MultiCropParams:
        """Draw the crop positions in a volume of ``shape`` (D, H, W), then both views of each crop."""
        if any(s < c for s, c in zip(shape, self.crop_size)):
            raise OptionError(
                f"volume {tuple(shape)} is smaller than the crop {self.crop_size}: preprocess with ct-fm-ssl (it pads "
                "to the crop size)"
            )
        starts = crop_starts(shape, self.crop_size, self.num_crops, state)
        views = tuple((self.augment.get_params(state), self.augment.get_params(state)) for _ in range(self.num_crops))
        return MultiCropParams(starts, views)

    def apply(self, read, params: MultiCropParams) -> torch.Tensor:
        """Read each crop and augment its two views as ``params`` say -> [num_crops, 2, 1, *crop_size]."""
        from monai.data import get_track_meta, set_track_meta

        out = torch.empty((len(params.starts), 2, 1, *self.crop_size), dtype=torch.float32)
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors: the views need no affine bookkeeping (about 20 % faster)
        try:
            for i, (start, pair) in enumerate(zip(params.starts, params.views)):
                crop = torch.from_numpy(
                    np.ascontiguousarray(read(tuple(int(v) for v in start), self.crop_size), dtype=np.float32)
                )[None]
                for v in range(2):
                    out[i, v] = self.augment.apply(crop.clone(), pair[v])
        finally:
            set_track_meta(tracking)
        return out

    def __call__(self, shape, read, state: np.random.RandomState) -> torch.Tensor:
        return self.apply(read, self.get_params(state, shape))
