"""What ``ctfm models`` does, as library calls: the model table, checkpoint conversion into a
weights folder, and randomly initialised weights folders.

>>> folder = convert_checkpoint("epoch=449-step=225000-v1.ckpt", "weights/ct-fm-pretrain")  # doctest: +SKIP
>>> folder = init_weights_folder("ct-fm", "weights/tiny", seed=3, init_filters=8)        # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ctfm.errors import CTInputError
from ctfm.models.factory import init_model, load_weights, save_pretrained
from ctfm.models.labelmaps import default_labels, resolve_labels
from ctfm.models.registry import get_entry, list_models
from ctfm.models.segmentation import save_segmentation_model
from ctfm.models.weights import portable_source


def model_table() -> list[dict]:
    """One row per registered model: name, description, params, preprocess preset, hub id."""
    rows = []
    for name in list_models():
        entry = get_entry(name)
        with torch.device("meta"):  # count parameters without allocating them
            params = sum(p.numel() for p in entry.builder(**entry.kwargs).parameters())
        rows.append(
            {
                "name": name,
                "description": entry.description,
                "params": params,
                "preprocess": entry.preprocess_preset,
                "hub_id": entry.hub_id,
            }
        )
    return rows


def model_overrides(name: str, init_filters: int | None = None, out_channels: int | None = None, labels=None) -> dict:
    """Constructor overrides of registered model ``name`` (checked): the first level's width, the
    number of output classes, or the class names (``labels``) that set it."""
    entry = get_entry(name)
    overrides = {}
    if init_filters is not None:
        if init_filters < 1:
            raise CTInputError(
                None,
                f"--init-filters must be a positive integer, got {init_filters}",
                "use e.g. --init-filters 8 for a narrow test model",
            )
        overrides["init_filters"] = init_filters
    if out_channels is not None:
        if "out_channels" not in entry.kwargs:
            raise CTInputError(
                None,
                f"--out-channels applies to segmentation models, not {name!r}",
                "drop it, or use --model ct-fm-segresnet",
            )
        if out_channels < 1:
            raise CTInputError(
                None,
                f"--out-channels must be a positive integer, got {out_channels}",
                "give the number of classes including background",
            )
        overrides["out_channels"] = out_channels
    if labels is not None:
        if "out_channels" not in entry.kwargs:
            raise CTInputError(
                None,
                f"--labels applies to segmentation models, not {name!r}",
                "drop it, or use ct-fm-segresnet",
            )
        n = len(resolve_labels(labels))
        if overrides.get("out_channels", n) != n:
            raise CTInputError(
                None,
                f"--out-channels {overrides['out_channels']} disagrees with --labels"
                f" ({n} classes including background)",
                "give one of them",
            )
        overrides["out_channels"] = n
    return overrides


def save_model_folder(model, out, name: str, provenance: dict, labels=None, overwrite: bool = False) -> Path:
    """save_pretrained, or for a segmentation model save_segmentation_model with its class names
    (``labels``, default: numbered classes)."""
    if "out_channels" in get_entry(name).kwargs:
        labels = labels if labels is not None else default_labels(int(model.out_channels))
        return save_segmentation_model(model, out, labels, provenance=provenance, overwrite=overwrite)
    return save_pretrained(model, out, name=name, provenance=provenance, overwrite=overwrite)


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    model: str = "ct-fm",
    seed: int = 0,
    labels=None,
    overwrite: bool = False,
    init_filters: int | None = None,
    out_channels: int | None = None,
) -> tuple[Path, object]:
    """Load ``checkpoint`` (a CT-FM/Lightning ``.ckpt``, ``.pt``, ``.safetensors``, a weights folder or
    ``hf-hub:``) strictly into registered ``model`` and write a weights folder with its provenance.

    Parts the checkpoint does not hold (e.g. a decoder) are drawn from ``seed``. Returns the folder
    and the :class:`ctfm.models.weights.WeightsInfo` of the load.
    """
    net = init_model(model, seed, **model_overrides(model, init_filters, out_channels, labels))
    info = load_weights(net, checkpoint)
    provenance = {
        "source": "converted",
        "converted_from": portable_source(checkpoint),
        "converted_from_sha256": info.sha256,
        "converted_from_format": info.format,
        "ignored_keys": len(info.ignored_keys),
        "loaded_into": info.loaded_into,
    }
    if info.loaded_into != "model":
        provenance["seed"] = seed  # the parts outside the checkpoint were drawn from it
    if info.metadata and info.format in ("ckpt", "torch"):
        provenance.update({k: info.metadata[k] for k in ("epoch", "global_step") if k in info.metadata})
    return save_model_folder(net, out, model, provenance, labels, overwrite), info


def init_weights_folder(
    model: str,
    out: str | os.PathLike,
    seed: int = 0,
    labels=None,
    overwrite: bool = False,
    init_filters: int | None = None,
    out_channels: int | None = None,
) -> Path:
    """Write registered ``model`` with weights from ``torch.manual_seed(seed)`` (same seed, same sha256)."""
    net = init_model(model, seed, **model_overrides(model, init_filters, out_channels, labels))
    return save_model_folder(net, out, model, {"source": "random-init", "seed": seed}, labels, overwrite)


__all__ = ["convert_checkpoint", "init_weights_folder", "model_overrides", "model_table", "save_model_folder"]
