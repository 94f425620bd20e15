"""Self-supervised losses of CT-FM pre-training and of its ablations (docs/recipe.md, Pretraining).

One module per loss; each loss is a ``torch.nn.Module`` that works on its own, batched and
without Python loops over images or crops. Shapes use these letters:

- ``B``: images (scans) in the local batch;
- ``N``: crops per image (CT-FM: 15);
- ``2``: the two augmented views of one crop;
- ``D``: embedding dimension (CT-FM's projection head: 128).

Multi-crop embeddings travel as one tensor ``[B, N, 2, D]``. CT-FM's model returns the nested
form ``list[N] of list[2] of [B, D]``; :func:`stack_views` turns that into the tensor, and every
loss that takes ``[B, N, 2, D]`` accepts the nested form too.

Under mixed precision the losses run with autocast off and half-precision embeddings upcast to
float32 (exponentials of logits / 0.1 and D x D covariances are fragile in float16); float64
inputs stay float64.

:data:`LOSSES` maps a name (the ``loss`` key of a pretraining config) to its class;
:func:`build_loss` builds one. Losses with ``needs_prediction`` (SimSiam) are called as
``loss(z, p)`` with predictions ``p`` from a prediction head, all others as ``loss(z)``.

========================  =========================================================  ===========
name (:data:`LOSSES`)     what it is                                                 paper
========================  =========================================================  ===========
``intrasample_ntxent``    :class:`IntraSampleNTXentLoss`: negatives are the other    CT-FM
                          crops of the same scan (CT-FM's final loss)
``ntxent``                :class:`NTXentLoss`: SimCLR, negatives are the other       SimCLR
                          samples of the (optionally all-rank) batch
``simsiam``               :class:`SimSiamLoss`: negative cosine, stop-gradient       SimSiam
``vicreg``                :class:`VICRegLoss`: invariance, variance, covariance      VICReg
``intrasample_simsiam``   :class:`IntraSampleSimSiamLoss`: :class:`IntraSampleWrapper` CT-FM (abl)
                          around SimSiam, each scan's crops form one batch
``intrasample_vicreg``    :class:`IntraSampleVICRegLoss`: the wrapper around VICReg   CT-FM (abl)
========================  =========================================================  ===========

"CT-FM (abl)": the ablations of the CT-FM paper.

Papers:

- CT-FM: Pai, Hadzic et al., "Vision Foundation Models for Computed Tomography",
  arXiv 2501.09001 (2025).
- SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of
  Visual Representations", ICML 2020.
- SimSiam: Chen and He, "Exploring Simple Siamese Representation Learning", CVPR 2021.
- VICReg: Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
  Self-Supervised Learning", ICLR 2022.
"""

from __future__ import annotations

import inspect

import torch.nn as nn

from ctfm.pretrain.losses.common import stack_views
from ctfm.pretrain.losses.distributed import gather_with_gradient
from ctfm.pretrain.losses.intrasample_ntxent import IntraSampleNTXentLoss
from ctfm.pretrain.losses.intrasample_wrapper import IntraSampleSimSiamLoss, IntraSampleVICRegLoss, IntraSampleWrapper
from ctfm.pretrain.losses.ntxent import NTXentLoss
from ctfm.pretrain.losses.simsiam import SimSiamLoss
from ctfm.pretrain.losses.vicreg import VICRegLoss

__all__ = [
    "LOSSES",
    "IntraSampleNTXentLoss",
    "IntraSampleSimSiamLoss",
    "IntraSampleVICRegLoss",
    "IntraSampleWrapper",
    "NTXentLoss",
    "SimSiamLoss",
    "VICRegLoss",
    "build_loss",
    "check_loss_name",
    "loss_arguments",
    "gather_with_gradient",
    "stack_views",
]

LOSSES: dict[str, type[nn.Module]] = {
    "intrasample_ntxent": IntraSampleNTXentLoss,
    "ntxent": NTXentLoss,
    "simsiam": SimSiamLoss,
    "vicreg": VICRegLoss,
    "intrasample_simsiam": IntraSampleSimSiamLoss,
    "intrasample_vicreg": IntraSampleVICRegLoss,
}
"""Loss name -> class; keyword arguments go to the class (for ``intrasample_*`` wrappers, to the wrapped loss)."""


def check_loss_name(name: str) -> str:
    """``name`` if :data:`LOSSES` has it, else a ValueError listing the names."""
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(sorted(LOSSES))}")
    return name


def build_loss(name: str, **kwargs) -> nn.Module:
    """Build a loss by name (:data:`LOSSES`): ``build_loss("intrasample_ntxent", temperature=0.1)``."""
    return LOSSES[check_loss_name(name)](**kwargs)


def loss_arguments(name: str) -> set[str]:
    """The keyword arguments that loss ``name`` takes (those of the wrapped loss for wrappers)."""
    cls = LOSSES[check_loss_name(name)]
    target = getattr(cls, "wrapped", cls)
    parameters = inspect.signature(target.__init__).parameters.values()
    return {p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
