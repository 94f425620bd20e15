"""Encoders, heads, the model registry and weight loading.

>>> from ctfm.models import create_model, list_models
>>> encoder = create_model("ct-fm")                  # random init      # doctest: +SKIP
>>> encoder = create_model("ct-fm", weights="hf-hub:project-lighter/ct_fm_feature_extractor")  # doctest: +SKIP
>>> maps = encoder(x); vector = encoder.embed(x)     # 5 maps; [B, 512]  # doctest: +SKIP

Layout (timm-style): ``networks`` the modules, ``registry`` the named architectures (a leaf),
``weights`` sources, strict loading and the folder format (no model names), ``factory`` where
they meet (``create_model``, ``init_model``, ``save_pretrained``), ``segmentation`` the
segmentation model from any source with its class names (``labelmaps``). Importing this package needs
neither Lightning nor the CLI.
"""

from ctfm.models.factory import (
    build_sidecar,
    create_model,
    download_weights,
    init_model,
    load_weights,
    resolve_weights,
    save_pretrained,
)
from ctfm.models.manage import convert_checkpoint, init_weights_folder, model_table
from ctfm.models.networks import CTEncoder, CTSegResNet, pool_embedding
from ctfm.models.registry import ModelEntry, find_entry, get_entry, list_models, register_model
from ctfm.models.segmentation import LoadedSegmentation, load_segmentation_model, save_segmentation_model

__all__ = [
    "CTEncoder",
    "CTSegResNet",
    "ModelEntry",
    "build_sidecar",
    "convert_checkpoint",
    "create_model",
    "download_weights",
    "find_entry",
    "get_entry",
    "init_model",
    "init_weights_folder",
    "list_models",
    "model_table",
    "LoadedSegmentation",
    "load_segmentation_model",
    "load_weights",
    "pool_embedding",
    "register_model",
    "resolve_weights",
    "save_pretrained",
    "save_segmentation_model",
]
