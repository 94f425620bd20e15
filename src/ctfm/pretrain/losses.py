"""Self-supervised losses of CT-FM pre-training and of its ablations (docs/recipe.md, Pretraining).

Each loss is a ``torch.nn.Module`` that works on its own, batched and without Python loops
over images or crops. Shapes use these letters:

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

========================  =========================================================  ===========
name (:data:`LOSSES`)     what it is                                                 paper
========================  =========================================================  ===========
``intrasample_ntxent``    :class:`IntraSampleNTXentLoss`: negatives are the other    CT-FM
                          crops of the same scan (CT-FM's final loss)
``ntxent``                :class:`NTXentLoss`: SimCLR, negatives are the other       SimCLR
                          samples of the (optionally all-rank) batch
``simsiam``               :class:`SimSiamLoss`: negative cosine, stop-gradient       SimSiam
``vicreg``                :class:`VICRegLoss`: invariance, variance, covariance      VICReg
``intrasample_simsiam``   :class:`IntraSampleWrapper` around SimSiam: each scan's    CT-FM (abl)
                          crops form one batch
``intrasample_vicreg``    :class:`IntraSampleWrapper` around VICReg                  CT-FM (abl)
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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "IntraSampleNTXentLoss",
    "IntraSampleWrapper",
    "NTXentLoss",
    "SimSiamLoss",
    "VICRegLoss",
    "build_loss",
    "gather_with_gradient",
    "stack_views",
]

REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# Input checks and reshaping
# --------------------------------------------------------------------------------------------


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: the temperature must be > 0 (CT-FM uses 0.1)")
    return float(temperature)


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    return reduction


def _reduce(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    return per_item


def stack_views(nested: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """CT-FM's nested model output ``list[N] of list[2] of [B, D]`` -> one tensor ``[B, N, 2, D]``.

    ``nested[i][v]`` is view ``v`` of crop ``i`` for every image of the batch (CT-FM's model output
    mirrors the nesting of its input). The result satisfies
    ``stack_views(nested)[b, i, v] == nested[i][v][b]``. Tuples work as well as lists.
    """
    if isinstance(nested, torch.Tensor) or not isinstance(nested, Sequence) or len(nested) == 0:
        raise TypeError(
            f"stack_views expects a non-empty list of crops, each a list of 2 views [B, D]; got {type(nested).__name__}"
            + (f" of length {len(nested)}" if isinstance(nested, Sequence) else "")
        )
    reference_shape = None
    for crop_index, views in enumerate(nested):
        if isinstance(views, torch.Tensor) or not isinstance(views, Sequence) or len(views) != 2:
            raise ValueError(
                f"crop {crop_index}: expected a list of exactly 2 views (view 0, view 1), got "
                f"{type(views).__name__}" + (f" of length {len(views)}" if isinstance(views, Sequence) else "")
            )
        for view_index, view in enumerate(views):
            if not isinstance(view, torch.Tensor) or view.ndim != 2:
                shape = tuple(view.shape) if isinstance(view, torch.Tensor) else type(view).__name__
                raise ValueError(f"crop {crop_index}, view {view_index}: expected a [B, D] tensor, got {shape}")
            if reference_shape is None:
                reference_shape = view.shape
            elif view.shape != reference_shape:
                raise ValueError(
                    f"crop {crop_index}, view {view_index}: shape {tuple(view.shape)} differs from "
                    f"{tuple(reference_shape)} of crop 0, view 0; all views must be [B, D] with the same B and D"
                )
    # One stack per crop over its 2 views ([B, 2, D]), then one over crops ([B, N, 2, D]).
    return torch.stack([torch.stack(tuple(views), dim=1) for views in nested], dim=1)


def _as_crop_view_tensor(z: torch.Tensor | Sequence[Sequence[torch.Tensor]], argument: str = "z") -> torch.Tensor:
    """``[B, N, 2, D]`` tensor or CT-FM nesting -> ``[B, N, 2, D]`` tensor, checked."""
    if not isinstance(z, torch.Tensor):
        z = stack_views(z)
    if z.ndim != 4 or z.shape[2] != 2:
        raise ValueError(
            f"{argument} has shape {tuple(z.shape)}: expected [B, N, 2, D] (batch, crops, 2 views, dim) "
            "or the nested list[N] of list[2] of [B, D]"
        )
    return z


def _check_pair(first: torch.Tensor, second: torch.Tensor, names: tuple[str, str] = ("z0", "z1")) -> None:
    for name, tensor in zip(names, (first, second)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, D], got {type(tensor).__name__}")
        if tensor.ndim < 2:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}: expected [B, D]")
    if first.shape != second.shape:
        raise ValueError(
            f"{names[0]} {tuple(first.shape)} and {names[1]} {tuple(second.shape)} differ: "
            "the two views must have the same [B, D] shape"
        )


def _split_stacked_views(z: torch.Tensor, argument: str = "z0") -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., 2, D]`` -> (view 0, view 1), each ``[M, D]`` with M the product of the leading dims."""
    if z.ndim < 3 or z.shape[-2] != 2:
        raise ValueError(
            f"{argument} has shape {tuple(z.shape)} and no second view was given: pass (z0, z1) as two "
            "[B, D] tensors, or one stacked tensor [..., 2, D] whose leading dims become the batch"
        )
    flat = z.reshape(-1, 2, z.shape[-1])
    return flat[:, 0], flat[:, 1]


