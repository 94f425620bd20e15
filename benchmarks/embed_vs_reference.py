"""Whole-scan embedding: the reference pipeline against ctfm, same weights, same scans, one run.

Reference (extract_feat_LP.py, docs/recipe.md): MONAI LoadImage -> Orientation SPL -> Spacing
1 mm -> window -> ResizeWithPadOrCrop 320^3 -> MONAI SegResEncoder, fp32, one forward pass ->
last map averaged. Ours: ``ctfm.embed(..., mode="whole")`` (load_ct + checks + content hash +
bounded preprocessing + streamed encoder), fp32 and bf16.

Each pipeline runs in its own subprocess so that its peak RSS is its own; wall time covers file
to embedding. Weights: ``ctfm models init ct-fm --seed 0`` (the published weights cannot be
downloaded here; any weights give the same costs). Also reports the achieved GFLOP/s against
this machine's measured fp32 matmul peak.

    python benchmarks/embed_vs_reference.py [--scans REL ...] [--data ../shared/data]
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCANS = ["abdomen_3mm/example_ct.nii.gz", "lung_tumour_nrrd/lung1_image.nrrd"]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def worker_reference(scan: str, weights: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from monai.networks.nets.segresnet_ds import SegResEncoder
    from safetensors.torch import load_file

    from reference_chains import REFERENCE_CHAINS, load_reference

    config = json.loads((weights / "config.json").read_text())
    model = SegResEncoder(**config)
    model.load_state_dict(load_file(weights / "model.safetensors"))
    model.eval()
    start, cpu = time.perf_counter(), time.process_time()
    x = REFERENCE_CHAINS["ct-fm-1mm-320"](load_reference(scan))
    prep = time.perf_counter() - start
    with torch.no_grad():
        features = model(x.as_tensor()[None])
        embedding = torch.nn.functional.adaptive_avg_pool3d(features[-1], 1).flatten(1)[0]
    total = time.perf_counter() - start
    return {
        "seconds": total,
        "cpu_seconds": time.process_time() - cpu,
        "preprocess_seconds": prep,
        "encoder_seconds": total - prep,
        "embedding": embedding.numpy().tolist(),
    }


def worker_ours(scan: str, weights: Path, precision: str) -> dict:
    import ctfm

    start, cpu = time.perf_counter(), time.process_time()
    record = ctfm.embed(scan, weights=str(weights), mode="whole", precision=precision)[0]
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "embedding": np.asarray(record["embedding"]).tolist(),
    }


def run_worker(kind: str, scan: Path, weights: Path, precision: str = "fp32") -> dict:
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
                "--precision",
                precision,
                "--result",
                out.name,
            ],
            check=True,
        )
        return json.loads(Path(out.name).read_text())


def encoder_gflop_320() -> float:
    """FLOPs (as 2 x multiply-adds) of one CT-FM encoder pass over 320^3, counted on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    from ctfm.models import create_model

    with torch.device("meta"):
        model = create_model("ct-fm").eval()
        x = torch.empty(1, 1, 320, 320, 320)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--scans", nargs="+", default=DEFAULT_SCANS)
    parser.add_argument("--worker", choices=["reference", "ours"])
    parser.add_argument("--scan")
    parser.add_argument("--weights")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--result")
    args = parser.parse_args()

    if args.worker:
        result = (
            worker_reference(args.scan, Path(args.weights))
            if args.worker == "reference"
            else worker_ours(args.scan, Path(args.weights), args.precision)
        )
        result["peak_rss_gb"] = peak_rss_gb()
        Path(args.result).write_text(json.dumps(result))
        return

    from ctfm.models import init_model, save_pretrained

    gflop = encoder_gflop_320()
    peak = matmul_peak_gflops()
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}"
    )
    print(f"encoder cost at 320^3: {gflop:.0f} GFLOP; fp32 matmul peak (2048^2): {peak:.0f} GFLOP/s\n")
    print(
        "| scan | pipeline | wall s | speed-up | peak RSS GB | cosine to reference | encoder GFLOP/s (% of matmul "
        "peak) |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_pretrained(init_model("ct-fm", seed=0), Path(tmp) / "weights")
        for rel in args.scans:
            scan = Path(args.data) / rel
            ref = run_worker("reference", scan, weights)
            rate = gflop / ref["encoder_seconds"]
            print(
                f"| {rel} | reference fp32 | {ref['seconds']:.1f} | 1.00 | {ref['peak_rss_gb']:.2f} | 1 | {rate:.0f} "
                f"({100 * rate / peak:.0f} %) |",
                flush=True,
            )
            for precision in ("fp32", "bf16"):
                ours = run_worker("ours", scan, weights, precision)
                rate = gflop / ours["seconds"]  # upper bound on time spent in the encoder: whole run
                print(
                    f"| {rel} | ctfm {precision} | {ours['seconds']:.1f} | {ref['seconds'] / ours['seconds']:.2f} | "
                    f"{ours['peak_rss_gb']:.2f} | "
                    f"{cosine(ours['embedding'], ref['embedding']):.6f} | >= {rate:.0f} ({100 * rate / peak:.0f} %) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
