"""SimSiam's symmetric negative cosine with stop-gradient.

Paper: Chen and He, "Exploring Simple Siamese Representation Learning", CVPR 2021.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctfm.pretrain.losses.common import check_pair, full_precision, split_stacked_views, upcast


def _negative_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)), per row: [..., M, D] -> [..., M]."""
    return -F.cosine_similarity(prediction, target.detach(), dim=-1)


class SimSiamLoss(nn.Module):
    """SimSiam's symmetric negative cosine with stop-gradient (Chen and He, CVPR 2021, Eq. 2-3).

    ``loss = 1/2 * D(p0, stopgrad(z1)) + 1/2 * D(p1, stopgrad(z0))``, ``D(p, z) = -cos(p, z)`` averaged
    over the batch. Inputs ``z0``, ``z1``: projections of the two views ``[B, D]``; ``p0``, ``p1``:
    the predictor outputs for them ``[B, D]``. No gradient reaches ``z0``/``z1`` through this
    loss (it reaches the encoder through ``p``). Returns a scalar in [-1, 1]; -1 when each
    prediction points along the other view's projection.

    ``forward(z, p)`` with two stacked tensors ``[..., 2, D]`` (projections, predictions; e.g. the
    pretraining module's ``[B, N, 2, D]``) flattens the leading dims into the batch.
    """

    needs_prediction = True  # the caller supplies predictions p (a prediction head on z)

    def forward(
        self, z0: torch.Tensor, z1: torch.Tensor, p0: torch.Tensor | None = None, p1: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``z0``, ``z1``, ``p0``, ``p1`` [B, D] -> scalar; or ``forward(z, p)``, each [..., 2, D]."""
        if p0 is None and p1 is None:
            if isinstance(z0, torch.Tensor) and (z0.ndim < 3 or z0.shape[-2] != 2):
                raise ValueError(
                    f"SimSiamLoss got two tensors of shape {tuple(z0.shape)}: pass (z0, z1, p0, p1) as [B, D] tensors, "
                    "or (z, p) as stacked [..., 2, D] tensors"
                )
            (z0, z1), (p0, p1) = split_stacked_views(z0, "z"), split_stacked_views(z1, "p")
        elif p0 is None or p1 is None:
            raise ValueError(
                "SimSiamLoss takes (z0, z1, p0, p1) as [B, D] tensors, or (z, p) as stacked [..., 2, D] tensors"
            )
        if not isinstance(z0, torch.Tensor) or z0.ndim != 2:
            shape = tuple(z0.shape) if isinstance(z0, torch.Tensor) else type(z0).__name__
            raise ValueError(f"z0 has shape {shape}: expected [B, D] (use IntraSampleWrapper for per-image groups)")
        return self.forward_per_group(z0, z1, p0, p1)

    def forward_per_group(self, z0: torch.Tensor, z1: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor) -> torch.Tensor:
        """Per-group loss: inputs ``[..., M, D]`` -> ``[...]`` (the mean over each group's M rows)."""
        check_pair(z0, z1)
        check_pair(p0, p1, ("p0", "p1"))
        if p0.shape[:-1] != z0.shape[:-1]:
            raise ValueError(f"p0 {tuple(p0.shape)} and z0 {tuple(z0.shape)} must have the same leading (batch) shape")
        with full_precision(z0.device):
            z0, z1, p0, p1 = (upcast(tensor) for tensor in (z0, z1, p0, p1))
            per_row = 0.5 * _negative_cosine(p0, z1) + 0.5 * _negative_cosine(p1, z0)
            return per_row.mean(dim=-1)
