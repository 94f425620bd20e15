"""Proof that pretraining learns: frozen patch embeddings after a short CPU pretraining against the
same architecture at random initialisation, on organ identification in abdomen_3mm.

1. Pretrain a narrow CT-FM encoder (init_filters 8) with ctfm's intra-sample NT-Xent on the real
   scans of ../shared/data, for at most ``--minutes`` on the CPU. abdomen_3mm is left out of
   pretraining, so the evaluation scan is never seen.
2. Evaluation data: ``abdomen_3mm/example_ct_sm.nii.gz`` with its organ labels
   (``example_seg.nii.gz``), both put on the ct-fm-ssl grid (SPL, 3x1x1 mm; labels nearest).
   Patches centred in organs, at three sizes (8x32x32, 8x64x64 and 8x128x128 voxels: 24 mm deep,
   32, 64 and 128 mm wide); train patches lie wholly in the superior half of the volume, test
   patches wholly in the inferior half, so no train and test patch share a voxel. Five draws of
   patch centres per size.
3. Probes on frozen embeddings (the library's, ``ctfm.evaluate.probes.probe``, with fixed
   hyperparameters; ``probe_real.py`` runs the full ``ctfm probe`` protocol with CIs): kNN (k=5,
   cosine) and logistic regression (standardised, C=1);
   balanced accuracy, mean and spread over the draws, for the random initialisation and the
   exported encoder at every size, and for every periodic checkpoint at ``--checkpoint-patches``.

    python benchmarks/pretrain_learns.py [--data ../shared/data] [--minutes 18] [--out runs/learns]
        [--patches 8x64x64] [--set lr=1e-3]
"""

from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_SCANS = [
    "lung_tumour_nrrd/lung1_image.nrrd",
    "head_tilt_dicom/dicom",
    "abdomen_dicom/dicom",
    "sarcoma_ct/STS_019/CT_image.nii.gz",
    "sarcoma_ct/STS_025/CT_image.nii.gz",
    "whole_scans_1p5mm/neck_a.nii.gz",
    "whole_scans_1p5mm/lumbar_pelvis.nii.gz",
    "liver_3slice_dicomseg/dicom",
]
PATCHES = [(8, 32, 32), (8, 64, 64), (8, 128, 128)]  # evaluation patch sizes (D, H, W voxels at 3x1x1 mm)
MIN_VOXELS = 200  # an organ needs this many voxels in each slab to be a class
PER_CLASS = 40
DRAWS = 5  # independent draws of patch centres


def evaluation_volume(data: Path):
    """(image [D, H, W] in [0, 1], label map [D, H, W], {label: name}) of abdomen_3mm on the ct-fm-ssl grid."""
    from monai.transforms import Orientation, ScaleIntensityRange, Spacing

    from ctfm.io import load_ct, load_labels

    image, _ = load_ct(data / "abdomen_3mm" / "example_ct_sm.nii.gz")
    labels = load_labels(data / "abdomen_3mm" / "example_seg.nii.gz", image)
    axes = (("L", "R"), ("P", "A"), ("I", "S"))
    img = ScaleIntensityRange(-1024, 2048, 0, 1, clip=True)(
        Spacing((3, 1, 1), mode="bilinear")(Orientation("SPL", labels=axes)(image))
    )
    lab = Spacing((3, 1, 1), mode="nearest")(Orientation("SPL", labels=axes)(labels.labels.float()))
    return np.asarray(img[0]), np.asarray(lab[0]).round().astype(int), labels.names


