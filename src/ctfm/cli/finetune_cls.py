"""`ctfm finetune cls`: fine-tune a classifier (CT-FM trunk + pooled MLP head) on a manifest.

Examples:
  ctfm finetune cls --preset tiny --set data=cases.csv --set out=runs/tiny-cls
  ctfm finetune cls --preset head-ct --set data=sinoct.csv --set 'labels=["abnormal"]' --set encoder_weights=hf-hub:project-lighter/ct_fm_feature_extractor
  ctfm finetune cls --preset head-ct --set data=sinoct.csv --set percentage=10 --set out=runs/head-ct-10pct
  ctfm finetune cls --preset head-ct --set data=findings.csv --set 'labels=["bleed","fracture"]' --set window_layout=channels

Presets: head-ct (CT-FM's head-CT triage recipe: head-ct preprocessing, 4 windows stacked to
[1, 192, 128, 128], 512->256->1 head, BCE, AdamW 1e-4, warm-up cosine, 40 epochs, best
checkpoint by validation AUROC, batch 16 x 4 GPUs DDP) and tiny (a CPU in seconds). The manifest
(CSV/Parquet) has a path column, label column(s) (0/1 for binary and multi-label, names for
multi-class) and optionally split (train/val/test); without it the reference split is drawn. The
run folder follows `ctfm pretrain`'s conventions; export/ is the classifier
(ctfm predict cls SCANS --model RUN -o preds.csv).
"""

from __future__ import annotations

import argparse


def add_cls(sub) -> None:
    """Register ``ctfm finetune cls`` on the finetune verb's subparsers."""
    from ctfm.cli.pretrain import add_run_arguments

    p = sub.add_parser(
        "cls",
        help="fine-tune a classifier (CT-FM trunk + pooled MLP head)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset", choices=["head-ct", "tiny"], help="start from a preset (default: head-ct unless the file names one)"
    )
    add_run_arguments(p)


def run_cls(args) -> int:
    import ctfm
    from ctfm.finetune.cls import resolve_cls_config
    from ctfm.runs import parse_set

    preset = args.preset or (None if args.config else "head-ct")
    config = resolve_cls_config(preset, args.config, parse_set(args.sets))
    export = ctfm.finetune_cls(config, resume=not args.no_resume)
    print(
        f"done: run folder {config.out}; classifier exported to {export} (use: ctfm predict cls SCANS --model "
        f"{config.out} -o preds.csv)"
    )
    return 0
