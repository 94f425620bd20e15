"""What the embedding store holds: the computation key, the Parquet schemas, the record columns.

The **computation key** (:data:`RUN_KEY`) is every option that changes a vector: two rows that
differ in any of its fields are two different computations of a scan and never replace one
another. Scan rows and patch rows both carry it (plus ``scan_id``, and the ``write_id`` of the
write that produced them), and every reader joins patches to scans on all of it.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

# Options that change the vector. Defined here once; rows, file names, resume and joins use it.
RUN_KEY = ("mode", "model", "weights_sha256", "preset_hash", "pool", "precision", "overlap")
SCAN_KEY = ("scan_id", *RUN_KEY)
# A patch row belongs to the scan row of the same key *and* the same write (a re-embedded scan
# replaces its patches as a set, never patch by patch).
PATCH_KEY = (*SCAN_KEY, "write_id", "patch_index")

# Scan-record fields a user filters and splits on, copied into scans.parquet (ScanRecord names).
RECORD_COLUMNS = (
    "format",
    "modality",
    "kernel",
    "slice_thickness_mm",
    "manufacturer",
    "body_part",
    "contrast",
    "study_date",
    "series_description",
    "orientation",
    "spacing_mm",
    "shape",
)


def overlap_value(overlap: float) -> float:
    """The overlap as stored (float32), so that keys built in Python compare equal to stored ones."""
    return float(np.float32(overlap))


def run_key_of(row: dict) -> tuple:
    """The computation key of a scan or patch row, as a tuple in :data:`RUN_KEY` order."""
    return tuple(overlap_value(row[k]) if k == "overlap" and row[k] is not None else row[k] for k in RUN_KEY)


def key_digest(values: tuple) -> str:
    """A short, stable name for a key (file names of parts): 16 hex of its sha256."""
    return hashlib.sha256(json.dumps([None if v is None else str(v) for v in values]).encode()).hexdigest()[:16]


def schemas():
    """``{"scans", "patches", "failures"}`` -> pyarrow schema (pyarrow imported on first use)."""
    import pyarrow as pa

    vector = pa.list_(pa.float32())
    key_fields = [
        ("mode", pa.string()),
        ("model", pa.string()),
        ("weights_sha256", pa.string()),
        ("preset_hash", pa.string()),
        ("pool", pa.string()),
        ("precision", pa.string()),
        ("overlap", pa.float32()),
    ]
    record_fields = [
        ("format", pa.string()),
        ("modality", pa.string()),
        ("kernel", pa.string()),
        ("slice_thickness_mm", pa.float64()),
        ("manufacturer", pa.string()),
        ("body_part", pa.string()),
        ("contrast", pa.string()),
        ("study_date", pa.string()),
        ("series_description", pa.string()),
        ("orientation", pa.string()),
        ("spacing_mm", pa.list_(pa.float64())),
        ("shape", pa.list_(pa.int32())),
    ]
    scans = pa.schema(
        [
            ("scan_id", pa.string()),
            *key_fields,
            ("write_id", pa.string()),
            ("source_path", pa.string()),
            ("series_uid", pa.string()),
            ("study_uid", pa.string()),
            ("sop_uids", pa.list_(pa.string())),
            ("content_hash", pa.string()),
            ("n_patches", pa.int32()),
            ("preset", pa.string()),
            ("preprocess_spec", pa.string()),
            *record_fields,
            ("package_version", pa.string()),
            ("created_at", pa.string()),
            ("embedding", vector),
        ]
    )
    patches = pa.schema(
        [
            ("scan_id", pa.string()),
            *key_fields,
            ("write_id", pa.string()),
            ("patch_index", pa.int32()),
            ("center_mm", pa.list_(pa.float64())),
            ("start_voxel", pa.list_(pa.int32())),
            ("embedding", vector),
        ]
    )
    failures = pa.schema(
        [("source_path", pa.string()), ("series_uid", pa.string()), ("error", pa.string()), ("created_at", pa.string())]
    )
    return {"scans": scans, "patches": patches, "failures": failures}


def conform(table, schema):
    """``table`` with exactly ``schema``'s columns, in order: missing columns (files written by an
    older ctfm) become nulls, extra ones are dropped, types are cast."""
    import pyarrow as pa

    columns = []
    for field in schema:
        if field.name in table.column_names:
            column = table.column(field.name)
            columns.append(column if column.type == field.type else column.cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)
