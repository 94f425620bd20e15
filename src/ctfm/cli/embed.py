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


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders, DICOM trees, or CSV/Parquet manifests with a 'path' column")
    parser.add_argument("--model", default="ct-fm", help="registered model (default ct-fm)")
    parser.add_argument("--weights", help="model folder, hf-hub:ORG/NAME, .safetensors or .ckpt (default: random init, for testing only)")
    parser.add_argument("--mode", default="whole", choices=["whole", "patches"], help="whole: one 512-d vector per scan (1 mm, 320^3); patches: sliding windows at 3x1x1 mm")
    parser.add_argument("--out", required=True, metavar="STORE", help="store folder")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--preset", help="preprocessing preset (default: ct-fm-1mm-320 for whole, ct-fm-patches for patches)")
    parser.add_argument("--overlap", type=float, default=0.0, help="patch overlap fraction (patches mode)")
    parser.add_argument("--pool", default="mean", choices=["mean", "max", "min"], help="how patch vectors make the scan vector (3D-MIR uses min)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init when --weights is not given")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    dist = parser.add_argument_group("past one machine (Lightning)")
    dist.add_argument("--devices", type=int, default=None, help="processes/GPUs per node; >1 runs under Lightning DDP")
    dist.add_argument("--num-nodes", type=int, default=1)
    dist.add_argument("--strategy", default=None, help="Lightning strategy, e.g. ddp")
    dist.add_argument("--accelerator", default=None, help="Lightning accelerator: cpu or gpu")


def run(args) -> int:
    import torch

    from ctfm.embedding.modes import EmbedOptions
    from ctfm.embedding.runner import discover_inputs, pending_sources, run_sources
    from ctfm.models import create_model
    from ctfm.preprocess import get_preset
    from ctfm.store import EmbeddingStore

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = EmbedOptions(
        mode=args.mode,
        spec=get_preset(args.preset) if args.preset else None,
        precision=args.precision,
        device=device,
        overlap=args.overlap,
        pool=(args.pool,),
    )
    sources = discover_inputs(args.inputs)
    if args.weights is None:
        torch.manual_seed(args.seed)
        print(f"note: no --weights given: {args.model} with random weights (seed {args.seed}); use --weights hf-hub:... for CT-FM", file=sys.stderr)
    encoder = create_model(args.model, weights=args.weights).eval()
    store = EmbeddingStore(args.out)
    todo = pending_sources(sources, store, encoder, args.model, options)
    skipped = len(sources) - len(todo)
    distributed = (args.devices or 1) > 1 or args.num_nodes > 1 or args.strategy is not None
    if distributed:
        from ctfm.embedding.distributed import run_distributed

        trainer_kwargs = {"devices": args.devices or 1, "num_nodes": args.num_nodes, "accelerator": args.accelerator or ("gpu" if device == "cuda" else "cpu")}
        if args.strategy:
            trainer_kwargs["strategy"] = args.strategy
        summary = run_distributed(todo, encoder, args.model, options, store, trainer_kwargs, progress=not args.no_progress)
        if summary is None:  # not global rank 0: rank 0 reports
            return 0
    else:
        summary = run_sources(todo, encoder.to(device), args.model, options, store, progress=not args.no_progress, skip_done=False)
        store.compact()
    summary.skipped += skipped
    rate = summary.done / summary.seconds if summary.seconds else 0.0
    print(f"embedded {summary.done} scan(s), skipped {summary.skipped} already in the store, {len(summary.failed)} failed" + (f"; {rate:.2f} scans/s" if summary.done else "") + f"; store: {args.out}")
    for source, message in summary.failed:
        print(f"error: {message}", file=sys.stderr)
    return 1 if summary.failed else 0
