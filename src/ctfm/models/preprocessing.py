"""The preprocessing a loaded model expects: weights carry the PreprocessSpec they were trained with.

A weights folder's ``ctfm.json`` sidecar records that spec under ``"preprocess"`` (and may pin a
spec per embedding mode under ``"embedding_preprocess"``); folders without a sidecar (the
published CT-FM folders, checkpoints) fall back to the registry entry of the model. Every
consumer (embedding, prediction, search, the app) asks :func:`preprocessing_for` instead of
choosing a preset itself, so an encoder pretrained at another spacing is fed at that spacing.
"""

from __future__ import annotations

import warnings

import torch.nn as nn

from ctfm.errors import CTInputError
from ctfm.models.registry import get_entry
from ctfm.preprocess import PreprocessSpec, get_preset
from ctfm.preprocess.spec import embedding_spec


class PreprocessOverrideWarning(UserWarning):
    """A user-chosen preset replaces the preprocessing recorded with the weights."""


def _sidecar(model: nn.Module) -> tuple[object, dict]:
    """``(weights_info, ctfm.json content)`` of a loaded model; ``{}`` where there is no sidecar."""
    info = getattr(model, "weights_info", None)
    metadata = getattr(info, "metadata", None) if info is not None else None
    return info, metadata if isinstance(metadata, dict) else {}


def training_spec_of(model: nn.Module, model_name: str) -> tuple[PreprocessSpec, str]:
    """``(spec the weights were trained with, where that came from)``.

    Read from the sidecar of the weights folder the model was loaded from, else the registry's
    preset for ``model_name`` (CT-FM's own recipe for the ct-fm models).
    """
    info, metadata = _sidecar(model)
    recorded = metadata.get("preprocess")
    if isinstance(recorded, dict):
        try:
            return PreprocessSpec.from_dict(recorded), "weights"
        except (TypeError, ValueError) as exc:
            raise CTInputError(
                getattr(info, "path", None),
                f"ctfm.json records an unusable preprocess spec ({exc})",
                "fix or remove the 'preprocess' entry of ctfm.json",
            ) from None
    return get_preset(get_entry(model_name).preprocess_preset), "registry"


def preprocessing_for(
    model: nn.Module, model_name: str, mode: str, preset: str | PreprocessSpec | None = None
) -> PreprocessSpec:
    """The PreprocessSpec that embedding ``mode`` uses with ``model``.

    Derived from the weights (see the module docstring); ``preset`` (a name or a spec) overrides
    it, with a :class:`PreprocessOverrideWarning` when it differs from what the weights expect.
    """
    info, metadata = _sidecar(model)
    pinned = (metadata.get("embedding_preprocess") or {}).get(mode)
    if isinstance(pinned, dict):
        try:
            expected = PreprocessSpec.from_dict(pinned)
        except (TypeError, ValueError) as exc:
            raise CTInputError(
                getattr(info, "path", None),
                f"ctfm.json records an unusable {mode} spec ({exc})",
                "fix or remove the 'embedding_preprocess' entry of ctfm.json",
            ) from None
    else:
        training, _ = training_spec_of(model, model_name)
        expected = embedding_spec(training, mode)
    if preset is None:
        return expected
    chosen = preset if isinstance(preset, PreprocessSpec) else get_preset(preset)
    if chosen.content_hash() != expected.content_hash():
        warnings.warn(
            f"preset {chosen.name} overrides the preprocessing these weights expect for {mode} mode ({expected.name}); "
            "embeddings will differ from the weights' own recipe",
            PreprocessOverrideWarning,
            stacklevel=2,
        )
    return chosen
