"""SimCLR's NT-Xent across samples, optionally over the batch of all ranks.

Paper: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctfm.pretrain.losses.common import (
    apply_reduction,
    check_pair,
    check_reduction,
    check_temperature,
    full_precision,
    split_stacked_views,
    upcast,
)
from ctfm.pretrain.losses.distributed import gather_with_gradient
from ctfm.runtime import rank_and_world_size


def _ntxent_per_anchor(
    z0: torch.Tensor,
    z1: torch.Tensor,
    candidates0: torch.Tensor,
    candidates1: torch.Tensor,
    first_row: int,
    temperature: float,
) -> torch.Tensor:
    """SimCLR's per-anchor loss ``[..., 2, B]`` (row v: anchors of view v), batched over leading dims.

    ``z0``, ``z1``: L2-normalised local views [..., B, D]. ``candidates0``, ``candidates1``: the
    same views of the whole (gathered) batch [..., M, D], in which the local samples are rows
    ``first_row : first_row + B``. The anchor z_v[k] meets 2M - 1 candidates: its positive
    z_{1-v}[k] and 2M - 2 negatives (every other view in the batch, both views of other samples).
    """
    local, total = z0.shape[-2], candidates0.shape[-2]
    anchors = torch.stack((z0, z1), dim=-3)  # [..., 2, B, D]
    candidates = torch.cat((candidates0, candidates1), dim=-2)  # [..., 2M, D]
    logits = anchors @ candidates.transpose(-1, -2).unsqueeze(-3) / temperature  # [..., 2, B, 2M]
    own_row = first_row + torch.arange(local, device=z0.device)  # [B]
    itself = torch.stack((own_row, total + own_row))  # [2, B]: view 0 in the first M columns
    partner = torch.stack((total + own_row, own_row))  # [2, B]
    positive_logit = torch.take_along_dim(logits, partner.unsqueeze(-1).expand(*logits.shape[:-1], 1), dim=-1)
    logits = logits.masked_fill(F.one_hot(itself, 2 * total).bool(), float("-inf"))
    return torch.logsumexp(logits, dim=-1) - positive_logit.squeeze(-1)


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent (normalised temperature-scaled cross-entropy) across samples.

    Inputs ``z0``, ``z1``: ``[B, D]``, the two views of B samples (or one stacked ``z0`` of shape
    ``[..., 2, D]`` whose leading dims are flattened into the batch, e.g. ``[B, 1, 2, D]``).
    After L2 normalisation each of the 2B views is an anchor; its positive is the other view of
    the same sample, its negatives are the 2B - 2 other views in the batch (Chen et al., ICML
    2020, Eq. 1, with cosine similarity). The loss is the mean over the 2B anchors;
    ``reduction="none"`` returns ``[2, B]`` (row v: anchors taken from view v).

    ``gather_distributed=True`` with an initialised process group of W > 1 ranks gathers both
    views from all ranks (with gradient, :func:`gather_with_gradient`): the local anchors then
    meet 2WB - 2 negatives. Each rank's loss is the mean over its *own* 2B anchors, so the mean of
    the rank losses equals the loss on the concatenated global batch, and with DDP's gradient
    averaging the update is that of the global loss. Every rank must hold the same B. Without a
    process group (or W = 1) the flag changes nothing.
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False, reduction: str = "mean"):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.gather_distributed = bool(gather_distributed)
        self.reduction = check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}, reduction={self.reduction!r}"

    def forward(self, z0: torch.Tensor, z1: torch.Tensor | None = None) -> torch.Tensor:
        """``z0``, ``z1`` [B, D] -> scalar, or [2, B] with ``reduction="none"``."""
        if z1 is None:
            z0, z1 = split_stacked_views(z0)
        check_pair(z0, z1)
        if z0.ndim != 2:
            raise ValueError(
                f"z0 has shape {tuple(z0.shape)}: expected [B, D] (or pass one stacked [..., 2, D] tensor)"
            )
        rank, world_size = rank_and_world_size(environment=False) if self.gather_distributed else (0, 1)
        if z0.shape[0] * world_size < 2:
            raise ValueError(
                f"NT-Xent got a batch of {z0.shape[0] * world_size} sample: it needs >= 2 samples "
                "(over all ranks when gathering) so that every anchor has negatives"
            )
        with full_precision(z0.device):
            z0, z1 = F.normalize(upcast(z0), dim=-1), F.normalize(upcast(z1), dim=-1)
            if world_size > 1:
                candidates0, candidates1 = gather_with_gradient(z0), gather_with_gradient(z1)
            else:
                candidates0, candidates1 = z0, z1
            per_anchor = _ntxent_per_anchor(z0, z1, candidates0, candidates1, rank * z0.shape[0], self.temperature)
            return apply_reduction(per_anchor, self.reduction)

    def forward_per_group(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        """Independent NT-Xent of each group: ``z0``, ``z1`` [G, M, D] -> ``[G]`` (never gathered).

        Group g is scored as its own batch of M samples: equal to ``forward(z0[g], z1[g])``.
        """
        check_pair(z0, z1)
        if z0.shape[-2] < 2:
            raise ValueError(
                f"NT-Xent groups of {z0.shape[-2]} sample (shape {tuple(z0.shape)}): each group needs >= 2 samples"
            )
        with full_precision(z0.device):
            z0, z1 = F.normalize(upcast(z0), dim=-1), F.normalize(upcast(z1), dim=-1)
            return _ntxent_per_anchor(z0, z1, z0, z1, 0, self.temperature).mean(dim=(-2, -1))
