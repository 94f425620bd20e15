"""Batch embedding: find scans, embed each, write the store, carry on past failures.

``embed([...])`` is the Python API and ``ctfm embed`` the command: the command parses its
arguments and calls :func:`embed`, so both take the same defaults (device, seed, preprocessing)
and write the same records. A run is resumable: scans already in the store for the same
computation key (:data:`ctfm.store.schema.RUN_KEY`) are skipped, and every finished scan is on
disk before the next one starts.
"""

from __future__ import annotations

import hashlib
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ctfm import __version__
from ctfm.embedding.modes import EmbedOptions, embed_patches, encode_whole, prepare
from ctfm.errors import OptionError, UserError, one_line
from ctfm.io import content_hash
from ctfm.io.sources import ScanSource, discover_inputs, source_location
from ctfm.preprocess import load_usable_ct
from ctfm.runtime import Result, check_device, jsonable, progress_bar, utc_now
from ctfm.store.schema import RECORD_COLUMNS, RUN_KEY, overlap_value
from ctfm.store.vectors import load_run_vectors

DEFAULT_SEED = 0  # the random init used when no weights are given (testing only)

__all__ = [
    "DEFAULT_SEED",
    "EmbedRun",
    "RandomWeightsWarning",
    "RunSummary",
    "ScanSource",
    "default_device",
    "discover_inputs",
    "embed_source",
    "run_sources",
]


class RandomWeightsWarning(UserWarning):
    """No weights were given: the encoder is randomly initialised (for tests and demos only)."""


