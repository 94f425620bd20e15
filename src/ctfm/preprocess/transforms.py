"""MONAI transform chains built from a :class:`PreprocessSpec` (and nowhere else)."""

from __future__ import annotations

import torch

from ctfm.preprocess.spec import PreprocessSpec, Window


class AboveThreshold:
    """Foreground selector ``x > threshold`` (a picklable replacement for a lambda)."""

    def __init__(self, threshold: float = 0.0):
        self.threshold = float(threshold)

    def __call__(self, x):
        return x > self.threshold

    def __repr__(self) -> str:
        return f"AboveThreshold({self.threshold})"


class StackWindows:
    """Window one image several times and concatenate the results along ``axis``.

    [1, D, H, W] -> [1, n*D, H, W] for ``axis=1``: CT-FM's head-CT chain stacks its four
    windows along the first spatial axis, not as channels (REFERENCE.md §4.3, pitfall 6).
    """

    def __init__(self, windows: tuple[Window, ...], axis: int = 1):
        from monai.transforms import ScaleIntensityRange

        self.scalers = [ScaleIntensityRange(a_min=w.low_hu, a_max=w.high_hu, b_min=0.0, b_max=1.0, clip=True) for w in windows]
        self.axis = axis

    def __call__(self, image):
        return torch.cat([scale(image) for scale in self.scalers], dim=self.axis)


def build_transforms(spec: PreprocessSpec):
    """The MONAI ``Compose`` of ``spec``: MetaTensor [1, X, Y, Z] in HU -> [C', D, H, W] in [0, 1].

    Input is what :func:`ctfm.io.load_ct` returns (channel first, HU, RAS affine).
    """
    from monai.transforms import (
        CenterSpatialCrop,
        Compose,
        CropForeground,
        Orientation,
        ResizeWithPadOrCrop,
        ScaleIntensityRange,
        Spacing,
        SpatialPad,
    )

    # labels spelled out: MONAI's current default, stated so its deprecation notice stays quiet.
    steps = [Orientation(axcodes=spec.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    crop = None
    if spec.foreground_crop is not None:
        crop = CropForeground(select_fn=AboveThreshold(spec.foreground_crop.threshold_hu), margin=spec.foreground_crop.margin_voxels)
    if crop is not None and spec.foreground_crop.before_resampling:
        steps.append(crop)
    if spec.spacing_mm is not None:
        steps.append(Spacing(pixdim=spec.spacing_mm, mode=spec.interpolation))
    if crop is not None and not spec.foreground_crop.before_resampling:
        steps.append(crop)

    size = spec.patch_size_voxels
    pad_kwargs = {"value": spec.pad_value_hu} if spec.pad_mode == "constant" else {}
    if spec.size_policy == "pad":
        steps.append(SpatialPad(spatial_size=size, mode=spec.pad_mode, **pad_kwargs))
    elif spec.size_policy == "pad_or_crop":
        steps.append(ResizeWithPadOrCrop(spatial_size=size, mode=spec.pad_mode, **pad_kwargs))
    elif spec.size_policy == "pad_then_center_crop":
        steps.append(SpatialPad(spatial_size=size, mode=spec.pad_mode, **pad_kwargs))
        steps.append(CenterSpatialCrop(roi_size=size))

    if len(spec.windows) == 1:
        w = spec.windows[0]
        steps.append(ScaleIntensityRange(a_min=w.low_hu, a_max=w.high_hu, b_min=0.0, b_max=1.0, clip=True))
    else:
        steps.append(StackWindows(spec.windows, axis=spec.window_concat_axis))
    return Compose(steps)


def preprocess(image, spec: PreprocessSpec):
    """Apply ``spec`` to one loaded CT ([1, X, Y, Z] HU MetaTensor); returns a MetaTensor."""
    return build_transforms(spec)(image)