def evaluation_patches(volume, seed: int = 0, patch=PATCHES[0]):
    """(train_patches, train_labels, test_patches, test_labels, class_names) from ``evaluation_volume``:
    PER_CLASS patches per organ and slab, centres drawn with ``seed``."""
    img, lab, label_names = volume
    depth = img.shape[0]
    half = patch[0] // 2
    # Centres whose patches stay inside one slab: train rows [0, split), test rows [split, depth).
    split = depth // 2
    slabs = {"train": (half, split - half), "test": (split + half, depth - half)}
    rng = np.random.default_rng(seed)
    chosen = {}
    for name, (lo, hi) in slabs.items():
        mask = np.zeros_like(lab, dtype=bool)
        mask[
            lo : hi + 1, patch[1] // 2 : lab.shape[1] - patch[1] // 2, patch[2] // 2 : lab.shape[2] - patch[2] // 2
        ] = True
        chosen[name] = {c: np.argwhere((lab == c) & mask) for c in np.unique(lab[mask]) if c > 0}
    classes = sorted(
        c
        for c in chosen["train"]
        if len(chosen["train"][c]) >= MIN_VOXELS and len(chosen["test"].get(c, [])) >= MIN_VOXELS
    )
    out = []
    for name in ("train", "test"):
        patches, targets = [], []
        for k, c in enumerate(classes):
            points = chosen[name][c][
                rng.choice(len(chosen[name][c]), size=min(PER_CLASS, len(chosen[name][c])), replace=False)
            ]
            for d, h, w in points:
                patches.append(
                    img[
                        d - half : d + half,
                        h - patch[1] // 2 : h + patch[1] // 2,
                        w - patch[2] // 2 : w + patch[2] // 2,
                    ]
                )
                targets.append(k)
        out += [np.stack(patches)[:, None].astype(np.float32), np.asarray(targets)]
    names = [label_names.get(int(c), str(c)) for c in classes]
    return (*out, names)


def embed(encoder, patches: np.ndarray) -> np.ndarray:
    encoder.eval()
    with torch.inference_mode():
        return torch.cat(
            [encoder.embed(torch.from_numpy(patches[i : i + 64])) for i in range(0, len(patches), 64)]
        ).numpy()


def probe(train_x, train_y, test_x, test_y) -> dict[str, float]:
    """Balanced accuracy of the library's kNN (k = 5, cosine) and logistic (standardised, C = 1)
    probes with this benchmark's fixed hyperparameters (``probe_real.py`` chooses them by inner CV)."""
    from sklearn.metrics import balanced_accuracy_score

    from ctfm.evaluate.probes.probe import KNNPath, LogisticPath

    n_classes = int(max(train_y.max(), test_y.max())) + 1
    knn = KNNPath().fit_predict(train_x, train_y, test_x, n_classes, 5)
    logistic = LogisticPath().fit_predict(train_x, train_y, test_x, n_classes, 1.0)
    return {
        "knn": balanced_accuracy_score(test_y, knn.argmax(1)),
        "logistic": balanced_accuracy_score(test_y, logistic.argmax(1)),
    }


BENCHMARK_SETTINGS = {
    # Crops at the scale of the evaluation patches, many per scan (more same-scan negatives), and a
    # cosine schedule sized to what fits in the time budget (the timer stops the run).
    "model_kwargs": {"init_filters": 8},
    "crop_size": [8, 32, 32],
    "num_crops": 12,
    "batch_size": 4,
    "steps_per_epoch": 25,
    "max_epochs": 80,
    "warmup_epochs": 1,
    "lr": 5e-4,
    "checkpoint_every_n_epochs": 10,
}


