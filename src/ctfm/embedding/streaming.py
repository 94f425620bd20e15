"""Run the CT-FM encoder over a volume of any depth in bounded memory, with exact results.

The reference pipeline feeds a whole 320^3 volume through the encoder at once: its stride-1
activations alone are 32 x 320^3 floats (4.2 GB each), and the run peaks at 17 GB. Every layer of
the SegResEncoder is local along the depth axis (3x3x3 convolutions, eval-mode BatchNorm, ReLU,
residual sums), so the network can instead be *streamed* along axis 0 (D), a few slices at a time,
like a line buffer in image processing:

- a pointwise layer passes each chunk of rows straight through;
- a 3x3x3 convolution keeps the last input rows it has seen and emits an output row as soon as
  the rows it depends on have arrived; zero rows are fed at the two ends, which is exactly the
  network's own zero padding along D (padding in H and W is the convolution's own);
- a stride-2 convolution emits output row ``o`` once input row ``2o + 1`` has arrived;
- a residual block delays its identity branch by the two rows its convolutions hold back.

No row is computed twice (no halo recomputation), and each output row sees exactly the inputs
and padding that the unstreamed network gives it, so results equal the full forward pass up to
floating-point summation order. Peak memory is a few chunks of the widest level (O(chunk x H x W x
32 channels)) plus whatever the caller keeps of the outputs, whatever the depth of the volume.
BatchNorm must be in eval mode (running statistics): in train mode it is not local.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class StreamLayer:
    """A layer that consumes chunks of rows along D and yields the rows it can complete."""

    def push(self, rows: torch.Tensor) -> torch.Tensor | None:  # rows: [B, C, t, H, W]
        raise NotImplementedError

    def flush(self) -> torch.Tensor | None:
        """Called once after the last chunk: emit the rows held back (with end padding)."""
        return None


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    parts = [p for p in parts if p is not None and p.shape[2] > 0]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


class PointwiseStream(StreamLayer):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn

    def push(self, rows):
        return self.fn(rows)


class ConvStream(StreamLayer):
    """Streaming Conv3d with kernel 3 along D, padding 1 along D, stride 1 or 2 along D."""

    def __init__(self, conv: nn.Conv3d):
        kd, sd, pd = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        if (kd, pd) != (3, 1) or sd not in (1, 2) or conv.dilation[0] != 1 or conv.groups != 1:
            raise ValueError(f"streaming supports 3-row kernels with padding 1 and stride 1 or 2 along D, got {conv}")
        self.conv = conv
        self.stride = sd
        self.pending: torch.Tensor | None = None  # input rows not yet fully consumed
        self.next_out = 0  # index of the next output row to emit
        self.pending_start = -1  # input index of pending[:, :, 0]; -1 is the zero padding row

    def _run(self, rows: torch.Tensor) -> torch.Tensor:
        # 'valid' along D (rows already include context), the layer's own padding along H, W.
        c = self.conv
        return F.conv3d(rows, c.weight, c.bias, stride=c.stride, padding=(0, c.padding[1], c.padding[2]))

    def _emit(self, available_end: int) -> torch.Tensor | None:
        """Emit every output row whose 3 input rows lie in [pending_start, available_end)."""
        s = self.stride
        # output row o reads input rows s*o - 1 .. s*o + 1
        last = (available_end - 2) // s  # largest o with s*o + 1 <= available_end - 1
        if last < self.next_out:
            return None
        first_in = s * self.next_out - 1 - self.pending_start
        last_in = s * last + 1 - self.pending_start
        out = self._run(self.pending[:, :, first_in : last_in + 1])
        self.next_out = last + 1
        # keep the rows the next output row still needs
        keep_from = s * self.next_out - 1 - self.pending_start
        self.pending = self.pending[:, :, keep_from:]
        self.pending_start += keep_from
        return out

    def push(self, rows):
        if self.pending is None:
            pad = rows.new_zeros(rows.shape[0], rows.shape[1], 1, *rows.shape[3:])
            self.pending = torch.cat([pad, rows], dim=2)
        else:
            self.pending = torch.cat([self.pending, rows], dim=2)
        return self._emit(self.pending_start + self.pending.shape[2])

    def flush(self):
        if self.pending is None:
            return None
        n_in = self.pending_start + self.pending.shape[2]  # one past the last real input row
        n_out = (n_in - 1) // self.stride + 1  # output length of a stride-s, pad-1, k3 conv
        pad = self.pending.new_zeros(*self.pending.shape[:2], 1, *self.pending.shape[3:])
        self.pending = torch.cat([self.pending, pad], dim=2)
        out = self._emit(n_in + 1) if self.next_out < n_out else None
        if out is not None and self.next_out > n_out:  # never emit past the true output length
            out = out[:, :, : out.shape[2] - (self.next_out - n_out)]
        self.pending = None
        return out


class SequenceStream(StreamLayer):
    def __init__(self, stages: list[StreamLayer]):
        self.stages = stages

    def push(self, rows):
        for stage in self.stages:
            if rows is None:
                return None
            rows = stage.push(rows)
        return rows

    def flush(self):
        carried = None
        for stage in self.stages:
            out = stage.push(carried) if carried is not None else None
            carried = _cat([out, stage.flush()])
        return carried


class _Residual(StreamLayer):
    """x + body(x), where body holds back some rows: the identity rows wait in a queue."""

    def __init__(self, body: StreamLayer):
        self.body = body
        self.queue: list[torch.Tensor] = []

    def _add(self, out):
        if out is None:
            return None
        n = out.shape[2]
        identity = torch.cat(self.queue, dim=2) if len(self.queue) > 1 else self.queue[0]
        result = out + identity[:, :, :n]
        rest = identity[:, :, n:]
        self.queue = [rest] if rest.shape[2] else []
        return result

    def push(self, rows):
        self.queue.append(rows)
        return self._add(self.body.push(rows))

    def flush(self):
        return self._add(self.body.flush())


def _block_stream(block) -> StreamLayer:
    """A MONAI SegResBlock: x + conv2(act2(norm2(conv1(act1(norm1(x))))))."""
    for norm in (block.norm1, block.norm2):
        if norm.training:
            raise ValueError("streamed inference needs BatchNorm in eval mode (call encoder.eval())")
    body = SequenceStream(
        [
            PointwiseStream(lambda x, b=block: b.act1(b.norm1(x))),
            ConvStream(block.conv1),
            PointwiseStream(lambda x, b=block: b.act2(b.norm2(x))),
            ConvStream(block.conv2),
        ]
    )
    return _Residual(body)


class _Level(StreamLayer):
    """One encoder level: its blocks (whose output is a feature map) then the downsampling conv."""

    def __init__(self, level, sink: Callable[[torch.Tensor], None]):
        self.blocks = SequenceStream([_block_stream(b) for b in level["blocks"]])
        down = level["downsample"]
        self.down = ConvStream(down) if isinstance(down, nn.Conv3d) else None
        self.sink = sink

    def push(self, rows):
        feats = self.blocks.push(rows)
        if feats is None:
            return None
        self.sink(feats)
        return self.down.push(feats) if self.down is not None else None

    def flush(self):
        feats = self.blocks.flush()
        out = None
        if feats is not None:
            self.sink(feats)
            out = self.down.push(feats) if self.down is not None else None
        if self.down is not None:
            out = _cat([out, self.down.flush()])
        return out


CHUNK_BYTES = 96e6  # stride-1 activations per streamed chunk; a few such live at once


def auto_chunk(encoder, volume: torch.Tensor) -> int:
    """Rows per chunk so that one stride-1 activation chunk is about CHUNK_BYTES (4..64 rows).

    Thin chunks keep memory low; thick ones keep convolutions efficient (narrow encoders and
    small slices afford more rows).
    """
    row_bytes = encoder.init_filters * volume.shape[0] * volume.shape[3] * volume.shape[4] * 4
    return int(max(4, min(64, CHUNK_BYTES // max(row_bytes, 1))))


def stream_encoder(
    encoder,
    volume: torch.Tensor,
    sinks: list[Callable[[torch.Tensor], None]],
    chunk: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> None:
    """Feed ``volume`` [B, C, D, H, W] through ``encoder`` ``chunk`` rows at a time (auto if None).

    ``sinks[i]`` receives the rows of feature map ``i`` ([B, C_i, t, H_i, W_i]) in order, as soon as
    they are complete; concatenating them along dim 2 gives exactly ``encoder(volume)[i]``.
    """
    if len(sinks) != len(encoder.layers):
        raise ValueError(f"need one sink per encoder level ({len(encoder.layers)}), got {len(sinks)}")
    stages: list[StreamLayer] = [ConvStream(encoder.conv_init)]
    stages += [_Level(level, sink) for level, sink in zip(encoder.layers, sinks)]
    pipeline = SequenceStream(stages)
    chunk = chunk or auto_chunk(encoder, volume)
    ctx = (
        torch.autocast(device_type=volume.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), ctx:
        for start in range(0, volume.shape[2], chunk):
            pipeline.push(volume[:, :, start : start + chunk])
        pipeline.flush()


class _Collect:
    def __init__(self):
        self.parts: list[torch.Tensor] = []

    def __call__(self, rows):
        self.parts.append(rows.float())

    def result(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=2)


class _SumPool:
    """Accumulates the sum over D, H, W in float64 (for the global average)."""

    def __init__(self):
        self.total = None
        self.count = 0

    def __call__(self, rows):
        s = rows.double().sum(dim=(2, 3, 4))
        self.total = s if self.total is None else self.total + s
        self.count += rows.shape[2] * rows.shape[3] * rows.shape[4]


def _discard(rows):
    return None


def streamed_features(
    encoder, volume: torch.Tensor, levels: tuple[int, ...] | None = None, chunk: int | None = None, autocast_dtype=None
) -> list[torch.Tensor | None]:
    """``encoder(volume)`` computed streamed; only the maps in ``levels`` are kept (others None)."""
    n = len(encoder.layers)
    keep = set(range(n)) if levels is None else set(levels)
    sinks = [_Collect() if i in keep else _discard for i in range(n)]
    stream_encoder(encoder, volume, sinks, chunk=chunk, autocast_dtype=autocast_dtype)
    return [s.result() if isinstance(s, _Collect) else None for s in sinks]


def streamed_embedding(encoder, volume: torch.Tensor, chunk: int | None = None, autocast_dtype=None) -> torch.Tensor:
    """[B, C, D, H, W] -> [B, 512]: global average of the last map, without keeping any map."""
    n = len(encoder.layers)
    pool = _SumPool()
    stream_encoder(encoder, volume, [_discard] * (n - 1) + [pool], chunk=chunk, autocast_dtype=autocast_dtype)
    return (pool.total / pool.count).float()
