"""The embedding store: a folder of Parquet files that survives being killed at any moment.

Layout (schema in docs/store.md)::

    STORE/scans.parquet      one row per (scan, mode, model, weights, preset): provenance + embedding
    STORE/patches.parquet    patch mode: one row per patch (scan id, centre in mm, embedding)
    STORE/failures.parquet   every failed attempt: source, series, error, time
    STORE/parts/             rows written since the last compaction, one small file per scan

Writers never modify a file in place. Each finished scan is written as its own part files,
patches first and the scan row last, each to a temporary name and then renamed: a part exists
whole or not at all, and a scan row exists only once its patches do. Readers merge the compacted
files with the parts (so a run killed with SIGKILL loses nothing it had finished, and shards
written by several DDP ranks merge on read); ``compact()`` folds the parts into the main files.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np

from ctfm.runtime import write_parquet_atomic

# A row is one scan computed one way: any option that changes the vector is part of the key.
SCAN_KEY = ("scan_id", "mode", "model", "weights_sha256", "preset_hash", "pool", "precision", "overlap")
STALE_TEMPORARY_SECONDS = 3600  # a writer's temporary older than this belongs to a dead process


def _schemas():
    import pyarrow as pa

    vector = pa.list_(pa.float32())
    scans = pa.schema(
        [
            ("scan_id", pa.string()),
            ("source_path", pa.string()),
            ("series_uid", pa.string()),
            ("study_uid", pa.string()),
            ("content_hash", pa.string()),
            ("mode", pa.string()),
            ("pool", pa.string()),
            ("overlap", pa.float32()),
            ("n_patches", pa.int32()),
            ("model", pa.string()),
            ("weights_sha256", pa.string()),
            ("preset", pa.string()),
            ("preset_hash", pa.string()),
            ("precision", pa.string()),
            ("package_version", pa.string()),
            ("created_at", pa.string()),
            ("embedding", vector),
        ]
    )
    patches = pa.schema(
        [
            ("scan_id", pa.string()),
            ("patch_index", pa.int32()),
            ("center_mm", pa.list_(pa.float64())),
            ("start_voxel", pa.list_(pa.int32())),
            ("model", pa.string()),
            ("weights_sha256", pa.string()),
            ("preset_hash", pa.string()),
            ("embedding", vector),
        ]
    )
    failures = pa.schema([("source_path", pa.string()), ("series_uid", pa.string()), ("error", pa.string()), ("created_at", pa.string())])
    return {"scans": scans, "patches": patches, "failures": failures}



class EmbeddingStore:
    """Append-only embedding store in a folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.parts = self.root / "parts"

    def _ensure(self) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)

    # ---- writing -------------------------------------------------------------------------
    def add(self, scan_row: dict, patch_rows: list[dict] | None = None, writer: str = "0") -> None:
        """Write one scan (and its patches) as part files; visible to readers once complete."""
        import pyarrow as pa

        self._ensure()
        schemas = _schemas()
        stem = f"{scan_row['scan_id']}-{scan_row['mode']}-{scan_row['preset_hash'][:8]}-{scan_row['weights_sha256'][:8]}-w{writer}"
        if patch_rows:
            write_parquet_atomic(pa.Table.from_pylist(patch_rows, schema=schemas["patches"]), self.parts / f"{stem}.patches.parquet")
        write_parquet_atomic(pa.Table.from_pylist([scan_row], schema=schemas["scans"]), self.parts / f"{stem}.scans.parquet")

    def add_failure(self, source_path: str, series_uid: str | None, error: str, created_at: str, writer: str = "0") -> None:
        import pyarrow as pa

        self._ensure()
        row = {"source_path": source_path, "series_uid": series_uid, "error": error, "created_at": created_at}
        write_parquet_atomic(pa.Table.from_pylist([row], schema=_schemas()["failures"]), self.parts / f"{uuid.uuid4().hex}-w{writer}.failures.parquet")

    # ---- reading -------------------------------------------------------------------------
    def _part_files(self, kind: str) -> list[Path]:
        if not self.parts.exists():
            return []
        names = sorted(p for p in self.parts.glob(f"*.{kind}.parquet") if not p.name.startswith("."))
        if kind == "patches":  # only patches whose scan row was committed
            names = [p for p in names if (p.parent / p.name.replace(".patches.parquet", ".scans.parquet")).exists()]
        return names

    def _read(self, kind: str, parts: list[Path] | None = None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = _schemas()[kind]
        tables = []
        main = self.root / f"{kind}.parquet"
        if main.exists():
            tables.append(pq.read_table(main, schema=schema))
        for p in self._part_files(kind) if parts is None else parts:
            try:
                tables.append(pq.read_table(p, schema=schema))
            except FileNotFoundError:  # folded into the main file by a concurrent compaction
                continue
        if not tables:
            return schema.empty_table()
        return pa.concat_tables(tables)

    def scans(self, parts: list[Path] | None = None):
        """All scan rows (a pyarrow Table), de-duplicated on the scan key (last write wins)."""
        return _dedupe(self._read("scans", parts), SCAN_KEY)

    def patches(self, parts: list[Path] | None = None):
        return _dedupe(self._read("patches", parts), ("scan_id", "patch_index", "weights_sha256", "preset_hash"))

    def failures(self, parts: list[Path] | None = None):
        return self._read("failures", parts)

    def done_keys(self) -> set[tuple]:
        table = self.scans()
        cols = [table.column(k).to_pylist() for k in SCAN_KEY]
        return set(zip(*cols))

    def embeddings(self, mode: str | None = None) -> tuple[list[str], np.ndarray]:
        """``(scan_ids, matrix [N, 512])`` for quick use (nearest neighbours, probes)."""
        table = self.scans()
        if mode is not None:
            import pyarrow.compute as pc

            table = table.filter(pc.equal(table.column("mode"), mode))
        ids = table.column("scan_id").to_pylist()
        matrix = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32).reshape(len(ids), -1)
        return ids, matrix

    # ---- maintenance ---------------------------------------------------------------------
    def compact(self) -> None:
        """Fold the part files into scans/patches/failures.parquet (atomic renames), then drop them."""
        if not self.parts.exists():
            return
        # Temporaries of writers killed mid-write (never read: their names start with "."); only
        # old ones, so that a writer still running beside this process keeps its own.
        now = time.time()
        for stale in [*self.parts.glob(".*.partial"), *self.root.glob(".*.partial")]:
            try:
                if now - stale.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                    stale.unlink(missing_ok=True)
            except FileNotFoundError:
                continue
        # Fold exactly the parts listed now; parts that land meanwhile wait for the next compaction.
        listed = {kind: self._part_files(kind) for kind in ("patches", "scans", "failures")}
        if not any(listed.values()):
            return
        for kind in ("patches", "scans", "failures"):
            table = getattr(self, kind)(listed[kind])
            if table.num_rows or (self.root / f"{kind}.parquet").exists():
                write_parquet_atomic(table, self.root / f"{kind}.parquet")
        for files in listed.values():  # a crash here leaves duplicates, which readers de-duplicate
            for p in files:
                p.unlink(missing_ok=True)


def _dedupe(table, key: tuple[str, ...]):
    if table.num_rows == 0:
        return table
    cols = [table.column(k).to_pylist() for k in key]
    last = {}
    for i, k in enumerate(zip(*cols)):
        last[k] = i
    keep = sorted(last.values())
    return table.take(keep) if len(keep) != table.num_rows else table