def patch_sizes(text: str) -> list[tuple[int, int, int]]:
    """ "8x32x32,8x64x64" -> [(8, 32, 32), (8, 64, 64)]."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def encoder_from_checkpoint(path: Path, model_kwargs: dict):
    """The encoder of a Lightning checkpoint (weights only), as ``create_model`` builds it."""
    from ctfm.models import create_model

    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    encoder = create_model("ct-fm", **model_kwargs)
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")})
    return encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--minutes", type=float, default=18.0)
    parser.add_argument("--out", default="runs/pretrain_learns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--patches", type=patch_sizes, default=PATCHES, help="evaluation patch sizes in voxels, e.g. 8x32x32,8x64x64"
    )
    parser.add_argument(
        "--checkpoint-patches",
        type=patch_sizes,
        default=[PATCHES[1]],
        help="patch sizes at which the periodic checkpoints are also evaluated (default 8x64x64; the 8x128x128 "
        "evaluation takes minutes per encoder)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a pretraining setting (as ctfm pretrain --set)",
    )
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)

    from lightning.pytorch.callbacks import Timer

    from ctfm.pretrain.cache import build_cache
    from ctfm.pretrain.config import resolve_pretrain_config
    from ctfm.pretrain.train import build_module, pretrain
    from ctfm.runs import parse_set

    build_cache([str(data / rel) for rel in PRETRAIN_SCANS], out / "cache", progress=False)
    config = resolve_pretrain_config(
        "tiny",
        overrides={
            **BENCHMARK_SETTINGS,
            "data": str(out / "cache"),
            "out": str(out),
            "seed": args.seed,
            **parse_set(args.set),
        },
    )
    started = time.time()
    export = pretrain(
        config, resume=False, extra_callbacks=[Timer(duration={"minutes": args.minutes})], progress_bar=False
    )
    minutes = (time.time() - started) / 60

    from ctfm.models import create_model

    torch.manual_seed(args.seed)
    random_encoder = build_module(config).encoder  # the same initialisation the run started from
    # Every periodic checkpoint (accuracy against pretraining time), then the exported encoder.
    encoders = [("random init", 0.0, random_encoder)]
    for ckpt in sorted((out / "checkpoints").glob("epoch=*.ckpt"), key=lambda p: p.stat().st_mtime):
        encoders.append(
            (ckpt.stem, (ckpt.stat().st_mtime - started) / 60, encoder_from_checkpoint(ckpt, config.model_kwargs))
        )
    encoders.append(("pretrained (export)", minutes, create_model("ct-fm", weights=str(export))))
    # Each patch size: DRAWS draws of patch centres; accuracies are means (and spreads) over the draws.
    volume = evaluation_volume(data)
    evaluations = {}
    for patch in args.patches:
        draws = [evaluation_patches(volume, seed, patch) for seed in range(args.seed, args.seed + DRAWS)]
        results = {}
        for label, _, encoder in encoders:
            if label not in ("random init", "pretrained (export)") and patch not in args.checkpoint_patches:
                continue
            scores = [probe(embed(encoder, tx), ty, embed(encoder, vx), vy) for tx, ty, vx, vy, _ in draws]
            results[label] = {
                k: (100 * np.mean([d[k] for d in scores]), 100 * np.std([d[k] for d in scores]))
                for k in ("knn", "logistic")
            }
        evaluations[patch] = (draws[0][4], len(draws[0][1]), len(draws[0][3]), results)

    losses = []
    with open(out / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            if row.get("train/loss_epoch"):
                losses.append((int(row["epoch"]), float(row["train/loss_epoch"])))
    overrides = parse_set(args.set)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"pretraining: {minutes:.1f} min, {len(losses)} epochs x {config.steps_per_epoch} steps, {len(PRETRAIN_SCANS)} "
        f"scans, crops {config.num_crops} x {config.crop_size}, batch {config.batch_size}, lr {config.lr}"
        + (f", overrides {overrides}" if overrides else "")
    )
    for patch, (names, n_train, n_test, results) in evaluations.items():
        mm = tuple(round(v * m) for v, m in zip(patch, (3, 1, 1)))
        print(f"\n### patches of {patch[0]}x{patch[1]}x{patch[2]} voxels ({mm[0]}x{mm[1]}x{mm[2]} mm)\n")
        print(
            f"{len(names)} organs ({', '.join(names)}); {n_train} train / {n_test} test patches per draw, {DRAWS} "
            "draws\n"
        )
        print(
            "| encoder | minutes of pretraining | kNN balanced accuracy (mean ± sd) | logistic balanced accuracy (mean "
            "± sd) |"
        )
        print("|---|---|---|---|")
        for label, at, _ in encoders:
            if label not in results:
                continue
            r = results[label]
            print(
                f"| {label} | {at:.1f} | {r['knn'][0]:.1f} ± {r['knn'][1]:.1f} | {r['logistic'][0]:.1f} ± "
                f"{r['logistic'][1]:.1f} |"
            )
        final, base = results["pretrained (export)"], results["random init"]
        print(
            f"\ngain of the exported encoder: kNN {final['knn'][0] - base['knn'][0]:+.1f} points, logistic "
            f"{final['logistic'][0] - base['logistic'][0]:+.1f} points"
        )
    step = max(1, len(losses) // 12)
    print(
        "\nloss curve (epoch: mean train loss): "
        + ", ".join(
            f"{e}: {v:.3f}"
            for e, v in losses[::step] + ([losses[-1]] if losses and losses[-1] not in losses[::step] else [])
        )
    )


if __name__ == "__main__":
    main()
