"""Pretrain a CT foundation model with intra-sample contrastive learning (CT-FM's method).

Examples:
  ctfm pretrain --preset tiny --set data=scans/ --set out=runs/tiny
  ctfm pretrain --config my_run.yaml --set max_steps=1000
  ctfm pretrain --preset ct-fm --set data=cohort.parquet --set out=runs/ctfm --set devices=8 --set num_nodes=2

Presets: ct-fm (CT-FM's run: 500 epochs x 500 steps, 4 GPUs x 4 scans, fp16 mixed, DDP,
sync BN) and tiny (a laptop CPU). A config file (YAML or JSON, values only) may name a preset
with `preset: tiny`. Keys: see README; the recipe: docs/recipe.md. The run folder gets config.yaml, metrics.csv,
tensorboard/, checkpoints/ (every N epochs + last) and export/ (ctfm embed --weights RUN/export).
A run whose folder has checkpoints/last.ckpt resumes from it exactly (--no-resume starts over).
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument(
        "--preset", choices=["ct-fm", "tiny"], help="start from a preset (default: ct-fm unless the file names one)"
    )
    add_run_arguments(parser)


def add_run_arguments(parser) -> None:
    """The options of every training verb (``ctfm pretrain``, ``ctfm finetune TASK``): --config, --set, --no-resume."""
    config_help = "YAML or JSON config (values only); may name a preset with `preset: NAME`"
    parser.add_argument("--config", metavar="FILE", help=config_help)
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (JSON value or string); repeatable",
    )
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints/last.ckpt in the run folder")


def run(args) -> int:
    import ctfm
    from ctfm.pretrain.config import resolve_pretrain_config
    from ctfm.runs import parse_set

    preset = args.preset or (None if args.config else "ct-fm")
    config = resolve_pretrain_config(preset, args.config, parse_set(args.sets))
    export = ctfm.pretrain(config, resume=not args.no_resume)
    print(
        f"done: run folder {config.out}; encoder exported to {export} (use: ctfm embed SCANS --weights {export} --out "
        "STORE)"
    )
    return 0
