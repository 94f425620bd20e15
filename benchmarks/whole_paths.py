"""Today's streamed encoder against the padding-aware one, on one prepared whole-scan volume.

Both run in this process, one after the other, on the same ``ct-fm-1mm-320`` volume with the same
random full-size CT-FM encoder (seed 0), fp32; prints the share of convolution work the
padding-aware path computes, both times, the speed-up and the cosine between the two vectors.

    python benchmarks/whole_paths.py ../shared/data/whole_scans_1p5mm/neck_a.nii.gz
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scan", help="a CT file or DICOM folder")
    args = parser.parse_args()

    from ctfm.embedding.modes import prepare
    from ctfm.embedding.padding_aware import cost_ratio, padding_aware_embedding
    from ctfm.embedding.streaming import streamed_embedding
    from ctfm.io import load_ct
    from ctfm.models import init_model
    from ctfm.preprocess import get_preset

    encoder = init_model("ct-fm", 0).eval()
    volume = prepare(load_ct(args.scan)[0], get_preset("ct-fm-1mm-320")).as_tensor()[None]  # [1, 1, 320, 320, 320]
    print(f"conv work of the padding-aware path: {cost_ratio(encoder, volume):.1%}", flush=True)
    start = time.perf_counter()
    aware = padding_aware_embedding(encoder, volume)
    t_aware = time.perf_counter() - start
    print(f"padding-aware: {t_aware:.1f} s", flush=True)
    start = time.perf_counter()
    plain = streamed_embedding(encoder, volume)
    t_plain = time.perf_counter() - start
    cosine = torch.nn.functional.cosine_similarity(aware, plain).item()
    print(f"plain streamed: {t_plain:.1f} s; padding-aware is {t_plain / t_aware:.2f}x faster; cosine {cosine:.7f}")


if __name__ == "__main__":
    main()
