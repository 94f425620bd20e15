"""Model registry: ``create_model(name, weights=...)`` and ``list_models()`` (timm-style)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from ctfm.models.networks import CT_FM_ARCH, CTEncoder, CTSegResNet


@dataclass(frozen=True)
class ModelEntry:
    """A named architecture: how to build it, and what its weights expect.

    ``preprocess_preset`` names the PreprocessSpec the weights were trained with;
    ``hub_id`` is where the published weights live (loaded only from a local folder or cache).
    """

    name: str
    builder: Callable[..., nn.Module]
    kwargs: dict = field(default_factory=dict)
    description: str = ""
    preprocess_preset: str = "ct-fm-patches"
    hub_id: str | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def create_model(name: str, weights: str | None = None, **overrides) -> nn.Module:
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
            from ctfm.errors import CTInputError

            raise CTInputError(weights, f"config.json has arguments {unknown} that model {name!r} does not take", "choose the matching model (e.g. --model ct-fm-segresnet for a segmentation folder)")
        kwargs.update(arch)
    model = entry.builder(**{**kwargs, **overrides})
    if weights is not None:
        from ctfm.models.weights import load_weights

        load_weights(model, weights)
    return model


def _constructor_arguments(cls) -> set[str]:
    """Named constructor arguments of ``cls`` and of the MONAI classes it extends."""
    import inspect

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
    import json

    from ctfm.models.weights import resolve_weights

    path = resolve_weights(weights)
    config = path / "config.json" if path.is_dir() else None
    if config is None or not config.is_file():
        return {}
    try:
        return dict(json.loads(config.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}  # load_weights reports a damaged config.json with the fix


register_model(
    ModelEntry(
        name="ct-fm",
        builder=CTEncoder,
        kwargs=dict(CT_FM_ARCH),
        description="CT-FM SegResEncoder (77.8 M parameters): 5 feature maps, 512-d pooled embedding",
        preprocess_preset="ct-fm-patches",
        hub_id="project-lighter/ct_fm_feature_extractor",
    )
)
register_model(
    ModelEntry(
        name="ct-fm-segresnet",
        builder=CTSegResNet,
        kwargs={**CT_FM_ARCH, "out_channels": 2, "dsdepth": 4},
        description="SegResNetDS with the CT-FM encoder (keys encoder.*), for segmentation fine-tuning",
        preprocess_preset="ct-fm-patches",
        hub_id="project-lighter/ct_fm_segresnet",
    )
)
