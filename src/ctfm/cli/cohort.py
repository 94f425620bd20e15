"""Pre-training cohorts: select IDC series, download them, scan local archives, cache volumes.

Examples:
  ctfm cohort idc --out cohort.parquet --collections nlst lidc_idri --limit 1000
  ctfm cohort download cohort.parquet data/idc
  ctfm cohort scan archive/ more_scans/ --out scans.parquet
  ctfm cohort cache cohort.parquet cache/ --workers 8
  ctfm cohort cache scans.parquet cache/ --preset ct-fm-ssl --dtype float16

idc       selects from the index bundled with idc-index (offline) with CT-FM's series filters
          (docs/recipe.md); filters that need an index not installed here are reported.
download  fetches the manifest's series (network) and fills its 'path' column; re-run to resume.
scan      describes every scan found (DICOM series, NIfTI, NRRD, MHA); unreadable or unusable
          inputs become rows with an 'error'.
cache     preprocesses each scan once (default ct-fm-ssl) into CACHE_DIR/volumes/*.npy +
          index.parquet for crop-wise reading in pre-training; resumable.

Exit status: 0 done (scan: also when some inputs are unreadable, they are rows of the manifest);
1 download left series missing / cache failed on some scans (each recorded); 2 unusable arguments
or input, or a download that got nothing (e.g. no network).
The IDC commands need the idc-index package (pip install 'ctfm[idc]').
"""

from __future__ import annotations

import argparse
import sys

from ctfm.cli import positive_int
from ctfm.cli.pacs_options import add_pacs_arguments


def add_arguments(parser) -> None:
    from ctfm.cli import add_subcommands

    sub = add_subcommands(parser, "cohort")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "idc", help="select CT series from the Imaging Data Commons index (offline)", formatter_class=fmt
    )
    p.add_argument("--out", required=True, metavar="MANIFEST", help="Parquet manifest to write")
    p.add_argument(
        "--collections", nargs="+", metavar="C", help="IDC collection ids (default: all), e.g. nlst lidc_idri"
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        metavar="N",
        help="keep the first N series (by collection, patient, study, series)",
    )
    p.add_argument(
        "--fetch-indices",
        action="store_true",
        help="download idc-index's ct_index and volume_geometry_index first (network) so that every filter applies",
    )

    p = sub.add_parser(
        "download", help="download a cohort's series from IDC and fill its 'path' column", formatter_class=fmt
    )
    p.add_argument("manifest", help="manifest written by `ctfm cohort idc`")
    p.add_argument("dir", metavar="DIR", help="download folder (collection/patient/study/CT_series/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("scan", help="describe local CT files and DICOM trees in a manifest", formatter_class=fmt)
    p.add_argument("inputs", nargs="+", metavar="DIR", help="folders, files or manifests")
    p.add_argument("--out", required=True, metavar="MANIFEST", help="Parquet manifest to write")
    p.add_argument("--workers", type=positive_int, default=1, help="processes reading scans in parallel")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_pacs_arguments(p)

    p = sub.add_parser("cache", help="preprocess every scan once into a crop-readable cache", formatter_class=fmt)
    p.add_argument("inputs", nargs="+", metavar="MANIFEST", help="manifest(s) (or folders/files) of scans")
    p.add_argument("cache_dir", metavar="CACHE_DIR", help="cache folder (index.parquet + volumes/)")
    p.add_argument("--workers", type=positive_int, default=1, help="processes preprocessing in parallel")
    p.add_argument("--preset", default="ct-fm-ssl", help="preprocessing preset (default ct-fm-ssl)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16"],
        help="stored dtype: float32 is exact; float16 halves disk (max error 2.4e-4 on [0, 1])",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ctfm.cli import run_subcommand

    return run_subcommand(args, {"idc": _idc, "download": _download, "scan": _scan, "cache": _cache})


def _idc(args) -> int:
    from ctfm.cohorts.idc import PAPER_FILTERS, format_size_mb, select_idc_cohort
    from ctfm.runtime import write_parquet_atomic

    cohort = select_idc_cohort(collections=args.collections, limit=args.limit, fetch_indices=args.fetch_indices)
    write_parquet_atomic(cohort.table, args.out)
    print(
        f"IDC {cohort.idc_version}: {cohort.passed} of {cohort.candidates} candidate series pass the filters"
        + (f"; kept the first {cohort.n_series} (--limit)" if cohort.n_series < cohort.passed else "")
    )
    for key, removed in cohort.applied.items():
        print(
            f"  applied: {PAPER_FILTERS[key]} (removed {removed})"
            + (f" [{cohort.notes[key]}]" if key in cohort.notes else "")
        )
    for key, reason in cohort.skipped.items():
        print(f"  NOT applied: {PAPER_FILTERS[key]}: {reason}")
    print(
        f"{cohort.n_series} series, {cohort.n_patients} patients, {cohort.n_collections} collections, "
        f"{format_size_mb(cohort.size_mb)}; manifest: {args.out}"
    )
    return 0


def _download(args) -> int:
    from ctfm.cohorts.idc import download_idc

    summary = download_idc(args.manifest, args.dir, progress=not args.no_progress)
    print(
        f"downloaded {summary.downloaded} series, {summary.already} already had a path, {len(summary.missing)} missing; "
        f"manifest updated: {args.manifest}"
    )
    for uid, why in summary.missing[:20]:
        print(f"error: series {uid}: {why}", file=sys.stderr)
    if len(summary.missing) > 20:
        print(
            f"error: ... and {len(summary.missing) - 20} more series missing; rerun the same command to resume",
            file=sys.stderr,
        )
    return 1 if summary.missing else 0


def _scan(args) -> int:
    from ctfm.cohorts import format_size_mb, scan_local
    from ctfm.runtime import write_parquet_atomic

    summary = scan_local(args.inputs, workers=args.workers, progress=not args.no_progress)
    write_parquet_atomic(summary.table, args.out)
    ok = summary.n_scans - summary.n_errors
    print(
        f"scanned {summary.n_scans} scan(s): {ok} usable CT, {summary.n_errors} unreadable or unusable (see the 'error' "
        f"column); {format_size_mb(summary.disk_bytes / 1e6)} on disk; manifest: {args.out}"
    )
    return 0


def _cache(args) -> int:
    from ctfm.cohorts import format_size_mb
    from ctfm.pretrain.cache import build_cache

    summary = build_cache(
        args.inputs,
        args.cache_dir,
        spec=args.preset,
        workers=args.workers,
        progress=not args.no_progress,
        dtype=args.dtype,
    )
    left_out = []
    if summary.unreadable:
        left_out.append(f"{summary.unreadable} marked unreadable in the manifest")
    if summary.not_downloaded:
        left_out.append(f"{summary.not_downloaded} not downloaded (no path; run `ctfm cohort download`)")
    print(
        f"cached {summary.done} scan(s) ({format_size_mb(summary.bytes_written / 1e6)}), skipped {summary.skipped} "
        f"already cached, {len(summary.failed)} failed"
        + (f"; left out {', '.join(left_out)}" if left_out else "")
        + f"; {summary.seconds:.1f} s; cache: {args.cache_dir}"
    )
    for _, message in summary.failed:
        print(f"error: {message}", file=sys.stderr)
    return 1 if summary.failed else 0
