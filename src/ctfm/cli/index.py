"""Build, update and inspect the FAISS vector index beside an embedding store.

An index covers one run (computation key: model, weights, preset, mode, pool, precision,
overlap) at one level: `scan` (one vector per scan) or `patch` (one per sliding window). It is
written to STORE/index/ and records the scan rows it covers; when the store changes it is stale
(`status` says so, `update` extends or rebuilds it, searches fall back to exact search).

Examples:
  ctfm index build store/                          exact (flat) cosine index of the scan vectors
  ctfm index build store/ --level patch --kind hnsw --metric cosine
  ctfm index build store/ --kind ivf --nlist 4096 --nprobe 32 --run 3f2a
  ctfm index build store/ --kind ivf --codec pq64 --refine 10 --nprobe 128   millions of vectors
  ctfm index update store/ --level patch           add scans embedded since the build
  ctfm index status store/ [--json]                runs, indexes, staleness
  ctfm index build store/ --where mode=patches --where overlap=0.5 --level patch
  ctfm index check store/                          exit 1 when any index is stale or damaged
"""

from __future__ import annotations

import json

from ctfm.cli import nonnegative_int, positive_int
from ctfm.cli.selection import add_run_selection


def add_arguments(parser) -> None:
    from ctfm.cli import add_subcommands

    sub = add_subcommands(parser, "index")
    build = sub.add_parser("build", help="build (or rebuild) an index over one run's vectors")
    build.add_argument("store", metavar="STORE")
    build.add_argument(
        "--level", default="scan", choices=["scan", "patch"], help="scan vectors (default) or patch (window) vectors"
    )
    build.add_argument(
        "--kind",
        default="flat",
        choices=["flat", "ivf", "hnsw"],
        help="flat: exact (default); ivf: inverted lists; hnsw: graph",
    )
    build.add_argument(
        "--metric",
        default="cosine",
        choices=["cosine", "l2"],
        help="cosine (default; score = cosine similarity) or l2 (score = -distance)",
    )
    add_run_selection(
        build,
        run_help="the run to index when the store holds several: its digest or a unique prefix (see `ctfm index "
        "status`)",
    )
    build.add_argument("--nlist", type=positive_int, help="ivf: number of lists (default ~4 sqrt(N))")
    build.add_argument(
        "--nprobe",
        type=positive_int,
        default=16,
        help="ivf: lists visited per query (default 16; stored as the search default)",
    )
    build.add_argument(
        "--codec",
        default="flat",
        help="ivf: how lists store vectors: flat (default), sq8 (1 byte per value) or pq<M> (M bytes per vector, e.g. "
        "pq64)",
    )
    build.add_argument(
        "--refine",
        type=nonnegative_int,
        default=0,
        help="ivf: keep the full vectors too and re-rank REFINE x k candidates exactly (e.g. 10 with pq)",
    )
    build.add_argument("--hnsw-m", type=positive_int, default=32, help="hnsw: links per node (default 32)")
    build.add_argument(
        "--ef-construction", type=positive_int, default=80, help="hnsw: build-time candidate list (default 80)"
    )
    build.add_argument(
        "--ef-search",
        type=positive_int,
        default=64,
        help="hnsw: search-time candidate list (default 64; stored as the search default)",
    )
    build.add_argument("--json", action="store_true", help="print the manifest as JSON")
    update = sub.add_parser("update", help="extend an index with new scans, or rebuild it when scans changed")
    update.add_argument("store", metavar="STORE")
    update.add_argument("--level", default="scan", choices=["scan", "patch"])
    add_run_selection(update)
    for name, text in (
        ("status", "runs of the store and the state of each index"),
        ("check", "exit 1 when any index is stale or damaged (rebuild a damaged one with `ctfm index build`)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("store", metavar="STORE")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        add_run_selection(p, run_help="show only the run of this digest (or unique prefix) and its indexes")


def run(args) -> int:
    from ctfm.cli import run_subcommand

    return run_subcommand(args, dict.fromkeys(("build", "update", "status", "check"), _run))


def _run(args) -> int:
    import ctfm
    from ctfm.cli.selection import run_selection
    from ctfm.store.index import IndexParams, index_status, update_index

    run_digest, where = run_selection(args)
    store = ctfm.open_store(args.store)
    if args._subcommand == "build":
        params = IndexParams(
            kind=args.kind,
            metric=args.metric,
            nlist=args.nlist,
            nprobe=args.nprobe,
            m=args.hnsw_m,
            ef_construction=args.ef_construction,
            ef_search=args.ef_search,
            codec=args.codec,
            refine=args.refine,
        )
        index = ctfm.build_index(store, args.level, params, run=run_digest, where=where)
        if args.json:
            print(json.dumps({k: v for k, v in index.manifest.items() if k != "covered"}, indent=2))
        else:
            m = index.manifest
            print(
                f"built {m['level']}-level {m['params']['kind']} {m['params']['metric']} index of run {m['digest']}: "
                f"{m['vectors']} vectors of {m['dim']} from {m['scans']} scan(s) in {m['build_seconds']:.2f} s; "
                f"{index.path}"
            )
        return 0
    if args._subcommand == "update":
        index, done = update_index(store, args.level, run=run_digest, where=where)
        print(f"{index.path}: {done}; {index.ntotal} vectors from {index.manifest['scans']} scan(s)")
        return 0
    status = index_status(store, run_digest, where)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        _print_status(status)
    if args._subcommand == "check":  # stale or damaged
        return 1 if any(i["stale"] for i in status["indexes"]) else 0
    return 0


def _print_status(status: dict) -> None:
    from ctfm.store.vectors import describe_run

    print(f"store {status['store']}")
    for level, runs in status["runs"].items():
        print(f"{level}-level runs: {len(runs)}")
        for r in runs:
            print(f"  {describe_run(r)}")
    if not status["indexes"]:
        print("no index (build one: ctfm index build STORE [--level scan|patch])")
    for i in status["indexes"]:
        if i.get("damaged"):
            print(f"index {i['level']}/{i['run']}: DAMAGED: {i['state']}")
            continue
        print(
            f"index {i['level']}/{i['run']}: {i['kind']} {i['metric']}, {i['vectors']} vectors from {i['scans']} "
            f"scan(s), built {i['created_at']}: {'STALE: ' if i['stale'] else ''}{i['state']}"
        )
