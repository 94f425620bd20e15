"""Whole-scan embeddings that compute the constant padding once, exactly.

The ``ct-fm-1mm-320`` input is a box of scan inside constant padding: most of the 320^3 voxels
of a small scan are the same value. Along each axis, a run of identical slices stays a run of
identical slices through every layer of the encoder (shorter by one slice at each end per 3-tap
convolution: the layer's zero padding and the scan box make the run's end slices differ), so the
network only needs a few copies of each run to compute every distinct slice.

Bookkeeping, per axis and per feature map (:class:`_Axis`): a *label* per slice of the full map,
equal labels meaning identical slices, and the full indices that are actually materialised (the
first few of each run). Labels are propagated symbolically: a convolution's output slice is
labelled by the triple of input labels it reads (zero padding has its own label), a residual sum
by the pair of its operands' labels, pointwise layers keep them. Because the map is a function of
its three per-axis labels, two outputs with the same labels on every axis are equal; the
compressed map computes each label combination once. Before every convolution each run is given
3 materialised slices (4-5 for a stride-2 one, an even number removed so that the stride grid is
unchanged), enough for every triple of the full map to occur in the compressed one; after a
residual sum one slice per run is kept. The global average is a weighted sum of the last
compressed map (weight = the number of full slices each one stands for, per axis).

Everything else is :mod:`ctfm.embedding.streaming`: the compressed volume is streamed along D in
bounded memory (runs along D are shrunk and re-grown by streamed row gathers), so the result equals
the full forward pass up to floating-point summation order, and memory is at most that of the
streamed path. On a scan that fills its input there are no runs and nothing to gain:
:func:`whole_embedding` then uses the plain streamed path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ctfm.embedding.streaming import (
    ConvStream,
    PointwiseStream,
    SequenceStream,
    StreamLayer,
    auto_chunk,
    streamed_embedding,
)

PAD = -1  # label of the zero padding beyond the ends of an axis
MAX_COST_RATIO = 0.9  # use the padding-aware path when it needs at most this share of the conv work


@dataclass(frozen=True)
class _Axis:
    """One axis of a feature map: ``labels`` [N] (equal label => identical slices) for the full
    map; ``keep`` [n] the full indices materialised in the compressed map (the first ones of
    each run of equal labels, at least one per run)."""

    labels: np.ndarray
    keep: np.ndarray

    @property
    def full(self) -> int:
        return len(self.labels)


def _runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of each run of equal adjacent labels."""
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    return starts, np.diff(np.r_[starts, len(labels)])


