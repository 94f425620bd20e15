"""Gathering embeddings across ranks with gradient, for losses whose negatives span the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ctfm.runtime import rank_and_world_size


class _AllGatherWithGradient(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient for a slice back to its owner.

    Forward: local ``[B, ...]`` -> ``world_size`` tensors ``[B, ...]`` (rank order).
    Backward: the gradients of all gathered copies are summed over ranks (all_reduce) and the
    local slice is returned, so the local embeddings receive the gradient of *every* rank's
    loss. Combined with DDP's averaging of parameter gradients, this yields the gradient of the
    mean of the rank losses, i.e. of the loss on the global batch. (Written with all_reduce
    rather than reduce_scatter because gloo has no reduce_scatter.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor)
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *gathered_gradients: torch.Tensor) -> torch.Tensor:
        summed = torch.stack(gathered_gradients).contiguous()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed[dist.get_rank()]


def gather_with_gradient(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [B, ...] of all ranks along dim 0 -> ``[world_size * B, ...]``.

    Rank ``r``'s rows are ``r * B : (r + 1) * B``; gradients reach the local rows from every
    rank's use of them (see :class:`_AllGatherWithGradient`). Every rank must pass the same
    shape (use ``drop_last=True`` in the sampler). Without an initialised process group, or
    with one process, returns ``tensor`` itself.
    """
    _, world_size = rank_and_world_size(environment=False)
    if world_size == 1:
        return tensor
    return torch.cat(_AllGatherWithGradient.apply(tensor), dim=0)
