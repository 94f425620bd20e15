"""Model registry: named architectures (timm-style ``_registry``), a leaf module.

It knows the networks and nothing about weights: building a model with weights is
:func:`ctfm.models.factory.create_model`, reading and writing weights :mod:`ctfm.models.weights`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from ctfm.errors import OptionError
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


def find_entry(name: str) -> ModelEntry | None:
    """The entry registered as ``name``, or None."""
    return _REGISTRY.get(name)


def get_entry(name: str) -> ModelEntry:
    entry = find_entry(name)
    if entry is None:
        raise OptionError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return entry


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
