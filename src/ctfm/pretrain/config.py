"""Pretraining configuration: typed, values only, presets, ``--set key=value`` overrides.

A config file is YAML or JSON holding values (no code). ``resolve_config(preset, file, sets)``
merges preset < file < overrides; the resolved config is saved in the run folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ctfm.errors import CTInputError, one_line, OptionError
from ctfm.runtime import write_text_atomic
from ctfm.preprocess import get_preset
from ctfm.pretrain.losses import loss_arguments, LOSSES


@dataclass
class PretrainConfig:
    """Every value a pretraining run depends on (docs/recipe.md for the ct-fm preset)."""

    data: str = ""  # a manifest (CSV/Parquet with 'path'), a folder of scans, or a cache folder (index.parquet)
    out: str = "runs/pretrain"  # the run folder: config, metrics, TensorBoard, checkpoints, export
    cache: str = ""  # where to build the preprocessed cache (default: <out>/cache)
    model: str = "ct-fm"
    model_kwargs: dict = field(default_factory=dict)  # e.g. {"init_filters": 8} for a narrow encoder
    loss: str = "intrasample_ntxent"  # a name of ctfm.pretrain.losses.LOSSES
    temperature: float = 0.1  # for the losses that take one (the NT-Xent family)
    loss_kwargs: dict = field(default_factory=dict)  # other arguments of the loss, e.g. {"mu": 25.0} for vicreg
    num_crops: int = 15
    crop_size: list = field(default_factory=lambda: [32, 128, 128])  # voxels of the ct-fm-ssl volume (64x128x128 mm at 3x1x1 mm)
    # Training voxel spacing in mm (S, P, L); empty: CT-FM's 3x1x1. The exported weights record the
    # resulting PreprocessSpec, so that `ctfm embed` feeds the encoder at the same spacing.
    spacing_mm: list = field(default_factory=list)
    # View augmentations (docs/recipe.md): random resized crop scale range, then each with probability p.
    crop_scale: list = field(default_factory=lambda: [0.33, 1.0])
    flip_p: float = 0.5
    histogram_shift_p: float = 0.5
    smooth_p: float = 0.5
    batch_size: int = 4  # scans per device and step
    num_workers: int = 5
    max_epochs: int = 500
    steps_per_epoch: int = 500
    max_steps: int = -1  # stop early after this many optimiser steps (-1: run max_epochs)
    lr: float = 1e-4
    weight_decay: float = 1e-6
    warmup_epochs: int = 10
    precision: str = "16-mixed"  # Lightning precision: 32-true, 16-mixed, bf16-mixed
    accelerator: str = "auto"
    devices: int = 4
    num_nodes: int = 1
    strategy: str = "ddp"
    sync_batchnorm: bool = True
    checkpoint_every_n_epochs: int = 10
    seed: int = 0
    cache_workers: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def _read_file(path: str | Path) -> dict[str, Any]:

    path = Path(path)
    if not path.is_file():
        raise CTInputError(path, "no such config file", "check the path given to --config")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
        raise CTInputError(path, f"not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} ({one_line(exc, 120)})", "fix the syntax; a config holds key: value pairs") from None
    if not isinstance(data, dict):
        raise CTInputError(path, "a config file holds a mapping of keys to values", "write key: value pairs")
    if "preset" in data:
        data = {**PRESETS[_preset_name(data.pop("preset"))], **data}
    return data


def _preset_name(name: str) -> str:
    if name not in PRESETS:
        raise OptionError(f"unknown pretraining preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return name


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["lr=3e-4", "model_kwargs={\\"init_filters\\": 8}", "data=scans/"]`` -> dict (JSON values, else strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OptionError(f"--set {item!r}: expected key=value")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def resolve_config(preset: str | None = None, file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    values: dict[str, Any] = dict(PRESETS[_preset_name(preset)]) if preset else {}
    if file:
        values.update(_read_file(file))
    values.update(overrides or {})
    known = {f.name: f for f in fields(PretrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise OptionError(f"unknown config keys {unknown}; known keys: {', '.join(sorted(known))}")
    config = PretrainConfig(**values)
    if config.num_crops < 2:
        raise OptionError(f"num_crops {config.num_crops}: intra-sample contrast needs at least 2 crops")
    for key in ("flip_p", "histogram_shift_p", "smooth_p"):
        if not 0.0 <= float(getattr(config, key)) <= 1.0:
            raise OptionError(f"{key} {getattr(config, key)}: expected a probability in [0, 1]")
    if len(config.crop_scale) != 2 or not 0.0 < config.crop_scale[0] <= config.crop_scale[1] <= 1.0:
        raise OptionError(f"crop_scale {config.crop_scale}: expected [low, high] with 0 < low <= high <= 1")
    if config.spacing_mm and (len(config.spacing_mm) != 3 or not all(isinstance(v, (int, float)) and v > 0 for v in config.spacing_mm)):
        raise OptionError(f"spacing_mm {config.spacing_mm}: expected three positive numbers in mm (S, P, L), e.g. [2, 2, 2]")
    _check_loss(config)
    return config


def training_spec(config: PretrainConfig):
    """The PreprocessSpec the encoder trains on: ``ct-fm-ssl``, at ``config.spacing_mm`` if given."""

    spec = get_preset("ct-fm-ssl")
    if not config.spacing_mm or tuple(float(v) for v in config.spacing_mm) == spec.spacing_mm:
        return spec
    spacing = tuple(float(v) for v in config.spacing_mm)
    return spec.with_(name=f"ct-fm-ssl-{'x'.join(f'{v:g}' for v in spacing)}mm", spacing_mm=spacing, description=f"ct-fm-ssl at {'x'.join(f'{v:g}' for v in spacing)} mm")


def _check_loss(config: PretrainConfig) -> None:
    """``loss`` names a registered loss and ``loss_kwargs`` holds only arguments it takes."""

    if not isinstance(config.loss, str) or config.loss not in LOSSES:
        raise OptionError(f"loss {config.loss!r}: unknown; choose one of {', '.join(sorted(LOSSES))}")
    if not isinstance(config.loss_kwargs, dict):
        raise OptionError(f"loss_kwargs {config.loss_kwargs!r}: expected a mapping of argument -> value, e.g. {{\"mu\": 25.0}}")
    accepted = loss_arguments(config.loss)
    unknown = sorted(set(config.loss_kwargs) - accepted)
    if unknown:
        raise OptionError(f"loss_kwargs {unknown}: not arguments of loss {config.loss!r}; it takes {', '.join(sorted(accepted)) or 'none'}")


def save_config(config: PretrainConfig, path: str | Path) -> None:
    import yaml

    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=True))
