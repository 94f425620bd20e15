"""Write labelled synthetic torso phantoms (image + label map with names), for demos and tests.

Synthetic data is never evidence about real scans.

Examples:
  ctfm synth --out phantoms --n 5 --seed 0
"""

from __future__ import annotations

from ctfm.cli import nonnegative_int, positive_int


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=positive_int, default=1, help="number of phantoms (default 1)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="first seed (default 0)")


def run(args) -> int:
    from ctfm.synth import make_phantom, write_phantom

    for seed in range(args.seed, args.seed + args.n):
        image_path, labels_path = write_phantom(make_phantom(seed=seed), args.out, stem=f"phantom_seed{seed}")
        print(f"wrote {image_path} and {labels_path}")
    return 0
