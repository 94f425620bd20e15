"""The embedding store: a folder of Parquet files that survives being killed at any moment.

Layout (columns in :mod:`ctfm.store.schema`; format in docs/store.md)::

    STORE/scans.parquet      one row per scan and computation key: provenance, record, embedding
    STORE/patches.parquet    patch mode: one row per patch (key, write id, centre in mm, embedding)
    STORE/failures.parquet   every failed attempt: source, series, error, time
    STORE/parts/             rows written since the last compaction, one small set per scan
    STORE/.lock              taken shared by readers and exclusively by compaction

Writers never modify a file in place. Each finished scan is written as its own part files, named
after its scan id, its computation key and a fresh write id: patches first and the scan row last,
each to a temporary name and then renamed. A part exists whole or not at all, a scan row exists
only once its patches do, and two runs that differ in any key field never write the same file.
Readers merge the compacted files with the parts (so a run killed with SIGKILL loses nothing it
had finished, and shards of several processes or DDP ranks merge on read); ``compact()`` folds
the parts into the main files under the exclusive lock, so concurrent runs lose nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from pathlib import Path

from ctfm.errors import CTInputError
from ctfm.runtime import write_parquet_atomic
from ctfm.store.damage import read_parquet, writing
from ctfm.store.schema import PATCH_KEY, RUN_KEY, SCAN_KEY, key_digest, run_key_of, schemas
from ctfm.store.vectors import RunVectors, find_run, list_runs, select

STALE_TEMPORARY_SECONDS = 3600  # a writer's temporary older than this belongs to a dead process
LOCK_NAME = ".lock"


def open_store(path) -> EmbeddingStore:
    """The store in an existing folder, or a one-line :class:`CTInputError` saying why it is not one.

    >>> store = open_store("store/")                                        # doctest: +SKIP
    >>> [r["digest"] for r in store.runs("scan")]                           # doctest: +SKIP
    >>> run = store.select("scan", run="3f2a", where={"modality": "CT"})    # doctest: +SKIP
    >>> run.vectors.shape, run.metadata.column_names                        # doctest: +SKIP
    """
    if isinstance(path, EmbeddingStore):
        return path
    root = Path(path)
    if not root.is_dir():
        raise CTInputError(root, "no such store folder", "give the folder that `ctfm embed --out` wrote")
    if (
        not any((root / f"{kind}.parquet").exists() for kind in ("scans", "patches", "failures"))
        and not (root / "parts").is_dir()
    ):
        raise CTInputError(
            root,
            "not an embedding store (no scans.parquet, failures.parquet or parts/)",
            "give the folder that `ctfm embed --out` wrote",
        )
    return EmbeddingStore(root)


class EmbeddingStore:
    """Append-only embedding store in a folder (see the module docstring).

    ``EmbeddingStore(folder)`` writes (the folder is made on the first write);
    :func:`open_store` opens an existing one for reading. Reading a run: :meth:`runs` lists
    them, :meth:`select` returns one run's vectors and metadata as columns.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.parts = self.root / "parts"

    def _ensure(self) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self, exclusive: bool):
        """Readers share the lock; compaction holds it alone (no reader sees a half-folded store)."""
        try:
            handle = open(self.root / LOCK_NAME, "a+") if self.root.is_dir() else None
        except OSError:  # a read-only store: nobody can compact it, so reading needs no lock
            if exclusive:
                raise
            handle = None
        if handle is None:
            yield
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def exclusive(self):
        """The store's lock, held alone (as compaction and repair hold it): a context manager."""
        return self._locked(exclusive=True)

    # ---- writing -------------------------------------------------------------------------
    def add(self, scan_row: dict, patch_rows: list[dict] | None = None, writer: str = "0") -> str:
        """Write one scan (and its patches) as part files; visible to readers once complete.

        The rows get the scan row's computation key and a fresh ``write_id`` (returned); patch
        rows need only their own fields (index, centre, start, embedding).
        """
        import pyarrow as pa

        self._ensure()
        table_schemas = schemas()
        write_id = uuid.uuid4().hex
        scan_row = {**scan_row, "write_id": write_id}
        key = {k: scan_row[k] for k in SCAN_KEY}
        stem = f"{scan_row['scan_id']}-{key_digest(run_key_of(scan_row))}-w{writer}-{write_id[:12]}"
        patch_part = self.parts / f"{stem}.patches.parquet"
        scan_part = self.parts / f"{stem}.scans.parquet"
        try:
            if patch_rows:
                rows = [{**p, **key, "write_id": write_id} for p in patch_rows]
                with writing(patch_part):
                    write_parquet_atomic(pa.Table.from_pylist(rows, schema=table_schemas["patches"]), patch_part)
            with writing(scan_part):
                write_parquet_atomic(pa.Table.from_pylist([scan_row], schema=table_schemas["scans"]), scan_part)
        except BaseException:  # no scan part: its patch part would never be read or folded, so it goes too
            patch_part.unlink(missing_ok=True)
            raise
        return write_id

    def add_failure(
        self, source_path: str, series_uid: str | None, error: str, created_at: str, writer: str = "0"
    ) -> None:
        import pyarrow as pa

        self._ensure()
        row = {"source_path": source_path, "series_uid": series_uid, "error": error, "created_at": created_at}
        path = self.parts / f"{uuid.uuid4().hex}-w{writer}.failures.parquet"
        with writing(path):
            write_parquet_atomic(pa.Table.from_pylist([row], schema=schemas()["failures"]), path)

    # ---- reading -------------------------------------------------------------------------
    def _part_files(self, kind: str, committed_scans: list[Path] | None = None) -> list[Path]:
        """Part files of ``kind`` in write order (modification time, then name). Patch parts count
        only when their scan part is committed (in ``committed_scans`` when given)."""
        if not self.parts.exists():
            return []
        files = []
        for p in self.parts.glob(f"*.{kind}.parquet"):
            if p.name.startswith("."):
                continue
            try:
                files.append((p.stat().st_mtime_ns, p.name, p))
            except FileNotFoundError:  # folded by a compaction meanwhile
                continue
        names = [p for _, _, p in sorted(files)]
        if kind == "patches":
            committed = {
                p.name for p in (committed_scans if committed_scans is not None else self._part_files("scans"))
            }
            names = [p for p in names if p.name.replace(".patches.parquet", ".scans.parquet") in committed]
        return names

    def _read_files(self, kind: str, parts: list[Path], columns: list[str] | None = None):
        """The main file of ``kind`` and ``parts``, concatenated in the current schema (raw rows);
        with ``columns``, only those columns (in schema order) are read. A damaged file is a
        one-line :class:`ctfm.store.damage.DamagedFileError` naming it."""
        import pyarrow as pa

        schema = schemas()[kind]
        if columns is not None:
            columns = [field.name for field in schema if field.name in set(columns)]
        tables = []
        main = self.root / f"{kind}.parquet"
        for path in ([main] if main.exists() else []) + list(parts):
            try:
                tables.append(read_parquet(path, self.root, schema, columns))
            except FileNotFoundError:  # folded into the main file by a concurrent compaction
                continue
        if columns is not None:
            schema = pa.schema([field for field in schema if field.name in set(columns)])
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def raw(self, kind: str):
        """Every stored row of ``kind`` ("scans", "patches", "failures"), duplicates and leftovers
        included (for integrity checks; use :meth:`scans` / :meth:`patches` otherwise)."""
        with self._locked(exclusive=False):
            scans = self._part_files("scans")
            parts = (
                scans
                if kind == "scans"
                else self._part_files(kind, committed_scans=scans)
                if kind == "patches"
                else self._part_files(kind)
            )
            return self._read_files(kind, parts)

    def scans(self, columns: list[str] | None = None):
        """All scan rows (a pyarrow Table), one per scan and computation key (the last write wins);
        ``columns`` reads only those (the key and ``write_id`` come too)."""
        wanted = None if columns is None else list(dict.fromkeys([*SCAN_KEY, "write_id", *columns]))
        with self._locked(exclusive=False):
            return _latest(self._read_files("scans", self._part_files("scans"), wanted), SCAN_KEY)

    def patches(self, columns: list[str] | None = None):
        """The patch rows of the current scan rows only, joined on the whole key and write id;
        ``columns`` reads only those (the key, ``write_id`` and ``patch_index`` come too)."""
        keys = [*SCAN_KEY, "write_id"]
        wanted = None if columns is None else list(dict.fromkeys([*PATCH_KEY, *columns]))
        with self._locked(exclusive=False):
            scan_parts = self._part_files("scans")
            scans = _latest(self._read_files("scans", scan_parts, keys), SCAN_KEY)
            patches = self._read_files("patches", self._part_files("patches", committed_scans=scan_parts), wanted)
        return _belonging(patches, scans)

    def failures(self):
        with self._locked(exclusive=False):
            return self._read_files("failures", self._part_files("failures"))

    # ---- runs ----------------------------------------------------------------------------
    def runs(self, level: str = "scan", where: dict | None = None) -> list[dict]:
        """The runs (computation keys) at ``level`` ("scan" or "patch"): key fields, ``key``,
        ``digest``, ``preset``, ``scans``, ``rows`` (vectors); only scans ``where`` keeps."""
        return list_runs(self, level, where)

    def find_run(self, level: str = "scan", run: str | None = None, where: dict | None = None) -> dict:
        """The one run named by ``run`` (digest or unique prefix) and/or ``where``, or the only one;
        a one-line OptionError listing the candidates otherwise."""
        return find_run(self, level, run, where)

    def select(self, level: str = "scan", run: str | None = None, where: dict | None = None) -> RunVectors:
        """The vectors of that run (of the scans ``where`` keeps): ``.vectors`` float32 [N, d],
        ``.metadata`` (pyarrow Table), ``.key``, ``.digest``."""
        return select(self, level, run, where)

    def done_keys(self) -> set[tuple]:
        """``(scan_id, *RUN_KEY)`` of every complete scan row: what a resumed run skips.

        A patches-mode row is complete only while every one of its ``n_patches`` windows is
        stored (patch indices ``0..n_patches-1`` of its own write). A scan whose rows were lost
        (a damaged file moved to quarantine by ``ctfm store check --repair``) is therefore not
        done, and the next ``ctfm embed`` of its source computes it again.
        """
        table = self.incomplete_scans(with_complete=True)
        cols = [table.column(k).to_pylist() for k in SCAN_KEY]
        return {(row[0], *run_key_of(dict(zip(RUN_KEY, row[1:])))) for row in zip(*cols)}

    def incomplete_scans(self, with_complete: bool = False):
        """The current scan rows (key, ``write_id``, ``n_patches``, ``source_path``) missing some of
        their windows; with ``with_complete``, the complete ones instead. Counted in Arrow, once."""
        import pyarrow as pa
        import pyarrow.compute as pc

        with self._locked(exclusive=False):
            scan_parts = self._part_files("scans")
            scans = _latest(
                self._read_files("scans", scan_parts, [*SCAN_KEY, "write_id", "n_patches", "source_path"]), SCAN_KEY
            )
            patch_parts = self._part_files("patches", committed_scans=scan_parts)
            windows = self._read_files("patches", patch_parts, ["scan_id", "write_id", "patch_index"])
        expected = pc.if_else(
            pc.fill_null(pc.equal(scans.column("mode"), "patches"), False),
            pc.fill_null(scans.column("n_patches"), 0),
            pa.scalar(0, pa.int32()),
        )
        rows = pa.array(range(scans.num_rows), pa.int64())
        scans = scans.append_column("_expected", expected).append_column("_row", rows)
        in_range = pc.and_(pc.greater_equal(windows.column("patch_index"), 0), pc.is_valid(windows.column("write_id")))
        counts = (
            windows.filter(in_range)
            .group_by(["scan_id", "write_id"], use_threads=False)
            .aggregate([("patch_index", "count_distinct"), ("patch_index", "max")])
        )
        joined = scans.join(counts, keys=["scan_id", "write_id"], join_type="left outer", use_threads=False)
        have = pc.fill_null(joined.column("patch_index_count_distinct"), 0)
        top = pc.fill_null(joined.column("patch_index_max"), -1)
        expected = pc.cast(joined.column("_expected"), pa.int64())
        # n distinct indices >= 0 whose largest is n - 1: exactly 0..n-1
        complete = pc.and_(
            pc.equal(pc.cast(have, pa.int64()), expected),
            pc.equal(pc.cast(top, pa.int64()), pc.subtract(expected, 1)),
        )
        complete = pc.or_(complete, pc.equal(expected, 0))
        keep = joined.filter(complete if with_complete else pc.invert(complete))
        return keep.take(pc.sort_indices(keep.column("_row"))).select(
            [*SCAN_KEY, "write_id", "n_patches", "source_path"]
        )

    # ---- maintenance ---------------------------------------------------------------------
    def compact(self) -> None:
        """Fold the part files into scans/patches/failures.parquet (atomic renames), then drop them.

        Holds the store's exclusive lock: concurrent compactions run one after the other, each
        folding everything on disk, so parts of concurrent writers are never lost.
        """
        if not self.parts.exists():
            return
        with self._locked(exclusive=True):
            self._drop_stale_temporaries()
            # Fold exactly the parts listed now (patches only with their listed scan part); parts
            # that land meanwhile wait for the next compaction.
            scans = self._part_files("scans")
            listed = {
                "scans": scans,
                "patches": self._part_files("patches", committed_scans=scans),
                "failures": self._part_files("failures"),
            }
            if not any(listed.values()):
                return
            scan_table = _latest(self._read_files("scans", listed["scans"]), SCAN_KEY)
            tables = {
                "scans": scan_table,
                "patches": _belonging(self._read_files("patches", listed["patches"]), scan_table),
                "failures": self._read_files("failures", listed["failures"]),
            }
            for kind in ("patches", "scans", "failures"):  # patches land before the scans that name them
                main = self.root / f"{kind}.parquet"
                if tables[kind].num_rows or main.exists():
                    with writing(main):  # a failed write leaves the old file and every part in place
                        write_parquet_atomic(tables[kind], main)
            for kind in ("patches", "scans", "failures"):  # a crash here leaves duplicates, which readers drop
                for p in listed[kind]:
                    p.unlink(missing_ok=True)

    def _drop_stale_temporaries(self) -> None:
        """Temporaries of writers killed mid-write (never read: their names start with "."); only
        old ones, so that a writer still running beside this process keeps its own."""
        now = time.time()
        for stale in [*self.parts.glob(".*.partial"), *self.root.glob(".*.partial")]:
            try:
                if now - stale.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                    stale.unlink(missing_ok=True)
            except FileNotFoundError:
                continue


def _latest(table, key: tuple[str, ...]):
    """One row per ``key``: the last one in file order (the newest write)."""
    if table.num_rows == 0:
        return table
    cols = [table.column(k).to_pylist() for k in key]
    last = {}
    for i, k in enumerate(zip(*cols)):
        last[k] = i
    keep = sorted(last.values())
    return table.take(keep) if len(keep) != table.num_rows else table


def _belonging(patches, scans):
    """Patch rows whose full key and write id match a scan row, one per patch index."""
    if patches.num_rows == 0:
        return patches
    wanted = set(zip(*[scans.column(k).to_pylist() for k in (*SCAN_KEY, "write_id")]))
    cols = [patches.column(k).to_pylist() for k in (*SCAN_KEY, "write_id")]
    keep = [i for i, k in enumerate(zip(*cols)) if k in wanted]
    table = patches.take(keep) if len(keep) != patches.num_rows else patches
    return _latest(table, PATCH_KEY)
