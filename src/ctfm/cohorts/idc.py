"""Pre-training cohorts from the Imaging Data Commons as Parquet manifests: select CT series, download them.

Every manifest has a ``path`` column (and ``series_uid`` where a folder may hold several series),
so ``ctfm cohort cache`` and ``ctfm embed`` read it directly.

* :func:`select_idc_cohort` queries the index that the ``idc-index`` package ships (offline, no
  network) and applies CT-FM's series filters (docs/recipe.md) with
  :func:`apply_paper_filters`. The bundled index has one row per series with ``Modality`` and
  ``instanceCount`` but no ``SliceThickness``, ``ImageType`` or slice positions; those live in
  idc-index's ``ct_index`` and ``volume_geometry_index``, which are *not* bundled (idc-index
  downloads them from GitHub on ``fetch_index``). They are used when already installed locally,
  fetched with ``fetch_indices=True`` (network), and otherwise the filters that need them are
  reported as not applied, with the reason.
* :func:`download_idc` fetches a manifest's series through ``IDCClient.download_from_selection``
  and fills in ``path``. idc-index does not raise when the network is unreachable (s5cmd fails,
  idc-index logs it and returns), so success is judged from the files on disk.
"""

from __future__ import annotations

import difflib
import json
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctfm.errors import CTInputError, MissingDependencyError, OptionError, one_line, optional_import
from ctfm.io.tables import read_table
from ctfm.runtime import write_parquet_atomic

# ---- CT-FM's series filters (docs/recipe.md; CT-FM's notebooks/data-download/query.sql) ----------
MIN_INSTANCES = 50  # strictly more than this many instances
THICKNESS_RANGE_MM = (1.0, 5.0)  # 1 <= min SliceThickness and max SliceThickness <= 5

PAPER_FILTERS = {
    "modality": "Modality = 'CT'",
    "instances": f"more than {MIN_INSTANCES} instances (instanceCount > {MIN_INSTANCES})",
    "slice_thickness": f"slice thickness {THICKNESS_RANGE_MM[0]:g}-{THICKNESS_RANGE_MM[1]:g} mm",
    "localizer": "no LOCALIZER in ImageType",
    "unique_positions": "unique slice positions (instances / distinct ImagePositionPatient = 1)",
}

# The columns each filter reads, in order of preference.
_FILTER_COLUMNS = {
    "modality": ["Modality"],
    "instances": ["instanceCount"],
    "slice_thickness": ["SliceThickness_min+SliceThickness_max", "SliceThickness"],
    "localizer": ["ImageType"],
    "unique_positions": ["unique_slice_positions", "n_distinct_positions"],
}

IDC_DIR_TEMPLATE = "%collection_id/%PatientID/%StudyInstanceUID/%Modality_%SeriesInstanceUID"

# Columns of the bundled idc-index ``index`` copied into the manifest (when present).
_IDC_COLUMNS = [
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "collection_id",
    "Modality",
    "instanceCount",
    "series_size_MB",
    "BodyPartExamined",
    "Manufacturer",
    "SeriesDescription",
    "license_short_name",
    "source_DOI",
]
# Extra per-series columns from the fetchable indices, and the filters that need them.
_EXTRA_INDICES = {
    "ct_index": (["SliceThickness", "ImageType"], ["slice_thickness", "localizer"]),
    "volume_geometry_index": (["unique_slice_positions"], ["unique_positions"]),
}
# The paper's query reads every instance; the fetchable indices summarise a series.
_INDEX_NOTES = {
    "slice_thickness": "from ct_index, whose SliceThickness is one representative instance per series (ANY_VALUE), not "
    "the min/max over all instances of the paper's query",
    "localizer": "from ct_index, whose ImageType is one representative instance per series (ANY_VALUE), not every "
    "instance as in the paper's query",
    "unique_positions": "from volume_geometry_index.unique_slice_positions (distinct positions along the slice "
    "normal), the equivalent of instances / distinct ImagePositionPatient = 1",
}


