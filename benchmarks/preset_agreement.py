"""Agreement of each ctfm preset with CT-FM's MONAI reference chain on the real scans.

Runs both pipelines on the same inputs in one process and prints a Markdown table: output
shape, max absolute difference, and the time of each (ratio measured side by side).

    python benchmarks/preset_agreement.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the reference chains live with the tests that gate on them

from test_preset_agreement import SCANS  # noqa: E402

from ctfm.io import load_ct  # noqa: E402
from ctfm.preprocess import get_preset, preprocess  # noqa: E402
from reference_chains import REFERENCE_CHAINS, load_reference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    data = Path(args.data)
    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}"
    )
    print("| scan | preset | shape | max abs diff | ours s | reference s |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for scan, reader in SCANS:
        path = data / scan
        for preset in sorted(REFERENCE_CHAINS):
            t0 = time.perf_counter()
            ours = preprocess(load_ct(path)[0], get_preset(preset))
            t1 = time.perf_counter()
            ref_in = load_ct(path)[0] if reader == "ours" else load_reference(path, reader=reader)
            ref = REFERENCE_CHAINS[preset](ref_in)
            t2 = time.perf_counter()
            diff = (
                float((torch.as_tensor(ours) - torch.as_tensor(ref)).abs().max())
                if ours.shape == ref.shape
                else float("inf")
            )
            worst = max(worst, diff)
            shape = "x".join(map(str, ours.shape[1:]))
            print(f"| {scan} | {preset} | {shape} | {diff:.2g} | {t1 - t0:.2f} | {t2 - t1:.2f} |")
    print(f"\nworst max abs difference over all scans and presets: {worst:.2g}")


if __name__ == "__main__":
    main()
