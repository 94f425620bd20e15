"""Run a listening DICOM node: receive series by C-STORE, embed / predict each, send results back.

Examples:
  ctfm listen --aet CTFM --port 11112 --spool node/ --embed store/ --weights model_dir
  ctfm listen --port 11112 --spool node/ --predict seg_model --send dicomweb:http://127.0.0.1:8042/dicom-web
  ctfm listen --port 11112 --spool node/ --embed store/ --weights W --allow-aet ORTHANC --idle 5

A series is complete after --idle seconds without a new instance; each ends with one log line
(UIDs, instances, timings, outcome). The node binds 127.0.0.1 unless --host says otherwise, and
refuses callers not named by --allow-aet when it is given. Stop it with Ctrl-C or SIGTERM; a
series received but not finished is picked up at the next start. See docs/pacs.md.
"""

from __future__ import annotations

import signal
import sys

from ctfm.cli.pacs_options import add_pacs_arguments


def add_arguments(parser) -> None:
    parser.add_argument("--aet", default="CTFM", help="the node's AE title (default CTFM)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112; 0: a free one)")
    parser.add_argument("--spool", required=True, metavar="DIR", help="folder for received series and their records")
    parser.add_argument("--idle", type=float, default=10.0, metavar="SECONDS", help="a series is complete after this")
    parser.add_argument("--allow-aet", action="append", default=[], metavar="AET", help="accept only these callers")
    parser.add_argument("--embed", metavar="STORE", help="embed each series into this store")
    parser.add_argument("--weights", help="encoder weights for --embed (default: random init, testing only)")
    parser.add_argument("--model", default="ct-fm", help="registered encoder model for --embed (default ct-fm)")
    parser.add_argument("--predict", metavar="MODEL", help="segmentation model run on each series (DICOM SEG out)")
    parser.add_argument("--send", metavar="DEST", help="send each SEG and its measurement report to DEST")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--max-series", type=int, default=None, help="stop after this many series (default: never)")
    add_pacs_arguments(parser)


def run(args) -> int:
    import ctfm
    from ctfm.node import NodeConfig

    config = NodeConfig(
        spool=args.spool,
        aet=args.aet,
        host=args.host,
        port=args.port,
        idle_s=args.idle,
        allow_aets=tuple(args.allow_aet),
        embed_store=args.embed,
        weights=args.weights,
        model=args.model,
        predict_model=args.predict,
        send=args.send,
        device=args.device,
        max_series=args.max_series,
    )

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)

    def log(line: str) -> None:
        print(line, flush=True)

    summary = ctfm.listen(config, log=log)
    print(summary.summary(), flush=True)
    for series_uid, message in summary.failed:
        print(f"error: series {series_uid}: {message}", file=sys.stderr)
    return 1 if summary.failed else 0