def apply_paper_filters(df):
    """Keep the series that pass CT-FM's pre-training filters.

    ``df`` is a pandas DataFrame or a pyarrow Table with one row per series, shaped like
    idc-index's ``index`` (``Modality``, ``instanceCount``), optionally joined with
    ``SliceThickness`` (or ``SliceThickness_min`` and ``SliceThickness_max``), ``ImageType``
    (a list of values, or a backslash-separated string) and ``unique_slice_positions`` (bool) or
    ``n_distinct_positions`` (count of distinct ImagePositionPatient).

    Filters run in the order of :data:`PAPER_FILTERS`. A missing value fails the filter that needs
    it (as a NULL comparison does in the paper's SQL), except ``ImageType``: a series without one
    has no LOCALIZER to exclude it.

    Returns:
        ``(kept, applied, skipped)``: ``kept`` is the same type as ``df``; ``applied`` maps each
        filter that ran to the number of series it removed; ``skipped`` maps each filter that
        could not run to the reason (its columns are absent).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    is_table = isinstance(df, pa.Table)
    names = list(df.column_names if is_table else df.columns)
    n = len(df)

    def column(name: str):
        if is_table:
            return df.column(name).combine_chunks()
        return pa.array(df[name], from_pandas=True)

    def as_bool(arr, null_value: bool) -> np.ndarray:
        return np.asarray(pc.fill_null(arr, null_value).to_numpy(zero_copy_only=False), dtype=bool)

    def number(name: str):
        return pc.cast(column(name), pa.float64())

    keep = np.ones(n, dtype=bool)
    applied: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for key in PAPER_FILTERS:
        choice = next((c for c in _FILTER_COLUMNS[key] if all(part in names for part in c.split("+"))), None)
        if choice is None:
            wanted = " or ".join(c.replace("+", " and ") for c in _FILTER_COLUMNS[key])
            skipped[key] = f"the index has no {wanted} column"
            continue
        if key == "modality":
            ok = as_bool(pc.equal(pc.utf8_upper(pc.cast(column("Modality"), pa.string())), "CT"), False)
        elif key == "instances":
            ok = as_bool(pc.greater(number("instanceCount"), MIN_INSTANCES), False)
        elif key == "slice_thickness":
            low, high = THICKNESS_RANGE_MM
            lo_col, hi_col = (
                ("SliceThickness_min", "SliceThickness_max") if "+" in choice else ("SliceThickness", "SliceThickness")
            )
            ok = as_bool(pc.and_(pc.greater_equal(number(lo_col), low), pc.less_equal(number(hi_col), high)), False)
        elif key == "localizer":
            ok = ~_has_localizer(column("ImageType"), n)
        else:  # unique_positions
            if choice == "unique_slice_positions":
                ok = as_bool(pc.cast(column(choice), pa.bool_()), False)
            else:
                ok = as_bool(pc.equal(number("instanceCount"), number("n_distinct_positions")), False)
        applied[key] = int((keep & ~ok).sum())
        keep &= ok
    if is_table:
        return df.filter(pa.array(keep)), applied, skipped
    return df.loc[keep].reset_index(drop=True), applied, skipped


def _has_localizer(arr, n: int) -> np.ndarray:
    """Rows whose ImageType holds the value LOCALIZER (list column or backslash-joined string)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_null(arr.type):
        return np.zeros(n, dtype=bool)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = pc.split_pattern(arr, "\\")
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise OptionError(
            f"ImageType column of type {arr.type}: expected a list of strings or a backslash-separated string"
        )
    values = pc.utf8_upper(pc.utf8_trim_whitespace(pc.cast(pc.list_flatten(arr), pa.string())))
    parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
    hit = np.asarray(pc.fill_null(pc.equal(values, "LOCALIZER"), False).to_numpy(zero_copy_only=False), dtype=bool)
    out = np.zeros(n, dtype=bool)
    out[parents[hit]] = True
    return out


# ---- selecting from the Imaging Data Commons index ------------------------------------------
def idc_client():
    """An ``idc_index.IDCClient``, or a one-line error naming the pip command."""
    idc_index = optional_import("idc_index", "idc", "IDC cohort selection and download")
    return idc_index.IDCClient()


