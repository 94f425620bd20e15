"""PreprocessSpec: the patch-size rule, JSON round trips, hashing, validation, chain shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from ctfm.preprocess import (
    PRESETS,
    ForegroundCrop,
    PreprocessSpec,
    Window,
    build_transforms,
    get_preset,
    list_presets,
    preprocess,
)


def tiny_ct(shape=(24, 20, 16), spacing=(2.0, 2.0, 3.0)) -> MetaTensor:
    """A [1, X, Y, Z] HU block: air around a soft-tissue box with a bright core."""
    array = np.full(shape, -1000.0, dtype=np.float32)
    array[4:-4, 3:-3, 2:-2] = 40.0
    array[10:14, 8:12, 6:10] = 700.0
    return MetaTensor(
        torch.from_numpy(array)[None], affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    )


def test_patch_size_rule_matches_ct_fm():
    assert get_preset("ct-fm-ssl").patch_size_voxels == (32, 128, 128)  # ceil((64//3)/16)*16 = 32
    assert get_preset("ct-fm-patches").patch_size_voxels == (24, 128, 128)
    assert get_preset("ct-fm-1mm-320").patch_size_voxels == (320, 320, 320)
    assert get_preset("head-ct").patch_size_voxels == (48, 128, 128)
    spec = PreprocessSpec(
        name="x", spacing_mm=(1.5, 0.7, 0.7), size_policy="pad", patch_size_mm=(100, 100, 100), patch_multiple=16
    )
    assert spec.patch_size_voxels == tuple(math.ceil((100 // s) / 16) * 16 for s in (1.5, 0.7, 0.7))


@pytest.mark.parametrize("name", list_presets())
def test_json_round_trip_and_hash(name, tmp_path):
    spec = get_preset(name)
    again = PreprocessSpec.from_json(spec.to_json())
    assert again == spec and again.content_hash() == spec.content_hash()
    spec.save(tmp_path / "spec.json")
    assert PreprocessSpec.load(tmp_path / "spec.json") == spec


def test_hash_ignores_name_but_not_values():
    spec = get_preset("ct-fm-ssl")
    assert spec.with_(name="renamed", description="other").content_hash() == spec.content_hash()
    assert spec.with_(spacing_mm=(2.0, 1.0, 1.0)).content_hash() != spec.content_hash()
    assert len({p.content_hash() for p in PRESETS.values()}) == len(PRESETS)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"orientation": "SPX"}, "orientation"),
        ({"spacing_mm": (0.0, 1.0, 1.0)}, "spacing_mm"),
        ({"size_policy": "stretch"}, "size_policy"),
        ({"size_policy": "pad"}, "needs patch_size_mm"),
        ({"pad_mode": "wrap"}, "pad_mode"),
        ({"windows": ()}, "window"),
    ],
)
def test_invalid_specs_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessSpec(name="bad", **kwargs)


def test_window_order_and_unknown_keys_and_presets():
    with pytest.raises(ValueError, match="high_hu must exceed"):
        Window(100.0, 0.0)
    with pytest.raises(ValueError, match="unknown PreprocessSpec keys"):
        PreprocessSpec.from_dict({"name": "x", "spacing": [1, 1, 1]})
    with pytest.raises(ValueError, match="known presets: ct-fm-1mm-320, ct-fm-patches, ct-fm-ssl, head-ct"):
        get_preset("ctfm")


def test_ssl_chain_on_a_tiny_volume():
    out = preprocess(tiny_ct(), get_preset("ct-fm-ssl"))
    # Orientation SPL puts the superior axis first; crop keeps HU > 0 (the box), pad to >= 32x128x128.
    assert tuple(out.shape) == (1, 32, 128, 128)
    assert float(out.min()) == 0.0 and float(out.max()) == pytest.approx((700 + 1024) / 3072, abs=1e-6)
    # Padding of -1024 HU becomes exactly 0 after the window.
    assert float(out[0, 0, 0, 0]) == 0.0


def test_foreground_crop_before_and_after_resampling_differ_only_in_order():
    spec = PreprocessSpec(name="t", spacing_mm=(3.0, 2.0, 2.0), foreground_crop=ForegroundCrop(threshold_hu=0.0))
    out_after = preprocess(tiny_ct(), spec)
    out_before = preprocess(
        tiny_ct(), spec.with_(foreground_crop=ForegroundCrop(threshold_hu=0.0, before_resampling=True))
    )
    assert out_after.shape[0] == out_before.shape[0] == 1
    names_after = [type(t).__name__ for t in build_transforms(spec).transforms]
    names_before = [
        type(t).__name__
        for t in build_transforms(spec.with_(foreground_crop=ForegroundCrop(before_resampling=True))).transforms
    ]
    assert names_after.index("CropForeground") > names_after.index("Spacing")
    assert names_before.index("CropForeground") < names_before.index("Spacing")


def test_head_ct_stacks_four_windows_along_the_first_spatial_axis():
    out = preprocess(tiny_ct(), get_preset("head-ct"))
    assert tuple(out.shape) == (1, 192, 128, 128)
    blood, subdural, stroke, bone = torch.split(out, 48, dim=1)
    # Soft tissue at +40 HU: blood window [0, 80] -> 0.5, stroke [28, 36] -> clipped to 1.
    assert float(blood.max()) == pytest.approx(1.0) and float(stroke.max()) == pytest.approx(1.0)
    assert float(bone.max()) == pytest.approx((700 + 900) / 3000, abs=1e-6)
