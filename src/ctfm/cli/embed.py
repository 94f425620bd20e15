"""Embed CT scans into a store: files, folders, DICOM trees (series found recursively), manifests.

Examples:
  ctfm embed scans/ --weights hf-hub:project-lighter/ct_fm_feature_extractor --out store
  ctfm embed cohort.csv --weights model_dir --mode patches --pool min --out store
  ctfm models init ct-fm --seed 0 --out random_ct_fm && ctfm embed scan.nii.gz --weights random_ct_fm --out store
  ctfm embed archive/ --weights model_dir --out store --accelerator gpu --devices 4 --strategy ddp

The store is a folder (scans.parquet, patches.parquet, failures.parquet; schema in docs/store.md).
Re-running skips scans already in the store. Exit status 1 if any scan failed (each failure is
recorded with its error), 2 for unusable arguments.
"""

from __future__ import annotations

import sys

from ctfm.cli import accelerator, device, fraction, nonnegative_int, positive_int
from ctfm.cli.pacs_options import add_pacs_arguments


def add_arguments(parser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="files, folders, DICOM trees, or CSV/Parquet manifests with a 'path' column",
    )
    parser.add_argument("--model", default="ct-fm", help="registered model (default ct-fm)")
    parser.add_argument(
        "--weights",
        help="model folder, hf-hub:ORG/NAME, .safetensors or .ckpt (default: random init, for testing only)",
    )
    parser.add_argument(
        "--mode",
        default="whole",
        choices=["whole", "patches"],
        help="whole: one 512-d vector per scan (1 mm, 320^3); patches: sliding windows at 3x1x1 mm",
    )
    parser.add_argument("--out", required=True, metavar="STORE", help="store folder")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "auto"],
        help="fp32 (default), bf16 autocast, or auto: bf16 where the device computes it natively",
    )
    parser.add_argument("--device", type=device, default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--preset",
        help="preprocessing preset overriding the one recorded with the weights (CT-FM weights: ct-fm-1mm-320 for "
        "whole, ct-fm-patches for patches); warned when it differs",
    )
    parser.add_argument("--overlap", type=fraction, default=0.0, help="patch overlap fraction (patches mode)")
    parser.add_argument(
        "--pool",
        default="mean",
        choices=["mean", "max", "min"],
        help="how patch vectors make the scan vector (3D-MIR uses min)",
    )
    parser.add_argument(
        "--seed",
        type=nonnegative_int,
        default=None,
        help="seed of the random init when --weights is not given (default 0, as ctfm.embed)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_pacs_arguments(parser)
    dist = parser.add_argument_group("past one machine (Lightning)")
    dist.add_argument(
        "--devices", type=positive_int, default=None, help="processes/GPUs per node; >1 runs under Lightning DDP"
    )
    dist.add_argument("--num-nodes", type=positive_int, default=1)
    dist.add_argument("--strategy", default=None, help="Lightning strategy, e.g. ddp")
    dist.add_argument("--accelerator", type=accelerator, default=None, help="Lightning accelerator: cpu or gpu")


def run(args) -> int:
    import ctfm

    distributed = None
    if (args.devices or 1) > 1 or args.num_nodes > 1 or args.strategy is not None:
        distributed = {"devices": args.devices or 1, "num_nodes": args.num_nodes}
        if args.accelerator:
            distributed["accelerator"] = args.accelerator
        if args.strategy:
            distributed["strategy"] = args.strategy
    run = ctfm.embed(
        args.inputs,
        model=args.model,
        weights=args.weights,
        mode=args.mode,
        out=args.out,
        precision=args.precision,
        device=args.device,
        overlap=args.overlap,
        pool=args.pool,
        preset=args.preset,
        **({"seed": args.seed} if args.seed is not None else {}),
        progress=not args.no_progress,
        distributed=distributed,
        return_records=False,
    )
    summary = run.totals
    if summary is None:  # not global rank 0: rank 0 reports
        return 0
    print(f"{summary.summary()}; preprocessing {run.spec.name}; store: {args.out}")
    for _source, message in summary.failed:
        print(f"error: {message}", file=sys.stderr)
    return 1 if summary.failed else 0