@dataclass
class IDCCohort:
    """The result of :func:`select_idc_cohort`: the manifest and what was applied to make it."""

    table: object  # pyarrow.Table, one row per series
    applied: dict[str, int]  # filter -> series removed
    skipped: dict[str, str]  # filter -> why it could not be applied
    notes: dict[str, str] = field(default_factory=dict)  # filter -> how it was applied
    idc_version: str = ""
    candidates: int = 0  # series before the filters (after --collections)
    passed: int = 0  # series after the filters (before --limit)

    @property
    def n_series(self) -> int:
        return self.table.num_rows

    @property
    def n_patients(self) -> int:
        pairs = zip(self.table.column("collection_id").to_pylist(), self.table.column("PatientID").to_pylist())
        return len(set(pairs))

    @property
    def n_collections(self) -> int:
        return len(set(self.table.column("collection_id").to_pylist()))

    @property
    def size_mb(self) -> float:
        import pyarrow.compute as pc

        total = pc.sum(self.table.column("series_size_MB")).as_py()
        return float(total or 0.0)


def select_idc_cohort(
    collections=None, limit: int | None = None, fetch_indices: bool = False, client=None
) -> IDCCohort:
    """CT series of the Imaging Data Commons that pass CT-FM's filters, as a manifest.

    Reads the index bundled with idc-index (no network). ``ct_index`` and
    ``volume_geometry_index`` (slice thickness, ImageType, slice positions) are used when they are
    installed locally; ``fetch_indices=True`` downloads them first (network). Filters whose
    columns are unavailable are listed in ``skipped`` with the reason.

    Args:
        collections: IDC ``collection_id`` values to restrict to (default: all).
        limit: keep the first N series (ordered by collection, patient, study, series).
        fetch_indices: download the missing extra indices (needs network access to GitHub).
        client: an ``IDCClient`` (default: a new one).
    """
    import pyarrow as pa

    client = client if client is not None else idc_client()
    index = client.index
    if collections:
        wanted = [str(c) for c in collections]
        known = set(index["collection_id"].dropna().unique())
        unknown = [c for c in wanted if c not in known]
        if unknown:
            hints = sorted({m for c in unknown for m in difflib.get_close_matches(c.lower(), sorted(known), n=3)})
            raise CTInputError(
                None,
                f"unknown IDC collection(s): {', '.join(unknown)}",
                "collection ids are lower case, e.g. nlst, lidc_idri"
                + (f"; close matches: {', '.join(hints)}" if hints else ""),
            )
        index = index[index["collection_id"].isin(wanted)]
    df = index[[c for c in _IDC_COLUMNS if c in index.columns]]
    skipped_reasons: dict[str, str] = {}
    notes: dict[str, str] = {}
    for name, (columns, filters) in _EXTRA_INDICES.items():
        extra, reason = _extra_index(client, name, columns, fetch_indices)
        if extra is None:
            for f in filters:
                skipped_reasons[f] = reason
            continue
        extra = extra[extra["SeriesInstanceUID"].isin(df["SeriesInstanceUID"])]
        df = df.merge(extra.drop_duplicates("SeriesInstanceUID"), on="SeriesInstanceUID", how="left")
        for f in filters:
            notes[f] = _INDEX_NOTES[f]
    candidates = len(df)
    kept, applied, skipped = apply_paper_filters(df)
    skipped = {k: skipped_reasons.get(k, v) for k, v in skipped.items()}
    passed = len(kept)
    kept = kept.sort_values(["collection_id", "PatientID", "StudyInstanceUID", "SeriesInstanceUID"], kind="stable")
    if limit is not None:
        if limit < 1:
            raise CTInputError(None, f"--limit {limit}", "give a positive number of series")
        kept = kept.head(int(limit))
    kept = kept.drop(columns=[c for c in ("ImageType", "unique_slice_positions") if c in kept.columns]).reset_index(
        drop=True
    )
    table = pa.Table.from_pandas(kept, preserve_index=False)
    version = str(getattr(client, "idc_version", "") or "")
    table = _with_manifest_columns(table, version)
    meta = {
        "ctfm.manifest": "idc-cohort",
        "ctfm.idc_version": version,
        "ctfm.filters_applied": json.dumps({k: PAPER_FILTERS[k] for k in applied}),
        "ctfm.filters_skipped": json.dumps(skipped),
        "ctfm.filter_notes": json.dumps(notes),
    }
    table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})
    return IDCCohort(
        table=table,
        applied=applied,
        skipped=skipped,
        notes=notes,
        idc_version=version,
        candidates=candidates,
        passed=passed,
    )


