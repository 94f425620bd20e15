"""What the evaluations read: vectors of one computation from a store, names in manifests and
annotation sheets matched to store rows, encoders, and the outputs every evaluation writes.

A store may hold several computations (mode, weights, preset, pool, overlap): an evaluation uses
exactly one and refuses to mix them, naming the runs and the options that pick one (``--run DIGEST``,
``--where COLUMN=VALUE``). Sheets are read by :func:`ctfm.io.read_table`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctfm.embedding.api import build_encoder
from ctfm.embedding.modes import POOLINGS, encode_windows
from ctfm.embedding.runner import weights_sha256_of
from ctfm.errors import CTInputError, OptionError
from ctfm.evaluate.reports.report import provenance, write_results
from ctfm.runtime import DocumentResult
from ctfm.store import open_store
from ctfm.store.vectors import key_dict


@dataclass
class StoreVectors:
    """Scan vectors of one computation key: ``matrix`` [N, D] in the order of ``scan_ids``."""

    store: str
    key: dict
    scan_ids: list[str]
    source_paths: list[str]
    matrix: np.ndarray
    content_hashes: list[str] = field(default_factory=list)

    def index_of(self, name: str, where: str | os.PathLike | None = None) -> int:
        """Row of ``name``: a scan id, a source path, or a file name / stem (unique) of a source path."""
        lookup = self._lookup()
        key = str(name).strip()
        for candidate in (key, os.path.abspath(key), Path(key).name, _stem(key)):
            rows = lookup.get(candidate)
            if rows is not None:
                if len(rows) > 1:
                    raise CTInputError(
                        where,
                        f"scan {key!r} matches {len(rows)} store rows "
                        f"({', '.join(self.scan_ids[r] for r in rows[:3])}...)",
                        "name it by scan id or full path",
                    )
                return rows[0]
        raise CTInputError(
            where,
            f"scan {key!r} is not in the store {self.store} (computation {self.key.get('mode')}, weights "
            f"{str(self.key.get('weights_sha256'))[:12]})",
            "embed it first with ctfm embed ... --out STORE, or name it by scan id, path or file name",
        )

    def _lookup(self) -> dict[str, list[int]]:
        if not hasattr(self, "_names"):
            names: dict[str, list[int]] = {}
            for i, (scan_id, path) in enumerate(zip(self.scan_ids, self.source_paths)):
                for candidate in {scan_id, path, os.path.basename(path), _stem(path)}:
                    names.setdefault(candidate, []).append(i)
            self._names = names
        return self._names

    def provenance(self) -> dict:
        return {
            "store": os.path.abspath(self.store),
            "computation": self.key,
            "n_scans": len(self.scan_ids),
            "content_hashes_sha256": digest_of(sorted(self.content_hashes)),
        }


def _stem(path: str) -> str:
    name = os.path.basename(str(path))
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".npy"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def digest_of(items) -> str:
    """sha256 of a list of strings (order as given)."""
    h = hashlib.sha256()
    for item in items:
        h.update(str(item).encode())
        h.update(b"\0")
    return h.hexdigest()


def store_vectors(
    store_path: str | os.PathLike, run: str | None = None, where: dict | None = None, pool_patches: str | None = None
) -> StoreVectors:
    """The scan vectors of the one run of ``store_path`` that ``run`` (a digest or unique prefix)
    and ``where`` (``{column: value}`` of the scan rows) pick (:meth:`ctfm.store.EmbeddingStore.select`;
    several candidates are a one-line error listing them), in scan id order.

    ``pool_patches`` ("min", "mean", "max"): recompute each scan vector from its stored patch
    vectors (3D-MIR uses the minimum), whatever pooling the run stored."""
    store = open_store(store_path)
    if pool_patches is None:
        vectors = store.select("scan", run=run, where=where)
        order = np.argsort(vectors.scan_id, kind="stable")
        matrix = vectors.vectors[order]
        scans = vectors.metadata.take(pa.array(order, type=pa.int64()))
        key = key_dict(vectors.key)
    else:
        if pool_patches not in POOLINGS:
            raise OptionError(f"pooling {pool_patches!r}: expected one of {', '.join(POOLINGS)}")
        vectors = store.select("patch", run=run, where=where)
        # Windows come grouped by scan id (sorted): one reduction per contiguous group.
        ids = vectors.scan_id
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, dtype=np.int64)
        scans = vectors.scan_table.take(pc.sort_indices(vectors.scan_table, sort_keys=[("scan_id", "ascending")]))
        missing = sorted(set(scans.column("scan_id").to_pylist()) - set(ids[starts].tolist()))
        if missing:
            raise CTInputError(
                store_path,
                f"scans without patch rows: {', '.join(missing[:3])}",
                "run ctfm store check, or re-embed them in patches mode",
            )
        if pool_patches == "mean":
            counts = np.diff(np.r_[starts, len(ids)])
            matrix = (np.add.reduceat(vectors.vectors.astype(np.float64), starts, axis=0) / counts[:, None]).astype(
                np.float32
            )
        else:
            matrix = getattr(np, "minimum" if pool_patches == "min" else "maximum").reduceat(
                vectors.vectors, starts, axis=0
            )
        key = {**key_dict(vectors.key), "pool": f"{pool_patches} (recomputed from patches)"}
    hashes = [h or "" for h in scans.column("content_hash").to_pylist()]
    return StoreVectors(
        os.fspath(store_path),
        key,
        scans.column("scan_id").to_pylist(),
        scans.column("source_path").to_pylist(),
        np.ascontiguousarray(matrix, dtype=np.float32),
        hashes,
    )


def load_eval_encoder(weights: str | None, model: str = "ct-fm", seed: int = 0, device: str = "cpu"):
    """``(encoder in eval mode, provenance fields)``: weights loaded strictly, or a seeded random
    init (warned, for testing)."""

    encoder = build_encoder(model, weights, seed).eval().to(device)
    fields = {
        "model": model,
        "weights": weights if weights is not None else f"random-init seed {seed}",
        "weights_sha256": weights_sha256_of(encoder),
    }
    return encoder, fields


def encode_batches(
    encoder, volumes: np.ndarray, batch_size: int = 8, device: str = "cpu", precision: str = "fp32"
) -> np.ndarray:
    """[N, D, H, W] (or [N, 1, D, H, W]) float32 in [0, 1] -> [N, 512] pooled embeddings, encoded
    as every stored patch and region query is (:func:`ctfm.embedding.modes.encode_windows`)."""
    import torch

    if volumes.ndim == 4:
        volumes = volumes[:, None]
    out = [
        encode_windows(
            encoder,
            torch.from_numpy(np.ascontiguousarray(volumes[i : i + batch_size], dtype=np.float32)),
            device,
            precision,
        ).numpy()
        for i in range(0, len(volumes), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass
class ZeroShotResult(DocumentResult):
    """What a zero-shot evaluation returns: ``data`` holds the keys of its results.json and the
    paths of ``results`` (results.json) and ``report`` (report.html); ``provenance`` what produced it."""

    def summary(self) -> str:
        return f"{self.data['evaluation']}: results {self.data['results']}, report {self.data['report']}"


def write_evaluation_outputs(
    out_dir: str | os.PathLike, results: dict, provenance_fields: dict, report, result_type=None
) -> ZeroShotResult:
    """``results.json`` (with provenance) and ``report.html`` in ``out_dir``; returns the result
    (``result_type``, a :class:`ZeroShotResult` subclass) with the two paths."""

    prov = provenance(**provenance_fields)
    results_path = write_results(out_dir, results, prov)
    report.provenance(prov)
    report_path = report.write(Path(out_dir) / "report.html")
    paths = {"results": os.fspath(results_path), "report": os.fspath(report_path)}
    return (result_type or ZeroShotResult)({**results, **paths}, prov)


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)
