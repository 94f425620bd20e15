"""What a store holds, whether its rows agree with one another, and the repair of damage.

``summarise(store)`` counts runs (computation keys), scans, patches and failures;
``check_store(store)`` lists every inconsistency: damaged files (store Parquet files and index
files), patch rows without their scan row, scan rows whose patch count disagrees with their
patches, rows without a full key, embeddings of the wrong size or with NaN. ``repair_store``
moves every damaged file into ``STORE/quarantine/`` with a note of why; the scans whose rows
went with them are then incomplete, so the next ``ctfm embed`` of the same sources computes
them again (:meth:`ctfm.store.EmbeddingStore.done_keys`). They back ``ctfm store info/check``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ctfm.errors import MissingDependencyError
from ctfm.runtime import Result
from ctfm.store.damage import DamagedFileError, quarantine, read_parquet, write_note
from ctfm.store.embeddings import EmbeddingStore
from ctfm.store.index import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    DamagedIndexError,
    index_dir,
    inside_index_dir,
    manifest_files,
    open_index_files,
    read_manifest,
)
from ctfm.store.schema import RUN_KEY, SCAN_KEY, key_digest, run_key_of, schemas

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


def store_files(store: EmbeddingStore) -> list[tuple[Path, str]]:
    """``(path, kind)`` of every Parquet file readers read: the main files and the part files."""
    files = [(store.root / f"{kind}.parquet", kind) for kind in ("scans", "patches", "failures")]
    files = [(p, kind) for p, kind in files if p.exists()]
    if store.parts.exists():
        for path in sorted(store.parts.glob("*.parquet")):
            kind = path.name.rsplit(".", 2)[-2] if path.name.count(".") >= 2 else ""
            if not path.name.startswith(".") and kind in ("scans", "patches", "failures"):
                files.append((path, kind))
    return files


def damaged_store_files(store: EmbeddingStore) -> list[tuple[Path, str]]:
    """``(path, reason)`` of every store file that does not read whole in its table's schema."""
    table_schemas = schemas()
    damaged = []
    for path, kind in store_files(store):
        try:
            read_parquet(path, store.root, table_schemas[kind])
        except FileNotFoundError:  # folded by a concurrent compaction
            continue
        except DamagedFileError as exc:
            damaged.append((path, exc.problem))
    return damaged


def damaged_indexes(store: EmbeddingStore) -> list[tuple[Path, str, list[Path]]]:
    """``(manifest, reason, files)`` of every damaged index: ``files`` are the manifest and the
    files of that index's name (``<level>-<digest>.*``) in ``STORE/index/``, nothing outside it.
    FAISS files are read when faiss is installed; otherwise only the manifests and ids are checked."""
    found = []
    for path in manifest_files(store):
        try:
            manifest = read_manifest(store, path)
            try:
                if manifest.get("format") == FORMAT_VERSION:  # another format: `ctfm index status` says so
                    open_index_files(store, manifest)
            except MissingDependencyError:
                pass
        except FileNotFoundError:
            continue
        except DamagedIndexError as exc:
            level, digest = MANIFEST_NAME.fullmatch(path.name).groups()
            prefix = f"{level}-{digest}."
            if not inside_index_dir(store, index_dir(store)):  # a link out of the store: reported, never moved
                found.append((path, exc.problem, []))
                continue
            members = [p for p in sorted(index_dir(store).iterdir()) if p.name.startswith(prefix) and p != path]
            found.append((path, exc.problem, [path, *members]))
    return found