def _extra_index(client, name: str, columns: list[str], fetch: bool):
    """(DataFrame of SeriesInstanceUID + columns, None) or (None, why it is unavailable)."""
    overview = getattr(client, "indices_overview", {}) or {}
    if name not in overview:
        return None, f"this idc-index version has no {name}"
    installed = bool(overview[name].get("installed"))
    if not installed and not fetch:
        return (
            None,
            f"needs idc-index's {name}, which is not bundled with the package and not installed locally "
            "(--fetch-indices downloads it; that needs network access)",
        )
    try:
        client.fetch_index(name)  # loads from disk when installed, downloads otherwise
    except Exception as exc:
        raise CTInputError(
            None,
            f"could not fetch the IDC {name} ({one_line(exc, 200, with_type=True)})",
            "check network access, or leave out --fetch-indices to select with the bundled index only",
        ) from None
    table = getattr(client, name, None)
    if table is None:
        if fetch and not installed:
            raise CTInputError(
                None,
                f"could not fetch the IDC {name} (idc-index logged the failure)",
                "check network access, or leave out --fetch-indices to select with the bundled index only",
            )
        return None, f"idc-index's {name} could not be loaded"
    missing = [c for c in ["SeriesInstanceUID", *columns] if c not in table.columns]
    if missing:
        return None, f"idc-index's {name} has no {', '.join(missing)} column"
    return table[["SeriesInstanceUID", *columns]], ""


def _with_manifest_columns(table, idc_version: str):
    """Add ``series_uid`` (for discover_inputs) and an empty ``path`` (filled by download)."""
    import pyarrow as pa

    n = table.num_rows
    table = table.append_column("series_uid", table.column("SeriesInstanceUID"))
    table = table.append_column("idc_version", pa.array([idc_version] * n, pa.string()))
    return table.append_column("path", pa.nulls(n, pa.string()))


def format_size_mb(mb: float) -> str:
    """Megabytes as MB, GB or TB (decimal units, as IDC reports them)."""
    if mb >= 1e6:
        return f"{mb / 1e6:.2f} TB"
    if mb >= 1e3:
        return f"{mb / 1e3:.2f} GB"
    return f"{mb:.1f} MB"


# ---- downloading ------------------------------------------------------------------------------
class IDCDownloadError(RuntimeError):
    """The IDC download could not run (no network, no disk space, ...)."""


@dataclass
class DownloadSummary:
    manifest: str
    downloaded: int = 0  # series complete on disk after this run
    already: int = 0  # series that had a path before the run
    missing: list[tuple[str, str]] = field(default_factory=list)  # (SeriesInstanceUID, why)
    errors: list[str] = field(default_factory=list)  # what the downloader reported


def series_folder(out_dir, row: dict) -> Path:
    """Where idc-index puts a series under :data:`IDC_DIR_TEMPLATE`."""
    return (
        Path(out_dir)
        / str(row["collection_id"])
        / str(row["PatientID"])
        / str(row["StudyInstanceUID"])
        / f"{row['Modality']}_{row['SeriesInstanceUID']}"
    )


def idc_download(series_uids: list[str], out_dir: Path, progress: bool = True) -> list[str]:
    """Download series through ``IDCClient.download_from_selection``; returns the errors it logged.

    idc-index reports a failed download (no network, bucket errors) only through its logger and
    returns normally, so the error lines are captured here; the caller checks the files.
    """
    client = idc_client()
    _require_host("s3.amazonaws.com")
    captured = _ErrorCapture()
    logger = logging.getLogger("idc_index")
    logger.addHandler(captured)
    try:
        client.download_from_selection(
            downloadDir=str(out_dir),
            seriesInstanceUID=list(series_uids),
            dirTemplate=IDC_DIR_TEMPLATE,
            show_progress_bar=progress,
            quiet=True,
            use_s5cmd_sync=True,
        )
    finally:
        logger.removeHandler(captured)
    return captured.messages


