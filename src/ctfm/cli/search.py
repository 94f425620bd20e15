"""Search a store for similar scans, or for the region around a point.

Scan search: the scans whose vectors are nearest to the query's (a scan id of the store, its
path, or a new file embedded with the store's model, weights and preset: give --weights).
Region search: the run's window centred on x,y,z (world mm, RAS) is the query; every scan's
windows (or only --target's) are compared with it by cosine, and each hit is refined from its
best window to a point in the target's own world mm. --heatmap writes the similarity volume on
the target's own voxel grid (NIfTI).

Examples:
  ctfm search store/ --scan 4ec991ac3dabdf6f -k 5
  ctfm search store/ --scan new_ct.nii.gz --weights model_dir --json
  ctfm search store/ --point scan.nii.gz:12.5,-30,104 -k 10 --json
  ctfm search store/ --point 4ec991ac3dabdf6f:12.5,-30,104 --target other.nii.gz --weights model_dir --heatmap sim.nii.gz
  ctfm search store/ --scan ID --where body_part=CHEST --where kernel=B30f

--json prints a list of hits: scan_id, source_path, score (cosine; -distance for an l2 index)
and rank; region hits add point_mm (refined), window_center_mm, window_score and refine.
"""

from __future__ import annotations

import json
import sys

from ctfm.cli import device, positive_int
from ctfm.cli.pacs_options import add_pacs_arguments


def add_arguments(parser) -> None:
    parser.add_argument("store", metavar="STORE")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument(
        "--scan",
        metavar="ID_OR_PATH",
        help="scan-level query: a scan id or path in the store, or a file (embedded first; needs --weights)",
    )
    query.add_argument(
        "--point",
        metavar="PATH_OR_ID:x,y,z",
        help="region query: the window centred on x,y,z (world mm, RAS) of that scan",
    )
    parser.add_argument(
        "--target",
        metavar="ID_OR_PATH",
        help="region search in this scan only (a file outside the store is embedded first)",
    )
    parser.add_argument("-k", type=positive_int, default=10, help="number of hits (default 10)")
    parser.add_argument(
        "--heatmap",
        metavar="OUT.nii.gz",
        help="region search: write the similarity volume on the target's grid (the best hit's without --target)",
    )
    parser.add_argument("--json", action="store_true", help="print the hits as a JSON list")
    parser.add_argument(
        "--weights",
        help="the store's weights (checked by sha256): needed for files outside the store, centred query windows and "
        "fine refinement",
    )
    from ctfm.cli.selection import add_run_selection

    add_run_selection(
        parser,
        run_help="the run to search when the store holds several: its digest or a unique prefix (`ctfm store info` "
        "lists them)",
    )
    parser.add_argument(
        "--query-from",
        default="auto",
        choices=["auto", "centred", "stored"],
        help="region query window: centred on the point (needs --weights) or the stored window nearest it; auto: "
        "centred with --weights",
    )
    parser.add_argument(
        "--refine",
        default="auto",
        choices=["auto", "fine", "weighted", "none"],
        help="hit location: fine (search with the encoder, to a voxel), weighted (similarity-weighted centre of the "
        "top windows), none (best window centre); auto: fine for --target with --weights, else weighted",
    )
    parser.add_argument("--include-self", action="store_true", help="let the query scan itself be a hit")
    parser.add_argument(
        "--exact", action="store_true", help="scan search: ignore the FAISS index, compare with every vector"
    )
    parser.add_argument("--device", type=device, default="cpu", help="where the encoder runs (default cpu)")
    add_pacs_arguments(parser)


def parse_point(text: str):
    """``PATH_OR_ID:x,y,z`` -> (PATH_OR_ID, [x, y, z])."""
    from ctfm.errors import OptionError

    scan, sep, coords = str(text).rpartition(":")
    try:
        values = [float(v) for v in coords.split(",")]
    except ValueError:
        values = []
    if not sep or not scan or len(values) != 3:
        raise OptionError(
            f"--point {text!r}: expected PATH_OR_ID:x,y,z with three numbers in world mm (RAS), e.g. "
            "scan.nii.gz:12.5,-30,104"
        )
    return scan, values


def run(args) -> int:
    import ctfm
    from ctfm.cli.selection import run_selection
    from ctfm.search import SearchSession

    run_digest, where = run_selection(args)
    filters = None  # --where is the session's: it picks the run and keeps only matching scans as hits
    options = {
        "run": run_digest,
        "where": where,
        "weights": args.weights,
        "device": args.device,
        "use_index": not args.exact,
    }
    if args.scan is not None:
        if args.heatmap or args.target:
            from ctfm.errors import OptionError

            raise OptionError("--target and --heatmap belong to region search (--point)")
        hits = ctfm.search_scans(
            args.store, args.scan, k=args.k, filters=filters, include_self=args.include_self, **options
        )
        _print(hits, args.json, lambda h: f"{h.rank:3d}  {h.score:+.4f}  {h.scan_id}  {h.source_path}")
        return 0
    scan, point = parse_point(args.point)
    if args.heatmap:  # the similarity volume is NIfTI: its path is checked before the search runs
        from ctfm.runtime import require_output_file

        require_output_file(args.heatmap, (".nii.gz", ".nii"), "--heatmap")
    session = SearchSession(args.store, **options)  # region search keeps its session for the query and heatmap
    query = session.region_query(scan, point, args.query_from)
    hits = session.search_point(
        query, point, k=args.k, target=args.target, filters=filters, refine=args.refine, include_self=args.include_self
    )
    if not args.json:
        print(
            f"query: {query.scan.source_path} at ({', '.join(f'{v:g}' for v in point)}) mm RAS: {query.describe()}",
            file=sys.stderr,
        )
    if args.heatmap:
        target = args.target or (hits[0].scan_id if hits else None)
        if target is not None:
            session.write_similarity_volume(
                query, target if args.target else session.resolve(hits[0].scan_id), args.heatmap
            )
            if not args.json:
                print(f"similarity volume: {args.heatmap}", file=sys.stderr)
        else:
            print(f"warning: no hit, so no similarity volume written to {args.heatmap}", file=sys.stderr)
    _print(
        hits,
        args.json,
        lambda h: (
            f"{h.rank:3d}  {h.score:+.4f}  ({', '.join(f'{v:.1f}' for v in h.point_mm)}) mm  {h.scan_id}  "
            f"{h.source_path}"
        ),
    )
    return 0


def _print(hits, as_json: bool, line) -> None:
    if as_json:
        print(json.dumps([h.to_dict() for h in hits], indent=2))
        return
    if not hits:
        print("no hits")
    for h in hits:
        print(line(h))
