"""Encoders, heads, the model registry and weight loading.

>>> from ctfm.models import create_model, list_models
>>> encoder = create_model("ct-fm")                  # random init      # doctest: +SKIP
>>> encoder = create_model("ct-fm", weights="hf-hub:project-lighter/ct_fm_feature_extractor")  # doctest: +SKIP
>>> maps = encoder(x); vector = encoder.embed(x)     # 5 maps; [B, 512]  # doctest: +SKIP

Importing this package needs neither Lightning nor the CLI.
"""

from ctfm.models.networks import CTEncoder, CTSegResNet, pool_embedding
from ctfm.models.registry import ModelEntry, create_model, get_entry, list_models, register_model

__all__ = ["CTEncoder", "CTSegResNet", "ModelEntry", "create_model", "get_entry", "list_models", "pool_embedding", "register_model"]
