"""Region search on real scans, before and after a change to ctfm.search, in one run.

1. Self-search: 20 points inside labelled structures of the shared real scans (abdomen_3mm's
   full scan with ``vertebrae.nii.gz``, its ``_sm`` crop with ``example_seg.nii.gz``, abdomen_dicom
   with ``seg.nii.gz``; each label's voxel nearest its centroid) are searched in the scan they
   come from (``--target`` = the query scan, k = 1). Error = distance from the hit to the point
   (mm), for the default path (the stored window nearest the point; refinement none and
   weighted) and for the centred window (``--weights``; none, weighted, fine).
2. Cross-scan semantic search (``ctfm.evaluate.zeroshot.semantic_search``, the protocol of
   benchmarks/zero_shot_real.py): each organ's centroid in abdomen_3mm ``_sm`` searched in
   abdomen_dicom and the reverse; error to the target organ's centroid (mm) and the inside-label
   rate, centred queries, refinement none and weighted, at 2 mm with 32^3 windows (the setting
   of zero_shot_real.py's recorded run; CT-FM's protocol is 1 mm, 64^3).

Both parts run the same store and encoder through two checkouts of the package: ``--before``
(a ``src`` folder of the old code, e.g. ``git worktree add /tmp/before main``) and this
repository's ``src``, each in its own process (``--worker``). The store is embedded once (the
embedding code is not what is compared).

    python benchmarks/self_search_real.py --before /tmp/before/src [--data ../shared/data] [--out runs/self_search]
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
LABELLED = [  # (image, labels, how many labels to use)
    ("abdomen_3mm/example_ct.nii.gz", "abdomen_3mm/vertebrae.nii.gz", 7),
    ("abdomen_3mm/example_ct_sm.nii.gz", "abdomen_3mm/example_seg.nii.gz", 7),
    ("abdomen_dicom/dicom", "abdomen_dicom/seg.nii.gz", 6),
]
PATHS = [("stored", "none"), ("stored", "weighted"), ("centred", "none"), ("centred", "weighted"), ("centred", "fine")]
CROSS_SPACING_MM = 2.0  # benchmarks/zero_shot_real.py's recorded run: 2 mm, 32^3 windows (64 mm), overlap 0.625
WINDOW_MM = (48.0, 64.0, 64.0)  # 16x64x64 voxels at 3x1x1 mm: fine refinement affordable on 2 CPU cores


def points(data: Path) -> list[dict]:
    """Per labelled scan, the voxel nearest the centroid of each of its largest labels, in world mm."""
    from ctfm.io import load_labels
    from ctfm.preprocess import load_usable_ct

    out = []
    for image_rel, labels_rel, n in LABELLED:
        image, _ = load_usable_ct(data / image_rel)
        labels = np.asarray(load_labels(data / labels_rel, image).labels[0])
        affine = np.asarray(image.affine, np.float64)
        values, counts = np.unique(labels[labels > 0], return_counts=True)
        for value in values[np.argsort(-counts)][:n]:
            ijk = np.argwhere(labels == value)
            voxel = ijk[np.argmin(np.linalg.norm(ijk - ijk.mean(0), axis=1))]
            out.append(
                {
                    "scan": str(data / image_rel),
                    "label": int(value),
                    "point": (affine @ np.append(voxel, 1.0))[:3].tolist(),
                }
            )
    return out


def worker(args) -> None:
    """Run the searches with whichever ctfm is on PYTHONPATH; print a JSON document."""
    import warnings

    warnings.simplefilter("ignore")
    import ctfm
    from ctfm.evaluate.zeroshot.semantic_search import search_spec, semantic_search_cases, summarise_label
    from ctfm.models import create_model
    from ctfm.search import SearchSession

    job = json.loads(Path(args.worker).read_text())
    result = {"ctfm": str(Path(ctfm.__file__).parent), "self": {}, "cross": {}, "seconds": {}}
    plain = SearchSession(job["store"])
    with_weights = SearchSession(job["store"], weights=job["weights"])
    for source, refine in PATHS:
        t = time.time()
        session = plain if source == "stored" else with_weights
        errors = []
        for case in job["points"]:
            hit = session.search_point(
                case["scan"], case["point"], k=1, target=case["scan"], query_from=source, refine=refine
            )[0]
            errors.append(float(np.linalg.norm(np.asarray(hit.point_mm) - case["point"])))
        result["self"][f"{source}/{refine}"] = errors
        result["seconds"][f"self {source}/{refine}"] = time.time() - t
        print(json.dumps(result, default=float), flush=True)  # partial results, line by line
    encoder = create_model("ct-fm", weights=job["weights"]).eval()
    t = time.time()
    run = semantic_search_cases(
        job["cross_scans"],
        job["organs"],
        [(0, 1), (1, 0)],
        encoder,
        ("none", "weighted"),
        store=job["cross_store"],
        spec=search_spec(CROSS_SPACING_MM, int(round(64 / CROSS_SPACING_MM))),
    )
    result["cross"] = {r: summarise_label([c[r] for c in run["cases"]]) for r in ("none", "weighted")}
    result["seconds"]["cross"] = time.time() - t
    print(json.dumps(result, default=float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default="runs/self_search")
    parser.add_argument("--before", help="the src folder of the code to compare against")
    parser.add_argument("--init-filters", type=int, default=4, help="width of the random CT-FM encoder (default 4)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import warnings

    import ctfm
    from ctfm.cli import main as cli
    from ctfm.evaluate.zeroshot.retrieval import common_labels, labelled_volume
    from ctfm.preprocess import get_preset

    data, out = Path(args.data), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "weights"
    if not weights.exists():
        assert (
            cli(
                [
                    "models",
                    "init",
                    "ct-fm",
                    "--seed",
                    "0",
                    "--out",
                    str(weights),
                    "--init-filters",
                    str(args.init_filters),
                ]
            )
            == 0
        )
    spec = get_preset("ct-fm-patches").with_(name="small-windows", patch_size_mm=WINDOW_MM)
    t = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctfm.embed(
            [str(data / image) for image, _, _ in LABELLED],
            weights=str(weights),
            mode="patches",
            preset=spec,
            out=out / "store",
            device="cpu",
            return_records=False,
        )
    embed_seconds = time.time() - t
    a = labelled_volume(data / LABELLED[1][0], data / LABELLED[1][1])
    b = labelled_volume(data / LABELLED[2][0], data / LABELLED[2][1])
    job = {
        "store": str(out / "store"),
        "weights": str(weights),
        "points": points(data),
        "cross_scans": [{"image": str(data / s[0]), "labels": str(data / s[1])} for s in LABELLED[1:]],
        "organs": common_labels([a, b], min_centres=50),
        "cross_store": str(out / "cross_store"),
    }
    (out / "job.json").write_text(json.dumps(job))
    results = {}
    for name, src in (("before", args.before), ("after", str(ROOT / "src"))):
        if not src:
            continue
        env = {**os.environ, "PYTHONPATH": src}
        log = out / f"{name}.jsonl"
        with open(log, "w") as stdout:
            done = subprocess.run(
                [sys.executable, __file__, "--worker", str(out / "job.json")], env=env, stdout=stdout, text=True
            )
        if done.returncode:
            raise SystemExit(f"{name} worker failed (exit {done.returncode})")
        results[name] = json.loads(log.read_text().strip().splitlines()[-1])
    load = os.getloadavg()
    results["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_after": load,
        "embed_seconds": embed_seconds,
        "points": len(job["points"]),
        "organs": job["organs"],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(
        f"machine: {results['machine']['processor']}, {os.cpu_count()} cores, load {load}; {len(job['points'])} points"
    )
    print("\n| path | before median / max mm | after median / max mm |\n|---|---|---|")
    for source, refine in PATHS:
        key = f"{source}/{refine}"
        cells = []
        for name in ("before", "after"):
            e = results.get(name, {}).get("self", {}).get(key)
            cells.append(f"{np.median(e):.1f} / {np.max(e):.1f}" if e else "-")
        print(f"| {key} | {cells[0]} | {cells[1]} |")
    print("\n| cross-scan | before mean / median mm, inside | after mean / median mm, inside |\n|---|---|---|")
    for refine in ("none", "weighted"):
        cells = []
        for name in ("before", "after"):
            s = results.get(name, {}).get("cross", {}).get(refine)
            cells.append(
                f"{s['error_mm_mean']:.1f} / {s['error_mm_median']:.1f}, {s['inside_label_rate']:.3f}" if s else "-"
            )
        print(f"| centred/{refine} | {cells[0]} | {cells[1]} |")
    for name in ("before", "after"):
        if name in results:
            print(f"seconds {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in results[name]["seconds"].items()))


if __name__ == "__main__":
    main()
