"""The three embedding modes, all fed by a PreprocessSpec preset.

- ``whole``: the reference definition (CT-FM's ``extract_feat_LP.py``, docs/recipe.md):
  ``ct-fm-1mm-320`` preprocessing, the stride-16 map of the encoder, global average -> one 512-d
  vector. Computed streamed along the first axis (:mod:`ctfm.embedding.streaming`), so memory
  stays bounded for any scan, and with the constant padding around a small scan computed once
  (:mod:`ctfm.embedding.padding_aware`).
- ``patches``: sliding windows at the training resolution (``ct-fm-patches``: 24x128x128 voxels at
  3x1x1 mm) as MONAI's ``SlidingWindowSplitter`` cuts them in CT-FM's scripts; each window gives
  a 512-d vector with its centre in world millimetres (RAS); scan vectors pool them by mean, max
  or min (3D-MIR uses min).
- ``dense``: the stride-16 feature volume of the whole preprocessed scan with its affine, for
  point queries (semantic search).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ctfm.embedding.padding_aware import whole_embedding
from ctfm.embedding.streaming import streamed_features
from ctfm.errors import OptionError
from ctfm.models.networks import pool_embedding
from ctfm.preprocess import PreprocessSpec, get_preset, preprocess
from ctfm.preprocess.bounded import preprocess_bounded, supports_bounded
from ctfm.preprocess.spec import EMBEDDING_PRESETS

MODES = ("whole", "patches", "dense")
POOLINGS = ("mean", "max", "min")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
DEFAULT_WINDOW_VOXELS = (24, 128, 128)  # CT-FM's sliding window at 3x1x1 mm, where a spec names none


@dataclass
class PatchEmbeddings:
    """Patch grid of one scan: ``embeddings`` [N, 512], ``centers_mm`` [N, 3] (RAS world mm),
    ``starts`` [N, 3] (voxel index of each window in the preprocessed volume)."""

    embeddings: np.ndarray
    centers_mm: np.ndarray
    starts: np.ndarray
    patch_size: tuple[int, int, int]
    overlap: float

    def pooled(self, how: str = "mean") -> np.ndarray:
        """[512] scan vector: mean, max or min over patches."""
        if how not in POOLINGS:
            raise OptionError(f"pooling {how!r}: expected one of {', '.join(POOLINGS)}")
        return getattr(self.embeddings, how)(axis=0).astype(np.float32)


@dataclass
class DenseFeatures:
    """``features`` [512, d, h, w] on a grid whose voxel-to-RAS-mm map is ``affine`` (4x4)."""

    features: np.ndarray
    affine: np.ndarray

    def query(self, point_mm) -> np.ndarray:
        """The [512] feature vector at the feature voxel nearest to a RAS point (mm)."""
        ijk = np.linalg.solve(self.affine, np.append(np.asarray(point_mm, dtype=np.float64), 1.0))[:3]
        idx = np.round(ijk).astype(int)
        if np.any(idx < 0) or np.any(idx >= np.asarray(self.features.shape[1:])):
            raise OptionError(
                f"point {list(point_mm)} mm lies outside the feature volume (feature voxel {idx.tolist()}, grid "
                f"{list(self.features.shape[1:])})"
            )
        return self.features[:, idx[0], idx[1], idx[2]]

    def voxel_centers_mm(self) -> np.ndarray:
        """[d, h, w, 3] RAS centre of every feature voxel."""
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in self.features.shape[1:]], indexing="ij"), axis=-1)
        return grid @ self.affine[:3, :3].T + self.affine[:3, 3]


@dataclass
class EmbedOptions:
    mode: str = "whole"
    spec: PreprocessSpec | None = None  # default: EMBEDDING_PRESETS[mode] (CT-FM's recipe)
    precision: str = "fp32"
    device: str = "cpu"
    chunk: int | None = None  # rows per streamed step (whole, dense); None: auto
    patch_size: tuple[int, int, int] | None = None  # default: spec.patch_size_voxels
    overlap: float = 0.0
    batch_size: int = 4
    pool: tuple[str, ...] = field(default_factory=lambda: ("mean",))

    def __post_init__(self):
        if self.mode not in MODES:
            raise OptionError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.precision not in PRECISIONS:
            raise OptionError(f"precision {self.precision!r}: expected fp32 or bf16")
        if not 0.0 <= self.overlap < 1.0:
            raise OptionError(f"overlap {self.overlap}: expected a fraction in [0, 1)")
        if self.spec is None:
            self.spec = get_preset(EMBEDDING_PRESETS[self.mode])


class SlowPrecisionWarning(UserWarning):
    """bf16 was asked for on a device without native bf16 arithmetic (it is emulated, far slower)."""


def native_bf16(device: str = "cpu") -> bool:
    """True when ``device`` computes bf16 convolutions natively (CUDA with bf16, or a CPU whose
    oneDNN has bf16 kernels: AVX-512 BF16 / AMX). Elsewhere bf16 is emulated, ~100x slower than fp32."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def resolve_precision(precision: str, device: str) -> str:
    """``"auto"`` -> ``"bf16"`` where the device has native bf16, else ``"fp32"``; an explicit
    ``"bf16"`` on a device without it is kept, with a :class:`SlowPrecisionWarning`."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        import warnings

        warnings.warn(
            f"bf16 has no native support on this {torch.device(device).type} (it is emulated and runs far slower than "
            "fp32); use --precision fp32 or auto",
            SlowPrecisionWarning,
            stacklevel=3,
        )
    return precision


def _autocast(device: str, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def prepare(image, spec: PreprocessSpec):
    """Preprocess for an encoder: in bounded memory where the spec allows (same result)."""

    return (
        preprocess_bounded(image, spec)
        if supports_bounded(spec) and len(spec.windows) == 1
        else preprocess(image, spec)
    )


def encode_whole(encoder, prepared, options: EmbedOptions) -> np.ndarray:
    """Preprocessed [1, D, H, W] -> [512] float32: streamed encoder (padding computed once), last map averaged."""
    volume = prepared.as_tensor()[None].to(options.device)  # [1, 1, D, H, W]
    vector = whole_embedding(encoder, volume, chunk=options.chunk, autocast_dtype=PRECISIONS[options.precision])
    return vector[0].cpu().numpy().astype(np.float32)


def embed_whole(encoder, image, options: EmbedOptions | None = None) -> np.ndarray:
    """[1, X, Y, Z] HU MetaTensor -> [512] float32 (``extract_feat_LP.py``'s vector, computed streamed)."""
    options = options or EmbedOptions(mode="whole")
    return encode_whole(encoder, prepare(image, options.spec), options)


def window_size(spec: PreprocessSpec) -> tuple[int, int, int]:
    """The sliding-window size (voxels, spec axis order) that patches mode uses with ``spec``."""
    return tuple(spec.patch_size_voxels or DEFAULT_WINDOW_VOXELS)


def encode_windows(encoder, windows: torch.Tensor, device: str = "cpu", precision: str = "fp32") -> torch.Tensor:
    """Preprocessed windows [B, 1, D, H, W] -> [B, 512] float32 on the CPU: the last map of the
    encoder, globally averaged (what every patch row and every region query is)."""

    with torch.inference_mode(), _autocast(device, precision):
        return pool_embedding(encoder(windows.to(device))[-1]).float().cpu()


def embed_patches(encoder, image, options: EmbedOptions | None = None) -> PatchEmbeddings:
    """[1, X, Y, Z] HU MetaTensor -> a patch grid of 512-d vectors with world centres."""
    from monai.inferers import SlidingWindowSplitter

    options = options or EmbedOptions(mode="patches")
    prepared = preprocess(image, options.spec)
    affine = np.asarray(prepared.affine, dtype=np.float64)
    size = tuple(options.patch_size or window_size(options.spec))
    splitter = SlidingWindowSplitter(size, overlap=options.overlap)
    volume = prepared.as_tensor()[None]  # [1, 1, D, H, W]
    vectors, starts = [], []
    batch, batch_starts = [], []

    def flush():
        vectors.append(encode_windows(encoder, torch.cat(batch), options.device, options.precision))
        starts.extend(batch_starts)
        batch.clear()
        batch_starts.clear()

    for patch, location in splitter(volume):
        batch.append(patch)
        batch_starts.append(tuple(int(v) for v in location))
        if len(batch) == options.batch_size:
            flush()
    if batch:
        flush()
    starts_arr = np.asarray(starts, dtype=np.int64).reshape(-1, 3)
    centres_vox = starts_arr + (np.asarray(size) - 1) / 2.0
    centres_mm = centres_vox @ affine[:3, :3].T + affine[:3, 3]
    return PatchEmbeddings(torch.cat(vectors).numpy().astype(np.float32), centres_mm, starts_arr, size, options.overlap)


def embed_dense(encoder, image, options: EmbedOptions | None = None) -> DenseFeatures:
    """[1, X, Y, Z] HU MetaTensor -> the stride-16 feature volume of the preprocessed scan."""
    options = options or EmbedOptions(mode="dense")
    prepared = preprocess(image, options.spec)
    volume = prepared.as_tensor()[None].to(options.device)
    last = len(encoder.layers) - 1
    maps = streamed_features(
        encoder, volume, levels=(last,), chunk=options.chunk, autocast_dtype=PRECISIONS[options.precision]
    )
    stride = 2**last
    # A stride-2, pad-1, 3-wide convolution centres output o on input 2o: after `last` of them,
    # feature voxel o sits on input voxel stride*o.
    affine = np.asarray(prepared.affine, dtype=np.float64) @ np.diag([stride, stride, stride, 1.0])
    return DenseFeatures(maps[last][0].cpu().numpy().astype(np.float32), affine)