def check_store(store: EmbeddingStore) -> list[Problem]:
    """Every inconsistency in ``store`` (empty list: consistent)."""
    problems: list[Problem] = []

    def report(code: str, examples: list[str], message: str, fix: str, count: int | None = None) -> None:
        if examples:
            shown = "; ".join(examples[:MAX_EXAMPLES]) + (" ..." if len(examples) > MAX_EXAMPLES else "")
            problems.append(Problem(code, count if count is not None else len(examples), f"{message}: {shown}", fix))

    unreadable = [f"{path.relative_to(store.root)} ({reason})" for path, reason in damaged_store_files(store)]
    report(
        "unreadable_file",
        unreadable,
        "damaged store files (not readable Parquet of their table)",
        f"`ctfm store check --repair {store.root}` moves them to {store.root / 'quarantine'}/ with a note of why; "
        "the next `ctfm embed` of the same sources then recomputes the scans they held",
    )
    report(
        "damaged_index",
        [f"{path.relative_to(store.root)}: {reason}" for path, reason, _ in damaged_indexes(store)],
        "damaged indexes (searches read the store exactly instead)",
        f"`ctfm index build {store.root} --level LEVEL --run DIGEST` replaces one; `ctfm store check --repair "
        f"{store.root}` moves them to quarantine/",
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
        "re-run `ctfm embed` on their sources with the same options: a scan missing windows is computed again",
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


@dataclass
class RepairResult(Result):
    """What ``ctfm store check --repair`` did: files moved to quarantine (with why), the scans now
    to be recomputed by the next ``ctfm embed`` of the same sources, the quarantine folder."""

    store: str
    moved: list[dict] = field(default_factory=list)  # file (relative to the store), moved_to, reason
    recompute: list[dict] = field(default_factory=list)  # scan_id, source_path (None when the row was lost)
    lost_scan_rows: list[str] = field(default_factory=list)  # files whose scan rows are gone, ids unknown
    quarantine: str | None = None

    def summary(self) -> str:
        if not self.moved:
            return f"{self.store}: nothing damaged to repair"
        return (
            f"{self.store}: moved {len(self.moved)} damaged file(s) to {self.quarantine}; {len(self.recompute)} scan(s) "
            "to recompute"
            + (f" (and every scan row of {', '.join(self.lost_scan_rows)})" if self.lost_scan_rows else "")
            + ": re-run `ctfm embed` on the same sources with the same options"
        )


def _part_scan_id(path: Path) -> str | None:
    """The scan id a part file's name starts with (``<scan_id>-<key digest>-w<writer>-<write>``)."""
    stem = path.name.removesuffix(".scans.parquet")  # a DICOM series id (`#1.2.840...`) holds dots
    pieces = stem.rsplit("-", 3)
    return pieces[0] if len(pieces) == 4 else None


def repair_store(store: EmbeddingStore) -> RepairResult:
    """Move every damaged file of ``store`` (and of its index) into ``STORE/quarantine/<time>-<id>/``
    with ``note.json`` saying why, under the store's exclusive lock.

    With a damaged scan part goes the patch part of the same write (never read without it); with
    a damaged index, its manifest and every file of its name in ``STORE/index/`` (nothing a
    manifest names outside it). Afterwards the scans whose rows were lost are missing or
    incomplete, so :meth:`EmbeddingStore.done_keys` no longer counts them and the next ``ctfm
    embed`` of the same sources recomputes them; the result lists them.
    """
    entries: list[tuple[Path, str]] = []
    lost_ids: set[str] = set()
    lost_tables: list[str] = []
    with store.exclusive():
        for path, reason in damaged_store_files(store):
            entries.append((path, reason))
            if path.parent == store.parts and path.name.endswith(".scans.parquet"):
                scan_id = _part_scan_id(path)
                if scan_id:
                    lost_ids.add(scan_id)
                partner = path.with_name(path.name.replace(".scans.parquet", ".patches.parquet"))
                if partner.exists():
                    entries.append((partner, f"the patch rows of the damaged scan part {path.name}"))
            elif path == store.root / "scans.parquet":
                lost_tables.append("scans.parquet")
        for manifest, reason, files in damaged_indexes(store):
            for path in files:
                why = f"damaged index: {reason}" if path == manifest else f"a file of the damaged index {manifest.name}"
                entries.append((path, why))
        entries = [(p, why) for i, (p, why) in enumerate(entries) if all(p != q for q, _ in entries[:i])]
        folder, moved = quarantine(store.root, entries)
        store.parts.mkdir(parents=True, exist_ok=True)  # the folder stays a store with its main files gone
    recompute = [] if folder is None else store.incomplete_scans().select(["scan_id", "source_path"]).to_pylist()
    if lost_ids:  # a lost part's scan with no row left (an earlier write's row, if any, stands)
        present = set(store.scans(columns=["scan_id"]).column("scan_id").to_pylist())
        recompute += [{"scan_id": i, "source_path": None} for i in sorted(lost_ids - present)]
    result = RepairResult(
        str(store.root),
        moved=moved,
        recompute=recompute,
        lost_scan_rows=lost_tables,
        quarantine=str(folder) if folder else None,
    )
    if folder is not None:
        write_note(folder, moved, {"recompute": recompute, "lost_scan_rows": lost_tables, "summary": result.summary()})
    return result
