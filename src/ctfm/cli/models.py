"""List, download, convert and initialise model weights.

A weights folder holds config.json (constructor kwargs, as lighter-zoo publishes it),
model.safetensors and ctfm.json (preprocessing, embedding, sha256, provenance). Load one with
create_model("ct-fm", weights="FOLDER") or weights="hf-hub:ORG/NAME".

Examples:
  ctfm models list
  ctfm models download project-lighter/ct_fm_feature_extractor
  ctfm models download ct-fm --out weights/ct-fm
  ctfm models convert epoch=449-step=225000-v1.ckpt --model ct-fm --out weights/ct-fm-pretrain
  ctfm models convert pretrained.ckpt --model ct-fm-segresnet --out weights/seg-init
  ctfm models init ct-fm --seed 0 --out weights/ct-fm-random
  ctfm models init ct-fm --seed 3 --init-filters 8 --out weights/tiny
  ctfm models init ct-fm-segresnet --seed 0 --labels totalseg-v2 --out weights/seg-random

Exit status: 0 on success, 2 for bad input (unknown model, weights that do not fit, no network).
"""

from __future__ import annotations

import argparse
import json

from ctfm.cli import nonnegative_int, positive_int


def add_arguments(parser) -> None:
    from ctfm.cli import add_subcommands

    sub = add_subcommands(parser, "models", noun="action")

    def action(name: str, help_text: str, description: str):
        return sub.add_parser(
            name, help=help_text, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
        )

    p = action(
        "list",
        "list the registered models",
        "List the registered models: name, parameters, preprocessing preset, hub id.\n\nExample:\n  ctfm models list "
        "--json",
    )
    p.add_argument("--json", action="store_true", help="print one JSON list")

    p = action(
        "download",
        "download published weights into the Hugging Face cache or a folder (needs network)",
        "Download ORG/NAME[@REV] (hf-hub: optional, or a model name from `ctfm models list`).\n\n"
        "Examples:\n  ctfm models download project-lighter/ct_fm_feature_extractor\n  ctfm models download ct-fm --out "
        "weights/ct-fm",
    )
    p.add_argument("repo", help="ORG/NAME, hf-hub:ORG/NAME[@REV] or a registered model name")
    p.add_argument("--out", metavar="DIR", help="write a plain weights folder here instead of the Hugging Face cache")

    p = action(
        "convert",
        "convert a CT-FM/Lightning checkpoint (or any weights source) into a weights folder",
        "Load weights strictly into a registered model (CT-FM prefixes model./_orig_mod./backbone./encoder.\n"
        "are converted, the SimCLR projection head is dropped) and write a weights folder with provenance.\n\n"
        "Example:\n  ctfm models convert epoch=449-step=225000-v1.ckpt --model ct-fm --out weights/ct-fm-pretrain",
    )
    p.add_argument("checkpoint", help="a .ckpt/.pt/.pth/.safetensors file, a weights folder or hf-hub:ORG/NAME")
    p.add_argument("--model", default="ct-fm", help="registered model name (default: ct-fm)")
    p.add_argument(
        "--seed",
        type=nonnegative_int,
        default=0,
        help="seed for parts the checkpoint does not hold, e.g. a decoder (default: 0)",
    )
    _add_writing_arguments(p)

    p = action(
        "init",
        "write a randomly initialised weights folder (same seed, same sha256)",
        "Write a registered model with weights from torch.manual_seed(SEED): byte-identical for the same seed.\n\n"
        "Example:\n  ctfm models init ct-fm --seed 3 --init-filters 8 --out weights/tiny",
    )
    p.add_argument("model", help="registered model name, e.g. ct-fm")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default: 0)")
    _add_writing_arguments(p)


def _add_writing_arguments(p) -> None:
    p.add_argument("--out", metavar="DIR", required=True, help="the weights folder to write")
    p.add_argument(
        "--init-filters",
        type=positive_int,
        metavar="N",
        help="width of the first level (default: the model's, 32 for ct-fm)",
    )
    p.add_argument(
        "--out-channels",
        type=positive_int,
        metavar="N",
        help="output classes including background (segmentation models only)",
    )
    p.add_argument(
        "--labels",
        metavar="MAP",
        help="class names written with the weights (segmentation models only): totalseg-v2, a JSON file, or "
        "liver,spleen (0 is background); sets --out-channels",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing weights folder")


def run(args) -> int:
    from ctfm.cli import run_subcommand

    return run_subcommand(args, {"list": _list, "download": _download, "convert": _convert, "init": _init})


def _writing(args) -> dict:
    """The folder-writing options as keyword arguments of the library calls."""
    return {
        "labels": args.labels,
        "overwrite": args.overwrite,
        "init_filters": args.init_filters,
        "out_channels": args.out_channels,
    }


def _list(args) -> int:
    from ctfm.models.manage import model_table

    rows = model_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = {
        "name": "name",
        "params": "params",
        "preprocess": "preprocess",
        "hub_id": "hub id",
        "description": "description",
    }
    cells = [header] + [{**r, "params": f"{r['params']:,}", "hub_id": r["hub_id"] or "-"} for r in rows]
    widths = {k: max(len(str(c[k])) for c in cells) for k in ("name", "params", "preprocess", "hub_id")}
    for c in cells:
        print(
            f"{c['name']:<{widths['name']}}  {c['params']:>{widths['params']}}  "
            f"{c['preprocess']:<{widths['preprocess']}}  {c['hub_id']:<{widths['hub_id']}}  {c['description']}"
        )
    return 0


def _download(args) -> int:
    from ctfm.io.hashing import file_sha256
    from ctfm.models import download_weights
    from ctfm.models.weights import WEIGHTS_NAME

    folder = download_weights(args.repo, out=args.out)
    print(f"{folder}")
    print(f"  {WEIGHTS_NAME} sha256 {file_sha256(folder / WEIGHTS_NAME)}")
    return 0


def _convert(args) -> int:
    from ctfm.models.manage import convert_checkpoint
    from ctfm.models.weights import portable_source

    folder, info = convert_checkpoint(args.checkpoint, args.out, args.model, args.seed, **_writing(args))
    _report(
        folder,
        f"converted {portable_source(args.checkpoint)} ({info.format}, {len(info.ignored_keys)} keys ignored, loaded "
        f"into the {info.loaded_into})",
    )
    return 0


def _init(args) -> int:
    from ctfm.models.manage import init_weights_folder

    folder = init_weights_folder(args.model, args.out, args.seed, **_writing(args))
    _report(folder, f"random initialisation, seed {args.seed}")
    return 0


def _report(folder, what: str) -> None:
    from ctfm.models.weights import SIDECAR_NAME

    sidecar = json.loads((folder / SIDECAR_NAME).read_text())
    print(f"{folder}")
    print(f"  {what}")
    print(
        f"  model {sidecar['model']}, {sidecar['weights']['parameters']:,} parameters, sha256 "
        f"{sidecar['weights']['sha256']}"
    )
