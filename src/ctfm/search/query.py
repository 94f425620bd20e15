"""What a query is: a scan of the store, or a file embedded the store's way; a region around a point.

Everything is computed with the store's own run: the model and weights (their sha256 must be
the run's), the PreprocessSpec recorded in the scan rows (``preprocess_spec``), the mode,
overlap, pooling and precision. A file outside the store is embedded by
:func:`ctfm.embedding.runner.embed_source`, the very function ``ctfm embed`` uses, so a query is
never preprocessed by a second chain.

A **region query** is the window of the run's size (24x128x128 voxels at 3x1x1 mm for CT-FM)
centred on the point, cut from the preprocessed scan and padded with 0 where it leaves the
volume (as MONAI's ``SlidingWindowSplitter`` pads the stored windows), then encoded and
averaged: the CT-FM demo's query (its patch is centred on the clicked point and constant-padded),
with the store's window size so that query and stored windows are the same kind of vector.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctfm.embedding.modes import EmbedOptions
from ctfm.embedding.runner import embed_source, run_key, weights_sha256_of
from ctfm.errors import CTInputError, OptionError
from ctfm.io.pacs import is_pacs_url
from ctfm.io.sources import ScanSource
from ctfm.models import create_model
from ctfm.preprocess import PreprocessSpec
from ctfm.store.schema import RUN_KEY
from ctfm.store.vectors import key_dict


class WeightsMismatchError(OptionError):
    """The weights given are not the ones the store's vectors were computed with."""


@dataclass
class ScanRef:
    """A query or target scan: a row of the run (``row``), or a file not in the store (``path``)."""

    text: str
    scan_id: str | None
    row: dict | None
    path: str | None

    @property
    def in_store(self) -> bool:
        return self.row is not None

    @property
    def source_path(self) -> str:
        return self.row["source_path"] if self.row is not None else os.path.abspath(self.path)


def resolve_scan(scans: dict, text: str, store_root) -> ScanRef:
    """``text`` -> the run's scan it names (scan id, unique id prefix >= 6 hex, or source path),
    or a readable path not in the store; a one-line error otherwise."""

    text = str(text)
    if text in scans:
        return ScanRef(text, text, scans[text], None)
    if is_pacs_url(text):  # a series on a PACS: its row when the store has it, else embedded as a file is
        for scan_id, row in scans.items():
            if row.get("source_path") == text:
                return ScanRef(text, scan_id, row, None)
        return ScanRef(text, None, None, text)
    path = Path(text)
    if path.exists():
        sid = ScanSource(str(path)).scan_id
        if sid in scans:
            return ScanRef(text, sid, scans[sid], None)
        absolute = os.path.abspath(text)
        for scan_id, row in scans.items():
            if row.get("source_path") == absolute:
                return ScanRef(text, scan_id, row, None)
        return ScanRef(text, None, None, str(path))
    if len(text) >= 6 and all(c in "0123456789abcdef#." or c.isalnum() for c in text):
        matches = [s for s in scans if s.startswith(text)]
        if len(matches) == 1:
            return ScanRef(text, matches[0], scans[matches[0]], None)
        if len(matches) > 1:
            raise OptionError(
                f"scan {text!r}: the prefix matches {len(matches)} scans of {store_root} ({', '.join(matches[:4])} "
                "...); give more digits"
            )
    raise CTInputError(
        text,
        f"neither a scan id of the store {store_root} nor a file",
        "give a scan_id from `ctfm index status`/scans.parquet, or the path of a CT file or DICOM folder",
    )


def run_spec(row: dict):
    """The PreprocessSpec a run's row was computed with."""

    return PreprocessSpec.from_json(row["preprocess_spec"])


def run_options(key: tuple, spec, device: str = "cpu"):
    """EmbedOptions that reproduce run ``key`` (mode, spec, pool, precision, overlap)."""

    fields = key_dict(key)
    pool = fields["pool"] if fields["mode"] == "patches" else "mean"
    return EmbedOptions(
        mode=fields["mode"],
        spec=spec,
        precision=fields["precision"],
        device=device,
        overlap=float(fields["overlap"] or 0.0),
        pool=(pool,),
    )


