"""What the evaluations read: vectors of one computation from a store, names in manifests and
annotation sheets matched to store rows, encoders, and the outputs every evaluation writes.

A store may hold several computations (mode, weights, preset, pool, overlap): an evaluation uses
exactly one and refuses to mix them, naming the options that pick one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctfm.errors import CTInputError, MissingDependencyError, one_line, OptionError
from ctfm.embedding.modes import encode_windows, POOLINGS
from ctfm.embedding.api import build_encoder
from ctfm.embedding.runner import weights_sha256_of
from ctfm.evaluate.reports.report import provenance, write_results
from ctfm.store import open_store, RUN_KEY


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
                    raise CTInputError(where, f"scan {key!r} matches {len(rows)} store rows ({', '.join(self.scan_ids[r] for r in rows[:3])}...)", "name it by scan id or full path")
                return rows[0]
        raise CTInputError(where, f"scan {key!r} is not in the store {self.store} (computation {self.key.get('mode')}, weights {str(self.key.get('weights_sha256'))[:12]})", "embed it first with ctfm embed ... --out STORE, or name it by scan id, path or file name")

    def _lookup(self) -> dict[str, list[int]]:
        if not hasattr(self, "_names"):
            names: dict[str, list[int]] = {}
            for i, (scan_id, path) in enumerate(zip(self.scan_ids, self.source_paths)):
                for candidate in {scan_id, path, os.path.basename(path), _stem(path)}:
                    names.setdefault(candidate, []).append(i)
            self._names = names
        return self._names

    def provenance(self) -> dict:
        return {"store": os.path.abspath(self.store), "computation": self.key, "n_scans": len(self.scan_ids), "content_hashes_sha256": digest_of(sorted(self.content_hashes))}


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


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


KEY_FILTERS = ("mode", "model", "weights_sha256", "preset_hash", "pool", "precision", "overlap")


def _key_text(key: dict) -> str:
    return f"mode={key['mode']} model={key['model']} weights={str(key['weights_sha256'])[:12]} preset={str(key['preset_hash'])[:8]} pool={key['pool']} precision={key['precision']} overlap={key['overlap']}"


def store_vectors(store_path: str | os.PathLike, pool_patches: str | None = None, **filters) -> StoreVectors:
    """The scan vectors of the one computation in ``store_path`` that matches ``filters``
    (fields of the computation key; ``weights_sha256`` may be a prefix). ``pool_patches``
    ("min", "mean", "max"): recompute each scan vector from its stored patch vectors (3D-MIR uses
    the minimum), whatever pooling the run stored. More than one matching computation is an error
    that lists them."""

    filters = {k: v for k, v in filters.items() if v is not None}
    unknown = set(filters) - set(KEY_FILTERS)
    if unknown:
        raise OptionError(f"store filters {sorted(unknown)}: expected fields of the computation key ({', '.join(KEY_FILTERS)})")
    store = open_store(store_path)
    rows = store.scans().to_pylist()

    def matches(row) -> bool:
        for k, v in filters.items():
            if k == "weights_sha256":
                if not str(row[k] or "").startswith(str(v)):
                    return False
            elif k == "overlap":
                if row[k] is None or abs(float(row[k]) - float(v)) > 1e-6:
                    return False
            elif row[k] != v:
                return False
        return True

    rows = [r for r in rows if matches(r)]
    if pool_patches is not None:
        rows = [r for r in rows if r["mode"] == "patches"]
    keys: dict[tuple, list[dict]] = {}
    for r in rows:
        keys.setdefault(tuple(r[k] for k in RUN_KEY), []).append(r)
    wanted = ", ".join(f"{k}={v}" for k, v in filters.items()) or "any"
    if not keys:
        need = " with --mode patches" if pool_patches else ""
        raise CTInputError(store_path, f"no scans of a computation matching {wanted}{' in patches mode' if pool_patches else ''}", f"embed scans into it first (ctfm embed SCANS --out STORE{need}), or loosen the filters")
    if len(keys) > 1:
        listing = "; ".join(f"[{_key_text(dict(zip(RUN_KEY, k)))}: {len(v)} scans]" for k, v in keys.items())
        raise OptionError(f"{store_path}: {len(keys)} computations match {wanted}: {listing}; choose one with --weights-sha256 / --mode / --pool / --overlap")
    key_values, chosen = next(iter(keys.items()))
    key = dict(zip(RUN_KEY, key_values))
    chosen.sort(key=lambda r: r["scan_id"])
    if pool_patches is not None:

        if pool_patches not in POOLINGS:
            raise OptionError(f"pooling {pool_patches!r}: expected one of {', '.join(POOLINGS)}")
        by_scan: dict[str, list] = {}
        write_ids = {r["scan_id"]: r["write_id"] for r in chosen}
        for p in store.patches().to_pylist():
            if p["scan_id"] in write_ids and p["write_id"] == write_ids[p["scan_id"]] and tuple(p[k] for k in RUN_KEY) == key_values:
                by_scan.setdefault(p["scan_id"], []).append(p["embedding"])
        missing = [r["scan_id"] for r in chosen if r["scan_id"] not in by_scan]
        if missing:
            raise CTInputError(store_path, f"scans without patch rows: {', '.join(missing[:3])}", "run ctfm store check, or re-embed them in patches mode")
        matrix = np.stack([getattr(np.asarray(by_scan[r["scan_id"]], dtype=np.float32), pool_patches)(axis=0) for r in chosen])
        key = {**key, "pool": f"{pool_patches} (recomputed from patches)"}
    else:
        matrix = np.asarray([r["embedding"] for r in chosen], dtype=np.float32)
    return StoreVectors(os.fspath(store_path), key, [r["scan_id"] for r in chosen], [r["source_path"] for r in chosen], matrix, [r["content_hash"] or "" for r in chosen])


def read_table(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a CSV, TSV, Parquet or XLSX sheet as dicts (header names and text cells stripped);
    ``required`` columns must be present."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise CTInputError(path, "no such file", "give the path of a CSV, Parquet or XLSX sheet")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        elif suffix in (".xlsx", ".xlsm"):
            try:
                import openpyxl
            except ImportError:

                raise MissingDependencyError(f"{path}: reading XLSX sheets needs openpyxl (pip install openpyxl), or save the sheet as CSV") from None
            sheet = openpyxl.load_workbook(path, read_only=True, data_only=True).active
            values = [["" if v is None else v for v in row] for row in sheet.iter_rows(values_only=True)]
            rows = [dict(zip([str(h) for h in values[0]], row)) for row in values[1:]] if values else []
        else:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    except (ValueError, OSError, UnicodeDecodeError, csv.Error) as exc:

        raise CTInputError(path, f"unreadable sheet: {one_line(exc)}", "give a CSV (comma-separated, header row), TSV, Parquet or XLSX file") from None
    rows = [{str(k).strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k is not None} for row in rows]
    columns = list(rows[0]) if rows else []
    if not columns and suffix not in (".parquet", ".xlsx", ".xlsm"):
        with open(path, newline="", encoding="utf-8-sig") as fh:
            columns = [c.strip() for c in next(csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ","), [])]
    missing = [c for c in required if c not in columns]
    if missing:
        raise CTInputError(path, f"missing column(s) {', '.join(missing)} (found: {', '.join(columns) or 'none'})", f"add a header row with {', '.join(required)}")
    if not rows:
        raise CTInputError(path, "no rows", "add one row per scan")
    return rows


def load_encoder(weights: str | None, model: str = "ct-fm", seed: int = 0, device: str = "cpu"):
    """``(encoder in eval mode, provenance fields)``: weights loaded strictly, or a seeded random
    init (warned, for testing)."""

    encoder = build_encoder(model, weights, seed).eval().to(device)
    fields = {"model": model, "weights": weights if weights is not None else f"random-init seed {seed}", "weights_sha256": weights_sha256_of(encoder)}
    return encoder, fields


def encode_batches(encoder, volumes: np.ndarray, batch_size: int = 8, device: str = "cpu", precision: str = "fp32") -> np.ndarray:
    """[N, D, H, W] (or [N, 1, D, H, W]) float32 in [0, 1] -> [N, 512] pooled embeddings, encoded
    as every stored patch and region query is (:func:`ctfm.embedding.modes.encode_windows`)."""
    import torch


    if volumes.ndim == 4:
        volumes = volumes[:, None]
    out = [encode_windows(encoder, torch.from_numpy(np.ascontiguousarray(volumes[i : i + batch_size], dtype=np.float32)), device, precision).numpy() for i in range(0, len(volumes), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def write_outputs(out_dir: str | os.PathLike, results: dict, provenance_fields: dict, report) -> dict:
    """``results.json`` (with provenance) and ``report.html`` in ``out_dir``; returns the paths."""

    prov = provenance(**provenance_fields)
    results_path = write_results(out_dir, results, prov)
    report.provenance(prov)
    report_path = report.write(Path(out_dir) / "report.html")
    return {"results": os.fspath(results_path), "report": os.fspath(report_path)}


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)
