"""Zero-shot proof on real scans: organ-crop retrieval, semantic search of organ centroids and
stability on simulated rescans, for a random-init and a briefly pretrained encoder.

Data (../shared/data): the two labelled abdomen scans, A = abdomen_3mm/example_ct_sm.nii.gz
(labels example_seg.nii.gz) and B = abdomen_dicom/dicom (labels seg.nii.gz), are never seen in
pretraining; the other real 3D scans are the pretraining set.

1. Encoders: a narrow CT-FM encoder (init_filters 8) at its seeded random initialisation, and the
   same one after ``ctfm pretrain`` for ``--steps`` steps (CT-FM's intra-sample NT-Xent and view
   augmentations; crops 8x32x32 voxels, 12 per scan) on the pretraining scans.
2. Organ-crop retrieval (ctfm.evaluate.zeroshot.retrieval.crop_retrieval): scans preprocessed with ct-fm-patches (SPL, 3x1x1 mm, crop to HU > 0,
   [-1024, 2048] -> [0, 1]); for each organ with enough voxels in both scans, up to ``--crops``
   crops of 8x64x64 voxels (24x64x64 mm) centred on random organ voxels; crops of A query the crops
   of B and the reverse (cosine); relevance = same organ; P@1, P@5, P@10 (means over queries, 95 %
   bootstrap intervals) beside the chance level.
3. Semantic search (ctfm evaluate semantic-search's protocol: 64^3 windows at 1 mm, overlap
   0.625, cosine): each organ's centroid in A searched in B and the reverse; error in mm (best
   window centre, and the similarity-weighted refinement) and inside-label rate.
4. Stability: each real scan and a simulated rescan of it (resampled to 1.25x the voxel size,
   the anatomy shifted by 3-6 mm, Gaussian noise of 20 HU) embedded with ``ctfm.embed`` (patches,
   mean-pooled) into a store; ``ctfm evaluate stability``'s figures (pair vs non-pair cosine,
   separation AUC, rank-1 re-identification, ICC).

    python benchmarks/zero_shot_real.py [--data ../shared/data] [--out runs/zero_shot_real] [--steps 500]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCAN_A = ("abdomen_3mm/example_ct_sm.nii.gz", "abdomen_3mm/example_seg.nii.gz")
SCAN_B = ("abdomen_dicom/dicom", "abdomen_dicom/seg.nii.gz")
PRETRAIN_SCANS = [
    "lung_tumour_nrrd/lung1_image.nrrd",
    "head_tilt_dicom/dicom",
    "sarcoma_ct/STS_019/CT_image.nii.gz",
    "sarcoma_ct/STS_025/CT_image.nii.gz",
    "whole_scans_1p5mm/neck_a.nii.gz",
    "whole_scans_1p5mm/lumbar_pelvis.nii.gz",
    "liver_3slice_dicomseg/dicom",
]
STABILITY_SCANS = [SCAN_A[0], SCAN_B[0], *PRETRAIN_SCANS[:-1]]  # the 3-slice liver series is too thin to resample
MIN_CENTRES = 50  # an organ needs this many candidate crop centres in each scan
KS = (1, 5, 10)
PRETRAIN_SETTINGS = {
    "model_kwargs": {"init_filters": 8},
    "crop_size": [8, 32, 32],
    "num_crops": 12,
    "batch_size": 4,
    "steps_per_epoch": 25,
    "warmup_epochs": 1,
    "lr": 5e-4,
    "checkpoint_every_n_epochs": 100,
}


def pretrain(data: Path, out: Path, steps: int, seed: int, overrides: dict | None = None) -> Path:
    """``ctfm pretrain`` on the pretraining scans for ``steps`` steps; returns the export folder."""
    manifest = out / "pretrain_scans.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text("path\n" + "".join(f"{data / rel}\n" for rel in PRETRAIN_SCANS))
    epochs = max(1, steps // PRETRAIN_SETTINGS["steps_per_epoch"])
    settings = {
        **PRETRAIN_SETTINGS,
        **(overrides or {}),
        "max_epochs": epochs,
        "data": str(manifest),
        "out": str(out / "pretrain"),
        "seed": seed,
    }
    command = [
        sys.executable,
        "-m",
        "ctfm",
        "pretrain",
        "--preset",
        "tiny",
        *[f"--set={k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in settings.items()],
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return out / "pretrain" / "export"


# ---- rescans ---------------------------------------------------------------------------------
def simulated_rescan(path: Path, out: Path, seed: int) -> Path:
    """A rescan of ``path``: voxels 1.25x larger, anatomy shifted by 3-6 mm, noise sigma 20 HU."""
    import torch
    from monai.data import MetaTensor

    from ctfm.evaluate.zeroshot.saliency import onto_grid
    from ctfm.io import save_nifti
    from ctfm.preprocess import load_usable_ct

    rng = np.random.default_rng(seed)
    image, _ = load_usable_ct(path)
    affine = np.asarray(image.affine, np.float64)
    new_affine = affine @ np.diag([1.25, 1.25, 1.25, 1.0])
    shape = np.maximum(np.floor(np.asarray(image.shape[1:]) / 1.25).astype(int), 1)
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(3.0, 6.0)
    moved = np.eye(4)
    moved[:3, 3] = -shift  # the anatomy at world x now shows what was at x - shift
    values = (
        onto_grid(np.asarray(image[0], np.float32) + 1024.0, affine, moved @ new_affine, shape, order=1) - 1024.0
    )  # outside: air
    values += rng.normal(0.0, 20.0, size=values.shape).astype(np.float32)
    target = out / f"{path.name.split('.')[0]}_{path.parent.name}_rescan.nii.gz"
    save_nifti(
        MetaTensor(torch.from_numpy(values.astype(np.float32))[None], affine=torch.from_numpy(new_affine)), target
    )
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default="runs/zero_shot_real")
    parser.add_argument("--steps", type=int, default=500, help="pretraining steps (default 500)")
    parser.add_argument("--crops", type=int, default=20, help="crops per organ and scan (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-size", type=int, default=PRETRAIN_SETTINGS["batch_size"], help="pretraining scans per step (default 4)"
    )
    parser.add_argument(
        "--num-crops", type=int, default=PRETRAIN_SETTINGS["num_crops"], help="pretraining crops per scan (default 12)"
    )
    parser.add_argument(
        "--stability-scans",
        type=int,
        default=len(STABILITY_SCANS),
        help=f"how many of the {len(STABILITY_SCANS)} stability scans to use (default all)",
    )
    parser.add_argument(
        "--search-spacing",
        type=float,
        default=1.0,
        help="semantic search: isotropic spacing in mm (default 1, CT-FM's protocol); the window keeps 64 mm",
    )
    parser.add_argument("--skip-search", action="store_true", help="skip the semantic-search part")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    import ctfm
    from ctfm.evaluate.zeroshot.retrieval import common_labels, crop_retrieval, labelled_volume, organ_crops
    from ctfm.evaluate.zeroshot.semantic_search import search_spec, semantic_search_cases, summarise_label
    from ctfm.evaluate.zeroshot.stability import stability
    from ctfm.models import create_model

    started = time.time()
    overrides = {"batch_size": args.batch_size, "num_crops": args.num_crops}
    export = pretrain(data, out, args.steps, args.seed, overrides)
    pretrain_minutes = (time.time() - started) / 60
    from ctfm.pretrain.config import resolve_pretrain_config
    from ctfm.pretrain.train import build_module

    # The pretraining run initialises from torch.manual_seed(seed): the same start (as pretrain_learns.py).
    torch.manual_seed(args.seed)
    encoders = {
        "random init": build_module(
            resolve_pretrain_config(
                "tiny",
                overrides={
                    **PRETRAIN_SETTINGS,
                    **overrides,
                    "data": "unused",
                    "out": str(out / "unused"),
                    "seed": args.seed,
                },
            )
        ).encoder,
        "pretrained": create_model("ct-fm", weights=str(export)),
    }
    for encoder in encoders.values():
        encoder.eval()

    a = labelled_volume(data / SCAN_A[0], data / SCAN_A[1])
    b = labelled_volume(data / SCAN_B[0], data / SCAN_B[1])
    organs = common_labels([a, b], min_centres=MIN_CENTRES)
    crops_a, tags_a = organ_crops(*a[:3], organs, args.crops, args.seed)
    crops_b, tags_b = organ_crops(*b[:3], organs, args.crops, args.seed + 1)
    results: dict = {
        "organs": organs,
        "crops": {"A": len(tags_a), "B": len(tags_b)},
        "retrieval": {},
        "search": {},
        "stability": {},
        "seconds": {},
    }
    for name, encoder in encoders.items():
        t = time.time()
        results["retrieval"][name] = crop_retrieval(encoder, crops_a, tags_a, crops_b, tags_b, KS)
        results["seconds"][f"retrieval {name}"] = time.time() - t

    if not args.skip_search:
        scans = [
            {"image": str(data / SCAN_A[0]), "labels": str(data / SCAN_A[1])},
            {"image": str(data / SCAN_B[0]), "labels": str(data / SCAN_B[1])},
        ]
        for name, encoder in encoders.items():
            t = time.time()
            spec = search_spec(args.search_spacing, int(round(64 / args.search_spacing)))
            run = semantic_search_cases(
                scans,
                organs,
                [(0, 1), (1, 0)],
                encoder,
                ("none", "weighted"),
                store=out / f"search_store_{name.replace(' ', '_')}",
                spec=spec,
            )
            results["search"][name] = {
                refine: summarise_label([c[refine] for c in run["cases"]]) for refine in ("none", "weighted")
            }
            results["search"][name]["skipped"] = len(run["skipped"])
            results["seconds"][f"search {name}"] = time.time() - t

    rescans = out / "rescans"
    rescans.mkdir(exist_ok=True)
    originals = [data / rel for rel in STABILITY_SCANS[: args.stability_scans]]
    copies = [simulated_rescan(p, rescans, args.seed + i) for i, p in enumerate(originals)]
    for name, encoder in encoders.items():
        t = time.time()
        records = ctfm.embed(
            [str(p) for p in originals + copies],
            encoder=encoder,
            mode="patches",
            out=out / f"stability_store_{name.replace(' ', '_')}",
            device="cpu",
        )
        by_path = {r["source_path"]: r["embedding"] for r in records}
        va = np.stack([by_path[os.path.abspath(p)] for p in originals])
        vb = np.stack([by_path[os.path.abspath(p)] for p in copies])
        summary = stability(va, vb)
        results["stability"][name] = {k: v for k, v in summary.items() if not k.startswith("_")}
        results["seconds"][f"stability {name}"] = time.time() - t
    results["pretrain_minutes"] = pretrain_minutes
    results["total_minutes"] = (time.time() - started) / 60
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print_tables(results, args)


def print_tables(results: dict, args) -> None:
    import torch

    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; pretraining "
        f"{results['pretrain_minutes']:.1f} min ({args.steps} steps of {args.batch_size} scans x {args.num_crops} "
        f"crops), total {results['total_minutes']:.1f} min"
    )
    print(
        f"\norgans in both scans ({len(results['organs'])}): {', '.join(results['organs'])}; crops A "
        f"{results['crops']['A']}, B {results['crops']['B']}\n"
    )
    print("| encoder | direction | " + " | ".join(f"P@{k} [95% CI]" for k in KS) + " | chance P@k |")
    print("|---|---|" + "---|" * (len(KS) + 1))
    for name, by_direction in results["retrieval"].items():
        for direction, r in by_direction.items():
            print(
                f"| {name} | {direction} | "
                + " | ".join(
                    f"{r[f'P@{k}']['mean']:.3f} [{r[f'P@{k}']['low']:.3f}, {r[f'P@{k}']['high']:.3f}]" for k in KS
                )
                + f" | {r['chance']:.3f} |"
            )
    if results["search"]:
        print(
            f"\nsemantic search at {args.search_spacing:g} mm, {int(round(64 / args.search_spacing))}^3 windows, "
            "overlap 0.625"
        )
        print("\n| encoder | prediction | pairs | error mm mean [95% CI] | median | inside-label rate |")
        print("|---|---|---|---|---|---|")
        for name, by_refine in results["search"].items():
            for refine in ("none", "weighted"):
                s = by_refine[refine]
                if s.get("pairs"):
                    print(
                        f"| {name} | {'best window centre' if refine == 'none' else 'weighted refinement'} | "
                        f"{s['pairs']} | {s['error_mm_mean']:.1f} [{s['error_mm_low']:.1f}, {s['error_mm_high']:.1f}] | "
                        f"{s['error_mm_median']:.1f} | {s['inside_label_rate']:.3f} |"
                    )
    print(
        "\n| encoder | pairs | pair cosine mean [95% CI] | non-pair cosine mean | separation AUC | rank-1 a->b | "
        "rank-1 b->a | ICC(2,1) median |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, s in results["stability"].items():
        print(
            f"| {name} | {s['n_pairs']} | {s['pair_cosine']['mean']:.4f} [{s['pair_cosine']['low']:.4f}, "
            f"{s['pair_cosine']['high']:.4f}] | {s['non_pair_cosine']['mean']:.4f} | {s['separation_auc']:.3f} | "
            f"{s['rank1_reidentification']['a_to_b']['mean']:.3f} | {s['rank1_reidentification']['b_to_a']['mean']:.3f} "
            f"| {s['icc_2_1']['median']:.3f} |"
        )
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()))


if __name__ == "__main__":
    main()