@contextmanager
def _full_precision(device: torch.device) -> Iterator[None]:
    """Autocast off inside a loss: logits, exponentials and covariances are computed in float32+."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 -> float32 (mixed-precision embeddings); other dtypes unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


# --------------------------------------------------------------------------------------------
# Distributed gathering
# --------------------------------------------------------------------------------------------


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


def _distributed_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is unavailable or not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_gradient(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [B, ...] of all ranks along dim 0 -> ``[world_size * B, ...]``.

    Rank ``r``'s rows are ``r * B : (r + 1) * B``; gradients reach the local rows from every
    rank's use of them (see :class:`_AllGatherWithGradient`). Every rank must pass the same
    shape (use ``drop_last=True`` in the sampler). Without an initialised process group, or
    with one process, returns ``tensor`` itself.
    """
    _, world_size = _distributed_world()
    if world_size == 1:
        return tensor
    return torch.cat(_AllGatherWithGradient.apply(tensor), dim=0)


# --------------------------------------------------------------------------------------------
# Batched cores (leading dims are independent groups)
# --------------------------------------------------------------------------------------------


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


def _variance_hinge(z: torch.Tensor, eps: float) -> torch.Tensor:
    """VICReg's variance term of ``z`` [..., M, D] -> ``[...]``: mean_d relu(1 - sqrt(Var_M(z_d) + eps)).

    Var is the unbiased variance over the M samples, per feature dimension d.
    """
    standard_deviation = torch.sqrt(z.var(dim=-2) + eps)  # [..., D]
    return F.relu(1.0 - standard_deviation).mean(dim=-1)


def _off_diagonal_covariance(z: torch.Tensor) -> torch.Tensor:
    """VICReg's covariance term of ``z`` [..., M, D] -> ``[...]``: sum_{i != j} C_ij^2 / D."""
    samples, dim = z.shape[-2], z.shape[-1]
    centred = z - z.mean(dim=-2, keepdim=True)
    covariance = centred.transpose(-1, -2) @ centred / (samples - 1)  # [..., D, D]
    diagonal = torch.eye(dim, dtype=torch.bool, device=z.device)
    return covariance.masked_fill(diagonal, 0.0).pow(2).sum(dim=(-2, -1)) / dim


