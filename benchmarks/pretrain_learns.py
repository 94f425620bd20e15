"""Proof that pretraining learns: frozen patch embeddings after a short CPU pretraining against the
same architecture at random initialisation, on organ identification in abdomen_3mm.

1. Pretrain a narrow CT-FM encoder (init_filters 8) with ctfm's intra-sample NT-Xent on the real
   scans of ../shared/data, for at most ``--minutes`` on the CPU. abdomen_3mm is left out of
   pretraining, so the evaluation scan is never seen.
2. Evaluation data: ``abdomen_3mm/example_ct_sm.nii.gz`` with its organ labels
   (``example_seg.nii.gz``), both put on the ct-fm-ssl grid (SPL, 3x1x1 mm; labels nearest).
   Patches of 8x32x32 voxels centred in organs; train patches from the superior slab, test
   patches from the inferior slab, with a gap so no train and test patch overlap.
3. Probes on frozen embeddings: kNN (k=5, cosine) and logistic regression; balanced accuracy.

    python benchmarks/pretrain_learns.py [--data ../shared/data] [--minutes 18] [--out runs/learns]
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
PATCH = (8, 32, 32)
MIN_VOXELS = 200  # an organ needs this many voxels in each slab to be a class
PER_CLASS = 40


def evaluation_patches(data: Path, seed: int = 0):
    """(train_patches, train_labels, test_patches, test_labels, class_names) on the ct-fm-ssl grid."""
    from monai.transforms import Orientation, ScaleIntensityRange, Spacing

    from ctfm.io import load_ct, load_labels

    image, _ = load_ct(data / "abdomen_3mm" / "example_ct_sm.nii.gz")
    labels = load_labels(data / "abdomen_3mm" / "example_seg.nii.gz", image)
    axes = (("L", "R"), ("P", "A"), ("I", "S"))
    img = ScaleIntensityRange(-1024, 2048, 0, 1, clip=True)(Spacing((3, 1, 1), mode="bilinear")(Orientation("SPL", labels=axes)(image)))
    lab = Spacing((3, 1, 1), mode="nearest")(Orientation("SPL", labels=axes)(labels.labels.float()))
    img, lab = np.asarray(img[0]), np.asarray(lab[0]).round().astype(int)
    depth = img.shape[0]
    half = PATCH[0] // 2
    # Centres whose patches stay inside one slab: train rows [0, split), test rows [split, depth).
    split = depth // 2
    slabs = {"train": (half, split - half), "test": (split + half, depth - half)}
    rng = np.random.default_rng(seed)
    chosen = {}
    for name, (lo, hi) in slabs.items():
        mask = np.zeros_like(lab, dtype=bool)
        mask[lo : hi + 1, PATCH[1] // 2 : lab.shape[1] - PATCH[1] // 2, PATCH[2] // 2 : lab.shape[2] - PATCH[2] // 2] = True
        chosen[name] = {c: np.argwhere((lab == c) & mask) for c in np.unique(lab[mask]) if c > 0}
    classes = sorted(c for c in chosen["train"] if len(chosen["train"][c]) >= MIN_VOXELS and len(chosen["test"].get(c, [])) >= MIN_VOXELS)
    out = []
    for name in ("train", "test"):
        patches, targets = [], []
        for k, c in enumerate(classes):
            points = chosen[name][c][rng.choice(len(chosen[name][c]), size=min(PER_CLASS, len(chosen[name][c])), replace=False)]
            for d, h, w in points:
                patches.append(img[d - half : d + half, h - PATCH[1] // 2 : h + PATCH[1] // 2, w - PATCH[2] // 2 : w + PATCH[2] // 2])
                targets.append(k)
        out += [np.stack(patches)[:, None].astype(np.float32), np.asarray(targets)]
    names = [labels.names.get(int(c), str(c)) for c in classes]
    return (*out, names)


def embed(encoder, patches: np.ndarray) -> np.ndarray:
    encoder.eval()
    with torch.inference_mode():
        return torch.cat([encoder.embed(torch.from_numpy(patches[i : i + 64])) for i in range(0, len(patches), 64)]).numpy()


def probe(train_x, train_y, test_x, test_y) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    knn = KNeighborsClassifier(n_neighbors=5).fit(unit(train_x), train_y)
    scaler = StandardScaler().fit(train_x)
    logistic = LogisticRegression(max_iter=5000, C=1.0).fit(scaler.transform(train_x), train_y)
    return {
        "knn": balanced_accuracy_score(test_y, knn.predict(unit(test_x))),
        "logistic": balanced_accuracy_score(test_y, logistic.predict(scaler.transform(test_x))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--minutes", type=float, default=18.0)
    parser.add_argument("--out", default="runs/pretrain_learns")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)

    from lightning.pytorch.callbacks import Timer

    from ctfm.pretrain.cache import build_cache
    from ctfm.pretrain.config import resolve_config
    from ctfm.pretrain.train import build_module, pretrain

    build_cache([str(data / rel) for rel in PRETRAIN_SCANS], out / "cache", progress=False)
    config = resolve_config(
        "tiny",
        overrides={
            "data": str(out / "cache"),
            "out": str(out),
            "model_kwargs": {"init_filters": 8},
            # Crops at the scale of the evaluation patches, many per scan (more same-scan negatives),
            # and a cosine schedule sized to what fits in the time budget (the timer stops the run).
            "crop_size": [8, 32, 32],
            "num_crops": 12,
            "batch_size": 4,
            "steps_per_epoch": 25,
            "max_epochs": 50,
            "warmup_epochs": 1,
            "lr": 5e-4,
            "checkpoint_every_n_epochs": 5,
            "seed": args.seed,
        },
    )
    started = time.perf_counter()
    export = pretrain(config, resume=False, extra_callbacks=[Timer(duration={"minutes": args.minutes})], progress_bar=False)
    minutes = (time.perf_counter() - started) / 60

    from ctfm.models import create_model

    torch.manual_seed(args.seed)
    random_encoder = build_module(config).encoder  # the same initialisation the run started from
    pretrained = create_model("ct-fm", weights=str(export))
    train_x, train_y, test_x, test_y, names = evaluation_patches(data, args.seed)
    results = {}
    for label, encoder in (("random init", random_encoder), ("pretrained", pretrained)):
        results[label] = probe(embed(encoder, train_x), train_y, embed(encoder, test_x), test_y)

    losses = []
    with open(out / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            if row.get("train/loss_epoch"):
                losses.append((int(row["epoch"]), float(row["train/loss_epoch"])))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"pretraining: {minutes:.1f} min, {len(losses)} epochs x {config.steps_per_epoch} steps, {len(PRETRAIN_SCANS)} scans, crops {config.num_crops} x {config.crop_size}")
    print(f"evaluation: {len(names)} organs ({', '.join(names)}); {len(train_y)} train / {len(test_y)} test patches of {PATCH} voxels\n")
    print("| encoder | kNN balanced accuracy | logistic balanced accuracy |")
    print("|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {100 * r['knn']:.1f} | {100 * r['logistic']:.1f} |")
    gain = {k: 100 * (results["pretrained"][k] - results["random init"][k]) for k in ("knn", "logistic")}
    print(f"\ngain: kNN {gain['knn']:+.1f} points, logistic {gain['logistic']:+.1f} points")
    step = max(1, len(losses) // 12)
    print("\nloss curve (epoch: mean train loss): " + ", ".join(f"{e}: {v:.3f}" for e, v in losses[::step] + ([losses[-1]] if losses and losses[-1] not in losses[::step] else [])))


if __name__ == "__main__":
    main()
