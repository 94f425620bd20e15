"""Describe a CT and check that it is usable.

Examples:
  ctfm info scan.nii.gz
  ctfm info path/to/dicom_folder --json
  ctfm info archive/study --series 1.2.840.113619.2.55.3

Exit status: 0 for a usable CT (warnings allowed), 2 otherwise.
"""

from __future__ import annotations

import json
import sys

from ctfm.cli.pacs_options import add_pacs_arguments


def add_arguments(parser) -> None:
    parser.add_argument("path", help="a NIfTI/NRRD/MHA file or a DICOM series folder")
    parser.add_argument(
        "--series", metavar="UID", help="SeriesInstanceUID to load when a folder holds several CT series"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (schema in the README)")
    add_pacs_arguments(parser)


def run(args) -> int:
    import warnings

    import ctfm
    from ctfm.preprocess.validate import describe_ct

    with warnings.catch_warnings():
        # The record and the checks report resampling; no second copy on stderr.
        warnings.simplefilter("ignore")
        report = describe_ct(ctfm.load_ct(args.path, series_uid=args.series))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_as_text(report))
    errors = [c for c in report["checks"] if c["status"] == "error"]
    if errors:
        first = errors[0]
        print(f"error: {report['path']}: {first['message']} ({first['fix'] or 'fix the input'})", file=sys.stderr)
        return 2
    return 0


def _as_text(report: dict) -> str:
    r = report["record"]
    shape = "x".join(str(s) for s in report["shape"])
    spacing = " x ".join(f"{s:.4g}" for s in report["spacing_mm"])
    lines = [
        f"{report['path']}",
        f"  format       {report['format']}",
        f"  shape        {shape} voxels, spacing {spacing} mm, orientation {report['orientation']}",
    ]
    if report["format"] == "dicom":
        lines += [
            f"  series       {r['series_uid']} '{r['series_description'] or ''}' ({r['n_slices_on_disk']} slices)",
            f"  study        {r['study_uid']}",
            f"  acquisition  {r['manufacturer'] or '?'}, kernel {r['kernel'] or '?'}, slice thickness "
            f"{r['slice_thickness_mm']} mm, body part {r['body_part'] or '?'}, contrast "
            f"{r['contrast'] or 'none recorded'}, tilt {r['gantry_tilt_deg']} deg",
        ]
        if r["skipped"]:
            lines.append("  skipped      " + ", ".join(f"{n} {k}" for k, n in sorted(r["skipped"].items())))
        if r["resampled"]:
            lines.append(f"  resampled    {r['resampled']}")
    hu = report["hu"]
    lines.append(
        f"  HU           min {hu['min']:g}  p1 {hu['p1']:g}  p50 {hu['p50']:g}  p99 {hu['p99']:g}  max {hu['max']:g}"
    )
    lines.append("  checks")
    for c in report["checks"]:
        lines.append(
            f"    {c['status']:<5} {c['name']:<15} {c['message']}"
            + (f" ({c['fix']})" if c["status"] == "warn" and c["fix"] else "")
        )
    lines.append(f"  usable       {'yes' if report['usable'] else 'no'}")
    return "\n".join(lines)
