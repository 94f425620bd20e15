"""What to read: scan sources from files, folders and manifests.

A :class:`ScanSource` names one scan: a volume file, or a DICOM folder plus the series to take
from it. :func:`discover_inputs` expands what a user gives (files, folders searched recursively,
CSV/TSV/Parquet/XLSX manifests with a ``path`` column) into sources; every batch job (embedding, cohort
scan, cache) starts from it, and :func:`manifest_sources` is the one reader of manifests.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ctfm.errors import CTInputError
from ctfm.io.dicom import index_dicom_folder, quiet_pydicom
from ctfm.io.pacs import fetch_series, is_pacs_url, pacs_sources
from ctfm.io.tables import TABLE_SUFFIXES, read_table
from ctfm.io.volume import VOLUME_SUFFIXES

MANIFEST_SUFFIXES = TABLE_SUFFIXES  # a manifest is any table read_table reads


@dataclass(frozen=True)
class ScanSource:
    """One scan: a volume file, or a DICOM folder plus the series to take from it."""

    path: str
    series_uid: str | None = None

    @property
    def scan_id(self) -> str:
        """Stable id from the absolute source path (and series): the same input maps to the same row."""
        key = source_location(self.path) + ("#" + self.series_uid if self.series_uid else "")
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def __str__(self) -> str:
        return self.path + (f" [series {self.series_uid}]" if self.series_uid else "")


def source_location(path: str | os.PathLike) -> str:
    """What a store row records as a source: the absolute path, or a PACS address as it is."""
    return str(path) if is_pacs_url(path) else os.path.abspath(path)


def local_source(source: ScanSource) -> ScanSource:
    """``source`` itself, or for a PACS series its folder in the series cache (retrieved if needed)."""
    if not is_pacs_url(source.path):
        return source
    return ScanSource(str(fetch_series(source.path)), source.series_uid)


@dataclass
class ManifestSources:
    """The usable rows of a manifest, and how many rows were left out and why."""

    sources: list[ScanSource] = field(default_factory=list)
    unreadable: int = 0  # rows with an ``error`` (marked unreadable by ``ctfm cohort scan``)
    not_downloaded: int = 0  # rows without a ``path`` (an IDC cohort not downloaded yet)


def is_manifest(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(MANIFEST_SUFFIXES)


def manifest_sources(path: str | os.PathLike, table=None) -> ManifestSources:
    """Scan sources of a manifest: column ``path`` (relative paths are taken from the manifest's
    folder), optional ``series_uid``; rows with an ``error`` or no ``path`` are counted, not used."""
    path = Path(path)
    table = read_table(path) if table is None else table
    if "path" not in table.column_names:
        raise CTInputError(
            path,
            f"manifest has no 'path' column (columns: {', '.join(table.column_names)})",
            "add a 'path' column with one scan per row",
        )
    paths = table.column("path").to_pylist()
    series = table.column("series_uid").to_pylist() if "series_uid" in table.column_names else [None] * len(paths)
    errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * len(paths)
    out = ManifestSources()
    for p, s, e in zip(paths, series, errors):
        if e not in (None, ""):
            out.unreadable += 1
        elif p in (None, ""):
            out.not_downloaded += 1
        else:
            resolved = p if is_pacs_url(p) or os.path.isabs(str(p)) else path.parent / str(p)
            out.sources.append(ScanSource(str(resolved), str(s) if s not in (None, "") else None))
    if not out.sources:
        left = [
            f"{n} {why}" for n, why in ((out.unreadable, "marked unreadable"), (out.not_downloaded, "without a path"))
        ]
        raise CTInputError(
            path,
            f"no scan to read ({len(paths)} row(s): {', '.join(n for n in left if not n.startswith('0 '))})",
            "fill the 'path' column with one scan per row (ctfm cohort download fills an IDC manifest's)",
        )
    return out


def discover_inputs(inputs: list[str | os.PathLike]) -> list[ScanSource]:
    """Expand files, folders (volume files and DICOM series, recursively) and manifests
    (CSV/Parquet with a ``path`` column, optional ``series_uid``) into unique scan sources.

    The one place every verb's scan inputs are expanded: an input that yields no scan (an empty
    folder, a folder of single 2D slices, a manifest without usable rows) is a one-line
    :class:`CTInputError` saying what was found and skipped, never an empty success."""
    sources: list[ScanSource] = []
    for item in inputs:
        if is_pacs_url(item):  # one source per series the address names (docs/pacs.md)
            sources += [ScanSource(address, uid) for address, uid in pacs_sources(item)]
            continue
        path = Path(item)
        if not path.exists():
            raise CTInputError(path, "no such file or folder", "check the path")
        if is_manifest(path):
            sources += manifest_sources(path).sources
        elif path.is_file():
            sources.append(ScanSource(str(path)))
        else:
            sources += _scan_folder(path)
    return list(dict.fromkeys(sources))


def _scan_folder(folder: Path) -> list[ScanSource]:
    """Volume files under ``folder`` and every CT series of its DICOM files (by SeriesInstanceUID);
    none is a :class:`CTInputError` counting what the folder holds instead."""

    files = [p for p in folder.rglob("*") if p.is_file()]
    volumes = sorted(str(p) for p in files if p.name.lower().endswith(VOLUME_SUFFIXES))
    with quiet_pydicom():
        index = index_dicom_folder(folder)
    series = []
    placed = {s.uid for s in index.series}
    # A CT series none of whose files gives a slice position is listed too: loading it is
    # refused with the reason, rather than the series vanishing from the batch unseen.
    unplaced = [s for s in index.unplaced.values() if s.uid not in placed and len(s.files) >= 2]
    # A multi-frame CT (one file) is listed too, so that its one-line refusal is seen.
    multiframe = [s for s in index.multiframe.values() if s.uid not in placed and s.modality == "CT"]
    skipped = Counter(index.skipped)
    for s in [*index.series, *unplaced, *multiframe]:
        if s.modality != "CT":
            skipped[f"{s.modality or 'unknown-modality'} image(s)"] += len(s.files)
            continue
        if len(s.files) < 2 and s not in multiframe:
            skipped["single 2D slice(s)"] += len(s.files)
            continue
        parent = Path(os.path.commonpath([str(f.parent) for f in s.files]))
        series.append(ScanSource(str(parent), s.uid))
    if not volumes and not series:
        what = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
        raise CTInputError(
            folder,
            f"no 3D CT found ({len(files)} files{': ' + what + ' skipped' if what else ''})",
            "point at a folder of 3D scans (NIfTI, NRRD, MHA) or DICOM series",
        )
    return [ScanSource(v) for v in volumes] + sorted(series, key=lambda s: (s.path, s.series_uid))


def resolve_sources(items) -> ManifestSources:
    """Scan sources from ScanSource objects, files, folders and manifests, with the counts of
    manifest rows left out (unreadable, not downloaded)."""
    if isinstance(items, (str, os.PathLike, ScanSource)):
        items = [items]
    out = ManifestSources()
    for item in items:
        if isinstance(item, ScanSource):
            out.sources.append(item)
        elif not is_pacs_url(item) and is_manifest(Path(item)):
            rows = manifest_sources(item)
            out.sources += rows.sources
            out.unreadable += rows.unreadable
            out.not_downloaded += rows.not_downloaded
        else:
            out.sources += discover_inputs([item])
    out.sources = list(dict.fromkeys(out.sources))
    return out