def _require_host(host: str) -> None:
    """Fail at once when the bucket's host does not resolve (s5cmd would retry for minutes)."""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        raise IDCDownloadError(f"cannot resolve {host} ({exc}): no network access to the IDC buckets") from None


class _ErrorCapture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def download_idc(manifest, out_dir, downloader=None, progress: bool = True) -> DownloadSummary:
    """Download the series of an IDC cohort manifest and record their folders in its ``path``.

    Series that already have an existing ``path`` are skipped; re-running resumes (idc-index
    syncs what is already on disk). ``downloader(series_uids, out_dir) -> list[str]`` does the
    transfer and returns the errors it saw (default: :func:`idc_download`); a series counts as
    downloaded when its folder holds ``instanceCount`` files.

    Raises:
        CTInputError: the manifest is not an IDC cohort, or nothing could be downloaded (the
            message carries the downloader's first error, e.g. no network).
    """
    import pyarrow as pa

    manifest = Path(manifest)
    table = read_table(manifest)
    needed = ["SeriesInstanceUID", "StudyInstanceUID", "PatientID", "collection_id", "Modality"]
    absent = [c for c in needed if c not in table.column_names]
    if absent:
        raise CTInputError(
            manifest,
            f"not an IDC cohort manifest (no {', '.join(absent)} column)",
            "make one with `ctfm cohort idc --out cohort.parquet`",
        )
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = table.to_pylist()
    paths = [r.get("path") for r in rows]
    summary = DownloadSummary(manifest=str(manifest))
    todo = [i for i, r in enumerate(rows) if not (paths[i] and Path(paths[i]).exists())]
    summary.already = len(rows) - len(todo)
    if todo:
        uids = [rows[i]["SeriesInstanceUID"] for i in todo]
        try:
            result = (downloader or (lambda u, d: idc_download(u, d, progress)))(uids, out_dir)
            summary.errors = [str(m) for m in (result or [])]
        except MissingDependencyError:
            raise
        except IDCDownloadError as exc:
            summary.errors = [one_line(exc, 200)]
        except Exception as exc:  # requests / subprocess / disk-space errors raised by idc-index
            summary.errors = [f"{one_line(exc, 200, with_type=True)}"]
        for i in todo:
            folder = series_folder(out_dir, rows[i])
            n_files = _count_files(folder)
            expected = rows[i].get("instanceCount")
            if n_files and (not expected or n_files >= int(expected)):
                paths[i] = str(folder)
                summary.downloaded += 1
            else:
                why = "nothing downloaded" if not n_files else f"incomplete: {n_files} of {expected} files"
                summary.missing.append((rows[i]["SeriesInstanceUID"], why))
        if summary.downloaded:
            column = table.column_names.index("path") if "path" in table.column_names else None
            array = pa.array(paths, pa.string())
            table = (
                table.set_column(column, "path", array) if column is not None else table.append_column("path", array)
            )
            write_parquet_atomic(table, manifest)
        if not summary.downloaded:
            first = _first_error(summary.errors)
            raise CTInputError(
                out_dir,
                f"none of {len(todo)} series could be downloaded from IDC" + (f": {first}" if first else ""),
                "check network access to the IDC buckets (s3.amazonaws.com); rerun the same command to resume",
            )
    return summary


def _count_files(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _first_error(messages: list[str]) -> str:
    """The most telling line of what idc-index / s5cmd logged (the 'caused by' of a request error)."""
    lines = [" ".join(line.split()) for m in messages for line in str(m).splitlines() if line.strip()]
    for line in lines:
        if "caused by:" in line:
            return line[line.index("caused by:") + len("caused by:") :].strip()[:200]
    return lines[0][:200] if lines else ""
