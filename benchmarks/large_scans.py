"""Whole-scan embeddings of very large scans within a fixed memory budget.

Builds two large scans from real anatomy (``abdomen_3mm/example_ct.nii.gz`` resampled with
linear interpolation): 1024x1024x251 voxels (the CT-FM issue #40 shape, 0.36x0.30x1.34 mm) and
512x512x800 voxels (0.71x0.59x0.42 mm), both covering the original 366x303x336 mm. For each, in
separate subprocesses: ctfm's whole embedding (fp32, bounded preprocessing + streamed encoder)
and the unbounded computation of the same definition (MONAI chain and one encoder pass, as the
reference does). Reports wall time, peak RSS and the cosine between the two embeddings.

    python benchmarks/large_scans.py [--data ../shared/data] [--budget-gb 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from real_anatomy import resample_real_scan

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "1024x1024x251": ((1024, 1024, 251), (0.36, 0.30, 1.34)),
    "512x512x800": ((512, 512, 800), (0.71, 0.59, 0.42)),
}


def worker(kind: str, scan: str, weights: str) -> dict:
    start = time.perf_counter()
    if kind == "ours":
        import ctfm

        embedding = np.asarray(ctfm.embed(scan, weights=weights, mode="whole")[0]["embedding"])
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from monai.networks.nets.segresnet_ds import SegResEncoder
        from safetensors.torch import load_file

        from reference_chains import REFERENCE_CHAINS, load_reference

        model = SegResEncoder(**json.loads((Path(weights) / "config.json").read_text()))
        model.load_state_dict(load_file(Path(weights) / "model.safetensors"))
        model.eval()
        x = REFERENCE_CHAINS["ct-fm-1mm-320"](load_reference(scan))
        with torch.no_grad():
            embedding = torch.nn.functional.adaptive_avg_pool3d(model(x.as_tensor()[None])[-1], 1).flatten(1)[0].numpy()
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "embedding": np.asarray(embedding).tolist(),
    }


def run(kind: str, scan: Path, weights: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                kind,
                "--scan",
                str(scan),
                "--weights",
                str(weights),
                "--result",
                out.name,
            ],
            check=True,
        )
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--budget-gb", type=float, default=4.0)
    parser.add_argument("--worker", choices=["ours", "unbounded"])
    parser.add_argument("--scan")
    parser.add_argument("--weights")
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args.worker, args.scan, args.weights)))
        return

    from ctfm.models import init_model, save_pretrained

    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; budget "
        f"{args.budget_gb} GB\n"
    )
    print("| scan | ctfm s | ctfm peak RSS GB | within budget | unbounded s | unbounded peak RSS GB | cosine |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_pretrained(init_model("ct-fm", seed=0), Path(tmp) / "weights")
        for name, (shape, spacing) in SHAPES.items():
            scan = resample_real_scan(
                Path(args.data) / "abdomen_3mm" / "example_ct.nii.gz", shape, spacing, Path(tmp) / f"{name}.nii"
            )
            ours = run("ours", scan, weights)
            full = run("unbounded", scan, weights)
            a, b = np.asarray(ours["embedding"]), np.asarray(full["embedding"])
            cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            ok = "yes" if ours["peak_rss_gb"] <= args.budget_gb else "NO"
            print(
                f"| {name} | {ours['seconds']:.1f} | {ours['peak_rss_gb']:.2f} | {ok} | {full['seconds']:.1f} | "
                f"{full['peak_rss_gb']:.2f} | {cos:.7f} |",
                flush=True,
            )
            scan.unlink()


if __name__ == "__main__":
    main()
