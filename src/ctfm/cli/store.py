"""Summarise, check and compact an embedding store (the folder `ctfm embed --out` writes).

Examples:
  ctfm store info store/            runs by computation key, scans, patches, failures
  ctfm store info store/ --json
  ctfm store check store/           exit 1 when any file is damaged or any row inconsistent or orphaned
  ctfm store check store/ --repair  move damaged files to store/quarantine/ (with a note of why); the
                                    next `ctfm embed` of the same sources recomputes the scans they held
  ctfm store compact store/         fold pending part files into the main Parquet files
"""

from __future__ import annotations

import json
import sys


def add_arguments(parser) -> None:
    from ctfm.cli import add_subcommands

    sub = add_subcommands(parser, "store")
    info = sub.add_parser("info", help="what the store holds: runs by key, scans, patches, failures")
    info.add_argument("store", metavar="STORE")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    check = sub.add_parser("check", help="report inconsistent or orphaned rows; exit 1 if any")
    check.add_argument("store", metavar="STORE")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument(
        "--repair",
        action="store_true",
        help="first move every damaged file (store Parquet, index files) to STORE/quarantine/ with a note of why; "
        "the scans whose rows went with them are recomputed by the next `ctfm embed` of the same sources",
    )
    compact = sub.add_parser("compact", help="fold part files into scans/patches/failures.parquet")
    compact.add_argument("store", metavar="STORE")


def run(args) -> int:
    from ctfm.cli import run_subcommand

    return run_subcommand(args, dict.fromkeys(("info", "check", "compact"), _run))


def _run(args) -> int:
    import ctfm
    from ctfm.store import check_store, is_consistent, repair_store, summarise

    store = ctfm.open_store(args.store)
    if args._subcommand == "info":
        summary = summarise(store)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            _print_summary(summary)
        return 0
    if args._subcommand == "check":
        repair = repair_store(store) if args.repair else None
        problems = check_store(store)
        ok = is_consistent(problems)
        if args.json:
            report = {"store": str(store.root), "consistent": ok, "problems": [p.to_dict() for p in problems]}
            if repair is not None:
                report["repair"] = repair.to_json()
            print(json.dumps(report, indent=2))
        else:
            if repair is not None:
                for moved in repair.moved:
                    print(f"quarantined: {moved['file']} -> {moved['moved_to']} ({moved['reason']})")
                for scan in repair.recompute:
                    print(f"to recompute: {scan['scan_id']} ({scan['source_path'] or 'source unknown'})")
                print(repair.summary())
            for p in problems:
                level = "note" if p.code == "superseded_patches" else "problem"
                print(
                    f"{level}: {p.code} ({p.count}): {p.message} ({p.fix})",
                    file=sys.stdout if level == "note" else sys.stderr,
                )
            print(f"{store.root}: {'consistent' if ok else 'INCONSISTENT'}")
        return 0 if ok else 1
    store.compact()
    print(f"{store.root}: compacted")
    return 0


def _print_summary(summary: dict) -> None:
    print(
        f"store {summary['store']}: {summary['scans']} scan(s) in {summary['scan_rows']} row(s), {summary['patches']} "
        f"patch(es), {summary['failures']} failure(s) ({summary['failed_sources']} source(s)), "
        f"{summary['pending_parts']} pending part file(s), {summary['bytes'] / 1e6:.1f} MB"
    )
    if not summary["runs"]:
        print("no runs")
        return
    print("runs (one per computation key):")
    header = ("run", "mode", "pool", "overlap", "precision", "model", "weights", "preset", "dim", "scans", "patches")
    rows = [
        (
            r["digest"],
            r["mode"],
            r["pool"],
            f"{r['overlap']:g}",
            r["precision"],
            r["model"],
            str(r["weights_sha256"])[:12],
            r["preset"],
            str(r["dim"]),
            str(r["scans"]),
            str(r["patches"]),
        )
        for r in summary["runs"]
    ]
    widths = [max(len(h), *(len(str(row[i])) for row in rows)) for i, h in enumerate(header)]
    print("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  " + "  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
