"""Predict with fine-tuned models: `ctfm predict seg` (label maps) and `ctfm predict cls` (probabilities).

Examples:
  ctfm predict seg scan.nii.gz --model RUN_FOLDER -o preds
  ctfm predict seg dicom_tree/ --model hf-hub:project-lighter/whole_body_segmentation --format dicom-seg -o preds
  ctfm predict seg cohort.csv --model weights/seg --classes liver,spleen --statistics -o preds
  ctfm predict cls scans/ --model runs/head-ct -o preds.csv

seg: each input gets OUT/<name>.nii.gz (uint8/uint16 labels, the input's shape and affine; <name>
is the file name without extension, or the SeriesInstanceUID of a DICOM series, derived from its
content where blank) and OUT/<name>.labels.json; --format dicom-seg adds OUT/<name>.dcm, one frame
per acquired slice (tilted series included), blank source UIDs derived and recorded in the
labels.json; inputs no SEG can be built over are refused before the model is loaded;
--statistics adds OUT/<name>.statistics.json/.csv. Finished inputs are skipped on a re-run.
cls: one row per input with the probability of each label (preds.csv.json: provenance).
Inputs are those of `ctfm embed` (files, folders, DICOM trees, manifests with a path column).
Exit status 1 if any input failed (recorded), 2 for unusable arguments.
"""

from __future__ import annotations

import argparse
import sys

from ctfm.cli import device, fraction
from ctfm.cli.pacs_options import add_pacs_arguments


def add_seg(sub) -> None:
    p = sub.add_parser(
        "seg",
        help="segmentation label maps on each input's own grid",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="files, folders, DICOM trees, or CSV/Parquet manifests with a 'path' column",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="WEIGHTS_OR_RUN",
        help="a segmentation weights folder, hf-hub:ORG/NAME, a checkpoint, a fine-tuning run folder, or encoder "
        "weights with --labels",
    )
    p.add_argument("-o", "--out", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument(
        "--labels",
        metavar="MAP",
        help="class names: totalseg-v2, a JSON file or liver,spleen (default: those recorded with the weights)",
    )
    p.add_argument(
        "--format",
        dest="output_format",
        default="nifti",
        choices=["nifti", "dicom-seg"],
        help="nifti (default) or dicom-seg (also writes the NIfTI)",
    )
    p.add_argument(
        "--classes", metavar="NAMES", help="keep only these classes, e.g. liver,spleen (the others become background)"
    )
    p.add_argument(
        "--overlap", type=fraction, default=None, help="sliding-window overlap (default: the weights', 0.625)"
    )
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="fp32 (default) or bf16 autocast")
    p.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--statistics", action="store_true", help="per-class volume (ml), mean/sd HU and voxel count as JSON and CSV"
    )
    p.add_argument("--overwrite", action="store_true", help="predict again even where outputs exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--send",
        metavar="DEST",
        help="send each DICOM SEG and its TID 1500 measurement report to a PACS: dicomweb:URL (STOW-RS) or "
        "dimse://AET@HOST:PORT (C-STORE); needs --format dicom-seg",
    )
    add_pacs_arguments(p)


def add_cls(sub) -> None:
    p = sub.add_parser(
        "cls",
        help="class probabilities per scan from a `ctfm finetune cls` model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="files, folders, DICOM trees, or CSV/Parquet manifests with a 'path' column",
    )
    p.add_argument(
        "--model", required=True, metavar="RUN", help="run folder of ctfm finetune cls, or its export/ folder"
    )
    p.add_argument("-o", "--out", required=True, metavar="CSV", help="predictions CSV")
    p.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")
    add_pacs_arguments(p)


# Tasks register here; each adds its own subcommand (and its run function).
TASKS = [add_seg, add_cls]


def add_arguments(parser) -> None:
    from ctfm.cli import add_subcommands

    add_subcommands(parser, "predict", TASKS, noun="task")


def run(args) -> int:
    from ctfm.cli import run_subcommand

    return run_subcommand(args, {"seg": run_seg, "cls": run_cls})


def run_cls(args) -> int:
    import ctfm

    summary = ctfm.predict_cls(args.inputs, args.model, args.out, device=args.device, progress=not args.no_progress)
    print(summary.summary())
    for _source, message in summary.failed:
        print(f"error: {message}", file=sys.stderr)
    return 1 if summary.failed else 0


def run_seg(args) -> int:
    import ctfm

    summary = ctfm.predict_seg(
        args.inputs,
        model=args.model,
        out=args.out,
        labels=args.labels,
        output_format=args.output_format,
        classes=args.classes,
        overlap=args.overlap,
        precision=args.precision,
        device=args.device,
        statistics=args.statistics,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        send=args.send,
    )
    print(summary.summary())
    for _source, message in summary.failed:
        print(f"error: {message}", file=sys.stderr)
    return 1 if summary.failed else 0
