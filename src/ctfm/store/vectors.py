"""The vectors of one computation in a store, as numpy matrices, read once.

A store may hold several computations (runs): one per computation key
(:data:`ctfm.store.schema.RUN_KEY`). Everything that compares vectors (the FAISS index, scan
search, region search) works on exactly one run, chosen here: :func:`list_runs` names them (a
16-hex digest per key, as ``ctfm index status`` shows), :func:`select_run` picks one and refuses
to guess between several.

Levels: ``scan`` (one vector per scan row: whole-scan vectors, or pooled patch vectors) and
``patch`` (one vector per sliding window, with its centre in RAS mm).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctfm.errors import OptionError
from ctfm.store.schema import RUN_KEY, key_digest, run_key_of

LEVELS = ("scan", "patch")


def as_matrix(column, dtype=np.float32) -> np.ndarray:
    """A pyarrow list<float> column of equal-length lists -> [N, d] numpy (no Python lists)."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(array)
    if n == 0:
        return np.zeros((0, 0), dtype=dtype)
    values = array.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    if values.size % n:
        raise OptionError(f"vectors of unequal length in one run ({values.size} values over {n} rows); run `ctfm store check` on the store")
    return values.reshape(n, values.size // n)


def run_digest(key: tuple) -> str:
    """The 16-hex name of a computation key (the same digest the store's part files carry)."""
    return key_digest(tuple(key))


def key_dict(key: tuple) -> dict:
    return dict(zip(RUN_KEY, key))


def _key_column_tuples(table) -> list[tuple]:
    cols = [table.column(k).to_pylist() for k in RUN_KEY]
    return [run_key_of(dict(zip(RUN_KEY, values))) for values in zip(*cols)]


def list_runs(store, level: str) -> list[dict]:
    """One dict per computation key present at ``level``: key fields, ``digest``, ``preset``,
    ``rows`` (vectors), ``scans``."""
    _check_level(level)
    scans = store.scans()
    runs: dict[tuple, dict] = {}
    presets = scans.column("preset").to_pylist()
    ids = scans.column("scan_id").to_pylist()
    for key, preset, scan_id in zip(_key_column_tuples(scans), presets, ids):
        if level == "patch" and key[RUN_KEY.index("mode")] != "patches":
            continue
        run = runs.setdefault(key, {**key_dict(key), "digest": run_digest(key), "preset": preset, "rows": 0, "scans": set()})
        run["scans"].add(scan_id)
        if level == "scan":
            run["rows"] += 1
    if level == "patch":
        table = store.patches().select(list(RUN_KEY))
        from collections import Counter

        for key, n in Counter(_key_column_tuples(table)).items():
            if key in runs:
                runs[key]["rows"] += n
    out = []
    for run in runs.values():
        run["scans"] = len(run["scans"])
        out.append(run)
    return sorted(out, key=lambda r: r["digest"])


def describe_run(run: dict) -> str:
    return f"{run['digest']} (mode {run['mode']}, model {run['model']}, weights {str(run['weights_sha256'])[:12]}, preset {run['preset']}, pool {run['pool']}, overlap {run['overlap']:g}, {run['precision']}; {run['scans']} scans, {run['rows']} vectors)"


def select_run(store, level: str, run: str | None = None) -> tuple:
    """The computation key at ``level`` named by ``run`` (a digest or a unique prefix of one),
    or the only one there is; an :class:`OptionError` listing the runs otherwise."""
    runs = list_runs(store, level)
    if not runs:
        need = "embed with --mode patches" if level == "patch" else "embed scans into it first"
        raise OptionError(f"{store.root}: no {level}-level vectors in the store ({need})")
    if run is not None:
        chosen = [r for r in runs if r["digest"].startswith(run)]
        if len(chosen) != 1:
            listing = "; ".join(describe_run(r) for r in runs)
            raise OptionError(f"run {run!r}: {'matches no' if not chosen else 'matches several'} {level}-level run of {store.root} (runs: {listing})")
        return tuple(chosen[0][k] for k in RUN_KEY)
    if len(runs) > 1:
        listing = "; ".join(describe_run(r) for r in runs)
        raise OptionError(f"{store.root} holds {len(runs)} {level}-level runs and vectors of different runs are never mixed: choose one with --run DIGEST ({listing})")
    return tuple(runs[0][k] for k in RUN_KEY)


@dataclass
class RunVectors:
    """The vectors of one run at one level.

    ``matrix`` [N, d] float32 in row order; ``scan_id``/``write_id`` [N] per row; for patches,
    ``patch_index`` [N], ``centers_mm`` [N, 3] (RAS) and ``starts`` [N, 3] (SPL voxel of the
    window in the preprocessed volume); ``scans``: the run's scan rows (dicts, embedding
    dropped) by scan id.
    """

    key: tuple
    level: str
    matrix: np.ndarray
    scan_id: np.ndarray
    write_id: np.ndarray
    scans: dict
    patch_index: np.ndarray | None = None
    centers_mm: np.ndarray | None = None
    starts: np.ndarray | None = None

    @property
    def digest(self) -> str:
        return run_digest(self.key)

    def covered(self) -> set[tuple[str, str]]:
        """``(scan_id, write_id)`` of every scan row these vectors come from."""
        return {(s, r["write_id"]) for s, r in self.scans.items()}


def _key_mask(table, key: tuple) -> np.ndarray:
    import pyarrow.compute as pc

    mask = None
    for name, value in zip(RUN_KEY, key):
        column = table.column(name)
        if name == "overlap":
            cond = pc.equal(column, np.float32(value))
        elif value is None:
            cond = pc.is_null(column)
        else:
            cond = pc.equal(column, value)
        mask = cond if mask is None else pc.and_(mask, cond)
    return mask


def run_scan_rows(store, key: tuple) -> dict:
    """The scan rows of run ``key`` (dicts without the embedding), by scan id."""
    scans = store.scans()
    table = scans.filter(_key_mask(scans, key)).drop_columns(["embedding"])
    return {r["scan_id"]: r for r in table.to_pylist()}


def load_run_vectors(store, level: str, key: tuple) -> RunVectors:
    """Every vector of run ``key`` at ``level``, read in one pass (columns, not Python rows)."""
    _check_level(level)
    scans = store.scans()
    scan_table = scans.filter(_key_mask(scans, key))
    rows = {r["scan_id"]: r for r in scan_table.drop_columns(["embedding"]).to_pylist()}
    if level == "scan":
        return RunVectors(
            key=tuple(key),
            level=level,
            matrix=as_matrix(scan_table.column("embedding")),
            scan_id=np.asarray(scan_table.column("scan_id").to_pylist(), dtype=object),
            write_id=np.asarray(scan_table.column("write_id").to_pylist(), dtype=object),
            scans=rows,
        )
    patches = store.patches()
    table = patches.filter(_key_mask(patches, key))
    # Rows grouped by scan, in window order: region search reduces per scan over contiguous runs.
    import pyarrow.compute as pc

    order = pc.sort_indices(table, sort_keys=[("scan_id", "ascending"), ("patch_index", "ascending")])
    table = table.take(order)
    return RunVectors(
        key=tuple(key),
        level=level,
        matrix=as_matrix(table.column("embedding")),
        scan_id=np.asarray(table.column("scan_id").to_pylist(), dtype=object),
        write_id=np.asarray(table.column("write_id").to_pylist(), dtype=object),
        scans=rows,
        patch_index=table.column("patch_index").to_numpy(zero_copy_only=False).astype(np.int64),
        centers_mm=as_matrix(table.column("center_mm"), np.float64).reshape(-1, 3),
        starts=as_matrix(table.column("start_voxel"), np.int64).reshape(-1, 3),
    )


def matching_scans(scans: dict, filters: dict | None) -> set[str] | None:
    """Scan ids whose record fields match every filter (``{column: value or [values]}``,
    compared as text, case-insensitive); None when there are no filters."""
    if not filters:
        return None
    if scans:
        known = set(next(iter(scans.values())))
        unknown = sorted(set(filters) - known)
        if unknown:
            raise OptionError(f"filter on {', '.join(unknown)}: not a scan record column (filterable: {', '.join(sorted(k for k in known if k not in RUN_KEY))})")
    wanted = {name: {str(v).lower() for v in (value if isinstance(value, (list, tuple, set)) else [value])} for name, value in filters.items()}
    return {sid for sid, row in scans.items() if all(str(row.get(name)).lower() in values for name, values in wanted.items())}


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise OptionError(f"level {level!r}: expected one of {', '.join(LEVELS)}")
