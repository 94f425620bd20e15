"""Batch embedding: find scans, embed each, write the store, carry on past failures.

``embed([...])`` is the Python API and ``ctfm embed`` the command; both return / write the same
records. A run is resumable: scans already in the store for the same model, weights and preset
are skipped, and every finished scan is on disk before the next one starts.
"""

from __future__ import annotations

import hashlib
import os
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from ctfm.embedding.modes import EmbedOptions, embed_patches, encode_whole, prepare
from ctfm.errors import CTInputError
from ctfm.io.sources import ScanSource, discover_inputs
from ctfm.runtime import progress_bar, utc_now


@dataclass
class RunSummary:
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)


# ---- embedding one scan --------------------------------------------------------------------
def content_hash(image) -> str:
    """sha256 of the voxels and the affine: the same scan gives the same hash in any format."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32).tobytes())
    h.update(np.asarray(image.affine, dtype=np.float64).tobytes())
    return h.hexdigest()



def embed_source(source: ScanSource, encoder, model_name: str, weights_sha256: str, options: EmbedOptions) -> dict:
    """Load, embed and describe one scan; returns the store row (patch rows under ``"patches"``)."""
    from ctfm import __version__
    from ctfm.preprocess import load_usable_ct

    image, record = load_usable_ct(source.path, series_uid=source.series_uid)
    row = {
        "scan_id": source.scan_id,
        "source_path": os.path.abspath(source.path),
        "series_uid": record.series_uid,
        "study_uid": record.study_uid,
        "content_hash": content_hash(image),
        "mode": options.mode,
        "model": model_name,
        "weights_sha256": weights_sha256,
        "preset": options.spec.name,
        "preset_hash": options.spec.content_hash(),
        "precision": options.precision,
        "package_version": __version__,
        "created_at": utc_now(),
    }
    row["overlap"] = _overlap_of(options)
    if options.mode == "whole":
        prepared = prepare(image, options.spec)
        del image  # the full-resolution scan is not needed while the encoder runs
        row.update(embedding=encode_whole(encoder, prepared, options), pool="avg", n_patches=0)
        row["patches"] = []
    elif options.mode == "patches":
        grid = embed_patches(encoder, image, options)
        pool = options.pool[0]
        row.update(embedding=grid.pooled(pool), pool=pool, n_patches=len(grid.embeddings))
        row["patches"] = [
            {
                "scan_id": row["scan_id"],
                "patch_index": i,
                "center_mm": grid.centers_mm[i].tolist(),
                "start_voxel": grid.starts[i].tolist(),
                "model": model_name,
                "weights_sha256": weights_sha256,
                "preset_hash": row["preset_hash"],
                "embedding": grid.embeddings[i],
            }
            for i in range(len(grid.embeddings))
        ]
    else:
        raise ValueError(f"the store holds whole and patches embeddings, not {options.mode!r}")
    return row


def weights_sha256_of(model) -> str:
    """The sha256 of the loaded weights file, or of the state dict for a model built in memory."""
    info = getattr(model, "weights_info", None)
    if info is not None and getattr(info, "sha256", None):
        return info.sha256
    cached = getattr(model, "_state_sha256", None)
    if cached is None:
        h = hashlib.sha256()
        for key, tensor in sorted(model.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        cached = "state:" + h.hexdigest()
        model._state_sha256 = cached  # weights do not change during a run
    return cached


def pending_sources(sources, store, encoder, model_name: str, options: EmbedOptions) -> list[ScanSource]:
    """The sources not yet in ``store`` for this model, weights, mode and preset."""
    if store is None:
        return list(sources)
    key_tail = (options.mode, model_name, weights_sha256_of(encoder), options.spec.content_hash(), _pool_of(options), options.precision, _overlap_of(options))
    done = store.done_keys()
    return [s for s in sources if (s.scan_id, *key_tail) not in done]


def _pool_of(options: EmbedOptions) -> str:
    return "avg" if options.mode == "whole" else options.pool[0]


def _overlap_of(options: EmbedOptions) -> float:
    """Stored as float32; the key compares the same rounding."""
    return float(np.float32(options.overlap if options.mode == "patches" else 0.0))


def run_sources(sources, encoder, model_name: str, options: EmbedOptions, store, writer: str = "0", progress: bool = True, keep_records: bool = False, skip_done: bool = True) -> RunSummary:
    """Embed ``sources`` into ``store`` (skipping finished ones); failures are recorded, not raised."""
    summary = RunSummary()
    weights_sha = weights_sha256_of(encoder)
    todo = pending_sources(sources, store, encoder, model_name, options) if skip_done else list(sources)
    summary.skipped = len(sources) - len(todo)
    start = time.perf_counter()
    bar = progress_bar(len(todo), progress)
    for source in todo:
        try:
            row = embed_source(source, encoder, model_name, weights_sha, options)
        except CTInputError as exc:
            _record_failure(summary, store, source, str(exc), writer)
        except Exception as exc:  # a batch job records every failure and goes on
            detail = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            _record_failure(summary, store, source, f"{source}: {detail}", writer, trace=traceback.format_exc())
        else:
            patches = row.pop("patches")
            if store is not None:
                store.add(row, patches, writer=writer)
            summary.done += 1
            if keep_records:
                summary.records.append({**row, "patches": patches})
        bar.update(1)
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"{(summary.done + len(summary.failed)) / max(elapsed, 1e-9):.2f} scans/s, {len(summary.failed)} failed")
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _record_failure(summary, store, source, message, writer, trace: str | None = None):
    summary.failed.append((str(source), message))
    if store is not None:
        store.add_failure(os.path.abspath(source.path), source.series_uid, message, utc_now(), writer=writer)



def embed(
    inputs,
    model: str = "ct-fm",
    weights: str | None = None,
    mode: str = "whole",
    out: str | os.PathLike | None = None,
    precision: str = "fp32",
    device: str = "cpu",
    overlap: float = 0.0,
    pool: str = "mean",
    preset: str | None = None,
    progress: bool = False,
    encoder=None,
) -> list[dict]:
    """Embed scans and return their records (the rows of ``scans.parquet``, patches under
    ``"patches"``); with ``out``, also write them to that store (resumable).

    ``inputs``: a path or a list of files, folders (DICOM trees searched recursively) and
    manifests. ``encoder`` may be passed instead of ``model``/``weights`` (already built).
    """
    from ctfm.models import create_model
    from ctfm.preprocess import get_preset
    from ctfm.store import EmbeddingStore

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    sources = discover_inputs(list(inputs))
    options = EmbedOptions(mode=mode, spec=get_preset(preset) if preset else None, precision=precision, device=device, overlap=overlap, pool=(pool,))
    if encoder is None:
        encoder = create_model(model, weights=weights)
    encoder = encoder.eval().to(device)
    store = EmbeddingStore(out) if out is not None else None
    summary = run_sources(sources, encoder, model, options, store, progress=progress, keep_records=True)
    if store is None:
        return summary.records
    store.compact()
    return store_records(store, sources, model, weights_sha256_of(encoder), options)


def store_records(store, sources, model_name: str, weights_sha256: str, options: EmbedOptions) -> list[dict]:
    """The store's rows for ``sources`` (in their order), patches attached, embeddings as arrays."""
    preset_hash = options.spec.content_hash()
    wanted = (options.mode, model_name, weights_sha256, preset_hash, _pool_of(options), options.precision, _overlap_of(options))
    rows = {r["scan_id"]: r for r in store.scans().to_pylist() if (r["mode"], r["model"], r["weights_sha256"], r["preset_hash"], r["pool"], r["precision"], r["overlap"]) == wanted}
    patches: dict[str, list[dict]] = {}
    if options.mode == "patches":
        for p in store.patches().to_pylist():
            if p["weights_sha256"] == weights_sha256 and p["preset_hash"] == preset_hash:
                p["embedding"] = np.asarray(p["embedding"], dtype=np.float32)
                patches.setdefault(p["scan_id"], []).append(p)
    records = []
    for source in sources:
        row = rows.get(source.scan_id)
        if row is not None:
            row["embedding"] = np.asarray(row["embedding"], dtype=np.float32)
            row["patches"] = sorted(patches.get(source.scan_id, []), key=lambda p: p["patch_index"])
            records.append(row)
    return records
