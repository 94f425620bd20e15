"""The runs of a store and the vectors of one run, as columns (NumPy and Arrow), read once.

A store may hold several computations (runs): one per computation key
(:data:`ctfm.store.schema.RUN_KEY`). Everything that compares vectors (probes, evaluations, the
FAISS index, scan and region search, the app) works on exactly one run, chosen here:
:func:`list_runs` names them (a 16-hex digest per key, as ``ctfm store info`` shows),
:func:`find_run` picks one by ``run=DIGEST`` (a unique prefix will do) and/or
``where={"column": value}`` and refuses to guess between several, :func:`select` returns its
vectors as a :class:`RunVectors`. The store object's ``runs()`` and ``select()`` call these.

Levels: ``scan`` (one vector per scan row: whole-scan vectors, or pooled patch vectors) and
``patch`` (one vector per sliding window, with its centre in RAS mm).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctfm.errors import OptionError
from ctfm.store.schema import RUN_KEY, key_digest, run_key_of, schemas

LEVELS = ("scan", "patch")


def as_matrix(column, dtype=np.float32) -> np.ndarray:
    """A pyarrow list<float> column of equal-length lists -> [N, d] numpy (no Python lists)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(array)
    if n == 0:
        return np.zeros((0, 0), dtype=dtype)
    values = array.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    if values.size % n:
        raise OptionError(
            f"vectors of unequal length in one run ({values.size} values over {n} rows); run `ctfm store check` on the "
            "store"
        )
    return values.reshape(n, values.size // n)


def run_digest(key: tuple) -> str:
    """The 16-hex name of a computation key (the same digest the store's part files carry)."""
    return key_digest(tuple(key))


def key_dict(key: tuple) -> dict:
    return dict(zip(RUN_KEY, key))


def _key_tuples(table) -> list[tuple]:
    """The computation key of each row of ``table`` (one pass over the key columns)."""
    cols = [table.column(k).to_pylist() for k in RUN_KEY]
    return [run_key_of(dict(zip(RUN_KEY, values))) for values in zip(*cols)]


# ---- where: filters on a table's columns, in Arrow ------------------------------------------
def where_mask(table, where: dict | None, what: str = "scan"):
    """A boolean Arrow mask of the rows of ``table`` matching every ``{column: value}`` of
    ``where`` (None without filters).

    A value may be a list (any of them matches). Values given as text are read as numbers where
    the column is numeric (``slice_thickness_mm=1.5``, ``overlap=0.5``); text columns compare
    case-insensitively. An unknown or unfilterable column is a one-line :class:`OptionError`
    listing the columns that can be filtered on.
    """
    if not where:
        return None
    mask = None
    for name, value in where.items():
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        cond = _column_condition(table, name, values, what)
        mask = cond if mask is None else pc.and_(mask, cond)
    return mask


def filterable_columns(table) -> list[str]:
    """Columns of ``table`` that ``where`` can compare (text and numbers, not lists)."""
    return [f.name for f in table.schema if not pa.types.is_nested(f.type)]


def _column_condition(table, name: str, values: list, what: str):
    filterable = filterable_columns(table)
    if name not in filterable:
        problem = "a list column, not filterable" if name in table.column_names else f"not a {what} record column"
        raise OptionError(f"--where {name}=...: {problem} (filterable: {', '.join(filterable)})")
    column = table.column(name)
    kind = column.type
    if pa.types.is_floating(kind) or pa.types.is_integer(kind):
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            raise OptionError(
                f"--where {name}={values[0]}: {name} is a number column; give a number, e.g. --where {name}=1.5"
            ) from None
        if pa.types.is_integer(kind):
            if not all(n.is_integer() for n in numbers):
                return pa.array(np.zeros(len(table), dtype=bool))
            wanted = pa.array([int(n) for n in numbers], type=kind)
        else:
            wanted = pa.array(np.asarray(numbers, dtype=kind.to_pandas_dtype()), type=kind)
        cond = pc.is_in(column, value_set=wanted)
    elif pa.types.is_boolean(kind):
        truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        try:
            wanted = pa.array([v if isinstance(v, bool) else truth[str(v).strip().lower()] for v in values], type=kind)
        except KeyError:
            raise OptionError(f"--where {name}={values[0]}: {name} is true/false") from None
        cond = pc.is_in(column, value_set=wanted)
    else:
        text = column if pa.types.is_string(kind) or pa.types.is_large_string(kind) else pc.cast(column, pa.string())
        cond = pc.is_in(pc.utf8_lower(text), value_set=pa.array([str(v).lower() for v in values], type=pa.string()))
    return pc.fill_null(cond, False)


def _key_mask(table, key: tuple):
    mask = None
    for name, value in zip(RUN_KEY, key):
        column = table.column(name)
        if name == "overlap" and value is not None:
            cond = pc.equal(column, pa.scalar(np.float32(value), type=pa.float32()))
        elif value is None:
            cond = pc.is_null(column)
        else:
            cond = pc.equal(column, value)
        cond = pc.fill_null(cond, False)
        mask = cond if mask is None else pc.and_(mask, cond)
    return mask


# ---- runs -----------------------------------------------------------------------------------
_SCAN_NAMES = tuple(field.name for field in schemas()["scans"])


def _filter_columns(where: dict | None, *needed: str) -> list[str]:
    """The scan columns to read: ``needed``, and with ``where`` every column but the vector (so
    that any column can be filtered on, and an unknown one is named with the filterable ones)."""
    if where:
        return [name for name in _SCAN_NAMES if name != "embedding"]
    return list(needed)


def _scan_rows(store, where: dict | None, level: str):
    """The store's current scan rows that ``where`` keeps (patch level: patch-mode rows only)."""
    scans = store.scans(columns=_filter_columns(where, "scan_id", "preset"))
    mask = where_mask(scans, where)
    if level == "patch":
        patch_mode = pc.fill_null(pc.equal(scans.column("mode"), "patches"), False)
        mask = patch_mode if mask is None else pc.and_(mask, patch_mode)
    return scans if mask is None else scans.filter(mask)


def list_runs(store, level: str = "scan", where: dict | None = None) -> list[dict]:
    """One dict per computation key present at ``level`` (among the scan rows ``where`` keeps):
    the key fields, ``key`` (the tuple), ``digest``, ``preset``, ``rows`` (vectors), ``scans``."""
    _check_level(level)
    scans = _scan_rows(store, where, level).select(["scan_id", "preset", *RUN_KEY])
    runs: dict[tuple, dict] = {}
    for key, preset, count in _group_counts(scans, with_preset=True):
        runs[key] = {**key_dict(key), "key": key, "digest": run_digest(key), "preset": preset}
        runs[key].update(rows=count, scans=count)
    if level == "patch" and runs:
        patches = store.patches(columns=["scan_id"]).select(["scan_id", *RUN_KEY])
        kept = scans.column("scan_id").combine_chunks().unique()
        patches = patches.filter(pc.is_in(patches.column("scan_id"), value_set=kept))
        for run in runs.values():
            run["rows"] = 0
        for key, _, count in _group_counts(patches):
            if key in runs:
                runs[key]["rows"] += count
    return sorted(runs.values(), key=lambda r: r["digest"])


def _group_counts(table, with_preset: bool = False) -> list[tuple]:
    """``(key, preset, rows)`` per computation key of ``table`` (an Arrow group-by)."""
    if table.num_rows == 0:
        return []
    aggregations = [("scan_id", "count")] + ([("preset", "min")] if with_preset else [])
    grouped = table.group_by(list(RUN_KEY), use_threads=False).aggregate(aggregations)
    keys = _key_tuples(grouped)
    counts = grouped.column("scan_id_count").to_pylist()
    presets = grouped.column("preset_min").to_pylist() if with_preset else [None] * len(keys)
    return list(zip(keys, presets, counts))


def describe_run(run: dict) -> str:
    overlap = f"{run['overlap']:g}" if run["overlap"] is not None else "none"
    return f"{run['digest']} (mode {run['mode']}, model {run['model']}, weights {str(run['weights_sha256'])[:12]}, preset {run['preset']}, pool {run['pool']}, overlap {overlap}, {run['precision']}; {run['scans']} scans, {run['rows']} vectors)"


def _listing(runs: list[dict]) -> str:
    """The runs, each with its digest and the key fields in which the runs differ."""
    differing = [k for k in RUN_KEY if len({r[k] for r in runs}) > 1]
    if len(runs) < 2 or not differing:
        return "; ".join(describe_run(r) for r in runs)
    return "; ".join(f"{r['digest']} ({', '.join(f'{k}={r[k]}' for k in differing)}; {r['scans']} scans)" for r in runs)


def _where_text(where: dict | None) -> str:
    def text(value) -> str:
        return "|".join(map(str, value)) if isinstance(value, (list, tuple, set)) else str(value)

    return " ".join(f"--where {k}={text(v)}" for k, v in (where or {}).items())


def find_run(store, level: str = "scan", run: str | None = None, where: dict | None = None) -> dict:
    """The one run at ``level`` named by ``run`` (a digest or a unique prefix of one) among the
    scan rows ``where`` keeps, or the only one there is; a one-line :class:`OptionError` listing
    the candidates (digests and the key fields that tell them apart) otherwise."""
    runs = list_runs(store, level, where)
    if not runs:
        if where and list_runs(store, level):
            listing = _listing(list_runs(store, level))
            raise OptionError(f"{store.root}: no {level}-level vectors match {_where_text(where)} (runs: {listing})")
        need = "embed with --mode patches" if level == "patch" else "embed scans into it first"
        raise OptionError(f"{store.root}: no {level}-level vectors in the store ({need})")
    if run is not None:
        chosen = [r for r in runs if r["digest"].startswith(str(run).strip().lower())]
        if len(chosen) != 1:
            listing = _listing(runs)
            what = "matches no" if not chosen else "matches several"
            with_where = f" with {_where_text(where)}" if where else ""
            raise OptionError(f"run {run!r}: {what} {level}-level run of {store.root}{with_where} (runs: {listing})")
        return chosen[0]
    if len(runs) > 1:
        listing = _listing(runs)
        matching = f" matching {_where_text(where)}" if where else ""
        raise OptionError(
            f"{store.root} holds {len(runs)} {level}-level runs{matching} and vectors of different runs are never "
            f"mixed: choose one with --run DIGEST or --where COLUMN=VALUE (runs: {listing})"
        )
    return runs[0]


def select_run(store, level: str = "scan", run: str | None = None, where: dict | None = None) -> tuple:
    """The computation key of :func:`find_run`'s run."""
    return find_run(store, level, run, where)["key"]


def select(store, level: str = "scan", run: str | None = None, where: dict | None = None) -> RunVectors:
    """The vectors of the one run :func:`find_run` picks, of the scans ``where`` keeps."""
    return load_run_vectors(store, level, select_run(store, level, run, where), where)


# ---- one run's vectors ----------------------------------------------------------------------
@dataclass
class RunVectors:
    """The vectors of one run at one level, with their metadata as columns.

    ``vectors`` [N, d] float32, one row per scan (level ``scan``) or per window (level ``patch``);
    ``metadata`` (a pyarrow Table, N rows in the same order): the scan row's columns (scan
    level) or the patch row's (patch level: ``scan_id``, ``write_id``, ``patch_index``,
    ``center_mm`` RAS, ``start_voxel``), embedding dropped; ``scan_table``: the run's scan rows
    (embedding dropped). Windows are grouped by scan, in window order.
    """

    key: tuple
    level: str
    vectors: np.ndarray
    metadata: object  # pyarrow.Table
    scan_table: object  # pyarrow.Table

    @property
    def digest(self) -> str:
        return run_digest(self.key)

    def column(self, name: str) -> np.ndarray:
        """One metadata column as a NumPy array (text as object)."""
        return self.metadata.column(name).to_numpy(zero_copy_only=False)

    @functools.cached_property
    def scan_id(self) -> np.ndarray:
        return np.asarray(self.metadata.column("scan_id").to_pylist(), dtype=object)

    @functools.cached_property
    def write_id(self) -> np.ndarray:
        return np.asarray(self.metadata.column("write_id").to_pylist(), dtype=object)

    @functools.cached_property
    def patch_index(self) -> np.ndarray | None:
        if self.level != "patch":
            return None
        return self.metadata.column("patch_index").to_numpy(zero_copy_only=False).astype(np.int64)

    @functools.cached_property
    def centers_mm(self) -> np.ndarray | None:
        if self.level != "patch":
            return None
        return as_matrix(self.metadata.column("center_mm"), np.float64).reshape(-1, 3)

    @functools.cached_property
    def starts(self) -> np.ndarray | None:
        if self.level != "patch":
            return None
        return as_matrix(self.metadata.column("start_voxel"), np.int64).reshape(-1, 3)

    @functools.cached_property
    def scans(self) -> dict:
        """The run's scan rows by scan id (a lookup for hits and names; read from ``scan_table``)."""
        return {r["scan_id"]: r for r in self.scan_table.to_pylist()}

    def covered(self) -> set[tuple[str, str]]:
        """``(scan_id, write_id)`` of every scan row these vectors come from."""
        ids = self.scan_table.column("scan_id").to_pylist()
        return set(zip(ids, self.scan_table.column("write_id").to_pylist()))

    def take(self, rows: np.ndarray) -> RunVectors:
        """The vectors (and metadata) of ``rows`` (a boolean mask or indices) only."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        metadata = self.metadata.take(pa.array(rows, type=pa.int64()))
        ids = metadata.column("scan_id").combine_chunks().unique()
        kept = pc.is_in(self.scan_table.column("scan_id"), value_set=ids)
        return RunVectors(self.key, self.level, self.vectors[rows], metadata, self.scan_table.filter(kept))


def run_scan_table(store, key: tuple):
    """The scan rows of run ``key`` (a pyarrow Table, embedding dropped)."""
    scans = store.scans(columns=[c for c in _SCAN_NAMES if c != "embedding"])
    return scans.filter(_key_mask(scans, key))


def load_run_vectors(store, level: str, key: tuple, where: dict | None = None) -> RunVectors:
    """The vectors of run ``key`` at ``level`` (of the scans ``where`` keeps), read in one pass
    as columns, never as Python rows."""
    _check_level(level)
    scans = store.scans()
    mask = _key_mask(scans, key)
    extra = where_mask(scans, where)
    scan_table = scans.filter(mask if extra is None else pc.and_(mask, extra))
    scan_meta = scan_table.drop_columns(["embedding"])
    if level == "scan":
        return RunVectors(tuple(key), level, as_matrix(scan_table.column("embedding")), scan_meta, scan_meta)
    patches = store.patches(columns=["center_mm", "start_voxel", "embedding"])
    table = patches.filter(_key_mask(patches, key))
    if extra is not None:
        table = table.filter(pc.is_in(table.column("scan_id"), value_set=scan_meta.column("scan_id").combine_chunks()))
    # Rows grouped by scan, in window order: region search reduces per scan over contiguous runs.
    table = table.take(pc.sort_indices(table, sort_keys=[("scan_id", "ascending"), ("patch_index", "ascending")]))
    vectors = as_matrix(table.column("embedding"))
    metadata = table.select(["scan_id", "write_id", "patch_index", "center_mm", "start_voxel"])
    return RunVectors(tuple(key), level, vectors, metadata, scan_meta)


def matching_scans(scan_table, filters: dict | None) -> set[str] | None:
    """Scan ids of the rows of ``scan_table`` (a pyarrow Table) that match every filter
    (:func:`where_mask`); None when there are no filters."""
    if not filters:
        return None
    mask = where_mask(scan_table, {k: v for k, v in filters.items()})
    return set(scan_table.filter(mask).column("scan_id").to_pylist())


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise OptionError(f"level {level!r}: expected one of {', '.join(LEVELS)}")
