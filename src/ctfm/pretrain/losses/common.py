"""What every loss shares: input checks, the [B, N, 2, D] multi-crop layout, reductions, precision.

Shapes: ``B`` images in the local batch, ``N`` crops per image, ``2`` views per crop, ``D`` the
embedding dimension. CT-FM's model returns ``list[N] of list[2] of [B, D]``; :func:`stack_views`
turns it into one ``[B, N, 2, D]`` tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

REDUCTIONS = ("mean", "sum", "none")


def check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: the temperature must be > 0 (CT-FM uses 0.1)")
    return float(temperature)


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    return reduction


def apply_reduction(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
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


def as_crop_view_tensor(z: torch.Tensor | Sequence[Sequence[torch.Tensor]], argument: str = "z") -> torch.Tensor:
    """``[B, N, 2, D]`` tensor or CT-FM nesting -> ``[B, N, 2, D]`` tensor, checked."""
    if not isinstance(z, torch.Tensor):
        z = stack_views(z)
    if z.ndim != 4 or z.shape[2] != 2:
        raise ValueError(
            f"{argument} has shape {tuple(z.shape)}: expected [B, N, 2, D] (batch, crops, 2 views, dim) "
            "or the nested list[N] of list[2] of [B, D]"
        )
    return z


def check_pair(first: torch.Tensor, second: torch.Tensor, names: tuple[str, str] = ("z0", "z1")) -> None:
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


def split_stacked_views(z: torch.Tensor, argument: str = "z0") -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., 2, D]`` -> (view 0, view 1), each ``[M, D]`` with M the product of the leading dims."""
    if z.ndim < 3 or z.shape[-2] != 2:
        raise ValueError(
            f"{argument} has shape {tuple(z.shape)} and no second view was given: pass (z0, z1) as two "
            "[B, D] tensors, or one stacked tensor [..., 2, D] whose leading dims become the batch"
        )
    flat = z.reshape(-1, 2, z.shape[-1])
    return flat[:, 0], flat[:, 1]


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Autocast off inside a loss: logits, exponentials and covariances are computed in float32+."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 -> float32 (mixed-precision embeddings); other dtypes unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
