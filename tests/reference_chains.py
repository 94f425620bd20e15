"""The reference preprocessing chains, written out as CT-FM wrote them (docs/recipe.md), with MONAI.

These are deliberately NOT built from ctfm's PreprocessSpec: they are the independent reference
that the presets must reproduce. Each takes a path (or an already loaded image for inputs the
reference loader cannot read correctly) and returns the tensor the encoder would see.
"""

from __future__ import annotations

from monai import transforms as T

AXES = (("L", "R"), ("P", "A"), ("I", "S"))


def load_reference(path, reader=None):
    """CT-FM's loading: LoadImage(image_only=True) + EnsureChannelFirst (intrasample_simclr.yaml)."""
    return T.Compose([T.LoadImage(image_only=True, reader=reader), T.EnsureChannelFirst()])(str(path))


def ct_fm_ssl(image):
    """intrasample_simclr.yaml from orientation to the window, lazy flags as in the config."""
    return T.Compose(
        [
            T.Orientation(axcodes="SPL", labels=AXES, lazy=True),
            T.Spacing(pixdim=[3, 1, 1], mode="bilinear", lazy=True),
            T.CropForeground(lazy=True),
            T.SpatialPad(spatial_size=[32, 128, 128], value=-1024, lazy=True),
            T.ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True),
        ]
    )(image)


def ct_fm_patches(image):
    """CT-FM's zero-shot chain (feature_extractor.py): orientation SPL, [3,1,1] mm bilinear, foreground crop, window to [0,1]."""
    return T.Compose(
        [
            T.Orientation(axcodes="SPL", labels=AXES),
            T.Spacing(pixdim=[3, 1, 1], mode="bilinear"),
            T.CropForeground(),
            T.ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True),
        ]
    )(image)


def ct_fm_1mm_320(image):
    """extract_feat_LP.py: dictionary transforms, window before pad/crop to 320^3."""
    chain = T.Compose(
        [
            T.EnsureTyped(keys="image"),
            T.Orientationd(keys="image", axcodes="SPL", labels=AXES),
            T.Spacingd(keys="image", pixdim=(1.0, 1.0, 1.0), mode="bilinear"),
            T.ScaleIntensityRanged(keys="image", a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True),
            T.ResizeWithPadOrCropd(keys="image", spatial_size=(320, 320, 320)),
        ]
    )
    return chain({"image": image})["image"]


HEAD_WINDOWS = {"blood": (0, 80), "subdural": (-125, 175), "stroke": (28, 36), "bone": (-900, 2100)}


def head_ct(image):
    """sinoct.yaml: crop on raw HU, [5,2,2] mm, pad (minimum) + centre crop to
    [48,128,128], four windows concatenated along dim 1."""
    keys = list(HEAD_WINDOWS)
    chain = T.Compose(
        [
            T.Orientationd(keys="image", axcodes="SPL", labels=AXES),
            T.CropForegroundd(keys="image", source_key="image"),
            T.Spacingd(keys="image", pixdim=[5, 2, 2], mode="bilinear"),
            T.SpatialPadd(keys="image", spatial_size=[48, 128, 128], mode="minimum"),
            T.CenterSpatialCropd(keys="image", roi_size=[48, 128, 128]),
            T.CopyItemsd(keys="image", times=len(keys), names=keys),
            *[
                T.ScaleIntensityRanged(keys=k, a_min=lo, a_max=hi, b_min=0, b_max=1, clip=True)
                for k, (lo, hi) in HEAD_WINDOWS.items()
            ],
            T.ConcatItemsd(keys=keys, name="image", dim=1),
        ]
    )
    return chain({"image": image})["image"]


REFERENCE_CHAINS = {
    "ct-fm-ssl": ct_fm_ssl,
    "ct-fm-patches": ct_fm_patches,
    "ct-fm-1mm-320": ct_fm_1mm_320,
    "head-ct": head_ct,
}
