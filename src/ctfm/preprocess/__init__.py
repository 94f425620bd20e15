"""The one definition of preprocessing: :class:`PreprocessSpec`, its presets, its transforms,
and the checks that a loaded image is a usable CT."""

from ctfm.preprocess.spec import PRESETS, ForegroundCrop, PreprocessSpec, Window, get_preset, list_presets
from ctfm.preprocess.transforms import build_paired_transforms, build_transforms, preprocess
from ctfm.preprocess.validate import (
    Check,
    check_ct,
    check_scan,
    hu_statistics,
    is_usable,
    load_usable_ct,
    require_usable,
)

__all__ = [
    "PRESETS",
    "Check",
    "ForegroundCrop",
    "PreprocessSpec",
    "Window",
    "build_paired_transforms",
    "build_transforms",
    "check_ct",
    "check_scan",
    "get_preset",
    "hu_statistics",
    "is_usable",
    "list_presets",
    "load_usable_ct",
    "preprocess",
    "require_usable",
]
