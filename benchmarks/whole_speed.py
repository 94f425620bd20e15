"""Whole-scan embedding speed against the reference, by how much of the 320^3 input the scan fills.

Scans: the two whole scans of ``whole_scans_1p5mm`` (small scans inside constant padding) and one
that fills the input: ``abdomen_3mm/example_ct.nii.gz`` resampled linearly to 128^3 voxels of
2.7 mm (a 345.6 mm cube, the anatomy stretched by at most 14 % along one axis), so that after
1 mm resampling it is cropped, not padded, on every side.

For each scan, each in its own subprocess (as in ``embed_vs_reference.py``): the reference
pipeline (MONAI chain + one full-volume encoder pass, fp32) and ``ctfm.embed(mode="whole")`` in
fp32 and bf16. Full-size CT-FM architecture with random weights (seed 0). The fill fraction is the
scan's bounding box (voxels differing from the padding value) over the 320^3 input; "conv work"
is the share of the encoder's convolution multiply-adds the padding-aware path computes.

The reference peaks at about 17 GB: before each reference run this script waits until the machine
reports at least ``--min-free-gb`` available.

    python benchmarks/whole_speed.py [--data ../shared/data] [--precisions fp32 bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_vs_reference import cosine, run_worker  # noqa: E402
from real_anatomy import resample_real_scan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCANS = ["whole_scans_1p5mm/neck_a.nii.gz", "whole_scans_1p5mm/lumbar_pelvis.nii.gz"]
FILLING = ("abdomen_3mm/example_ct.nii.gz", (128, 128, 128), (2.7, 2.7, 2.7))


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def wait_for_memory(min_gb: float, timeout_s: float = 3600) -> None:
    start = time.monotonic()
    while available_gb() < min_gb:
        if time.monotonic() - start > timeout_s:
            raise SystemExit(
                f"error: memory: {available_gb():.1f} GB available, the reference needs {min_gb} GB (run when the "
                "machine is quieter)"
            )
        print(f"  waiting: {available_gb():.1f} GB available, need {min_gb} GB", file=sys.stderr, flush=True)
        time.sleep(30)


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def fill_and_work(scan: Path) -> tuple[float, float]:
    """(fill fraction of the 320^3 input, share of conv work of the padding-aware path)."""
    from ctfm.embedding.modes import prepare
    from ctfm.embedding.padding_aware import cost_ratio
    from ctfm.io import load_ct
    from ctfm.models import create_model
    from ctfm.preprocess import get_preset

    x = prepare(load_ct(scan)[0], get_preset("ct-fm-1mm-320")).as_tensor()[None]  # [1, 1, 320, 320, 320]
    inside = x[0, 0] != x[0, 0, 0, 0, 0]
    extent = 1.0
    for dim in range(3):
        idx = inside.any(dim=tuple(d for d in range(3) if d != dim)).nonzero()
        extent *= (int(idx.max()) - int(idx.min()) + 1) / x.shape[2 + dim] if len(idx) else 0.0
    with torch.device("meta"):
        encoder = create_model("ct-fm").eval()
    return extent, cost_ratio(encoder, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--min-free-gb", type=float, default=19.0)
    parser.add_argument("--json", help="also write the raw results here (updated after every run)")
    args = parser.parse_args()

    from ctfm.models import init_model, save_pretrained

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"load before: {load()}", flush=True)
    results: dict[str, dict] = {}

    def record(name, key, value):
        results.setdefault(name, {})[key] = value
        if args.json:
            Path(args.json).write_text(json.dumps(results))

    with tempfile.TemporaryDirectory() as tmp:
        weights = save_pretrained(init_model("ct-fm", seed=0), Path(tmp) / "weights")
        source, shape, spacing = FILLING
        filling = resample_real_scan(
            Path(args.data) / source, shape, spacing, Path(tmp) / "filling_abdomen_2p7mm.nii.gz"
        )
        scans = [(rel, Path(args.data) / rel) for rel in SCANS] + [(f"{source} at 128³ × 2.7 mm (fills)", filling)]
        # ctfm first (no memory constraint), then the reference runs one at a time when memory allows.
        for name, scan in scans:
            fill, work = fill_and_work(scan)
            record(name, "fill", fill)
            record(name, "work", work)
            for precision in args.precisions:
                ours = run_worker("ours", scan, weights, precision)
                print(
                    f"  {name}: ctfm {precision} {ours['seconds']:.1f} s wall, {ours['cpu_seconds']:.1f} s CPU "
                    f"({load()})",
                    file=sys.stderr,
                    flush=True,
                )
                record(name, precision, ours)
        for name, scan in scans:
            wait_for_memory(args.min_free_gb)
            ref = run_worker("reference", scan, weights)
            print(
                f"  {name}: reference {ref['seconds']:.1f} s wall, {ref['cpu_seconds']:.1f} s CPU ({load()})",
                file=sys.stderr,
                flush=True,
            )
            record(name, "reference", ref)

    print(f"load after: {load()}\n")
    print("Seconds are wall (CPU) seconds from file to vector; ratios are reference / ctfm (wall, CPU).\n")
    print(
        "| scan | fill of 320³ | conv work | reference s | ctfm fp32 s | ratio fp32 | cosine fp32 | ctfm bf16 s | "
        "ratio bf16 | cosine bf16 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ref = r["reference"]
        cells = [
            name,
            f"{100 * r['fill']:.0f} %",
            f"{100 * r['work']:.0f} %",
            f"{ref['seconds']:.1f} ({ref['cpu_seconds']:.0f})",
        ]
        for precision in ("fp32", "bf16"):
            ours = r.get(precision)
            if ours is None:
                cells += ["–", "–", "–"]
                continue
            cells += [
                f"{ours['seconds']:.1f} ({ours['cpu_seconds']:.0f})",
                f"{ref['seconds'] / ours['seconds']:.2f}× ({ref['cpu_seconds'] / ours['cpu_seconds']:.2f}×)",
                f"{cosine(ours['embedding'], ref['embedding']):.6f}",
            ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
