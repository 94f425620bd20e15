"""Probes on real scans through `ctfm probe`: organ identity and body region, random init against a
CT-FM encoder pretrained for a fixed number of steps, with bootstrap CIs; and the probe's speed.

1. Pretrain the narrow encoder of ``pretrain_learns.py`` (init_filters 8, same settings and scans,
   abdomen_3mm left out) for ``--steps`` optimiser steps (not minutes: a slower machine trains the
   same encoder and prints the same table). Random init = the same architecture and seed before
   training.
2. Organ identity: abdomen_3mm's organ patches as in ``pretrain_learns.py`` (train patches in the
   superior half, test in the inferior half: ``--split-column``), one draw of centres per size.
3. Body region: patches of 8x64x64 voxels (24x64x64 mm at 3x1x1 mm) drawn in hand-marked slabs of
   five real scans (``REGIONS``: neck, chest, abdomen, pelvis), 40 per slab, probed with
   ``--group-column scan`` (folds leave whole scans out; CIs resample scans). Four regions
   (multi-class) and abdomen vs pelvis (binary, the two regions present in more than one scan).
4. Every probe is the library's (``ctfm.evaluate.probes.probe_run.run_probe``, the code behind ``ctfm
   probe``): each encoder's patch vectors go into a real store, the labels into a CSV, and the two
   stores are probed together (same cases, folds, draws; paired comparison).
5. Timing: ``ctfm probe`` on a store of 10,000 synthetic 512-d vectors with 15 binary targets.

    python benchmarks/probe_real.py [--data ../shared/data] [--steps 300] [--threads 1] [--out runs/probe_real]
        [--patches 8x32x32,8x64x64] [--resamples 1000] [--skip-timing] [--timing-only]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_learns import (
    BENCHMARK_SETTINGS,
    PRETRAIN_SCANS,
    embed,
    evaluation_patches,
    evaluation_volume,
    patch_sizes,
)  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Slabs in voxel rows of the scan on the 3x1x1 mm SPL grid without cropping (row 0 = most inferior
# slice), marked by eye on coronal slices (femoral heads / iliac crests / lung bases / clavicles).
REGIONS = {
    "whole_scans_1p5mm/neck_a.nii.gz": [("neck", 0, 51)],
    "lung_tumour_nrrd/lung1_image.nrrd": [("chest", 0, 55)],
    "abdomen_dicom/dicom": [("abdomen", 0, 14)],
    "abdomen_3mm/example_ct.nii.gz": [("pelvis", 0, 45), ("abdomen", 55, 112)],
    "whole_scans_1p5mm/lumbar_pelvis.nii.gz": [("pelvis", 0, 38), ("abdomen", 48, 93)],
}
REGION_PATCH = (8, 64, 64)
PER_SLAB = 40


def region_volume(path: Path):
    """[D, H, W] in [0, 1] on the 3x1x1 mm SPL grid, uncropped: the ct-fm-patches spec without its crop."""
    from ctfm.io import load_ct
    from ctfm.preprocess import get_preset, preprocess

    spec = get_preset("ct-fm-patches").with_(name="ct-fm-patches-uncropped", foreground_crop=None)
    image, _ = load_ct(path)
    return np.asarray(preprocess(image, spec)[0]), spec


def region_patches(data: Path, seed: int = 0):
    """(patches [N, 1, 8, 64, 64], region names [N], scan names [N]): PER_SLAB centres per slab,
    in-plane inside the body (window value above that of -500 HU)."""
    rng = np.random.default_rng(seed)
    patches, regions, scans = [], [], []
    d, h, w = REGION_PATCH
    body_level = (-500 + 1024) / 3072
    for rel, slabs in REGIONS.items():
        volume, _ = region_volume(data / rel)
        depth = volume.shape[0]
        for region, lo, hi in slabs:
            lo, hi = max(lo, d // 2), min(hi, depth) - d // 2
            body = volume[lo:hi].mean(axis=0) > body_level
            rows, cols = np.nonzero(body[h // 2 : volume.shape[1] - h // 2, w // 2 : volume.shape[2] - w // 2])
            for _ in range(PER_SLAB):
                z = int(rng.integers(lo, max(lo + 1, hi)))
                k = int(rng.integers(len(rows)))
                y, x = rows[k] + h // 2, cols[k] + w // 2
                patches.append(volume[z - d // 2 : z + d // 2, y - h // 2 : y + h // 2, x - w // 2 : x + w // 2])
                regions.append(region)
                scans.append(rel.split("/")[0] + ("/" + Path(rel).name if "whole_scans" in rel else ""))
    return np.stack(patches)[:, None].astype(np.float32), regions, scans


def write_store(root: Path, vectors: np.ndarray, ids: list[str], model_tag: str) -> Path:
    """One scan row per patch vector in a real store (the writer of ``ctfm embed``)."""
    import pyarrow as pa

    from ctfm.runtime import write_parquet_atomic
    from ctfm.store.schema import schemas

    rows = [
        {
            "scan_id": i,
            "source_path": i,
            "mode": "patches",
            "model": "ct-fm",
            "weights_sha256": model_tag,
            "preset_hash": "probe-real",
            "pool": "mean",
            "precision": "fp32",
            "overlap": 0.0,
            "n_patches": 1,
            "preset": "ct-fm-patches",
            "embedding": v.tolist(),
        }
        for i, v in zip(ids, vectors)
    ]
    root.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=schemas()["scans"]), root / "scans.parquet")
    return root


def write_csv(path: Path, header: list[str], rows) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _ci(m: dict, scale: float = 100.0) -> str:
    return f"{scale * m['estimate']:.1f} [{scale * m['low']:.1f}, {scale * m['high']:.1f}]"


def _p(value: float, n_resamples: int) -> str:
    return f"p<{1 / n_resamples:.2g}" if value == 0 else f"p={value:.2g}"


def probe_table(result: dict, metrics: tuple[str, ...]) -> list[str]:
    """Markdown rows: one per target and encoder, then the paired difference."""
    lines = []
    n = result["settings"]["n_resamples"]
    for entry in result["targets"]:
        for label, store in zip(("random init", "pretrained"), entry["stores"]):
            lines.append(
                f"| {entry['target']} | {label} | " + " | ".join(_ci(store["metrics"][m]) for m in metrics) + " |"
            )
        for c in entry["comparisons"]:
            d = c["paired_bootstrap"][metrics[0]]
            extra = ""
            if "delong_auroc" in c:
                dl = c["delong_auroc"]
                extra = f"; DeLong AUROC {100 * dl['difference']:+.1f} [{100 * dl['low']:+.1f}, {100 * dl['high']:+.1f}], {_p(dl['p_value'], 10**9)}"
            lines.append(
                f"| {entry['target']} | pretrained − random | {100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, "
                f"{100 * d['high']:+.1f}], {_p(d['p_value'], n)} (paired bootstrap){extra} |"
                + " |"
                * (len(metrics) - 1)
            )
    return lines


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


TIMING_HEADER = "| evaluation | size | wall s (process) | CPU s (process and workers) | probe s (run_probe) | fit s (sum over targets) | mean AUROC |\n|---|---|---|---|---|---|---|"


def timing(out: Path, n: int = 10_000, dim: int = 512, n_targets: int = 15, jobs: int = 2) -> list[str]:
    """Wall time of `ctfm probe` (a subprocess, as a user runs it) on synthetic vectors."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    weights = rng.normal(size=(dim, n_targets)) * 0.08
    targets = ((features @ weights + rng.normal(size=(n, n_targets))) > 1.0).astype(int)
    ids = [f"s{i:05d}" for i in range(n)]
    store = write_store(out / "timing_store", features, ids, "synthetic")
    split = np.where(rng.random(n) < 0.8, "train", "test")
    labels = write_csv(
        out / "timing_labels.csv",
        ["scan_id", "split", *[f"finding{t}" for t in range(n_targets)]],
        ([i, s, *row] for i, s, row in zip(ids, split, targets)),
    )
    lines = []
    for name, extra in (("5-fold CV", ["--cv", "5"]), ("train/test split column", ["--split-column", "split"])):
        command = [
            sys.executable,
            "-m",
            "ctfm",
            "probe",
            str(store),
            "--labels",
            str(labels),
            "--target",
            ",".join(f"finding{t}" for t in range(n_targets)),
            "--task",
            "multilabel",
            "--jobs",
            str(jobs),
            "--json",
            *extra,
        ]
        started, cpu_before = time.perf_counter(), _children_cpu()
        done = subprocess.run(
            command, capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")}
        )
        wall, cpu = time.perf_counter() - started, _children_cpu() - cpu_before
        if done.returncode:
            raise SystemExit(done.stderr)
        result = json.loads(done.stdout)
        fit = sum(s["fit_seconds"] for t in result["targets"] for s in t["stores"])
        auroc = np.mean([t["stores"][0]["metrics"]["auroc"]["estimate"] for t in result["targets"]])
        lines.append(
            f"| {name} | {n} x {dim}, {n_targets} targets | {wall:.1f} | {cpu:.1f} | {result['seconds']:.1f} | "
            f"{fit:.1f} | {auroc:.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument(
        "--steps", type=int, default=300, help="pretraining optimiser steps (a multiple of 25, the steps per epoch)"
    )
    parser.add_argument("--out", default="runs/probe_real")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--patches", type=patch_sizes, default=[(8, 32, 32), (8, 64, 64)], help="organ patch sizes in voxels"
    )
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--timing-only", action="store_true")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.timing_only:
        print("\n" + TIMING_HEADER)
        print("\n".join(timing(out)))
        return

    from ctfm.evaluate.probes.probe_run import run_probe
    from ctfm.models import create_model
    from ctfm.pretrain.cache import build_cache
    from ctfm.pretrain.config import resolve_pretrain_config
    from ctfm.pretrain.train import build_module, pretrain

    settings = dict(BENCHMARK_SETTINGS)
    steps_per_epoch = settings["steps_per_epoch"]
    if args.steps % steps_per_epoch:
        raise SystemExit(f"--steps {args.steps}: use a multiple of {steps_per_epoch}")
    settings["max_epochs"] = args.steps // steps_per_epoch
    settings["checkpoint_every_n_epochs"] = settings["max_epochs"]
    build_cache([str(data / rel) for rel in PRETRAIN_SCANS], out / "cache", progress=False)
    config = resolve_pretrain_config(
        "tiny", overrides={**settings, "data": str(out / "cache"), "out": str(out / "pretrain"), "seed": args.seed}
    )
    started = time.time()
    export = pretrain(config, resume=False, progress_bar=False)
    minutes = (time.time() - started) / 60
    torch.manual_seed(args.seed)
    encoders = {"random": build_module(config).encoder, "pretrained": create_model("ct-fm", weights=str(export))}
    evaluation_started = time.time()

    sections = []
    volume = evaluation_volume(data)
    for patch in args.patches:
        tx, ty, vx, vy, names = evaluation_patches(volume, args.seed, patch)
        tag = "x".join(map(str, patch))
        ids = [f"organ-{tag}-train-{i}" for i in range(len(ty))] + [f"organ-{tag}-test-{i}" for i in range(len(vy))]
        stores = [
            str(write_store(out / f"organ_{tag}_{name}", np.concatenate([embed(enc, tx), embed(enc, vx)]), ids, name))
            for name, enc in encoders.items()
        ]
        labels = write_csv(
            out / f"organ_{tag}_labels.csv",
            ["scan_id", "organ", "split"],
            ([i, names[int(c)], "train" if "-train-" in i else "test"] for i, c in zip(ids, np.concatenate([ty, vy]))),
        )
        for method in ("logistic", "knn"):
            result = run_probe(
                stores,
                str(labels),
                ["organ"],
                split_column="split",
                method=method,
                n_resamples=args.resamples,
                seed=args.seed,
                out=str(out / f"organ_{tag}_{method}"),
            )
            sections.append(
                (
                    f"organ identity, patches {tag} ({len(names)} organs, {len(ty)} train / {len(vy)} test patches), "
                    f"{method}",
                    probe_table(result, ("balanced_accuracy", "auroc_ovr", "accuracy")),
                    ("balanced accuracy %", "AUROC (one-vs-rest) %", "accuracy %"),
                )
            )

    patches, regions, scans = region_patches(data, args.seed)
    ids = [f"region-{i}" for i in range(len(regions))]
    stores = [
        str(write_store(out / f"region_{name}", embed(enc, patches), ids, name)) for name, enc in encoders.items()
    ]
    pelvis = ["1" if r == "pelvis" else "0" if r == "abdomen" else "" for r in regions]
    labels = write_csv(
        out / "region_labels.csv", ["scan_id", "region", "pelvis", "scan"], zip(ids, regions, pelvis, scans)
    )
    n_scans = len(set(scans))
    counts = {r: regions.count(r) for r in sorted(set(regions))}
    for method in ("logistic", "knn"):
        result = run_probe(
            stores,
            str(labels),
            ["region"],
            group_column="scan",
            cv=n_scans,
            method=method,
            n_resamples=args.resamples,
            seed=args.seed,
            out=str(out / f"region_{method}"),
        )
        sections.append(
            (
                f"body region (4 classes {counts}), {n_scans} scans, leave-one-scan-out, {method}",
                probe_table(result, ("balanced_accuracy", "auroc_ovr", "accuracy")),
                ("balanced accuracy %", "AUROC (one-vs-rest) %", "accuracy %"),
            )
        )
        result = run_probe(
            stores,
            str(labels),
            ["pelvis"],
            group_column="scan",
            cv=3,
            method=method,
            n_resamples=args.resamples,
            seed=args.seed,
            out=str(out / f"pelvis_{method}"),
        )
        sections.append(
            (
                f"pelvis vs abdomen (binary; {counts.get('pelvis', 0)} / {counts.get('abdomen', 0)} patches), 3 folds "
                f"grouped by scan, {method}",
                probe_table(result, ("auroc", "balanced_accuracy", "f1")),
                ("AUROC %", "balanced accuracy %", "F1 %"),
            )
        )
    evaluation_minutes = (time.time() - evaluation_started) / 60

    print(
        f"pretraining: {args.steps} steps ({settings['max_epochs']} epochs x {steps_per_epoch}), {minutes:.1f} min; "
        f"evaluation {evaluation_minutes:.1f} min; crops {config.num_crops} x {config.crop_size}, batch "
        f"{config.batch_size}, lr {config.lr}"
    )
    for title, lines, headers in sections:
        print(f"\n### {title}\n")
        print("| target | encoder | " + " | ".join(headers) + " |")
        print("|---|---|" + "---|" * len(headers))
        print("\n".join(lines))
    if not args.skip_timing:
        print("\n### probe speed\n")
        print(TIMING_HEADER)
        print("\n".join(timing(out)))


if __name__ == "__main__":
    main()
