"""Intra-sample versions of two-view losses: each image's crops form their own batch (CT-FM (abl))."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from ctfm.pretrain.losses.common import as_crop_view_tensor
from ctfm.pretrain.losses.simsiam import SimSiamLoss
from ctfm.pretrain.losses.vicreg import VICRegLoss


class IntraSampleWrapper(nn.Module):
    """Turn a two-view loss into an intra-sample one: each image's N crops form its own batch.

    CT-FM's ablations ``SimSiam_Intrasample`` and ``VicReg_Intrasample`` (docs/recipe.md, ablations).
    ``forward(*inputs)``: each input ``[B, N, 2, D]`` (or CT-FM's nesting, :func:`stack_views`);
    for image b the wrapped loss gets, for every input in order, view 0 then view 1 of its crops,
    ``[N, D]`` each, and the result is the mean over images of these per-image losses:

    - NT-Xent / VICReg: ``wrapper(z)`` = mean_b ``loss(z[b, :, 0], z[b, :, 1])``;
    - SimSiam: ``wrapper(z, p)`` = mean_b ``loss(z[b, :, 0], z[b, :, 1], p[b, :, 0], p[b, :, 1])``
      with ``z`` the projections and ``p`` the predictions.

    Losses defining ``forward_per_group`` (all of this module's pairwise losses) are computed for
    all images at once, without a loop; any other loss is called once per image (a loop over B).
    A gathering :class:`NTXentLoss` is refused: intra-sample negatives never cross images.
    """

    def __init__(self, loss: nn.Module | Callable[..., torch.Tensor]):
        super().__init__()
        if not callable(loss):
            raise TypeError(f"IntraSampleWrapper wraps a loss module or callable, got {type(loss).__name__}")
        if getattr(loss, "gather_distributed", False):
            raise ValueError(
                "IntraSampleWrapper got a loss with gather_distributed=True: intra-sample losses compare crops of "
                "one image only, so gathering other ranks' images is meaningless; pass gather_distributed=False"
            )
        self.loss = loss
        self.needs_prediction = bool(getattr(loss, "needs_prediction", False))

    def forward(self, *inputs: torch.Tensor | Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """``inputs``: one or more [B, N, 2, D] (or nested) -> scalar."""
        if not inputs:
            raise ValueError("IntraSampleWrapper needs at least one [B, N, 2, D] input")
        tensors = [as_crop_view_tensor(value, f"input {index}") for index, value in enumerate(inputs)]
        if any(tensor.shape[:3] != tensors[0].shape[:3] for tensor in tensors):
            shapes = ", ".join(str(tuple(tensor.shape)) for tensor in tensors)
            raise ValueError(f"inputs have shapes {shapes}: all must share the same B, N and 2 views")
        views = [tensor[:, :, view] for tensor in tensors for view in (0, 1)]  # each [B, N, D]
        per_group = getattr(self.loss, "forward_per_group", None)
        if per_group is not None:
            return per_group(*views).mean()
        batch = tensors[0].shape[0]
        per_image = [self.loss(*(view[image] for view in views)) for image in range(batch)]
        return torch.stack(per_image).mean()


class IntraSampleSimSiamLoss(IntraSampleWrapper):
    """CT-FM's ``SimSiam_Intrasample``: :class:`IntraSampleWrapper` around :class:`SimSiamLoss`;
    ``forward(z, p)`` with projections and predictions ``[B, N, 2, D]``. kwargs go to SimSiamLoss."""

    wrapped = SimSiamLoss

    def __init__(self, **kwargs):
        super().__init__(SimSiamLoss(**kwargs))


class IntraSampleVICRegLoss(IntraSampleWrapper):
    """CT-FM's ``VicReg_Intrasample``: :class:`IntraSampleWrapper` around :class:`VICRegLoss`;
    ``forward(z)`` with ``z`` [B, N, 2, D]. kwargs go to VICRegLoss."""

    wrapped = VICRegLoss

    def __init__(self, **kwargs):
        super().__init__(VICRegLoss(**kwargs))
