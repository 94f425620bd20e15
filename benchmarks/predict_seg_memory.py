"""Segmentation prediction: ctfm's streamed sliding window vs MONAI's sliding_window_inference.

Two measurements, each side in its own subprocess (peak RSS = the child's ru_maxrss):

  agreement  a small real-derived scan (default ../shared/data/abdomen_3mm/example_ct.nii.gz):
             ctfm's predict_volume vs MONAI sliding_window_inference + argmax on the same
             preprocessed tensor with the same model and settings; labels compared on the
             network grid (the exact part) and seconds side by side.
  memory     a synthetic CT of --size (default 512 512 800, 0.8 x 0.8 x 1.0 mm) with a
             118-class model: ctfm's peak RSS and seconds for the whole prediction back onto
             the input grid; MONAI's need is computed from its buffers (float32 output
             [118, D, H, W] + count map), since it does not fit this machine.

Examples:
  python benchmarks/predict_seg_memory.py agreement --init-filters 8
  python benchmarks/predict_seg_memory.py memory --init-filters 32 --z-levels 1
  python benchmarks/predict_seg_memory.py memory --init-filters 32            # the full run (hours on 2 cores)

--z-levels K runs only the windows of the first K first-axis starts (the ring buffer, the
forward pass and the inversion all reach their full size within the first level); it is for
measuring memory in bounded time, the labels of the rows left out are meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _model(n_classes: int, init_filters: int):
    from ctfm.models.segmentation import load_segmentation_model

    return load_segmentation_model(None, out_channels=n_classes, init_filters=init_filters, seed=0)


def child(args) -> dict:
    import numpy as np
    import torch

    from ctfm.io import load_ct
    from ctfm.predict import aggregation
    from ctfm.predict.seg import inference_spec, network_input, predict_prepared
    from ctfm.preprocess import build_transforms

    torch.set_num_threads(args.threads)
    loaded = _model(args.classes, args.init_filters)
    settings = aggregation.WindowSettings.from_dict(loaded.info["inference"])
    image, _ = load_ct(args.input)
    # Timed separately: preprocessing (each side's own) and prediction. ctfm's prediction ends on
    # the input grid (its inversion included); MONAI's ends on the network grid, as it does.
    start = time.perf_counter()
    if args.side == "ctfm":
        if args.z_levels:
            original = aggregation.monai_windows

            def first_levels(size, s):
                windows = original(size, s)
                starts = sorted({w[0].start for w in windows})[: args.z_levels]
                return [w for w in windows if w[0].start in starts]

            aggregation.monai_windows = first_levels
        prepared = network_input(image, loaded)
        if not args.save:
            del image  # as ctfm predict seg does: the HU volume is not held while predicting
        preprocess_s = time.perf_counter() - start
        labels = predict_prepared(*prepared, loaded, settings)
        predict_s = time.perf_counter() - start - preprocess_s
        x = prepared[0]
        del prepared
        result = {"labels_shape": list(labels.shape)}
        if args.save:
            # Network-grid labels for the agreement check (untimed): the streamed aggregation's own
            # argmax, comparable voxel for voxel with MONAI's.
            result["net_labels"] = args.save
            np.save(
                args.save, aggregation.streamed_logits(x, loaded.model, settings).argmax(0).numpy().astype(np.uint8)
            )
    else:
        net = build_transforms(inference_spec(loaded.spec))(image)
        x = net.as_tensor()[None].float()
        del image, net
        preprocess_s = time.perf_counter() - start
        labels = aggregation.monai_logits(x, loaded.model, settings).argmax(0).numpy().astype(np.uint8)
        predict_s = time.perf_counter() - start - preprocess_s
        result = {"labels_shape": list(labels.shape)}
        if args.save:
            np.save(args.save, labels)
    result.update(
        preprocess_seconds=round(preprocess_s, 2),
        predict_seconds=round(predict_s, 2),
        seconds=round(preprocess_s + predict_s, 2),
    )
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return result


def run_child(side: str, args, save: str | None = None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "_child",
        "--side",
        side,
        "--input",
        str(args.input),
        "--classes",
        str(args.classes),
        "--init-filters",
        str(args.init_filters),
        "--threads",
        str(args.threads),
    ]
    if save:
        cmd += ["--save", save]
    if getattr(args, "z_levels", None):
        cmd += ["--z-levels", str(args.z_levels)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def agreement(args) -> dict:
    import numpy as np

    tmp = Path(args.work)
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for rep in range(args.repeats):  # interleaved, which side first alternating, so load on the machine hits both
        order = ("ctfm", "monai") if rep % 2 == 0 else ("monai", "ctfm")
        # The network-grid labels are saved (untimed) in the first repeat only.
        row = {side: run_child(side, args, save=str(tmp / f"{side}.npy") if rep == 0 else None) for side in order}
        failed = {side: r["error"] for side, r in row.items() if "error" in r}
        if failed:
            raise SystemExit(f"predict_seg_memory agreement: a side failed: {failed}")
        rows.append(row)
    a, b = np.load(tmp / "ctfm.npy"), np.load(tmp / "monai.npy")
    # Ratio of the medians over the interleaved repeats: ctfm seconds / MONAI seconds (< 1: ctfm faster).
    med = {side: float(np.median([r[side]["seconds"] for r in rows])) for side in ("ctfm", "monai")}
    med_predict = {side: float(np.median([r[side]["predict_seconds"] for r in rows])) for side in ("ctfm", "monai")}
    return {
        "input": Path(args.input).name,
        "network_grid": list(a.shape),
        "identical_fraction": float((a == b).mean()),
        "median_seconds": med,
        "median_predict_seconds": med_predict,
        "ctfm_over_monai_seconds": round(med["ctfm"] / med["monai"], 3),
        "ctfm_over_monai_predict_seconds": round(med_predict["ctfm"] / med_predict["monai"], 3),
        "runs": rows,
    }


def memory(args) -> dict:
    import nibabel as nib
    import numpy as np

    from ctfm.predict.seg import inference_spec

    path = Path(args.work) / f"synthetic_{'x'.join(map(str, args.size))}.nii"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        x, y, z = args.size
        hu = np.full((x, y, z), -1000, dtype=np.int16)
        xx, yy = np.mgrid[:x, :y]
        body = ((xx - x / 2) / (0.42 * x)) ** 2 + ((yy - y / 2) / (0.32 * y)) ** 2 < 1
        hu[body] = 40
        hu[(((xx - x / 2) / (0.06 * x)) ** 2 + ((yy - 0.62 * y) / (0.06 * y)) ** 2 < 1)] = 700
        affine = np.diag([0.8, 0.8, 1.0, 1.0])
        nib.save(nib.Nifti1Image(hu, affine), str(path))
    args.input = path
    loaded = _model(args.classes, args.init_filters)
    spec = inference_spec(loaded.spec)
    ours = run_child("ctfm", args)
    # MONAI keeps output [N, D, H, W] and a count map [1, D, H, W] in float32 on the network grid.
    from ctfm.io import load_ct
    from ctfm.preprocess import build_transforms

    image, _ = load_ct(path)
    net_shape = list(build_transforms(spec)(image).shape[1:])
    voxels = int(np.prod(net_shape))
    monai_need = (args.classes + 1) * voxels * 4 / 2**30
    return {
        "input_size": args.size,
        "spacing_mm": [0.8, 0.8, 1.0],
        "network_grid": net_shape,
        "preprocess": spec.name,
        "classes": args.classes,
        "init_filters": args.init_filters,
        "z_levels": args.z_levels,
        "ctfm": ours,
        "monai_output_plus_count_gb": round(monai_need, 2),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["agreement", "memory", "_child"])
    p.add_argument("--side")
    p.add_argument("--input", default=str(ROOT.parent / "shared" / "data" / "abdomen_3mm" / "example_ct.nii.gz"))
    p.add_argument("--classes", type=int, default=118)
    p.add_argument("--init-filters", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, nargs=3, default=[512, 512, 800])
    p.add_argument("--z-levels", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--save")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ctfm_predict_seg_bench"))
    args = p.parse_args()
    if args.what == "_child":
        print(json.dumps(child(args)))
        return
    result = agreement(args) if args.what == "agreement" else memory(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