@dataclass
class RunSummary(Result):
    """How an embedding run went: scans embedded, skipped (already in the store), failed
    ``(input, message)``, seconds, and the records kept when there is no store."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        rate = f"; {self.done / self.seconds if self.seconds else 0.0:.2f} scans/s" if self.done else ""
        failed = len(self.failed)
        return f"embedded {self.done} scan(s), skipped {self.skipped} already in the store, {failed} failed{rate}"


class EmbedRun(list, Result):
    """What :func:`ctfm.embed` returns: the records of a run (a list of ``scans.parquet`` rows,
    patches under ``"patches"``), with the run's ``totals`` (:class:`RunSummary`: embedded,
    skipped, failed, seconds), the ``spec`` used and the ``store`` path; :meth:`summary` is one
    line, :meth:`to_json` the totals, spec and store (records stay in the list, or the store).

    On a DDP rank other than 0, the list is empty and ``totals`` is None (rank 0 reports).
    """

    def __init__(self, records=(), totals: RunSummary | None = None, spec=None, store=None):
        super().__init__(records)
        self.totals = totals
        self.spec = spec
        self.store = store

    def summary(self) -> str:
        return (
            self.totals.summary() if self.totals is not None else "embedding: this rank reports nothing (rank 0 does)"
        )

    def to_json(self) -> dict:
        totals = None if self.totals is None else {k: v for k, v in self.totals.to_json().items() if k != "records"}
        spec = None if self.spec is None else {"name": self.spec.name, "hash": self.spec.content_hash()}
        return jsonable({"totals": totals, "spec": spec, "store": None if self.store is None else str(self.store)})


def default_device(device: str | None = None) -> str:
    """``device`` checked to exist here, or ``"cuda"`` when a GPU is visible, else ``"cpu"``: the
    one default of the API and the CLI (:func:`ctfm.runtime.check_device`)."""
    return check_device(device)


# ---- embedding one scan --------------------------------------------------------------------
def record_columns(record) -> dict:
    """The ScanRecord fields that scans.parquet keeps for filtering (RECORD_COLUMNS)."""
    values = {name: getattr(record, name, None) for name in RECORD_COLUMNS}
    values["spacing_mm"] = [float(v) for v in record.spacing_mm]
    values["shape"] = [int(v) for v in record.shape]
    return values


def embed_source(source: ScanSource, encoder, model_name: str, weights_sha256: str, options: EmbedOptions) -> dict:
    """Load, embed and describe one scan; returns the store row (patch rows under ``"patches"``)."""

    image, record = load_usable_ct(source.path, series_uid=source.series_uid, spec=options.spec)
    row = {
        "scan_id": source.scan_id,
        "source_path": source_location(source.path),
        "series_uid": record.series_uid,
        "study_uid": record.study_uid,
        "sop_uids": list(record.sop_uids or []),
        "content_hash": content_hash(image),
        "mode": options.mode,
        "model": model_name,
        "weights_sha256": weights_sha256,
        "preset": options.spec.name,
        "preset_hash": options.spec.content_hash(),
        "preprocess_spec": options.spec.to_json(indent=None),
        "precision": options.precision,
        "overlap": overlap_of(options),
        **record_columns(record),
        "package_version": __version__,
        "created_at": utc_now(),
    }
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
                "patch_index": i,
                "center_mm": grid.centers_mm[i].tolist(),
                "start_voxel": grid.starts[i].tolist(),
                "embedding": grid.embeddings[i],
            }
            for i in range(len(grid.embeddings))
        ]
    else:
        raise OptionError(f"the store holds whole and patches embeddings, not {options.mode!r}")
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


def pool_of(options: EmbedOptions) -> str:
    return "avg" if options.mode == "whole" else options.pool[0]


def overlap_of(options: EmbedOptions) -> float:
    """The overlap as the key stores it (float32; 0 for whole scans)."""
    return overlap_value(options.overlap if options.mode == "patches" else 0.0)


def run_key(encoder, model_name: str, options: EmbedOptions) -> tuple:
    """The computation key (RUN_KEY order) of embedding with ``encoder`` and ``options``."""
    values = {
        "mode": options.mode,
        "model": model_name,
        "weights_sha256": weights_sha256_of(encoder),
        "preset_hash": options.spec.content_hash(),
        "pool": pool_of(options),
        "precision": options.precision,
        "overlap": overlap_of(options),
    }
    return tuple(values[k] for k in RUN_KEY)


def pending_sources(sources, store, encoder, model_name: str, options: EmbedOptions) -> list[ScanSource]:
    """The sources not yet in ``store`` for this computation key."""
    if store is None:
        return list(sources)
    key = run_key(encoder, model_name, options)
    done = store.done_keys()
    return [s for s in sources if (s.scan_id, *key) not in done]


def run_sources(
    sources,
    encoder,
    model_name: str,
    options: EmbedOptions,
    store,
    writer: str = "0",
    progress: bool = True,
    keep_records: bool = False,
    skip_done: bool = True,
) -> RunSummary:
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
        except UserError as exc:
            _record_failure(summary, store, source, str(exc), writer)
        except Exception as exc:  # a bug or an environment fault: recorded as such, the batch goes on
            message = f"{source}: internal error {type(exc).__name__}: {one_line(exc, 300)} (a bug in ctfm or its environment; please report it with this line)"
            _record_failure(summary, store, source, message, writer, trace=traceback.format_exc())
        else:
            patches = row.pop("patches")
            if store is not None:
                row["write_id"] = store.add(row, patches, writer=writer)
            summary.done += 1
            if keep_records:
                summary.records.append({**row, "patches": patches})
        bar.update(1)
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(
            f"{(summary.done + len(summary.failed)) / max(elapsed, 1e-9):.2f} scans/s, {len(summary.failed)} failed"
        )
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _record_failure(summary, store, source, message, writer, trace: str | None = None):
    summary.failed.append((str(source), message))
    if store is not None:
        store.add_failure(source_location(source.path), source.series_uid, message, utc_now(), writer=writer)


def store_records(store, sources, key: tuple) -> list[dict]:
    """The store's rows of computation ``key`` for ``sources`` (in their order), patches attached
    (joined on the whole key and write id), embeddings as float32 arrays. The run is read as
    columns (:func:`ctfm.store.vectors.load_run_vectors`); only the records handed back are dicts."""
    wanted = {source.scan_id for source in sources}
    scans = load_run_vectors(store, "scan", key)
    position = {scan_id: i for i, scan_id in enumerate(scans.scan_id) if scan_id in wanted}
    rows = scans.metadata.take(pa.array(sorted(position.values()), type=pa.int64())).to_pylist()
    by_id = {row["scan_id"]: (row, scans.vectors[position[row["scan_id"]]]) for row in rows}
    patches: dict[str, list[dict]] = {}
    if key[RUN_KEY.index("mode")] == "patches" and by_id:
        windows = load_run_vectors(store, "patch", key)
        fields = dict(zip(RUN_KEY, key))
        keep = np.flatnonzero(np.isin(windows.scan_id, np.asarray(sorted(by_id), dtype=object)))
        table = windows.metadata.take(pa.array(keep, type=pa.int64())).to_pylist()
        for i, p in zip(keep, table):
            patches.setdefault(p["scan_id"], []).append({**p, **fields, "embedding": windows.vectors[i]})
    records = []
    for source in sources:
        found = by_id.get(source.scan_id)
        if found is not None:
            row, vector = found
            records.append(
                {**row, "embedding": np.asarray(vector, dtype=np.float32), "patches": patches.get(source.scan_id, [])}
            )
    return records
