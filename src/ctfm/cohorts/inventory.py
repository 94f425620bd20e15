"""Inventory of a local archive as a Parquet manifest (``ctfm cohort scan``).

:func:`scan_local` describes files, folders and DICOM trees (found by
:func:`ctfm.io.sources.discover_inputs`) with :func:`ctfm.io.load_ct`; unreadable or unusable
inputs become rows with an ``error``. The manifest has the ``path`` and ``series_uid`` columns
that ``ctfm cohort cache`` and ``ctfm embed`` read.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctfm.errors import CTInputError, one_line
from ctfm.io import content_hash
from ctfm.io.sources import discover_inputs, source_location
from ctfm.preprocess import load_usable_ct
from ctfm.runtime import parallel_map


def describe_source(source) -> dict:
    """One manifest row for a scan source: geometry, UIDs, sizes; ``error`` when unusable."""

    row = {
        "scan_id": source.scan_id,
        "path": source_location(source.path),  # a PACS series: its address
        "series_uid": source.series_uid,
        "disk_bytes": _disk_bytes(Path(source.path)),
    }
    try:
        image, record = load_usable_ct(source.path, series_uid=source.series_uid)
    except CTInputError as exc:
        return {**row, "error": str(exc)}
    except Exception as exc:  # a batch job records every failure and goes on
        return {**row, "error": f"{source}: {one_line(exc, 200, with_type=True)}"}
    shape = [int(v) for v in record.shape]
    row.update(
        format=record.format,
        SeriesInstanceUID=record.series_uid,
        StudyInstanceUID=record.study_uid,
        Modality=record.modality,
        shape=shape,
        spacing_mm=[round(float(v), 6) for v in record.spacing_mm],
        orientation=record.orientation,
        SliceThickness=record.slice_thickness_mm,
        n_slices=int(record.n_slices_on_disk if record.n_slices_on_disk is not None else shape[2]),
        n_voxels=int(np.prod(shape)),
        content_hash=content_hash(image),
        warnings="; ".join(record.warnings) or None,
        error=None,
    )
    return row


def _disk_bytes(path: Path) -> int:
    """Size on disk: the file, or every file under a DICOM folder (all series it holds)."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


_SCAN_SCHEMA = [
    ("scan_id", "string"),
    ("path", "string"),
    ("series_uid", "string"),
    ("format", "string"),
    ("SeriesInstanceUID", "string"),
    ("StudyInstanceUID", "string"),
    ("Modality", "string"),
    ("shape", "list<int64>"),
    ("spacing_mm", "list<double>"),
    ("orientation", "string"),
    ("SliceThickness", "double"),
    ("n_slices", "int64"),
    ("n_voxels", "int64"),
    ("disk_bytes", "int64"),
    ("content_hash", "string"),
    ("warnings", "string"),
    ("error", "string"),
]


def _scan_schema():
    import pyarrow as pa

    types = {
        "string": pa.string(),
        "double": pa.float64(),
        "int64": pa.int64(),
        "list<int64>": pa.list_(pa.int64()),
        "list<double>": pa.list_(pa.float64()),
    }
    return pa.schema([(name, types[t]) for name, t in _SCAN_SCHEMA])


@dataclass
class ScanSummary:
    table: object  # pyarrow.Table
    seconds: float = 0.0

    @property
    def n_scans(self) -> int:
        return self.table.num_rows

    @property
    def n_errors(self) -> int:
        return self.table.num_rows - self.table.column("error").null_count

    @property
    def disk_bytes(self) -> int:
        return int(sum(v or 0 for v in self.table.column("disk_bytes").to_pylist()))


def scan_local(inputs, workers: int = 1, progress: bool = True) -> ScanSummary:
    """Describe every scan under ``inputs`` (files, folders, DICOM trees, manifests).

    Every source found by ``discover_inputs`` gets one row; those that cannot be read, or are not
    usable CT (label maps, 2D, not HU), carry the one-line reason in ``error``.
    """
    import pyarrow as pa
    from tqdm.auto import tqdm

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]

    start = time.perf_counter()
    sources = discover_inputs(list(inputs))
    rows = []
    errors = 0

    def crashed(source, message):
        return {
            "scan_id": source.scan_id,
            "path": source_location(source.path),  # a PACS series: its address
            "series_uid": source.series_uid,
            "error": message,
        }

    with tqdm(total=len(sources), unit="scan", desc="scanning", disable=not progress, dynamic_ncols=True) as bar:
        for _, row in parallel_map(describe_source, sources, workers=workers, on_crash=crashed):
            rows.append(row)
            errors += row.get("error") is not None
            bar.update(1)
            bar.set_postfix_str(f"{errors} unreadable")
    rows.sort(key=lambda r: (r["path"], r.get("series_uid") or ""))
    schema = _scan_schema()
    table = pa.Table.from_pylist([{name: r.get(name) for name in schema.names} for r in rows], schema=schema)
    table = table.replace_schema_metadata({b"ctfm.manifest": b"local-scan"})
    return ScanSummary(table=table, seconds=time.perf_counter() - start)