def _negative_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)), per row: [..., M, D] -> [..., M]."""
    return -F.cosine_similarity(prediction, target.detach(), dim=-1)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


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
        self.temperature = _check_temperature(temperature)
        if not 0.0 <= variance_weight <= 1.0:
            raise ValueError(f"variance_weight={variance_weight!r}: must lie in [0, 1] (it blends (1 - w) * NT-Xent + w * variance)")
        if not variance_eps >= 0:
            raise ValueError(f"variance_eps={variance_eps!r}: must be >= 0")
        self.variance_weight = float(variance_weight)
        self.variance_eps = float(variance_eps)
        self.reduction = _check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, variance_weight={self.variance_weight}, reduction={self.reduction!r}"

    def forward(self, z: torch.Tensor | Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """``z`` [B, N, 2, D] (or nested) -> scalar, or [B, N] with ``reduction="none"``."""
        z = _as_crop_view_tensor(z)
        batch, crops = z.shape[:2]
        if crops < 2:
            raise ValueError(
                f"z has {crops} crop per image (shape {tuple(z.shape)}): intra-sample NT-Xent needs N >= 2 crops, "
                "since its negatives are the other crops of the same image"
            )
        if self.variance_weight > 0 and batch * crops < 2:
            raise ValueError(f"variance_weight > 0 needs B * N >= 2 embeddings per view, got shape {tuple(z.shape)}")
        with _full_precision(z.device):
            z = _upcast(z)
            per_anchor = _intrasample_ntxent_per_anchor(F.normalize(z, dim=-1), self.temperature)
            if self.variance_weight > 0:
                per_view = z.transpose(0, 2).reshape(2, batch * crops, z.shape[-1])  # [2, B*N, D]
                variance_term = _variance_hinge(per_view, self.variance_eps).mean()
                per_anchor = (1.0 - self.variance_weight) * per_anchor + self.variance_weight * variance_term
            return _reduce(per_anchor, self.reduction)


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
        self.temperature = _check_temperature(temperature)
        self.gather_distributed = bool(gather_distributed)
        self.reduction = _check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}, reduction={self.reduction!r}"

    def forward(self, z0: torch.Tensor, z1: torch.Tensor | None = None) -> torch.Tensor:
        """``z0``, ``z1`` [B, D] -> scalar, or [2, B] with ``reduction="none"``."""
        if z1 is None:
            z0, z1 = _split_stacked_views(z0)
        _check_pair(z0, z1)
        if z0.ndim != 2:
            raise ValueError(f"z0 has shape {tuple(z0.shape)}: expected [B, D] (or pass one stacked [..., 2, D] tensor)")
        rank, world_size = _distributed_world() if self.gather_distributed else (0, 1)
        if z0.shape[0] * world_size < 2:
            raise ValueError(
                f"NT-Xent got a batch of {z0.shape[0] * world_size} sample: it needs >= 2 samples "
                "(over all ranks when gathering) so that every anchor has negatives"
            )
        with _full_precision(z0.device):
            z0, z1 = F.normalize(_upcast(z0), dim=-1), F.normalize(_upcast(z1), dim=-1)
            if world_size > 1:
                candidates0, candidates1 = gather_with_gradient(z0), gather_with_gradient(z1)
            else:
                candidates0, candidates1 = z0, z1
            per_anchor = _ntxent_per_anchor(z0, z1, candidates0, candidates1, rank * z0.shape[0], self.temperature)
            return _reduce(per_anchor, self.reduction)

    def forward_per_group(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        """Independent NT-Xent of each group: ``z0``, ``z1`` [G, M, D] -> ``[G]`` (never gathered).

        Group g is scored as its own batch of M samples: equal to ``forward(z0[g], z1[g])``.
        """
        _check_pair(z0, z1)
        if z0.shape[-2] < 2:
            raise ValueError(f"NT-Xent groups of {z0.shape[-2]} sample (shape {tuple(z0.shape)}): each group needs >= 2 samples")
        with _full_precision(z0.device):
            z0, z1 = F.normalize(_upcast(z0), dim=-1), F.normalize(_upcast(z1), dim=-1)
            return _ntxent_per_anchor(z0, z1, z0, z1, 0, self.temperature).mean(dim=(-2, -1))


class SimSiamLoss(nn.Module):
    """SimSiam's symmetric negative cosine with stop-gradient (Chen and He, CVPR 2021, Eq. 2-3).

    ``loss = 1/2 * D(p0, stopgrad(z1)) + 1/2 * D(p1, stopgrad(z0))``, ``D(p, z) = -cos(p, z)`` averaged
    over the batch. Inputs ``z0``, ``z1``: projections of the two views ``[B, D]``; ``p0``, ``p1``:
    the predictor outputs for them ``[B, D]``. No gradient reaches ``z0``/``z1`` through this
    loss (it reaches the encoder through ``p``). Returns a scalar in [-1, 1]; -1 when each
    prediction points along the other view's projection.
    """

    def forward(self, z0: torch.Tensor, z1: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor) -> torch.Tensor:
        """``z0``, ``z1``, ``p0``, ``p1`` [B, D] -> scalar."""
        if not isinstance(z0, torch.Tensor) or z0.ndim != 2:
            shape = tuple(z0.shape) if isinstance(z0, torch.Tensor) else type(z0).__name__
            raise ValueError(f"z0 has shape {shape}: expected [B, D] (use IntraSampleWrapper for per-image groups)")
        return self.forward_per_group(z0, z1, p0, p1)

    def forward_per_group(self, z0: torch.Tensor, z1: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor) -> torch.Tensor:
        """Per-group loss: inputs ``[..., M, D]`` -> ``[...]`` (the mean over each group's M rows)."""
        _check_pair(z0, z1)
        _check_pair(p0, p1, ("p0", "p1"))
        if p0.shape[:-1] != z0.shape[:-1]:
            raise ValueError(f"p0 {tuple(p0.shape)} and z0 {tuple(z0.shape)} must have the same leading (batch) shape")
        with _full_precision(z0.device):
            z0, z1, p0, p1 = (_upcast(tensor) for tensor in (z0, z1, p0, p1))
            per_row = 0.5 * _negative_cosine(p0, z1) + 0.5 * _negative_cosine(p1, z0)
            return per_row.mean(dim=-1)


class VICRegLoss(nn.Module):
    """VICReg: invariance + variance + covariance (Bardes, Ponce, LeCun, ICLR 2022, Eq. 1-6).

    Inputs ``z0``, ``z1``: ``[B, D]`` embeddings of the two views (or one stacked ``[..., 2, D]``),
    not normalised. With Var and Cov the unbiased estimates over the B samples:

    - invariance ``s = mean_{b,d} (z0 - z1)^2`` (mean squared error);
    - variance ``v = 1/2 * [h(z0) + h(z1)]``, ``h(z) = mean_d relu(1 - sqrt(Var(z_d) + eps))`` (a hinge
      keeping every dimension's standard deviation at 1 or above);
    - covariance ``c = sum_{i != j} Cov(z0)_ij^2 / D + sum_{i != j} Cov(z1)_ij^2 / D``;
    - ``loss = lambda_ * s + mu * v + nu * c``.

    The variance term is the *mean* of the two views' hinges, as in the authors' released code
    (the paper's Eq. 6 writes the sum); the default weights (25, 25, 1) were tuned with it.
    :meth:`terms` returns the three unweighted terms. Needs B >= 2.
    """

    def __init__(self, lambda_: float = 25.0, mu: float = 25.0, nu: float = 1.0, eps: float = 1e-4):
        super().__init__()
        for name, value in (("lambda_", lambda_), ("mu", mu), ("nu", nu), ("eps", eps)):
            if not value >= 0:
                raise ValueError(f"{name}={value!r}: VICReg weights and eps must be >= 0")
        self.lambda_, self.mu, self.nu, self.eps = float(lambda_), float(mu), float(nu), float(eps)

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}, mu={self.mu}, nu={self.nu}, eps={self.eps}"

    def terms(self, z0: torch.Tensor, z1: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The unweighted terms ``{"invariance", "variance", "covariance"}``; inputs ``[..., B, D]`` -> ``[...]`` each."""
        if z1 is None:
            z0, z1 = _split_stacked_views(z0)
        _check_pair(z0, z1)
        if z0.shape[-2] < 2:
            raise ValueError(f"VICReg got {z0.shape[-2]} sample (shape {tuple(z0.shape)}): variance and covariance need >= 2 samples")
        with _full_precision(z0.device):
            z0, z1 = _upcast(z0), _upcast(z1)
            return {
                "invariance": (z0 - z1).pow(2).mean(dim=(-2, -1)),
                "variance": 0.5 * (_variance_hinge(z0, self.eps) + _variance_hinge(z1, self.eps)),
                "covariance": _off_diagonal_covariance(z0) + _off_diagonal_covariance(z1),
            }

    def forward(self, z0: torch.Tensor, z1: torch.Tensor | None = None) -> torch.Tensor:
        """``z0``, ``z1`` [B, D] -> scalar."""
        if z1 is not None and z0.ndim != 2:
            raise ValueError(f"z0 has shape {tuple(z0.shape)}: expected [B, D] (use IntraSampleWrapper for per-image groups)")
        return self.forward_per_group(z0, z1)

    def forward_per_group(self, z0: torch.Tensor, z1: torch.Tensor | None = None) -> torch.Tensor:
        """Independent VICReg of each group: ``[..., M, D]`` -> ``[...]``."""
        terms = self.terms(z0, z1)
        return self.lambda_ * terms["invariance"] + self.mu * terms["variance"] + self.nu * terms["covariance"]


class IntraSampleWrapper(nn.Module):
    """Turn a two-view loss into an intra-sample one: each image's N crops form its own batch.

    CT-FM's ablations ``SimSiam_Intrasample`` and ``VicReg_Intrasample`` (docs/recipe.md).
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

    def forward(self, *inputs: torch.Tensor | Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """``inputs``: one or more [B, N, 2, D] (or nested) -> scalar."""
        if not inputs:
            raise ValueError("IntraSampleWrapper needs at least one [B, N, 2, D] input")
        tensors = [_as_crop_view_tensor(value, f"input {index}") for index, value in enumerate(inputs)]
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


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _intrasample_simsiam(**kwargs) -> IntraSampleWrapper:
    return IntraSampleWrapper(SimSiamLoss(**kwargs))


def _intrasample_vicreg(**kwargs) -> IntraSampleWrapper:
    return IntraSampleWrapper(VICRegLoss(**kwargs))


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "intrasample_ntxent": IntraSampleNTXentLoss,
    "ntxent": NTXentLoss,
    "simsiam": SimSiamLoss,
    "vicreg": VICRegLoss,
    "intrasample_simsiam": _intrasample_simsiam,
    "intrasample_vicreg": _intrasample_vicreg,
}
"""Loss name -> factory; keyword arguments go to the loss (for ``intrasample_*`` wrappers, to the wrapped loss)."""


def build_loss(name: str, **kwargs) -> nn.Module:
    """Build a loss by name (:data:`LOSSES`): ``build_loss("intrasample_ntxent", temperature=0.1)``."""
    try:
        factory = LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(sorted(LOSSES))}") from None
    return factory(**kwargs)
