"""Predict with a segmentation model: label maps on each input's own grid.

Examples:
  ctfm predict seg scan.nii.gz --model RUN_FOLDER -o preds
  ctfm predict seg dicom_tree/ --model hf-hub:project-lighter/whole_body_segmentation --format dicom-seg -o preds
  ctfm predict seg cohort.csv --model weights/seg --classes liver,spleen --statistics -o preds

Each input gets OUT/<name>.nii.gz (uint8/uint16 labels, the input's shape and affine; <name> is
the file name without extension, or the SeriesInstanceUID of a DICOM series) and
OUT/<name>.labels.json; --format dicom-seg adds OUT/<name>.dcm; --statistics adds
OUT/<name>.statistics.json/.csv. Finished inputs are skipped on a re-run. Exit status 1 if any
input failed (recorded in OUT/failures.json), 2 for unusable arguments.
"""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    p = sub.add_parser("seg", help="segmentation label maps", description=__doc__, formatter_class=parser.formatter_class)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders, DICOM trees, or CSV/Parquet manifests with a 'path' column")
    p.add_argument("--model", required=True, metavar="WEIGHTS_OR_RUN", help="a segmentation weights folder, hf-hub:ORG/NAME, a checkpoint, a fine-tuning run folder, or encoder weights with --labels")
    p.add_argument("-o", "--out", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--labels", metavar="MAP", help="class names: totalseg-v2, a JSON file or liver,spleen (default: those recorded with the weights)")
    p.add_argument("--format", dest="output_format", default="nifti", choices=["nifti", "dicom-seg"], help="nifti (default) or dicom-seg (also writes the NIfTI)")
    p.add_argument("--classes", metavar="NAMES", help="keep only these classes, e.g. liver,spleen (the others become background)")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the weights', 0.625)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="fp32 (default) or bf16 autocast")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--statistics", action="store_true", help="per-class volume (ml), mean/sd HU and voxel count as JSON and CSV")
    p.add_argument("--overwrite", action="store_true", help="predict again even where outputs exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ctfm.predict.seg import predict_seg

    summary = predict_seg(
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
    )
    print(f"predicted {summary.done} input(s), skipped {summary.skipped} already done, {len(summary.failed)} failed; {summary.seconds:.1f} s; outputs in {args.out}")
    for _source, message in summary.failed:
        print(f"error: {message}", file=sys.stderr)
    return 1 if summary.failed else 0
