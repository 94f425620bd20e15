"""Feeding speed of pretraining: training views per second per CPU core.

Reference (CT-FM's pretraining chain, docs/recipe.md): for every training sample, MONAI reads the compressed scan, runs
LoadImage -> EnsureChannelFirst -> Orientation SPL -> Spacing 3x1x1 mm -> CropForeground ->
SpatialPad 32x128x128 (-1024) -> window, then RandSpatialCropSamples (15 crops) and, per view,
random resized crop + flip + histogram shift + Gaussian smoothing. Ours: the same views drawn from
the preprocessed cache (`ctfm cohort cache`), reading only the crops. Both on one thread, same
inputs, in one run; the one-off cache build is timed separately.

Inputs: the compressed NIfTI scans of ../shared/data, and two full-resolution scans like those
CT-FM trained on (IDC chest/abdomen CT: 512x512, ~0.7 mm in-plane, 1.25 mm slices), built from
real anatomy (abdomen_3mm/example_ct.nii.gz, linear resampling) and stored as .nii.gz.

    python benchmarks/pretrain_feeding.py [--data ../shared/data] [--samples 3]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from real_anatomy import resample_real_scan

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "abdomen_3mm/example_ct.nii.gz",
    "whole_scans_1p5mm/neck_a.nii.gz",
    "whole_scans_1p5mm/lumbar_pelvis.nii.gz",
    "sarcoma_ct/STS_019/CT_image.nii.gz",
]
FULL_RES = {"idc_like_a": ((512, 512, 269), (0.715, 0.592, 1.25)), "idc_like_b": ((512, 512, 224), (0.715, 0.592, 1.5))}


def reference_sample(path: Path, state: np.random.RandomState, num_crops: int = 15) -> torch.Tensor:
    """One training sample exactly as CT-FM's pipeline makes it, from the compressed file."""
    from monai import transforms as T

    axes = (("L", "R"), ("P", "A"), ("I", "S"))
    volume = T.Compose(
        [
            T.LoadImage(image_only=True),
            T.EnsureChannelFirst(),
            T.Orientation(axcodes="SPL", labels=axes),
            T.Spacing(pixdim=[3, 1, 1], mode="bilinear"),
            T.CropForeground(),
            T.SpatialPad(spatial_size=[32, 128, 128], value=-1024),
            T.ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True),
        ]
    )(str(path))
    crops = T.RandSpatialCropSamples(roi_size=[32, 128, 128], num_samples=num_crops, random_size=False)
    crops.set_random_state(state=state)
    # Per view, CT-FM's transforms as MONAI ships them (transforms/ssl.py RandomResizedCrop + yaml).
    resize = T.Resize(spatial_size=[32, 128, 128], mode="trilinear")
    flip = T.RandFlip(prob=0.5, spatial_axis=[0])
    histogram = T.RandHistogramShift(num_control_points=5, prob=0.5)
    smooth = T.RandGaussianSmooth(prob=0.5)
    for t in (flip, histogram, smooth):
        t.set_random_state(state=state)

    def view(crop):
        scale_crop = T.RandScaleCrop(roi_scale=state.uniform(0.33, 1.0), random_size=False)
        scale_crop.set_random_state(state=state)
        return torch.as_tensor(smooth(histogram(flip(resize(scale_crop(crop))))))

    views = [[view(c) for _ in range(2)] for c in crops(volume)]
    return torch.stack([torch.stack(pair) for pair in views])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--samples", type=int, default=3, help="samples per scan and pipeline")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from ctfm.pretrain.cache import VolumeCache, build_cache  # ViewsDataset makes exactly these calls
    from ctfm.pretrain.views import MultiCropViews, sample_state

    data = Path(args.data)
    print(f"machine: {platform.machine()}, 1 thread (per-core figures), torch {torch.__version__}\n")
    print("| input | reference views/s/core | ctfm views/s/core | ratio |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scans = {rel: data / rel for rel in SMALL}
        for name, (shape, spacing) in FULL_RES.items():
            scans[f"{name} {shape[0]}x{shape[1]}x{shape[2]} .nii.gz"] = resample_real_scan(
                data / "abdomen_3mm" / "example_ct.nii.gz", shape, spacing, tmp / f"{name}.nii.gz"
            )
        started = time.perf_counter()
        build_cache([str(p) for p in scans.values()], tmp / "cache", progress=False)
        cache_seconds = time.perf_counter() - started
        cache = VolumeCache(tmp / "cache")
        by_source = {Path(cache.entry(i)["source_path"]).resolve(): i for i in range(len(cache))}
        views = MultiCropViews()
        totals = {"reference": 0.0, "ours": 0.0}
        count = 0
        for label, path in scans.items():
            index = by_source[path.resolve()]
            t0 = time.perf_counter()
            for k in range(args.samples):
                reference_sample(path, sample_state(0, 0, k))
            t1 = time.perf_counter()
            for k in range(args.samples):
                views(
                    cache.shape(index),
                    lambda start, size, index=index: cache.read_crop(index, start, size),
                    sample_state(0, 0, k),
                )
            t2 = time.perf_counter()
            n_views = args.samples * 30
            ref_rate, our_rate = n_views / (t1 - t0), n_views / (t2 - t1)
            totals["reference"] += t1 - t0
            totals["ours"] += t2 - t1
            count += n_views
            print(f"| {label} | {ref_rate:.1f} | {our_rate:.1f} | {our_rate / ref_rate:.1f}x |", flush=True)
        ref_rate, our_rate = count / totals["reference"], count / totals["ours"]
        print(f"| **all inputs** | {ref_rate:.1f} | {our_rate:.1f} | {our_rate / ref_rate:.1f}x |")
        print(f"\none-off cache build for these {len(scans)} scans: {cache_seconds:.1f} s (1 worker)")


if __name__ == "__main__":
    main()
