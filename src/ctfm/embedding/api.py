"""``embed([...])``: the Python API of a batch embedding run, in one process or under DDP.

``ctfm embed`` parses its arguments and calls :func:`embed`, so both take the same defaults
(device, seed, preprocessing) and write the same records. One process runs
:func:`ctfm.embedding.runner.run_sources`; with ``distributed``, :mod:`ctfm.embedding.distributed`
runs it on every rank. The batch machinery lives in :mod:`ctfm.embedding.runner`, this module on
top of both, so that neither imports the other.
"""

from __future__ import annotations

import os
import warnings

from ctfm.embedding.distributed import run_distributed
from ctfm.embedding.modes import EmbedOptions, resolve_precision
from ctfm.embedding.runner import (
    DEFAULT_SEED,
    EmbedRun,
    RandomWeightsWarning,
    default_device,
    discover_inputs,
    pending_sources,
    run_key,
    run_sources,
    store_records,
)
from ctfm.errors import OptionError
from ctfm.models import create_model, init_model
from ctfm.models.preprocessing import preprocessing_for
from ctfm.store import EmbeddingStore

__all__ = ["build_encoder", "embed"]


def build_encoder(model: str, weights: str | None, seed: int):
    """The encoder to embed with: ``weights`` loaded strictly, or a seeded random init (warned)."""

    if weights is not None:
        return create_model(model, weights=weights)
    warnings.warn(
        f"no weights given: {model} with random weights (seed {seed}), for testing only; give weights (e.g. "
        "hf-hub:project-lighter/ct_fm_feature_extractor) for CT-FM",
        RandomWeightsWarning,
        stacklevel=3,
    )
    return init_model(model, seed)


def embed(
    inputs,
    model: str = "ct-fm",
    weights: str | None = None,
    mode: str = "whole",
    out: str | os.PathLike | None = None,
    precision: str = "fp32",
    device: str | None = None,
    overlap: float = 0.0,
    pool: str = "mean",
    preset=None,
    seed: int = DEFAULT_SEED,
    progress: bool = False,
    encoder=None,
    distributed: dict | None = None,
    return_records: bool = True,
) -> EmbedRun:
    """Embed scans and return their records; with ``out``, also write them to that store (resumable).

    Args:
        inputs: a path or a list of files, folders (DICOM trees searched recursively) and
            CSV/Parquet manifests with a ``path`` column.
        model, weights: registry name and weights source (folder, ``hf-hub:ORG/NAME``,
            .safetensors, .ckpt); without weights, a random init from ``seed`` (warned).
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"auto"`` (bf16 where the device has
            native bf16 arithmetic, else fp32).
        mode: ``"whole"`` (one 512-d vector) or ``"patches"`` (sliding windows, pooled by
            ``pool``: mean, max or min; ``overlap`` between windows).
        preset: a preset name or PreprocessSpec overriding the preprocessing recorded with the
            weights (warned when it differs).
        device: ``"cpu"``, ``"cuda"``, ...; default :func:`default_device`.
        encoder: an already built encoder instead of ``model``/``weights``.
        distributed: Lightning Trainer arguments (``devices``, ``num_nodes``, ``strategy``,
            ``accelerator``) to run under DDP, one store shard per rank (needs ``out``).
        return_records: False to skip reading the records back (large runs into a store).

    Returns:
        an :class:`EmbedRun`: the records of ``inputs`` (rows of scans.parquet with the embedding
        as a float32 [512] array, patches under ``"patches"``), with ``.totals``, ``.spec``, ``summary()`` and ``to_json()``.
    """

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    device = default_device(device)  # a device this machine has, before any work
    precision = resolve_precision(precision, device)
    sources = discover_inputs(list(inputs))
    if encoder is None:
        encoder = build_encoder(model, weights, seed)
    spec = preprocessing_for(encoder, model, mode, preset)
    options = EmbedOptions(mode=mode, spec=spec, precision=precision, device=device, overlap=overlap, pool=(pool,))
    encoder = encoder.eval()
    store = EmbeddingStore(out) if out is not None else None
    if distributed:
        if store is None:
            raise OptionError("distributed embedding writes one store shard per rank: give out=STORE (--out)")

        todo = pending_sources(sources, store, encoder, model, options)
        summary = run_distributed(todo, encoder, model, options, store, distributed, progress=progress)
        if summary is None:  # not global rank 0: rank 0 reports
            return EmbedRun(totals=None, spec=spec, store=out)
        summary.skipped += len(sources) - len(todo)
    else:
        summary = run_sources(
            sources,
            encoder.to(device),
            model,
            options,
            store,
            progress=progress,
            keep_records=store is None and return_records,
        )
    if store is None:
        return EmbedRun(summary.records, totals=summary, spec=spec)
    store.compact()
    records = store_records(store, sources, run_key(encoder, model, options)) if return_records else []
    return EmbedRun(records, totals=summary, spec=spec, store=out)
