"""The one definition of CT-FM preprocessing: a serialisable spec and its named presets.

Every path that feeds an encoder (pretraining, embedding, fine-tuning, the app) builds its
transforms from a :class:`PreprocessSpec` through :func:`ctfm.preprocess.build_transforms`.
Axis conventions follow CT-FM: after ``Orientation("SPL")`` a tensor is [C, S, P, L], so spacing
and patch sizes are given in that order (axis 0 = superior-inferior).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ctfm.errors import OptionError
from ctfm.runtime import write_text_atomic

SIZE_POLICIES = ("none", "pad", "pad_or_crop", "pad_then_center_crop")
PAD_MODES = ("constant", "minimum", "edge", "reflect")


@dataclass(frozen=True)
class Window:
    """An HU window mapped linearly onto [0, 1] and clipped."""

    low_hu: float
    high_hu: float
    name: str = ""

    def __post_init__(self):
        if not self.high_hu > self.low_hu:
            raise OptionError(f"window {self.name or ''} [{self.low_hu}, {self.high_hu}]: high_hu must exceed low_hu")


@dataclass(frozen=True)
class ForegroundCrop:
    """Crop to the bounding box of voxels whose raw HU exceed ``threshold_hu``.

    CT-FM crops on raw HU with MONAI's default ``x > 0`` (docs/recipe.md), i.e. the box
    of soft tissue and bone, not of the body outline.
    """

    threshold_hu: float = 0.0
    margin_voxels: int = 0
    before_resampling: bool = False  # the head-CT chain crops before Spacing, the others after


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything that decides what an encoder sees.

    Order of operations (fixed): orientation -> [foreground crop, if before resampling] ->
    spacing -> [foreground crop] -> size policy (pad / pad-or-crop / pad + centre crop to
    ``patch_size_voxels``) -> HU window(s) to [0, 1]. Padding is expressed in HU *before* the
    window, so a pad of -1024 HU equals a pad of 0 after the [-1024, 2048] window.
    """

    name: str
    orientation: str = "SPL"
    spacing_mm: tuple[float, float, float] | None = (3.0, 1.0, 1.0)
    interpolation: str = "bilinear"
    foreground_crop: ForegroundCrop | None = field(default_factory=ForegroundCrop)
    size_policy: str = "none"
    patch_size_mm: tuple[float, float, float] | None = None
    patch_multiple: int = 1
    pad_mode: str = "constant"
    pad_value_hu: float = -1024.0
    windows: tuple[Window, ...] = (Window(-1024.0, 2048.0, "ct-fm"),)
    window_concat_axis: int = (
        1  # several windows are concatenated along this tensor dim (1 = first spatial axis, as CT-FM's head-CT chain)
    )
    description: str = ""

    def __post_init__(self):
        if len(self.orientation) != 3 or sorted(
            self.orientation.upper().replace("R", "L").replace("A", "P").replace("I", "S")
        ) != ["L", "P", "S"]:
            raise OptionError(f"orientation {self.orientation!r}: expected three axis codes like 'SPL' or 'RAS'")
        if self.spacing_mm is not None and (len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0):
            raise OptionError(
                f"spacing_mm {self.spacing_mm}: expected three positive numbers (mm, in orientation order)"
            )
        if self.size_policy not in SIZE_POLICIES:
            raise OptionError(f"size_policy {self.size_policy!r}: expected one of {', '.join(SIZE_POLICIES)}")
        if self.size_policy != "none" and self.patch_size_mm is None:
            raise OptionError(f"size_policy {self.size_policy!r} needs patch_size_mm")
        if self.pad_mode not in PAD_MODES:
            raise OptionError(f"pad_mode {self.pad_mode!r}: expected one of {', '.join(PAD_MODES)}")
        if not self.windows:
            raise OptionError("windows: give at least one HU window")
        if self.patch_multiple < 1:
            raise OptionError(f"patch_multiple {self.patch_multiple}: must be >= 1")

    @property
    def patch_size_voxels(self) -> tuple[int, int, int] | None:
        """Patch size in voxels: ``ceil((mm // spacing) / multiple) * multiple`` per axis.

        This is CT-FM's rule (intrasample_simclr.yaml): [64, 128, 128] mm at [3, 1, 1] mm with
        multiple 16 gives [32, 128, 128].
        """
        if self.patch_size_mm is None:
            return None
        spacing = self.spacing_mm or (1.0, 1.0, 1.0)
        m = self.patch_multiple
        return tuple(int(math.ceil((mm // sp) / m) * m) for mm, sp in zip(self.patch_size_mm, spacing))

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["windows"] = [asdict(w) for w in self.windows]
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        data = dict(data)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise OptionError(
                f"unknown PreprocessSpec keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        if data.get("foreground_crop") is not None:
            data["foreground_crop"] = ForegroundCrop(**data["foreground_crop"])
        if "windows" in data:
            data["windows"] = tuple(Window(**w) for w in data["windows"])
        for key in ("spacing_mm", "patch_size_mm"):
            if data.get(key) is not None:
                data[key] = tuple(float(v) for v in data[key])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write the spec as JSON, all or nothing."""
        write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PreprocessSpec:
        return cls.from_json(Path(path).read_text())

    def content_hash(self) -> str:
        """sha256 of what changes the output (the name and description do not)."""
        payload = self.to_dict()
        payload.pop("name")
        payload.pop("description")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def with_(self, **changes) -> PreprocessSpec:
        return replace(self, **changes)


CT_FM_WINDOW = Window(-1024.0, 2048.0, "ct-fm")

PRESETS: dict[str, PreprocessSpec] = {
    "ct-fm-ssl": PreprocessSpec(
        name="ct-fm-ssl",
        description="CT-FM pre-training volume before the random crops (docs/recipe.md)",
        spacing_mm=(3.0, 1.0, 1.0),
        foreground_crop=ForegroundCrop(threshold_hu=0.0),
        size_policy="pad",
        patch_size_mm=(64.0, 128.0, 128.0),
        patch_multiple=16,
        pad_value_hu=-1024.0,
    ),
    "ct-fm-patches": PreprocessSpec(
        name="ct-fm-patches",
        description="CT-FM inference preprocessing for sliding (24,128,128) patches (docs/recipe.md)",
        spacing_mm=(3.0, 1.0, 1.0),
        foreground_crop=ForegroundCrop(threshold_hu=0.0),
        size_policy="none",
        patch_size_mm=(72.0, 128.0, 128.0),
    ),
    "ct-fm-1mm-320": PreprocessSpec(
        name="ct-fm-1mm-320",
        description="CT-FM whole-scan embedding of extract_feat_LP.py: 1 mm, no crop, pad/crop to 320^3 "
        "(docs/recipe.md)",
        spacing_mm=(1.0, 1.0, 1.0),
        foreground_crop=None,
        size_policy="pad_or_crop",
        patch_size_mm=(320.0, 320.0, 320.0),
        pad_value_hu=-1024.0,
    ),
    "head-ct": PreprocessSpec(
        name="head-ct",
        description="Head-CT triage (SinoCT/CQ500): crop, 5x2x2 mm, 48x128x128, four windows stacked on axis 0 "
        "(docs/recipe.md)",
        spacing_mm=(5.0, 2.0, 2.0),
        foreground_crop=ForegroundCrop(threshold_hu=0.0, before_resampling=True),
        size_policy="pad_then_center_crop",
        patch_size_mm=(240.0, 256.0, 256.0),
        pad_mode="minimum",
        windows=(
            Window(0.0, 80.0, "blood"),
            Window(-125.0, 175.0, "subdural"),
            Window(28.0, 36.0, "stroke"),
            Window(-900.0, 2100.0, "bone"),
        ),
        window_concat_axis=1,
    ),
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> PreprocessSpec:
    """A named preset, or a ``ValueError`` listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise OptionError(
            f"unknown preprocessing preset {name!r}; known presets: {', '.join(list_presets())}"
        ) from None


# ---- the preprocessing that goes with a set of weights ------------------------------------------
# CT-FM's own recipe embeds with fixed presets (whole scans at 1 mm in 320^3, patches at the
# training resolution). Any other training spec gives specs derived from it, so that an encoder
# pretrained at another spacing embeds at that spacing.
CT_FM_TRAINING_PRESETS = ("ct-fm-ssl", "ct-fm-patches")
EMBEDDING_PRESETS = {"whole": "ct-fm-1mm-320", "patches": "ct-fm-patches", "dense": "ct-fm-patches"}
WHOLE_FIELD_OF_VIEW_MM = 320.0  # the whole-scan input of the reference extraction: 320 mm per axis
WHOLE_MULTIPLE = 16  # the encoder's total stride


def is_ct_fm_training_spec(spec: PreprocessSpec) -> bool:
    """True when ``spec`` computes what one of CT-FM's own training presets computes."""
    return spec.content_hash() in {PRESETS[name].content_hash() for name in CT_FM_TRAINING_PRESETS}


def embedding_spec(training: PreprocessSpec, mode: str) -> PreprocessSpec:
    """The spec that embedding ``mode`` ("whole", "patches" or "dense") uses for weights trained
    with ``training``.

    - CT-FM's recipe (``ct-fm-ssl`` / ``ct-fm-patches``): the fixed presets of EMBEDDING_PRESETS.
    - any other spec: ``patches``/``dense`` keep it whole but do not pad (sliding windows of its
      crop size); ``whole`` keeps its orientation, spacing, interpolation and windows, and pads or
      crops to a 320 mm field of view in voxels that are a multiple of 16.
    """
    if mode not in EMBEDDING_PRESETS:
        raise OptionError(f"mode {mode!r}: expected one of {', '.join(EMBEDDING_PRESETS)}")
    if is_ct_fm_training_spec(training):
        return PRESETS[EMBEDDING_PRESETS[mode]]
    if mode in ("patches", "dense"):
        return training.with_(
            name=f"{training.name}+patches",
            size_policy="none",
            description=f"sliding windows at the resolution of {training.name}",
        )
    return PRESETS["ct-fm-1mm-320"].with_(
        name=f"{training.name}+whole",
        description=f"whole scan at the resolution of {training.name}, {WHOLE_FIELD_OF_VIEW_MM:g} mm field of view",
        orientation=training.orientation,
        spacing_mm=training.spacing_mm,
        interpolation=training.interpolation,
        windows=training.windows,
        window_concat_axis=training.window_concat_axis,
        patch_size_mm=(WHOLE_FIELD_OF_VIEW_MM,) * 3,
        patch_multiple=1 if training.spacing_mm is None else WHOLE_MULTIPLE,
    )
