"""Pretraining configuration: :class:`PretrainConfig` (a :class:`ctfm.runs.RunConfig`) and its presets.

A config file is YAML or JSON holding values (no code). :func:`resolve_pretrain_config` merges
preset < file < ``--set`` overrides (:func:`ctfm.runs.resolve_config`); the resolved config is
saved in the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ctfm.errors import OptionError
from ctfm.preprocess import get_preset
from ctfm.pretrain.losses import LOSSES, loss_arguments
from ctfm.runs import RunConfig, resolve_config


@dataclass
class PretrainConfig(RunConfig):
    """Every value a pretraining run depends on (docs/recipe.md for the ct-fm preset; run keys:
    :class:`ctfm.runs.RunConfig`, here with the ct-fm recipe's defaults)."""

    kind: ClassVar[str] = "pretraining"

    # RunConfig keys, at the ct-fm recipe's values.
    out: str = "runs/pretrain"
    data: str = ""  # a manifest (CSV/Parquet with 'path'), a folder of scans, or a cache folder (index.parquet)
    batch_size: int = 4  # scans per device and step
    num_workers: int = 5
    max_epochs: int = 500
    steps_per_epoch: int = 500
    lr: float = 1e-4
    weight_decay: float = 1e-6
    warmup_epochs: int = 10
    # Pretraining's own keys.
    model: str = "ct-fm"
    loss: str = "intrasample_ntxent"  # a name of ctfm.pretrain.losses.LOSSES
    temperature: float = 0.1  # for the losses that take one (the NT-Xent family)
    loss_kwargs: dict = field(default_factory=dict)  # other arguments of the loss, e.g. {"mu": 25.0} for vicreg
    num_crops: int = 15
    crop_size: list = field(
        default_factory=lambda: [32, 128, 128]
    )  # voxels of the ct-fm-ssl volume (64x128x128 mm at 3x1x1 mm)
    # Training voxel spacing in mm (S, P, L); empty: CT-FM's 3x1x1. The exported weights record the
    # resulting PreprocessSpec, so that `ctfm embed` feeds the encoder at the same spacing.
    spacing_mm: list = field(default_factory=list)
    # View augmentations (docs/recipe.md): random resized crop scale range, then each with probability p.
    crop_scale: list = field(default_factory=lambda: [0.33, 1.0])
    flip_p: float = 0.5
    histogram_shift_p: float = 0.5
    smooth_p: float = 0.5
    cache_workers: int = 1

    def check(self) -> None:
        super().check()
        if self.steps_per_epoch < 1:
            raise OptionError(f"steps_per_epoch {self.steps_per_epoch}: pretraining needs a positive number of steps")
        if self.num_crops < 2:
            raise OptionError(f"num_crops {self.num_crops}: intra-sample contrast needs at least 2 crops")
        for key in ("flip_p", "histogram_shift_p", "smooth_p"):
            if not 0.0 <= float(getattr(self, key)) <= 1.0:
                raise OptionError(f"{key} {getattr(self, key)}: expected a probability in [0, 1]")
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise OptionError(f"crop_scale {self.crop_scale}: expected [low, high] with 0 < low <= high <= 1")
        positive = all(isinstance(v, (int, float)) and v > 0 for v in self.spacing_mm)
        if self.spacing_mm and (len(self.spacing_mm) != 3 or not positive):
            raise OptionError(
                f"spacing_mm {self.spacing_mm}: expected three positive numbers in mm (S, P, L), e.g. [2, 2, 2]"
            )
        _check_loss(self)


PRESETS: dict[str, dict[str, Any]] = {
    # CT-FM's run (docs/recipe.md): 500 epochs x 500 steps, 4 GPUs x 4 scans, 15 crops x 2 views, fp16 mixed, DDP, sync BN.
    "ct-fm": {},
    # A laptop CPU: a narrow encoder, few crops, a handful of steps, full precision, one process.
    "tiny": {
        "model_kwargs": {"init_filters": 8},
        "num_crops": 4,
        "batch_size": 2,
        "num_workers": 0,
        "max_epochs": 2,
        "steps_per_epoch": 4,
        "warmup_epochs": 0,
        "precision": "32-true",
        "accelerator": "cpu",
        "devices": 1,
        "strategy": "auto",
        "sync_batchnorm": False,
        "checkpoint_every_n_epochs": 1,
    },
}


def resolve_pretrain_config(
    preset: str | None = None, file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> PretrainConfig:
    """The pretraining config of ``preset`` < ``file`` < ``overrides`` (:func:`ctfm.runs.resolve_config`)."""
    return resolve_config(PretrainConfig, PRESETS, preset, file, overrides)


def training_spec(config: PretrainConfig):
    """The PreprocessSpec the encoder trains on: ``ct-fm-ssl``, at ``config.spacing_mm`` if given."""
    spec = get_preset("ct-fm-ssl")
    if not config.spacing_mm or tuple(float(v) for v in config.spacing_mm) == spec.spacing_mm:
        return spec
    spacing = tuple(float(v) for v in config.spacing_mm)
    return spec.with_(
        name=f"ct-fm-ssl-{'x'.join(f'{v:g}' for v in spacing)}mm",
        spacing_mm=spacing,
        description=f"ct-fm-ssl at {'x'.join(f'{v:g}' for v in spacing)} mm",
    )


def _check_loss(config: PretrainConfig) -> None:
    """``loss`` names a registered loss and ``loss_kwargs`` holds only arguments it takes."""
    if not isinstance(config.loss, str) or config.loss not in LOSSES:
        raise OptionError(f"loss {config.loss!r}: unknown; choose one of {', '.join(sorted(LOSSES))}")
    if not isinstance(config.loss_kwargs, dict):
        raise OptionError(
            f'loss_kwargs {config.loss_kwargs!r}: expected a mapping of argument -> value, e.g. {{"mu": 25.0}}'
        )
    accepted = loss_arguments(config.loss)
    unknown = sorted(set(config.loss_kwargs) - accepted)
    if unknown:
        raise OptionError(
            f"loss_kwargs {unknown}: not arguments of loss {config.loss!r}; it takes "
            f"{', '.join(sorted(accepted)) or 'none'}"
        )