def load_encoder(key: tuple, weights: str | os.PathLike | None = None, encoder=None):
    """The run's encoder: ``encoder`` or ``weights`` loaded strictly, checked to be the run's
    weights (sha256); a :class:`WeightsMismatchError` otherwise."""

    fields = key_dict(key)
    if encoder is None:
        if weights is None:
            return None
        encoder = create_model(fields["model"], weights=weights)
    sha = weights_sha256_of(encoder)
    if sha != fields["weights_sha256"]:
        where = weights if weights is not None else "the encoder given"
        raise WeightsMismatchError(
            f"{where}: weights sha256 {sha[:16]}... are not the store's ({str(fields['weights_sha256'])[:16]}...; give "
            "the weights the store was embedded with)"
        )
    return encoder.eval()


def embed_file(path: str, key: tuple, spec, encoder, device: str = "cpu") -> dict:
    """Embed a file as the run did (``embed_source``): its scan row, patches under ``"patches"``."""

    fields = key_dict(key)
    options = run_options(key, spec, device)
    computed = run_key(encoder, fields["model"], options)
    if tuple(computed) != tuple(key):
        differing = [n for n, a, b in zip(RUN_KEY, computed, key) if a != b]
        raise WeightsMismatchError(f"{path}: cannot reproduce the store's run ({', '.join(differing)} differ)")
    return embed_source(ScanSource(str(path)), encoder.to(device), fields["model"], fields["weights_sha256"], options)


def check_point_in_image(image, point_mm, label: str) -> np.ndarray:
    """The point's voxel in ``image``'s own grid; a one-line error when it lies outside."""
    affine = np.asarray(image.affine, dtype=np.float64)
    ijk = np.linalg.solve(affine, np.append(np.asarray(point_mm, dtype=np.float64), 1.0))[:3]
    shape = np.asarray(image.shape[1:])
    if np.any(ijk < -0.5) or np.any(ijk > shape - 0.5):
        corners = (
            np.array([[a, b, c, 1.0] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)])
            @ affine.T
        )
        low, high = corners[:, :3].min(0), corners[:, :3].max(0)
        extent = ", ".join(f"{'xyz'[i]} {low[i]:.1f}..{high[i]:.1f}" for i in range(3))
        raise CTInputError(
            label,
            f"point ({', '.join(f'{v:g}' for v in point_mm)}) mm lies outside the scan (its extent: {extent} mm RAS)",
            "give x,y,z in world millimetres (RAS) inside the scan",
        )
    return ijk


def centred_window(prepared, point_mm, size) -> "np.ndarray":
    """The [1, D, H, W] window of ``size`` centred on ``point_mm`` in a preprocessed volume
    ([C, D, H, W] MetaTensor), 0 outside it; and the window's start voxel."""
    affine = np.asarray(prepared.affine, dtype=np.float64)
    centre = np.linalg.solve(affine, np.append(np.asarray(point_mm, dtype=np.float64), 1.0))[:3]
    start = np.round(centre - (np.asarray(size) - 1) / 2.0).astype(int)
    return cut_window(prepared, start, size), start


def cut_window(prepared, start, size) -> np.ndarray:
    """``prepared[:, start:start+size]`` with 0 where the window leaves the volume."""
    volume = prepared.as_tensor().numpy() if hasattr(prepared, "as_tensor") else np.asarray(prepared)
    out = np.zeros((volume.shape[0], *size), dtype=np.float32)
    src, dst = [], []
    for axis in range(3):
        lo, hi = int(start[axis]), int(start[axis]) + int(size[axis])
        a, b = max(lo, 0), min(hi, volume.shape[1 + axis])
        if a >= b:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[(slice(None), *dst)] = volume[(slice(None), *src)]
    return out
