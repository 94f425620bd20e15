"""Fine-tune a CT-FM model on labelled scans: `ctfm finetune seg` (segmentation).

Examples:
  ctfm synth --out phantoms --n 3 && ctfm finetune seg --preset tiny --set data=phantoms.csv --set out=runs/tiny-seg
  ctfm finetune seg --preset ct-fm-totalseg --set data=TotalSegmentatorV2/ --set encoder_weights=hf-hub:project-lighter/ct_fm_feature_extractor
  ctfm finetune seg --preset ct-fm-totalseg --set data=TS/ --set percentage=2 --set out=runs/ts-2pct
  ctfm finetune seg --preset ct-fm-msd --set data=Task06_Lung/ --set 'classes=["cancer"]' --set devices=8 --set num_nodes=2
  ctfm finetune seg --config my_run.yaml --set 'freeze=["encoder"]'

Presets: ct-fm-totalseg (CT-FM's TotalSegmentator v2 recipe: 96x160x160 crops centred on
foreground classes, deep-supervision Dice+CE, AdamW 2e-4, warm-up cosine, 300 epochs, validation
every 5 epochs, best checkpoint by macro Dice, 4 GPUs DDP), ct-fm-msd (MSD tumour tasks) and tiny
(a laptop CPU in minutes). Data: a manifest (CSV/Parquet: image, label[, split]), a
TotalSegmentator v2 folder (meta.csv) or an MSD task folder (dataset.json). The run folder gets
config.yaml, metrics.csv, tensorboard/, checkpoints/ (every N epochs, last, best) and export/
(ctfm predict seg SCANS --model RUN). A run whose folder has checkpoints/last.ckpt resumes from it
exactly (--no-resume starts over). Keys and the recipe: docs/finetune.md.
"""

from __future__ import annotations

import argparse


def add_seg(sub) -> None:
    """``ctfm finetune seg``."""
    from ctfm.cli.pretrain import add_run_arguments

    p = sub.add_parser(
        "seg",
        help="fine-tune a segmentation model (SegResNetDS with the CT-FM encoder)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=["ct-fm-totalseg", "ct-fm-msd", "tiny"],
        help="start from a preset (default: ct-fm-totalseg unless the file names one)",
    )
    add_run_arguments(p)


# Tasks register here; each adds its own subcommand (and its run function).
from ctfm.cli.finetune_cls import add_cls  # noqa: E402

TASKS = [add_seg, add_cls]


def add_arguments(parser) -> None:
    from ctfm.cli import add_subcommands

    add_subcommands(parser, "finetune", TASKS, noun="task")


def run(args) -> int:
    from ctfm.cli import finetune_cls, run_subcommand

    return run_subcommand(args, {"seg": run_seg, "cls": finetune_cls.run_cls})


def run_seg(args) -> int:
    import ctfm
    from ctfm.finetune.seg import resolve_seg_config
    from ctfm.runs import parse_set

    preset = args.preset or (None if args.config else "ct-fm-totalseg")
    config = resolve_seg_config(preset, args.config, parse_set(args.sets))
    export = ctfm.finetune_seg(config, resume=not args.no_resume)
    print(
        f"done: run folder {config.out}; model exported to {export} (use: ctfm predict seg SCANS --model {config.out} "
        "-o OUTDIR)"
    )
    return 0
