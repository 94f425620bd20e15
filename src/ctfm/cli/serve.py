"""Serve the semantic-search app over a store: one page and a JSON API, in the browser.

Examples:
  ctfm serve store/                                  http://127.0.0.1:8000 (this machine only)
  ctfm serve store/ --weights model_dir --port 8080  the weights the store was embedded with
  ctfm serve store/ --host 0.0.0.0                   other machines too: the printed address carries a token
  ctfm serve store/ --host 0.0.0.0 --token-file tok  the token kept in a file of yours

The store needs patch embeddings (ctfm embed ... --mode patches --out STORE). Click a point in a
scan to find the most similar places in every scan of the store; upload a NIfTI file or a zipped
DICOM series to add it. The API is described at /docs (bundled, works offline) and /openapi.json.
The server answers only its own page (Host and Origin checks); bound to anything but 127.0.0.1 it
needs a token as well (docs/app.md, "Security").
"""

from __future__ import annotations

import sys

from ctfm.cli import device, nonnegative_float, port, positive_float, positive_int


def add_arguments(parser) -> None:
    parser.add_argument("store", metavar="STORE", help="store folder with patch embeddings")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=port, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument(
        "--max-upload-mb", type=positive_float, default=512, help="largest upload accepted, MiB (default 512)"
    )
    parser.add_argument(
        "--max-voxels",
        type=positive_int,
        default=None,
        help="largest scan an upload may hold, in voxels, read from its headers before decoding (default 536870912 "
        "= 512x512x2048); the server's free memory is checked as well",
    )
    parser.add_argument(
        "--search-seconds",
        type=positive_float,
        default=None,
        help="time budget of a search that runs the encoder (fine refinement, centred query), waiting for it "
        "included (default 30)",
    )
    parser.add_argument(
        "--token-file",
        help="file whose first line is the token every API request needs (default when bound to anything but "
        "127.0.0.1: a random token, printed in the address)",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name the server is reached by (the Host header it may carry; repeatable)",
    )
    parser.add_argument("--debug", action="store_true", help="print the traceback of an internal error")
    parser.add_argument(
        "--weights",
        help="the weights the store was embedded with (folder, hf-hub:ORG/NAME, file), checked against the store: "
        "needed for uploads and centred query windows (a store embedded with ctfm's seeded random init needs none)",
    )
    from ctfm.cli.selection import add_run_selection

    add_run_selection(
        parser,
        run_help="the patch-level run to serve when the store holds several: its digest or a unique prefix (`ctfm "
        "store info` lists them)",
    )
    parser.add_argument(
        "--query",
        default="stored",
        choices=["stored", "centred"],
        help="default query vector: stored (the query scan's stored window nearest the click; milliseconds) or centred "
        "(the window centred on the click, embedded: the reference protocol, about a second or more per click on "
        "a CPU); the page can switch",
    )
    parser.add_argument(
        "--refine",
        default="weighted",
        choices=["weighted", "fine", "none"],
        help="how hits move from their best window to a point (default weighted: no model run; fine: pattern search "
        "with the encoder, slow on a CPU)",
    )
    parser.add_argument(
        "--display-cache-gb",
        type=nonnegative_float,
        default=20.0,
        help="disk budget for scans converted for display in STORE/app-cache (default 20 GiB); past it scans are read "
        "from their sources when chosen",
    )
    parser.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda if available)")


def run(args) -> int:
    import ctfm
    from ctfm.cli.selection import run_selection

    run_digest, where = run_selection(args)

    limits = {"max_voxels": args.max_voxels, "search_seconds": args.search_seconds}

    def announce(url: str, state) -> None:
        if args.host in ("127.0.0.1", "localhost", "::1"):
            reach = "this machine only"
        elif args.token_file:
            reach = f"reachable from other machines with the token of {args.token_file}"
        else:
            reach = "reachable from other machines with the token in this address"
        base = url.split("/?", 1)[0]
        print(
            f"serving {len(state.rows)} scan(s) of {args.store} at {url} (bound to {args.host}, {reach}); API at "
            f"{base}/docs; Ctrl-C stops",
            flush=True,
        )
        if state.weights_note:
            print(f"warning: {state.weights_note}", file=sys.stderr, flush=True)

    ctfm.serve(
        args.store,
        host=args.host,
        port=args.port,
        max_upload_mb=args.max_upload_mb,
        weights=args.weights,
        run=run_digest,
        where=where,
        device=args.device,
        query_from=args.query,
        refine=args.refine,
        display_cache_gb=args.display_cache_gb,
        token_file=args.token_file,
        allow_hosts=args.allow_host,
        debug=args.debug,
        on_start=announce,
        **{k: v for k, v in limits.items() if v is not None},
    )
    return 0
