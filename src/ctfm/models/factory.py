"""Where the registry, weight sources and loading meet (timm-style ``_factory``).

``create_model(name, weights=...)`` builds a registered architecture and loads weights strictly;
``save_pretrained`` writes a weights folder with the ctfm.json sidecar of the registry entry;
a registered model name given where a weights source belongs is refused with its ``hf-hub:``
spelling. :mod:`ctfm.models.registry` and :mod:`ctfm.models.weights` do not import each other.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from ctfm import __version__
from ctfm.errors import CTInputError, OptionError
from ctfm.models import weights as _weights
from ctfm.models.registry import find_entry, get_entry
from ctfm.models.weights import (
    CONFIG_NAME,
    HUB_PREFIX,
    SIDECAR_FORMAT,
    WEIGHTS_NAME,
    WeightsInfo,
    arch_config,
    portable_source,
)
from ctfm.preprocess import get_preset


def _refuse_model_name(source) -> None:
    """A registered model name that is not an existing path -> the ``hf-hub:`` spelling of its weights."""
    if not isinstance(source, str) or Path(source).expanduser().exists():
        return
    entry = find_entry(source)
    if entry is not None and entry.hub_id:
        raise CTInputError(
            source,
            "is a model name, not a weights source",
            f'for its published weights write weights="{HUB_PREFIX}{entry.hub_id}"',
        )


def resolve_weights(source: str | os.PathLike) -> Path:
    """:func:`ctfm.models.weights.resolve_weights`, refusing a registered model name with its
    ``hf-hub:`` spelling."""
    _refuse_model_name(source)
    return _weights.resolve_weights(source)


def load_weights(model: nn.Module, source: str | os.PathLike) -> WeightsInfo:
    """:func:`ctfm.models.weights.load_state_into`, refusing a registered model name with its
    ``hf-hub:`` spelling."""
    _refuse_model_name(source)
    return _weights.load_state_into(model, source)


def hub_id_of(repo: str) -> str:
    """A registered model name -> its published ``ORG/NAME``; anything else unchanged."""
    entry = find_entry(repo)
    return entry.hub_id if entry is not None and entry.hub_id else repo


def download_weights(repo: str, out: str | os.PathLike | None = None) -> Path:
    """Download a registered model's published weights, or ``[hf-hub:]ORG/NAME[@REV]`` -> its folder
    (see :func:`ctfm.models.weights.download_weights`)."""
    return _weights.download_weights(hub_id_of(repo), out=out)


def create_model(name: str, weights: str | os.PathLike | None = None, **overrides) -> nn.Module:
    """Build a registered model; with ``weights``, load them strictly (see ``ctfm.models.weights``).

    ``weights`` is a local folder (config.json + model.safetensors), ``hf-hub:ORG/NAME``, a
    ``.safetensors`` file or a CT-FM/Lightning ``.ckpt``. Overrides change constructor kwargs
    (e.g. ``init_filters=8`` for a narrow encoder).
    """
    entry = get_entry(name)
    kwargs = {**entry.kwargs}
    if weights is not None:
        # Like from_pretrained: a weights folder's config.json says how to build the model
        # (e.g. a narrow encoder); explicit overrides must agree with it (checked on load).
        arch = _folder_arch(weights)
        unknown = sorted(set(arch) - _constructor_arguments(entry.builder))
        if unknown:
            raise CTInputError(
                weights,
                f"config.json has arguments {unknown} that model {name!r} does not take",
                "choose the matching model (e.g. --model ct-fm-segresnet for a segmentation folder)",
            )
        kwargs.update(arch)
    model = entry.builder(**{**kwargs, **overrides})
    if weights is not None:
        _weights.load_state_into(model, weights)
    return model


def init_model(name: str, seed: int, **overrides) -> nn.Module:
    """A registered model with random weights from ``torch.manual_seed(seed)`` (same seed, same bytes on CPU).

    The global RNG state is restored afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, **overrides)


def _constructor_arguments(cls) -> set[str]:
    """Named constructor arguments of ``cls`` and of the MONAI classes it extends."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (object, nn.Module) or "__init__" not in vars(klass):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self":
                names.add(p.name)
    return names


def _folder_arch(weights) -> dict:
    """Constructor kwargs from ``config.json`` when ``weights`` resolves to a weights folder."""
    path = resolve_weights(weights)
    config = path / CONFIG_NAME if path.is_dir() else None
    if config is None or not config.is_file():
        return {}
    try:
        return dict(json.loads(config.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}  # load_weights reports a damaged config.json with the fix


def build_sidecar(
    model: nn.Module, name: str, sha256: str, provenance: dict | None = None, preprocess=None, extra: dict | None = None
) -> dict:
    """The ctfm.json content: model, PreprocessSpec, embedding pooling, weights sha256, provenance.

    ``preprocess`` is the PreprocessSpec the weights were trained with (default: the registry's);
    ``extra`` adds top-level entries (a segmentation model's ``labels`` and ``inference``).
    """
    entry = get_entry(name)
    arch = arch_config(model)
    if provenance is None:
        info = getattr(model, "weights_info", None)
        provenance = (
            {"source": "loaded", "loaded_from": portable_source(info.source), "loaded_sha256": info.sha256}
            if info is not None
            else {"source": "unspecified"}
        )
    return {
        "ctfm_format": SIDECAR_FORMAT,
        "model": name,
        "description": entry.description,
        "class": type(model).__name__,
        "preprocess": (preprocess or get_preset(entry.preprocess_preset)).to_dict(),
        "embedding": {
            "pooling": "avg",
            "feature_map": "last",
            "dim": int(arch["init_filters"]) * 2 ** (len(arch["blocks_down"]) - 1),
            "stride": 2 ** (len(arch["blocks_down"]) - 1),
            "description": "adaptive_avg_pool3d(encoder(x)[-1], 1).flatten(1): the global average of the last feature "
            "map",
        },
        "weights": {"file": WEIGHTS_NAME, "sha256": sha256, "parameters": sum(p.numel() for p in model.parameters())},
        "provenance": {**provenance, "ctfm_version": __version__},
        **(extra or {}),
    }


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    name: str = "ct-fm",
    provenance: dict | None = None,
    overwrite: bool = False,
    preprocess=None,
    extra: dict | None = None,
) -> Path:
    """Write ``model`` as a weights folder (config.json, model.safetensors, ctfm.json) -> the folder.

    ``name`` is the registered model it was created as (checked before anything is written).
    Atomic and byte-stable, see :func:`ctfm.models.weights.write_weights_folder`.
    """
    entry = get_entry(name)  # unknown names fail before anything is written
    _weights.target_of(model)
    if isinstance(entry.builder, type) and not isinstance(model, entry.builder):
        raise OptionError(
            f"model is a {type(model).__name__} but {name!r} builds a {entry.builder.__name__}; pass the name the model "
            "was created with"
        )
    return _weights.write_weights_folder(
        model,
        folder,
        sidecar=lambda sha256: build_sidecar(model, name, sha256, provenance, preprocess=preprocess, extra=extra),
        overwrite=overwrite,
    )


__all__ = [
    "build_sidecar",
    "create_model",
    "download_weights",
    "hub_id_of",
    "init_model",
    "load_weights",
    "resolve_weights",
    "save_pretrained",
]
