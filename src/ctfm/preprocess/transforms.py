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
        self.scalers = [window_transform(w) for w in windows]
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
        crop = CropForeground(
            select_fn=AboveThreshold(spec.foreground_crop.threshold_hu), margin=spec.foreground_crop.margin_voxels
        )
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
        window = window_transform(spec.windows[0])
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
        steps.append(window_transform(spec.windows[0]))
    elif not single_window:
        steps.append(StackWindows(spec.windows, axis=spec.window_concat_axis))
    return Compose(steps)


def window_transform(window: Window):
    from monai.transforms import ScaleIntensityRange

    return ScaleIntensityRange(a_min=window.low_hu, a_max=window.high_hu, b_min=0.0, b_max=1.0, clip=True)


def preprocess(image, spec: PreprocessSpec):
    """Apply ``spec`` to one loaded CT ([1, X, Y, Z] HU MetaTensor); returns a MetaTensor."""
    return build_transforms(spec)(image)


def build_paired_transforms(spec: PreprocessSpec, image_key: str = "image", label_key: str = "label"):
    """The dictionary variant of :func:`build_transforms` for an image and its label map.

    The image goes through exactly the steps of ``build_transforms(spec)``; the label map
    [1, X, Y, Z] through the same spatial steps with nearest-neighbour resampling, the image's
    foreground box and zero (background) padding. For fine-tuning; one spec defines both chains.
    """
    from monai.transforms import (
        CenterSpatialCropd,
        Compose,
        CropForegroundd,
        Orientationd,
        ResizeWithPadOrCropd,
        Spacingd,
        SpatialPadd,
    )

    if len(spec.windows) != 1:
        raise ValueError(
            f"spec {spec.name!r} stacks {len(spec.windows)} windows along a spatial axis; a label map cannot follow it"
        )
    keys = (image_key, label_key)
    steps = [Orientationd(keys=keys, axcodes=spec.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    crop = None
    if spec.foreground_crop is not None:
        crop = CropForegroundd(
            keys=keys,
            source_key=image_key,
            select_fn=AboveThreshold(spec.foreground_crop.threshold_hu),
            margin=spec.foreground_crop.margin_voxels,
        )
    if crop is not None and spec.foreground_crop.before_resampling:
        steps.append(crop)
    if spec.spacing_mm is not None:
        steps.append(Spacingd(keys=keys, pixdim=spec.spacing_mm, mode=(spec.interpolation, "nearest")))
    if crop is not None and not spec.foreground_crop.before_resampling:
        steps.append(crop)
    size = spec.patch_size_voxels
    window = window_transform(spec.windows[0])
    pad_value = spec.pad_value_hu
    window_first = spec.pad_mode == "constant" and spec.size_policy != "none"
    if window_first:  # as build_transforms: window first, pad with the windowed pad value
        steps.append(window_transform_d(spec.windows[0], image_key))
        pad_value = float(window(torch.tensor([[[[spec.pad_value_hu]]]], dtype=torch.float32)).flatten()[0])
    image_pad = {"value": pad_value} if spec.pad_mode == "constant" else {}
    if spec.size_policy in ("pad", "pad_then_center_crop"):
        steps.append(SpatialPadd(keys=image_key, spatial_size=size, mode=spec.pad_mode, **image_pad))
        steps.append(SpatialPadd(keys=label_key, spatial_size=size, mode="constant", value=0))
        if spec.size_policy == "pad_then_center_crop":
            steps.append(CenterSpatialCropd(keys=keys, roi_size=size))
    elif spec.size_policy == "pad_or_crop":
        steps.append(ResizeWithPadOrCropd(keys=image_key, spatial_size=size, mode=spec.pad_mode, **image_pad))
        steps.append(ResizeWithPadOrCropd(keys=label_key, spatial_size=size, mode="constant", value=0))
    if not window_first:
        steps.append(window_transform_d(spec.windows[0], image_key))
    return Compose(steps)


def window_transform_d(window: Window, key: str):
    from monai.transforms import ScaleIntensityRanged

    return ScaleIntensityRanged(keys=key, a_min=window.low_hu, a_max=window.high_hu, b_min=0.0, b_max=1.0, clip=True)