def _keep_first(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.concatenate([s + np.arange(c) for s, c in zip(starts.tolist(), counts.tolist())]).astype(np.int64)


def _capped(labels: np.ndarray, cap: int, even: bool = False) -> _Axis:
    """Materialise at most ``cap`` slices per run (``even``: remove an even number, cap or cap + 1)."""
    starts, lengths = _runs(labels)
    counts = np.minimum(lengths, cap)
    if even:
        counts = np.where(lengths > cap, cap + (lengths - cap) % 2, lengths)
    return _Axis(labels, _keep_first(starts, counts))


def _source(axis: _Axis, full_index: np.ndarray) -> np.ndarray:
    """For each full index, a compressed index holding the same slice."""
    starts, _ = _runs(axis.labels)
    run_of_kept = np.searchsorted(starts, axis.keep, side="right") - 1
    counts = np.bincount(run_of_kept, minlength=len(starts))
    if np.any(counts == 0):
        raise AssertionError("a run has no materialised slice")
    first = np.r_[0, np.cumsum(counts)[:-1]]
    run = np.searchsorted(starts, full_index, side="right") - 1
    return first[run] + np.minimum(full_index - starts[run], counts[run] - 1)


def _canon(table: dict, columns: list[np.ndarray]) -> np.ndarray:
    return np.array([table.setdefault(key, len(table)) for key in zip(*[c.tolist() for c in columns])], dtype=np.int64)


def _conv_axis(axis: _Axis, stride: int) -> _Axis:
    """Labels after a 3-tap, pad-1 convolution of stride 1 or 2 along one axis."""

    def triples(seq):
        padded = np.r_[PAD, seq, PAD]  # padded[i + 1] = seq[i]
        centre = np.arange((len(seq) - 1) // stride + 1) * stride
        return [padded[centre], padded[centre + 1], padded[centre + 2]]

    table: dict = {}
    full = _canon(table, triples(axis.labels))
    comp = _canon(table, triples(axis.labels[axis.keep]))
    f_starts, f_lengths = _runs(full)
    c_starts, c_lengths = _runs(comp)
    if len(f_starts) != len(c_starts) or np.any(full[f_starts] != comp[c_starts]) or np.any(c_lengths > f_lengths):
        raise AssertionError("compressed convolution does not cover the full one (too few slices kept per run)")
    return _Axis(full, _keep_first(f_starts, c_lengths))


def _sum_axis(a: _Axis, b: _Axis) -> _Axis:
    """Labels of a + b (one slice kept per run)."""
    return _capped(_canon({}, [a.labels, b.labels]), 1)


def _gather_index(src: _Axis, dst: _Axis) -> np.ndarray | None:
    """Compressed indices of ``src`` that give ``dst``'s compressed map; None if the identity."""
    index = _source(src, dst.keep)
    return None if len(index) == len(src.keep) and np.array_equal(index, np.arange(len(index))) else index


def slice_labels(volume: torch.Tensor, dim: int) -> np.ndarray:
    """[B, C, D, H, W] -> [size of ``dim``] labels, equal for runs of identical adjacent slices."""
    n = volume.shape[dim]
    others = tuple(d for d in range(volume.dim()) if d != dim)
    same = (
        (volume.narrow(dim, 1, n - 1) == volume.narrow(dim, 0, n - 1)).all(dim=others)
        if n > 1
        else volume.new_zeros(0, dtype=torch.bool)
    )
    return np.r_[0, np.cumsum(~same.cpu().numpy())].astype(np.int64)


class _GatherRows(StreamLayer):
    """Streamed gather along D by a non-decreasing source index: output row n = input row index[n].

    Every output row is emitted by the push that delivers its source row, so nothing is held."""

    def __init__(self, index: np.ndarray):
        self.index = index
        self.received = 0
        self.next = 0

    def push(self, rows):
        end = self.received + rows.shape[2]
        stop = int(np.searchsorted(self.index, end, side="left"))
        picked = self.index[self.next : stop] - self.received
        self.next, self.received = stop, end
        if len(picked) == 0:
            return None
        return rows.index_select(2, torch.from_numpy(picked).to(rows.device))


def _gather_stages(src: tuple[_Axis, ...], dst: tuple[_Axis, ...]) -> list[StreamLayer]:
    """Stages turning a compressed map laid out as ``src`` (D, H, W) into one laid out as ``dst``."""
    stages: list[StreamLayer] = []
    d, h, w = (_gather_index(s, t) for s, t in zip(src, dst))
    if d is not None:
        stages.append(_GatherRows(d))
    for dim, index in ((3, h), (4, w)):
        if index is not None:
            stages.append(
                PointwiseStream(lambda x, i=torch.from_numpy(index), dim=dim: x.index_select(dim, i.to(x.device)))
            )
    return stages


class _Zip(StreamLayer):
    """a(x) + b(x) for two streams that emit the same rows at different times."""

    def __init__(self, a: StreamLayer, b: StreamLayer):
        self.a, self.b = a, b
        self.queues: tuple[list, list] = ([], [])

    def _add(self, outs):
        for q, out in zip(self.queues, outs):
            if out is not None and out.shape[2]:
                q.append(out)
        ready = [sum(t.shape[2] for t in q) for q in self.queues]
        n = min(ready)
        if n == 0:
            return None
        parts = []
        for q in self.queues:
            rows = torch.cat(q, dim=2) if len(q) > 1 else q[0]
            parts.append(rows[:, :, :n])
            q.clear()
            if rows.shape[2] > n:
                q.append(rows[:, :, n:])
        return parts[0] + parts[1]

    def push(self, rows):
        return self._add([self.a.push(rows), self.b.push(rows)])

    def flush(self):
        out = self._add([self.a.flush(), self.b.flush()])
        if any(self.queues):
            raise AssertionError("residual branches emitted different numbers of rows")
        return out


class _WeightedSum:
    """Sums rows [B, C, t, h, w] over D, H, W in float64 with per-axis multiplicities."""

    def __init__(self, weights: tuple[np.ndarray, ...]):
        self.wd = torch.from_numpy(weights[0].astype(np.float64))
        self.whw = torch.from_numpy(np.outer(weights[1], weights[2]).astype(np.float64))
        self.row = 0
        self.total = None

    def __call__(self, rows):
        t = rows.shape[2]
        per_row = (rows.double() * self.whw.to(rows.device)).sum(dim=(3, 4))  # [B, C, t]
        s = (per_row * self.wd[self.row : self.row + t].to(rows.device)).sum(dim=2)
        self.row += t
        self.total = s if self.total is None else self.total + s


@dataclass
class _Plan:
    stages: list[StreamLayer]
    sink: _WeightedSum
    input_layout: tuple[_Axis, ...]
    cost: float  # multiply-adds of the compressed convolutions
    full_cost: float  # multiply-adds of the full ones
    count: float  # voxels of the full last map


class _Planner:
    """Builds the streamed stages of the compressed encoder and its cost, layer by layer."""

    def __init__(self):
        self.cost = 0.0
        self.full_cost = 0.0

    def conv(self, conv: nn.Conv3d, layout: tuple[_Axis, ...]) -> tuple[list[StreamLayer], tuple[_Axis, ...]]:
        stride = conv.stride[0]
        if tuple(conv.kernel_size) != (3, 3, 3) or tuple(conv.padding) != (1, 1, 1) or len(set(conv.stride)) != 1:
            raise ValueError(f"padding-aware inference supports cubic 3-tap convolutions, got {conv}")
        target = tuple(_capped(a.labels, 4, even=True) if stride == 2 else _capped(a.labels, 3) for a in layout)
        out = tuple(_conv_axis(t, stride) for t in target)
        per_voxel = conv.in_channels * conv.out_channels * 27
        self.cost += per_voxel * float(np.prod([len(a.keep) for a in out]))
        self.full_cost += per_voxel * float(np.prod([a.full for a in out]))
        return _gather_stages(layout, target) + [ConvStream(conv)], out

    def block(self, block, layout):
        for norm in (block.norm1, block.norm2):
            if norm.training:
                raise ValueError("padding-aware inference needs BatchNorm in eval mode (call encoder.eval())")
        conv1, mid = self.conv(block.conv1, layout)
        conv2, out = self.conv(block.conv2, mid)
        result = tuple(_sum_axis(a, b) for a, b in zip(layout, out))
        body = SequenceStream(
            [PointwiseStream(lambda x, b=block: b.act1(b.norm1(x)))]
            + conv1
            + [PointwiseStream(lambda x, b=block: b.act2(b.norm2(x)))]
            + conv2
            + _gather_stages(out, result)
        )
        identity = SequenceStream(_gather_stages(layout, result) or [PointwiseStream(lambda x: x)])
        return _Zip(identity, body), result


def _plan(encoder, labels: tuple[np.ndarray, ...]) -> _Plan:
    planner = _Planner()
    layout = tuple(_Axis(lab, np.arange(len(lab), dtype=np.int64)) for lab in labels)
    first = tuple(_capped(a.labels, 3) for a in layout)
    stages, layout = planner.conv(encoder.conv_init, first)  # the input is compressed up front: no gather
    n = len(encoder.layers)
    for i, level in enumerate(encoder.layers):
        for block in level["blocks"]:
            stage, layout = planner.block(block, layout)
            stages.append(stage)
        if i < n - 1:
            down, layout = planner.conv(level["downsample"], layout)
            stages += down
    weights = tuple(np.bincount(_source(a, np.arange(a.full)), minlength=len(a.keep)) for a in layout)
    sink = _WeightedSum(weights)
    return _Plan(stages, sink, first, planner.cost, planner.full_cost, float(np.prod([a.full for a in layout])))


def _labels(volume: torch.Tensor) -> tuple[np.ndarray, ...]:
    return tuple(slice_labels(volume, dim) for dim in (2, 3, 4))


def cost_ratio(encoder, volume: torch.Tensor) -> float:
    """Share of the encoder's convolution work the padding-aware path needs for ``volume``."""
    plan = _plan(encoder, _labels(volume))
    return plan.cost / plan.full_cost


def padding_aware_embedding(
    encoder, volume: torch.Tensor, chunk: int | None = None, autocast_dtype: torch.dtype | None = None, labels=None
) -> torch.Tensor:
    """[B, C, D, H, W] -> [B, 512]: the global average of the last map, computing each run of
    identical slices (along any axis) only a few times; equal to the full pass up to summation order.

    ``labels``: the three :func:`slice_labels` of ``volume`` if already computed."""
    plan = _plan(encoder, labels if labels is not None else _labels(volume))
    x = volume
    for dim, axis in zip((2, 3, 4), plan.input_layout):
        if len(axis.keep) != axis.full:
            x = x.index_select(dim, torch.from_numpy(axis.keep).to(x.device))
    pipeline = SequenceStream(plan.stages)
    chunk = chunk or auto_chunk(encoder, x)
    ctx = (
        torch.autocast(device_type=volume.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    sink = plan.sink
    with torch.inference_mode(), ctx:
        for start in range(0, x.shape[2], chunk):
            out = pipeline.push(x[:, :, start : start + chunk])
            if out is not None:
                sink(out)
        out = pipeline.flush()
        if out is not None:
            sink(out)
    return (sink.total / plan.count).float()


def whole_embedding(
    encoder,
    volume: torch.Tensor,
    chunk: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    max_cost_ratio: float = MAX_COST_RATIO,
) -> torch.Tensor:
    """[B, C, D, H, W] -> [B, 512]: padding-aware when it saves work (cost ratio at most
    ``max_cost_ratio``), otherwise the plain streamed path."""
    labels = _labels(volume)
    plan = _plan(encoder, labels)
    if plan.cost > max_cost_ratio * plan.full_cost:
        return streamed_embedding(encoder, volume, chunk=chunk, autocast_dtype=autocast_dtype)
    return padding_aware_embedding(encoder, volume, chunk=chunk, autocast_dtype=autocast_dtype, labels=labels)
