"""Build, update and inspect the FAISS vector index beside an embedding store.

An index covers one run (computation key: model, weights, preset, mode, pool, precision,
overlap) at one level: `scan` (one vector per scan) or `patch` (one per sliding window). It is
written to STORE/index/ and records the scan rows it covers; when the store changes it is stale
(`status` says so, `update` extends or rebuilds it, searches fall back to exact search).

Examples:
  ctfm index build store/                          chosen by size: exact below 20,000 vectors, else HNSW
                                                   (IVF-SQ8 + re-ranking above 2,000,000); recall@10 measured
  ctfm index build store/ --kind flat              exact cosine index of the scan vectors
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
        default="auto",
        choices=["auto", "flat", "ivf", "hnsw"],
        help="auto (default): chosen by the number of vectors (exact below 20,000, else HNSW; IVF-SQ8 with "
        "re-ranking above 2,000,000), its search setting tuned to recall@10 >= 0.95 on held-out vectors; "
        "flat: exact; ivf: inverted lists; hnsw: graph",
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
        help="ivf: lists visited per query (default 16; stored as the search default)",
    )
    build.add_argument(
        "--codec",
        help="ivf: how lists store vectors: flat (default), sq8 (1 byte per value) or pq<M> (M bytes per vector, e.g. "
        "pq64)",
    )
    build.add_argument(
        "--refine",
        type=nonnegative_int,
        help="ivf: keep the full vectors too and re-rank REFINE x k candidates exactly (e.g. 10 with pq)",
    )
    build.add_argument("--hnsw-m", type=positive_int, help="hnsw: links per node (default 32)")
    build.add_argument("--ef-construction", type=positive_int, help="hnsw: build-time candidate list (default 80)")
    build.add_argument(
        "--ef-search",
        type=positive_int,
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
    from ctfm.errors import OptionError
    from ctfm.store.index import IndexParams, index_status, retrain_advice, update_index

    run_digest, where = run_selection(args)
    store = ctfm.open_store(args.store)
    if args._subcommand == "build":
        tuned = {
            "nlist": args.nlist,
            "nprobe": args.nprobe,
            "m": args.hnsw_m,
            "ef_construction": args.ef_construction,
            "ef_search": args.ef_search,
            "codec": args.codec,
            "refine": args.refine,
        }
        given = {k: v for k, v in tuned.items() if v is not None}
        if args.kind == "auto" and given:
            option = "--hnsw-m" if "m" in given else f"--{next(iter(given)).replace('_', '-')}"
            raise OptionError(f"{option}: a setting of a chosen kind; give --kind ivf or --kind hnsw with it")
        params = IndexParams(kind=args.kind, metric=args.metric, **given)
        index = ctfm.build_index(store, args.level, params, run=run_digest, where=where)
        if args.json:
            print(json.dumps({k: v for k, v in index.manifest.items() if k != "covered"}, indent=2))
        else:
            m = index.manifest
            print(
                f"built {m['level']}-level {m['params']['kind']} {m['params']['metric']} index of run {m['digest']}: "
                f"{m['vectors']} vectors of {m['dim']} from {m['scans']} scan(s) in {m['build_seconds']:.2f} s"
                f"{' (chosen by size)' if m.get('auto') else ''}; {_recall_text(m.get('recall_at_10'), m.get('recall_queries'))}; "
                f"{index.path}"
            )
        return 0
    if args._subcommand == "update":
        index, done = update_index(store, args.level, run=run_digest, where=where)
        advice = retrain_advice(index.manifest)
        print(
            f"{index.path}: {done}; {index.ntotal} vectors from {index.manifest['scans']} scan(s)"
            + (f" in {index.manifest['update_seconds']:.2f} s" if done == "extended" else "")
            + (f"; rebuild advised: {advice}" if advice else "")
        )
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
        settings = ", ".join(f"{k} {v}" for k, v in i["params"].items() if v is not None)
        size = f"{i['index_bytes'] / 2**20:.1f} MiB" if i.get("index_bytes") is not None else "size not recorded"
        built = f"{i['build_seconds']:.1f} s" if i.get("build_seconds") is not None else "?"
        print(
            f"index {i['level']}/{i['run']}: {i['kind']}{' (chosen by size)' if i['auto'] else ''} {i['metric']}"
            f"{f' ({settings})' if settings else ''}, {i['vectors']} vectors from {i['scans']} scan(s), {size}, "
            f"built {i['created_at']} in {built}, {_recall_text(i['recall_at_10'], i['recall_queries'])}: "
            f"{'STALE: ' if i['stale'] else ''}{i['state']}"
            + (f"; rebuild advised: {i['retrain']}" if i.get("retrain") else "")
        )


def _recall_text(recall, queries) -> str:
    if recall is None:
        return "recall@10 not measured (too few vectors to hold any out)"
    if not queries:
        return "exact (recall@10 1.0)"
    return f"recall@10 {recall:.3f} at build ({queries} held-out vectors vs exact search)"
