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
the same whichever worker, rank or resumed run draws it. Crops are read from the preprocessed
cache (:class:`ctfm.pretrain.cache.VolumeCache`) so that only the voxels a step uses are read.
"""

from __future__ import annotations

import numpy as np
import torch

from ctfm.preprocess import get_preset

CROP_SIZE = get_preset("ct-fm-ssl").patch_size_voxels  # (32, 128, 128): 64x128x128 mm at 3x1x1 mm, multiple of 16
NUM_CROPS = 15


def sample_state(seed: int, epoch: int, index: int) -> np.random.RandomState:
    """The RandomState of one sample: a pure function of (seed, epoch, index)."""
    mixed = np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0]
    return np.random.RandomState(int(mixed))


class HistogramShift:
    """MONAI's ``RandHistogramShift`` (same random draws, same mapping) without its sort search.

    The reference control points are evenly spaced over [min, max] of the image, so the segment
    of a value is ``floor((x - min) / step)``: one multiply-add per voxel instead of a
    ``searchsorted`` over the whole crop (about 4x faster). Values agree with MONAI's to float
    rounding (tests compare them).
    """

    def __init__(self, num_control_points: int = 5, prob: float = 0.5):
        from monai.transforms import RandHistogramShift

        self.draw = RandHistogramShift(num_control_points=num_control_points, prob=prob)

    def set_random_state(self, state: np.random.RandomState) -> None:
        self.draw.set_random_state(state=state)

    @property
    def _do_transform(self) -> bool:
        return self.draw._do_transform

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        self.draw.randomize()
        if not self.draw._do_transform:
            return img
        lo, hi = img.min(), img.max()
        if lo == hi:  # MONAI returns a constant image unchanged
            return img
        reference = torch.as_tensor(self.draw.reference_control_points, dtype=img.dtype)
        floating = torch.as_tensor(self.draw.floating_control_points, dtype=img.dtype)
        xp = reference * (hi - lo) + lo
        fp = floating * (hi - lo) + lo
        slope = (fp[1:] - fp[:-1]) / (xp[1:] - xp[:-1])
        offset = fp[:-1] - slope * xp[:-1]
        segments = len(slope)
        index = ((img - lo) * (segments / (hi - lo))).to(torch.long).clamp_(0, segments - 1)
        return slope[index] * img + offset[index]


class ViewAugment:
    """One view's augmentation chain (MONAI array transforms), [1, D, H, W] -> [1, D, H, W]."""

    def __init__(self, size=CROP_SIZE, scale=(0.33, 1.0), flip_p=0.5, histogram_p=0.5, smooth_p=0.5):
        from monai.transforms import RandFlip, RandGaussianSmooth, Resize

        self.size = tuple(size)
        self.scale = scale
        self.resize = Resize(spatial_size=self.size, mode="trilinear")
        self.flip = RandFlip(prob=flip_p, spatial_axis=[0])
        self.histogram = HistogramShift(num_control_points=5, prob=histogram_p)
        self.smooth = RandGaussianSmooth(prob=smooth_p)

    def __call__(self, view: torch.Tensor, state: np.random.RandomState) -> torch.Tensor:
        from monai.transforms import RandScaleCrop

        s = state.uniform(*self.scale)
        crop = RandScaleCrop(roi_scale=s, random_size=False)
        for t in (crop, self.flip, self.smooth):
            t.set_random_state(state=state)
        self.histogram.set_random_state(state)
        view = self.resize(crop(view))
        view = self.flip(view)
        view = self.histogram(view)
        view = self.smooth(view)
        return torch.as_tensor(view, dtype=torch.float32)


def crop_starts(shape, size, n: int, state: np.random.RandomState) -> np.ndarray:
    """[n, 3] uniformly random starts of ``size`` crops inside ``shape`` (crops never leave it)."""
    high = [max(1, s - c + 1) for s, c in zip(shape, size)]
    return np.stack([state.randint(0, h, size=n) for h in high], axis=1)


class MultiCropViews:
    """Scan volume -> [num_crops, 2, 1, *crop_size] views (float32, values in [0, 1] before
    augmentation). ``read(start, size)`` returns the crop [D, H, W] of the scan."""

    def __init__(self, num_crops: int = NUM_CROPS, crop_size=CROP_SIZE, scale=(0.33, 1.0), flip_p=0.5, histogram_p=0.5, smooth_p=0.5):
        if num_crops < 2:
            raise ValueError(f"num_crops {num_crops}: intra-sample contrast needs at least 2 crops (negatives come from the other crops)")
        self.num_crops = num_crops
        self.crop_size = tuple(int(c) for c in crop_size)
        self.augment = ViewAugment(self.crop_size, tuple(scale), flip_p=flip_p, histogram_p=histogram_p, smooth_p=smooth_p)

    def __call__(self, shape, read, state: np.random.RandomState) -> torch.Tensor:
        if any(s < c for s, c in zip(shape, self.crop_size)):
            raise ValueError(f"volume {tuple(shape)} is smaller than the crop {self.crop_size}: preprocess with ct-fm-ssl (it pads to the crop size)")
        from monai.data import get_track_meta, set_track_meta

        starts = crop_starts(shape, self.crop_size, self.num_crops, state)
        out = torch.empty((self.num_crops, 2, 1, *self.crop_size), dtype=torch.float32)
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors: the views need no affine bookkeeping (about 20 % faster)
        try:
            for i, start in enumerate(starts):
                crop = torch.from_numpy(np.ascontiguousarray(read(tuple(int(v) for v in start), self.crop_size), dtype=np.float32))[None]
                for v in range(2):
                    out[i, v] = self.augment(crop.clone(), state)
        finally:
            set_track_meta(tracking)
        return out

