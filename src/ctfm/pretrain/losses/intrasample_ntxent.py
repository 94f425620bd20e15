"""CT-FM's intra-sample NT-Xent: the crops of one scan are each other's negatives (docs/recipe.md).

Paper: CT-FM, Pai, Hadzic et al., "Vision Foundation Models for Computed Tomography",
arXiv 2501.09001 (2025); NT-Xent from SimCLR (Chen et al., ICML 2020).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctfm.pretrain.losses.common import (
    apply_reduction,
    as_crop_view_tensor,
    check_reduction,
    check_temperature,
    full_precision,
    upcast,
)
from ctfm.pretrain.losses.vicreg import variance_hinge


def _intrasample_ntxent_per_anchor(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """CT-FM's per-(image, crop) loss ``[B, N]`` of L2-normalised ``z`` [B, N, 2, D] (docs/recipe.md).

    Anchor of crop i: view 0 of crop i. Candidates: the 2N views of the same image, flattened
    crop-major so that view v of crop j sits in column 2j + v. Column 2i (the anchor itself) is
    removed, column 2i + 1 is the positive, the 2(N - 1) others are the negatives.
    """
    batch, crops, _, dim = z.shape
    anchors = z[:, :, 0]  # [B, N, D]
    candidates = z.reshape(batch, 2 * crops, dim)  # [B, 2N, D]
    logits = anchors @ candidates.transpose(1, 2) / temperature  # [B, N, 2N]
    crop_index = torch.arange(crops, device=z.device)
    positive_logit = logits[:, crop_index, 2 * crop_index + 1]  # [B, N]
    anchor_itself = F.one_hot(2 * crop_index, 2 * crops).bool()  # [N, 2N]
    logits = logits.masked_fill(anchor_itself, float("-inf"))
    return torch.logsumexp(logits, dim=-1) - positive_logit


class IntraSampleNTXentLoss(nn.Module):
    """CT-FM's intra-sample NT-Xent: crops of one scan are each other's negatives (docs/recipe.md).

    Input ``z``: ``[B, N, 2, D]`` (images, crops, views, dim) or CT-FM's nesting
    ``list[N] of list[2] of [B, D]`` (see :func:`stack_views`). With every embedding L2-normalised,
    for image b and crop i:

    - anchor ``a = z[b, i, 0]`` (view 0; view 1 is never an anchor, as in CT-FM);
    - positive ``s+ = <a, z[b, i, 1]>``;
    - negatives: ``<a, z[b, j, v]>`` for every other crop j != i of the *same* image and both
      views v: 2(N - 1) logits. Other images of the batch are never compared;
    - ``loss[b, i] = -log(exp(s+/t) / (exp(s+/t) + sum exp(s-/t)))``, the cross-entropy of the
      1 + 2(N - 1) logits over the temperature t with the positive as target.

    ``reduction="mean"`` (default, CT-FM) returns the mean over b and i (a scalar), ``"sum"``
    the sum, ``"none"`` the ``[B, N]`` per-anchor losses.

    ``variance_weight`` w (default 0, as in CT-FM's runs) blends in VICReg's variance term:
    ``(1 - w) * L + w * V`` with ``V = mean_d relu(1 - sqrt(Var(z_d) + variance_eps))``, computed on
    the *unnormalised* ``z`` (after L2 normalisation every feature's standard deviation is at
    most 1/sqrt(D), so the hinge would be nearly constant). Var is the unbiased variance over the
    B * N embeddings of one view, per feature dimension; V averages over features and the two
    views. With ``reduction="none"`` V is added to every entry, so that the mean of the
    ``[B, N]`` result equals the ``"mean"`` loss. Needs B * N >= 2 when w > 0.

    Paper: CT-FM (Pai, Hadzic et al., arXiv 2501.09001); NT-Xent from SimCLR (Chen et al.,
    ICML 2020); the variance term from VICReg (Bardes et al., ICLR 2022).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        variance_weight: float = 0.0,
        variance_eps: float = 1e-4,
        reduction: str = "mean",
    ):
        super().__init__()
        self.temperature = check_temperature(temperature)
        if not 0.0 <= variance_weight <= 1.0:
            raise ValueError(
                f"variance_weight={variance_weight!r}: must lie in [0, 1] (it blends (1 - w) * NT-Xent + w * variance)"
            )
        if not variance_eps >= 0:
            raise ValueError(f"variance_eps={variance_eps!r}: must be >= 0")
        self.variance_weight = float(variance_weight)
        self.variance_eps = float(variance_eps)
        self.reduction = check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, variance_weight={self.variance_weight}, reduction={self.reduction!r}"

    def forward(self, z: torch.Tensor | Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """``z`` [B, N, 2, D] (or nested) -> scalar, or [B, N] with ``reduction="none"``."""
        z = as_crop_view_tensor(z)
        batch, crops = z.shape[:2]
        if crops < 2:
            raise ValueError(
                f"z has {crops} crop per image (shape {tuple(z.shape)}): intra-sample NT-Xent needs N >= 2 crops, "
                "since its negatives are the other crops of the same image"
            )
        if self.variance_weight > 0 and batch * crops < 2:
            raise ValueError(f"variance_weight > 0 needs B * N >= 2 embeddings per view, got shape {tuple(z.shape)}")
        with full_precision(z.device):
            z = upcast(z)
            per_anchor = _intrasample_ntxent_per_anchor(F.normalize(z, dim=-1), self.temperature)
            if self.variance_weight > 0:
                per_view = z.transpose(0, 2).reshape(2, batch * crops, z.shape[-1])  # [2, B*N, D]
                variance_term = variance_hinge(per_view, self.variance_eps).mean()
                per_anchor = (1.0 - self.variance_weight) * per_anchor + self.variance_weight * variance_term
            return apply_reduction(per_anchor, self.reduction)
