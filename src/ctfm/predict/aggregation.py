"""Streamed Gaussian sliding-window inference: MONAI's windows and weights in bounded memory.

MONAI's ``sliding_window_inference`` keeps the whole output, ``[N, D, H, W]`` float32, plus a
count map: 118 classes on a 267x410x410 grid are 21 GB. Here the windows (``dense_patch_slices``
with MONAI's scan interval) and the importance map (``compute_importance_map``) are MONAI's, and
the same Gaussian-weighted sums are accumulated, but

- windows run in order of their first-axis start, and a row of the first axis is *finished* as
  soon as no window still to run covers it: it is emitted and freed, so only the rows under the
  current windows are held (about ``roi_size[0]`` rows);
- what is accumulated is the input of the network's last layer when that layer is a 1x1x1
  convolution with fewer input channels than classes (SegResNetDS: ``init_filters`` = 32 features
  against 118 classes). The head is linear, so ``head(sum g*f / sum g) == sum g*head(f) / sum g``:
  the same logits, 3.7x less memory for 118 classes, and the 118-channel window output is never
  materialised.

The emitted logits equal MONAI's up to float rounding (the sums are the same, in the same order
of windows); argmax labels agree exactly on all but near-tie voxels (tests measure it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class WindowSettings:
    """Sliding-window settings (MONAI's names); sizes in voxels of the network grid."""

    roi_size: tuple[int, int, int] = (96, 160, 160)
    overlap: float = 0.625
    mode: str = "gaussian"
    sigma_scale: float = 0.125
    sw_batch_size: int = 2

    @classmethod
    def from_dict(cls, d: dict) -> "WindowSettings":
        return cls(
            tuple(int(v) for v in d.get("roi_size", cls.roi_size)),
            float(d.get("overlap", cls.overlap)),
            str(d.get("mode", cls.mode)),
            float(d.get("sigma_scale", cls.sigma_scale)),
            int(d.get("sw_batch_size", cls.sw_batch_size)),
        )


class LinearHeadSplit:
    """A SegResNetDS seen as ``features(x) -> [B, F, ...]`` then a 1x1x1 ``head`` (F < classes).

    ``features`` runs the network with its final head replaced by the identity (in eval mode the
    network returns the full-resolution output only); ``head(f [F, ...]) -> [N, ...]``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.head = model.up_layers[-1]["head"]
        self.weight = self.head.weight.detach().flatten(1).float()  # [N, F], on the model's device
        self.bias = self.head.bias.detach().float() if self.head.bias is not None else None

    @staticmethod
    def applies(model: nn.Module) -> bool:
        layers = getattr(model, "up_layers", None)
        head = layers[-1]["head"] if layers is not None and len(layers) and "head" in layers[-1] else None
        return isinstance(head, nn.Conv3d) and head.kernel_size == (1, 1, 1) and head.in_channels < head.out_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, D, H, W] -> [B, F, D, H, W]; the deep-supervision heads (unused in eval) are skipped."""
        layer, dsdepth = self.model.up_layers[-1], self.model.dsdepth
        layer["head"], self.model.dsdepth = nn.Identity(), 1
        try:
            return self.model(x)
        finally:
            layer["head"], self.model.dsdepth = self.head, dsdepth

    def apply_head(self, f: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("nf,f...->n...", self.weight, f)
        if self.bias is not None:
            out += self.bias.view(-1, *([1] * (f.dim() - 1)))
        return out


# Finished rows are handed on two at a time: each row becomes [N, H, W] class scores (118 x 410 x 410
# float32 is 79 MB for a large abdomen at 1 mm), and the consumer's softmax doubles that, so the
# chunk size, not the ring buffer, decides the peak at the moment rows are finished.
FINISHED_ROWS_PER_YIELD = 2


def monai_windows(image_size, settings: WindowSettings) -> list[tuple[slice, slice, slice]]:
    """MONAI's window slices for ``image_size`` (already padded to >= roi), in MONAI's order."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    interval = _get_scan_interval(tuple(image_size), settings.roi_size, 3, (settings.overlap,) * 3)
    return [tuple(s) for s in dense_patch_slices(tuple(image_size), settings.roi_size, interval)]


def monai_pad(image_size, roi_size) -> list[tuple[int, int]]:
    """(before, after) padding per spatial axis, as sliding_window_inference pads a small input."""
    out = []
    for n, r in zip(image_size, roi_size):
        diff = max(int(r) - int(n), 0)
        out.append((diff // 2, diff - diff // 2))
    return out


def streamed_sliding_window(
    inputs: torch.Tensor,
    model: nn.Module,
    settings: WindowSettings,
    autocast: Callable | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_row, logits [N, n, H, W])`` for consecutive finished rows of ``inputs``.

    ``inputs``: [1, C, D, H, W] float32 on the network grid. The rows come in order 0..D-1 and
    together are MONAI's ``sliding_window_inference(inputs, roi, sw_batch_size, model, overlap,
    mode, sigma_scale)[0]``. ``progress(k)`` is told after each batch of k windows.
    """
    from monai.data.utils import compute_importance_map

    if inputs.dim() != 5 or inputs.shape[0] != 1:
        raise ValueError(f"inputs must be [1, C, D, H, W], got {tuple(inputs.shape)}")
    size = tuple(int(s) for s in inputs.shape[2:])
    pads = monai_pad(size, settings.roi_size)
    if any(a or b for a, b in pads):
        flat = [v for a, b in reversed(pads) for v in (a, b)]
        inputs = F.pad(inputs, flat, mode="constant", value=0.0)
    padded = tuple(int(s) for s in inputs.shape[2:])
    windows = sorted(monai_windows(padded, settings), key=lambda s: s[0].start)  # stable: MONAI's order within a start
    weight = compute_importance_map(
        settings.roi_size,
        mode=settings.mode,
        sigma_scale=settings.sigma_scale,
        device=inputs.device,
        dtype=torch.float32,
    )
    weight = weight.reshape(settings.roi_size)

    split = LinearHeadSplit(model) if LinearHeadSplit.applies(model) else None
    forward = split.features if split is not None else model
    autocast = autocast or contextlib.nullcontext
    (z_pad, _), (y_pad, _), (x_pad, _) = pads
    y_keep, x_keep = slice(y_pad, y_pad + size[1]), slice(x_pad, x_pad + size[2])

    # Ring buffer of the open rows: row r lives at r % depth. Batches never mix two window starts,
    # so the open rows [base, start + roi) always fit in roi_size[0] rows.
    depth = settings.roi_size[0]
    acc: torch.Tensor | None = None  # [F, depth, H, W] sum of weighted outputs
    cnt = torch.zeros((depth, padded[1], padded[2]), dtype=torch.float32, device=inputs.device)  # sum of weights
    base = 0  # first unfinished row

    def ring(lo: int, hi: int):
        """(buffer slice, offset into [lo, hi)) pieces of rows [lo, hi) in the ring."""
        pieces, r = [], lo
        while r < hi:
            at = r % depth
            n = min(hi - r, depth - at)
            pieces.append((slice(at, at + n), r - lo, n))
            r += n
        return pieces

    def finish(upto: int):
        nonlocal base
        upto = min(upto, padded[0])
        for lo in range(base, upto, FINISHED_ROWS_PER_YIELD):
            hi = min(lo + FINISHED_ROWS_PER_YIELD, upto)
            keep_lo, keep_hi = max(lo, z_pad), min(hi, z_pad + size[0])
            for ring_slice, offset, n in ring(lo, hi):
                r0 = lo + offset
                a, c = acc[:, ring_slice], cnt[ring_slice]
                k_lo, k_hi = max(r0, keep_lo), min(r0 + n, keep_hi)
                if k_lo < k_hi:
                    sel = slice(k_lo - r0, k_hi - r0)
                    mean = a[:, sel, y_keep, x_keep] / c[None, sel, y_keep, x_keep]
                    yield k_lo - z_pad, split.apply_head(mean) if split is not None else mean
                a.zero_()
                c.zero_()
        base = max(base, upto)

    groups: list[list] = []
    for w in windows:  # batches of sw_batch_size windows sharing their first-axis start
        if groups and len(groups[-1]) < settings.sw_batch_size and groups[-1][0][0].start == w[0].start:
            groups[-1].append(w)
        else:
            groups.append([w])
    # On a CPU the windows of a batch go through the network one at a time: in eval mode a window's
    # output does not depend on its batch mates, batching buys no speed on a CPU, and one window's
    # activations instead of sw_batch_size windows' is the largest saving of memory left.
    one_at_a_time = inputs.device.type == "cpu"
    with torch.no_grad():
        for g, batch in enumerate(groups):
            passes = [[w] for w in batch] if one_at_a_time else [batch]
            for part in passes:
                data = torch.cat([inputs[(slice(None), slice(None), *w)] for w in part])
                with autocast():
                    out = forward(data)
                out = out.float()
                if acc is None:
                    acc = torch.zeros(
                        (out.shape[1], depth, padded[1], padded[2]), dtype=torch.float32, device=out.device
                    )
                for b, (zs, ys, xs) in enumerate(part):
                    for ring_slice, offset, n in ring(zs.start, zs.stop):
                        w = weight[offset : offset + n]
                        acc[:, ring_slice, ys, xs].addcmul_(out[b, :, offset : offset + n], w)
                        cnt[ring_slice, ys, xs].add_(w)
                del out, data
            if progress is not None:
                progress(len(batch))
            upto = groups[g + 1][0][0].start if g + 1 < len(groups) else padded[0]
            yield from finish(upto)


def streamed_logits(inputs: torch.Tensor, model: nn.Module, settings: WindowSettings, **kwargs) -> torch.Tensor:
    """The whole [N, D, H, W] logits of :func:`streamed_sliding_window` (for tests and small inputs)."""
    parts = [logits for _, logits in streamed_sliding_window(inputs, model, settings, **kwargs)]
    return torch.cat(parts, dim=1)


def monai_logits(inputs: torch.Tensor, model: nn.Module, settings: WindowSettings) -> torch.Tensor:
    """MONAI's ``sliding_window_inference`` with the same settings -> [N, D, H, W] (the reference)."""
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        out = sliding_window_inference(
            inputs,
            settings.roi_size,
            settings.sw_batch_size,
            model,
            overlap=settings.overlap,
            mode=settings.mode,
            sigma_scale=settings.sigma_scale,
        )
    return out[0].as_tensor() if hasattr(out[0], "as_tensor") else out[0]


__all__ = [
    "LinearHeadSplit",
    "WindowSettings",
    "monai_logits",
    "monai_pad",
    "monai_windows",
    "streamed_logits",
    "streamed_sliding_window",
]
