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
    windows along the first spatial axis, not as channels (docs/recipe.md, Preprocessing presets).
    """

    def __init__(self, windows: tuple[Window, ...], axis: int = 1):
        self.scalers = [_window(w) for w in windows]
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
    pad_value = spec.pad_value_hu
    single_window = len(spec.windows) == 1
    window_first = single_window and spec.pad_mode == "constant" and spec.size_policy != "none"
    if window_first:
        # Same result, less work: window the smaller unpadded volume, then pad with the windowed
        # value of pad_value_hu (computed by the same transform, so bit-identical).
        window = _window(spec.windows[0])
        steps.append(window)
        pad_value = float(window(torch.tensor([[[[spec.pad_value_hu]]]], dtype=torch.float32)).flatten()[0])
    pad_kwargs = {"value": pad_value} if spec.pad_mode == "constant" else {}
    if spec.size_policy == "pad":
        steps.append(SpatialPad(spatial_size=size, mode=spec.pad_mode, **pad_kwargs))
    elif spec.size_policy == "pad_or_crop":
        steps.append(ResizeWithPadOrCrop(spatial_size=size, mode=spec.pad_mode, **pad_kwargs))
    elif spec.size_policy == "pad_then_center_crop":
        steps.append(SpatialPad(spatial_size=size, mode=spec.pad_mode, **pad_kwargs))
        steps.append(CenterSpatialCrop(roi_size=size))

    if single_window and not window_first:
        steps.append(_window(spec.windows[0]))
    elif not single_window:
        steps.append(StackWindows(spec.windows, axis=spec.window_concat_axis))
    return Compose(steps)


def _window(window: Window):
    from monai.transforms import ScaleIntensityRange

    return ScaleIntensityRange(a_min=window.low_hu, a_max=window.high_hu, b_min=0.0, b_max=1.0, clip=True)


def preprocess(image, spec: PreprocessSpec):
    """Apply ``spec`` to one loaded CT ([1, X, Y, Z] HU MetaTensor); returns a MetaTensor."""
    return build_transforms(spec)(image)
