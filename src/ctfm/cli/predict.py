"""Predict with fine-tuned models: `ctfm predict cls` (classification).

Examples:
  ctfm predict cls scans/ --model runs/head-ct -o preds.csv
  ctfm predict cls cohort.csv scan.nii.gz --model runs/head-ct/export -o preds.csv --device cpu

Inputs are those of `ctfm embed` (files, folders, DICOM trees, manifests with a path column).
One row per input: path, series_uid, scan_id, the probability of each label, the predicted
label(s), and the error of a scan that could not be read (exit 1 if any failed). preds.csv.json
records the provenance (model, weights sha256, preprocessing hash, version, inputs).
"""

from __future__ import annotations

import argparse
import sys


def add_cls(sub) -> None:
    from ctfm.cli import predict as this

    p = sub.add_parser("cls", help="class probabilities per scan from a `ctfm finetune cls` model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders, DICOM trees, or CSV/Parquet manifests with a 'path' column")
    p.add_argument("--model", required=True, metavar="RUN", help="run folder of ctfm finetune cls, or its export/ folder")
    p.add_argument("-o", "--out", required=True, metavar="CSV", help="predictions CSV")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(_task_run=this.run_cls)


# Tasks register here; each adds its own subcommand (and its run function).
TASKS = [add_cls]


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="task", metavar="TASK")
    for add in TASKS:
        add(sub)


def run(args) -> int:
    if not getattr(args, "_task_run", None):
        from ctfm.errors import OptionError

        raise OptionError("ctfm predict needs a task: cls (see ctfm predict --help)")
    return args._task_run(args)


def run_cls(args) -> int:
    from ctfm.predict.cls import predict_cls

    summary = predict_cls(args.inputs, args.model, args.out, device=args.device, progress=not args.no_progress)
    print(f"predicted {summary.rows - len(summary.failed)} scan(s), {len(summary.failed)} failed; wrote {summary.out}")
    for _source, message in summary.failed:
        print(f"error: {message}", file=sys.stderr)
    return 1 if summary.failed else 0
