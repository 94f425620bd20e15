"""What a store holds, and whether its rows agree with one another.

``summarise(store)`` counts runs (computation keys), scans, patches and failures;
``check_store(store)`` lists every inconsistency: patch rows without their scan row, scan rows
whose patch count disagrees with their patches, rows without a full key, unreadable part files,
embeddings of the wrong size or with NaN. Both back the ``ctfm store info/check`` verbs.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from ctfm.store.embeddings import EmbeddingStore
from ctfm.store.schema import RUN_KEY, SCAN_KEY, key_digest, run_key_of

MAX_EXAMPLES = 5  # rows named per problem in the report


@dataclass(frozen=True)
class Problem:
    """One kind of inconsistency: a code, how many rows, a message with examples, the fix."""

    code: str
    count: int
    message: str
    fix: str

    def to_dict(self) -> dict:
        return asdict(self)


def _key_text(values) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(RUN_KEY, values))


def summarise(store: EmbeddingStore) -> dict:
    """Runs by computation key (digest, scans, patches, preset name, dimension), totals, pending parts."""
    scans = store.scans()
    patches = store.patches()
    failures = store.failures()
    runs: dict[tuple, dict] = {}
    key_columns = [scans.column(k).to_pylist() for k in RUN_KEY]
    presets = scans.column("preset").to_pylist()
    dims = [len(v) if v is not None else 0 for v in scans.column("embedding").to_pylist()]
    for i, key in enumerate(zip(*key_columns)):
        fields = {**dict(zip(RUN_KEY, key)), "digest": key_digest(run_key_of(dict(zip(RUN_KEY, key))))}
        run = runs.setdefault(key, {**fields, "preset": presets[i], "dim": dims[i], "scans": 0, "patches": 0})
        run["scans"] += 1
    patch_counts = Counter(zip(*[patches.column(k).to_pylist() for k in RUN_KEY]))
    for key, n in patch_counts.items():
        if key in runs:
            runs[key]["patches"] += n
    parts = list(store.parts.glob("*.parquet")) if store.parts.exists() else []
    size = sum(p.stat().st_size for p in store.root.rglob("*.parquet"))
    return {
        "store": str(store.root),
        "runs": sorted(
            runs.values(),
            key=lambda r: (str(r["mode"]), str(r["model"]), str(r["preset"]), str(r["pool"]), float(r["overlap"] or 0)),
        ),
        "scans": len(set(scans.column("scan_id").to_pylist())),
        "scan_rows": scans.num_rows,
        "patches": patches.num_rows,
        "failures": failures.num_rows,
        "failed_sources": len(set(failures.column("source_path").to_pylist())),
        "pending_parts": len(parts),
        "bytes": size,
    }


def check_store(store: EmbeddingStore) -> list[Problem]:
    """Every inconsistency in ``store`` (empty list: consistent)."""
    import pyarrow.parquet as pq

    problems: list[Problem] = []

    def report(code: str, examples: list[str], message: str, fix: str, count: int | None = None) -> None:
        if examples:
            shown = "; ".join(examples[:MAX_EXAMPLES]) + (" ..." if len(examples) > MAX_EXAMPLES else "")
            problems.append(Problem(code, count if count is not None else len(examples), f"{message}: {shown}", fix))

    unreadable = []
    for path in sorted(store.root.glob("*.parquet")) + (
        sorted(store.parts.glob("*.parquet")) if store.parts.exists() else []
    ):
        if path.name.startswith("."):
            continue
        try:
            pq.read_metadata(path)
        except Exception as exc:  # a damaged file of any kind
            unreadable.append(f"{path.name} ({type(exc).__name__})")
    report(
        "unreadable_file",
        unreadable,
        "files that are not readable Parquet",
        "delete them and re-run `ctfm embed` (completed scans are kept)",
    )
    if unreadable:
        return problems  # the row checks below would fail on the same files

    scans = store.raw("scans").to_pylist()
    patches = store.raw("patches").to_pylist()

    no_key = [
        f"{r['scan_id']} ({r['source_path']})" for r in scans if any(r[k] is None for k in (*SCAN_KEY, "write_id"))
    ]
    report(
        "scan_without_key",
        no_key,
        "scan rows without a full computation key (written by an older ctfm)",
        "re-embed into a new store",
    )
    no_key_patches = [r for r in patches if any(r[k] is None for k in (*SCAN_KEY, "write_id"))]
    report(
        "patch_without_key",
        [f"{r['scan_id']} patch {r['patch_index']}" for r in no_key_patches],
        "patch rows without their scan's computation key (written by an older ctfm)",
        "re-embed into a new store",
    )

    keyed_scans = [r for r in scans if all(r[k] is not None for k in (*SCAN_KEY, "write_id"))]
    # The row a reader uses for each key is the last one; earlier writes are superseded.
    current: dict[tuple, dict] = {}
    for r in keyed_scans:
        current[tuple(r[k] for k in SCAN_KEY)] = r
    writes = {(*k, r["write_id"]) for k, r in current.items()}
    all_writes = {(*(r[k] for k in SCAN_KEY), r["write_id"]) for r in keyed_scans}

    by_write: dict[tuple, list[int]] = defaultdict(list)
    orphans, superseded = [], 0
    for p in patches:
        if any(p[k] is None for k in (*SCAN_KEY, "write_id")):
            continue
        w = (*(p[k] for k in SCAN_KEY), p["write_id"])
        if w in writes:
            by_write[w].append(p["patch_index"])
        elif w in all_writes:
            superseded += 1  # patches of an older write of the same key: dropped at compaction
        else:
            orphans.append(f"{p['scan_id']} patch {p['patch_index']} ({_key_text(w[1:-1])})")
    report(
        "orphan_patches",
        orphans,
        "patch rows with no scan row of the same key and write",
        "re-embed the scans named (or delete the store and re-run)",
    )

    mismatched, duplicated = [], []
    for key, row in current.items():
        w = (*key, row["write_id"])
        indices = by_write.get(w, [])
        expected = row["n_patches"] or 0
        if row["mode"] != "patches" and indices:
            mismatched.append(f"{row['scan_id']} is mode {row['mode']} but has {len(indices)} patch rows")
            continue
        counts = Counter(indices)
        dup = sorted(i for i, c in counts.items() if c > 1)
        if dup:
            duplicated.append(f"{row['scan_id']} patch indices {dup[:4]}")
        if row["mode"] == "patches" and sorted(counts) != list(range(expected)):
            mismatched.append(f"{row['scan_id']} ({_key_text(key[1:])}) records {expected} patches, has {len(counts)}")
    report(
        "patch_count_mismatch",
        mismatched,
        "scan rows whose patches are missing or not their own",
        "re-embed the scans named (`ctfm embed` with the same options after deleting the store)",
    )
    report("duplicate_patches", duplicated, "patch indices stored twice within one write", "re-embed the scans named")

    bad_vectors = []
    dims_by_model: dict[tuple, Counter] = defaultdict(Counter)
    for r in keyed_scans:
        vector = r["embedding"]
        if vector is None or len(vector) == 0:
            bad_vectors.append(f"{r['scan_id']}: no embedding")
            continue
        dims_by_model[(r["model"], r["weights_sha256"])][len(vector)] += 1
        if not np.all(np.isfinite(np.asarray(vector, dtype=np.float32))):
            bad_vectors.append(f"{r['scan_id']}: NaN or Inf in the embedding")
    for (model, _), dims in dims_by_model.items():
        if len(dims) > 1:
            bad_vectors.append(f"model {model}: embeddings of sizes {sorted(dims)}")
    report(
        "bad_embedding",
        bad_vectors,
        "scan embeddings that are missing, not finite or of mixed size",
        "re-embed the scans named",
    )
    if superseded:
        problems.append(
            Problem(
                "superseded_patches",
                superseded,
                f"{superseded} patch rows of earlier writes of the same scan and key (ignored by readers)",
                "harmless; `ctfm store compact` (or the next `ctfm embed` into the store) folds them away",
            )
        )
    return problems


def is_consistent(problems: list[Problem]) -> bool:
    """Superseded rows are leftovers readers ignore, not inconsistencies."""
    return all(p.code == "superseded_patches" for p in problems)
