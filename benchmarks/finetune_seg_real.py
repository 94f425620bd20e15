"""Fine-tune segmentation on one real abdominal CT, test on another patient and scanner.

Train: ../shared/data/abdomen_3mm (example_ct_sm + example_seg, 3 mm, TotalSegmentator labels,
a model's output). Test: ../shared/data/abdomen_dicom (DICOM, Siemens, 0.98 x 0.98 x 2 mm, its own
seg.nii.gz stored LAS). Classes: liver, spleen, kidneys, aorta, vertebra T12, stomach (the kidneys
are not in the test scan's field of view: Dice is undefined there, reported as such).

Two encoders, everything else equal (seed, steps, data, crops):
  (a) random init;
  (b) pretrained with `ctfm pretrain` (intra-sample contrastive) on the other real scans
      (whole_scans_1p5mm, lung_tumour_nrrd, sarcoma_ct) for a fixed number of steps.

Prediction, two ways: (1) MONAI's Gaussian sliding window on the test scan preprocessed with the
run's own PreprocessSpec (3 mm isotropic, SPL), argmax, Dice on that grid against the test label
map brought through the same spatial steps (nearest neighbour); (2) the product path,
``ctfm predict seg`` on the DICOM series (labels on the series' own grid) scored by
``ctfm evaluate seg`` against the test label map on that grid. Also in-sample Dice on the
training scan. ``--reuse`` scores the exports already in ``--out`` without training again.

    python benchmarks/finetune_seg_real.py [--pretrain-steps 120] [--finetune-steps 500] [--out DIR] [--reuse]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CTFM_TEST_DATA", ROOT.parent / "shared" / "data"))
CLASSES = ["liver", "spleen", "kidney_right", "kidney_left", "aorta", "vertebrae_T12", "stomach"]
PRETRAIN_SCANS = [
    "whole_scans_1p5mm/neck_a.nii.gz",
    "whole_scans_1p5mm/lumbar_pelvis.nii.gz",
    "lung_tumour_nrrd/lung1_image.nrrd",
    "sarcoma_ct/STS_019/CT_image.nii.gz",
    "sarcoma_ct/STS_025/CT_image.nii.gz",
]
ARCH = {"init_filters": 8}
SPACING = [3.0, 3.0, 3.0]
PATCH = [32, 64, 64]


def pretrain_encoder(out: Path, steps: int) -> Path:
    from ctfm.pretrain.config import resolve_pretrain_config
    from ctfm.pretrain.train import pretrain

    manifest = out / "pretrain_scans.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path"])
        for scan in PRETRAIN_SCANS:
            writer.writerow([str(DATA / scan)])
    config = resolve_pretrain_config(
        "tiny",
        None,
        {
            "data": str(manifest),
            "out": str(out / "pretrain"),
            "model_kwargs": ARCH,
            "spacing_mm": SPACING,
            "crop_size": [16, 48, 48],
            "num_crops": 4,
            "batch_size": 2,
            "max_epochs": 1,
            "steps_per_epoch": steps,
            "lr": 3e-4,
        },
    )
    return pretrain(config, resume=False, progress_bar=False)


def finetune(out: Path, encoder: str, steps: int, seed: int) -> Path:
    from ctfm.finetune.seg import finetune_seg, resolve_seg_config

    manifest = out / "train.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "split"])
        writer.writerow([DATA / "abdomen_3mm/example_ct_sm.nii.gz", DATA / "abdomen_3mm/example_seg.nii.gz", "train"])
    config = resolve_seg_config(
        "tiny",
        None,
        {
            "data": str(manifest),
            "class_map": "totalseg-v2",
            "classes": CLASSES,
            "out": str(out / ("ft-" + ("pretrained" if encoder else "random"))),
            "encoder_weights": encoder,
            "model_kwargs": ARCH,
            "spacing_mm": SPACING,
            "patch_size": PATCH,
            "val_every_n_epochs": 0,
            "val_fraction": 0.0,
            "max_epochs": 1,
            "steps_per_epoch": steps,
            "batch_size": 2,
            "lr": 1e-3,
            "seed": seed,
            "warmup_epochs": 0,
        },
    )
    return finetune_seg(config, resume=False, progress_bar=False)


def test_dice(export: Path, image_path: Path, label_path: Path) -> dict:
    """Per-class Dice of the exported model on one scan (MONAI sliding window), on the run's grid."""
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    from ctfm.finetune.data import map_values
    from ctfm.io import load_ct, load_labels
    from ctfm.models.labelmaps import resolve_labels
    from ctfm.models.segmentation import load_segmentation_model
    from ctfm.preprocess import build_paired_transforms

    model, labels, spec, info = load_segmentation_model(str(export))
    image, _ = load_ct(image_path)
    truth = load_labels(label_path, image).labels.numpy()[0]
    source = resolve_labels("totalseg-v2")
    by_name = {n: v for v, n in source.items()}
    value_map = {v: 0 for v in source}
    value_map.update({by_name[labels[c]]: c for c in labels if c})
    from monai.data import MetaTensor

    mapped = MetaTensor(torch.from_numpy(map_values(truth, value_map))[None].float(), affine=image.affine)
    item = build_paired_transforms(spec)({"image": image.float(), "label": mapped})
    with torch.no_grad():
        logits = sliding_window_inference(
            item["image"][None].as_tensor(),
            roi_size=PATCH,
            sw_batch_size=2,
            predictor=model,
            overlap=0.625,
            mode="gaussian",
        )
    prediction = logits.argmax(1)[0].numpy()
    reference = np.rint(item["label"][0].numpy()).astype(int)
    out = {}
    for c in sorted(labels):
        if c == 0:
            continue
        t, p = reference == c, prediction == c
        out[labels[c]] = float("nan") if not t.any() else float(2 * (t & p).sum() / (t.sum() + p.sum()))
    return out


def product_dice(export: Path, work: Path) -> dict:
    """Per-class Dice of ``ctfm predict seg`` on the test DICOM series, scored by ``ctfm evaluate
    seg`` on the series' own grid (the product path; the network-grid Dice above is MONAI's)."""
    import nibabel as nib
    import numpy as np

    from ctfm.finetune.data import map_values
    from ctfm.io import load_ct, load_labels
    from ctfm.models.labelmaps import resolve_labels
    from ctfm.predict.scoring import evaluate_segmentation
    from ctfm.predict.seg import predict_seg

    pred_dir, truth_dir = work / "pred", work / "truth"
    summary = predict_seg(
        [str(DATA / "abdomen_dicom/dicom")], model=str(export), out=str(pred_dir), progress=False, overwrite=True
    )
    if summary.failed:
        raise SystemExit(f"ctfm predict seg failed: {summary.failed}")
    prediction = summary.outputs[0] if summary.outputs else sorted(pred_dir.glob("*.nii.gz"))[0]
    labels = {
        int(k): v
        for k, v in json.loads(prediction.with_name(prediction.name.replace(".nii.gz", ".labels.json")).read_text())[
            "labels"
        ].items()
    }
    # The reference label map in the prediction's class indices, on the series grid.
    image, _ = load_ct(DATA / "abdomen_dicom/dicom")
    truth = load_labels(DATA / "abdomen_dicom/seg.nii.gz", image).labels.numpy()[0]
    by_name = {n: v for v, n in resolve_labels("totalseg-v2").items()}
    value_map = {v: 0 for v in by_name.values()}
    value_map.update({by_name[name]: index for index, name in labels.items() if index})
    predicted = nib.load(str(prediction))
    if predicted.shape != truth.shape:
        raise SystemExit(f"prediction shape {predicted.shape} differs from the series grid {truth.shape}")
    truth_dir.mkdir(parents=True, exist_ok=True)
    reference = map_values(truth, value_map).astype(np.uint8)
    nib.save(nib.Nifti1Image(reference, predicted.affine), str(truth_dir / prediction.name))
    results = evaluate_segmentation(str(prediction), str(truth_dir / prediction.name), n_resamples=200)
    per_class = results["summary"]["per_class"]
    # Classes absent from the reference are n/a here, as on the network grid (ctfm evaluate seg
    # itself scores a prediction of an absent class as Dice 0).
    present = {labels[int(v)] for v in np.unique(reference) if int(v)}
    return {
        name: (
            per_class[name]["dice"]["estimate"]
            if name in present and per_class.get(name, {}).get("dice")
            else float("nan")
        )
        for name in labels.values()
        if name != labels.get(0)
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=120)
    parser.add_argument("--finetune-steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reuse", action="store_true", help="score the exports already in --out instead of training again"
    )
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "ctfm-finetune-seg-real"))
    args = parser.parse_args(argv)
    if not (DATA / "abdomen_3mm").is_dir() or not (DATA / "abdomen_dicom").is_dir():
        print(f"skipped: real CT data not found at {DATA}", file=sys.stderr)
        return 0
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()
    encoder = out / "pretrain" / "export" if args.reuse else pretrain_encoder(out, args.pretrain_steps)
    timings["pretrain_s"] = time.perf_counter() - t0
    results, training_fit, product = {}, {}, {}
    for name, weights in (("random-init", ""), ("ctfm-pretrained", str(encoder))):
        t0 = time.perf_counter()
        export = (
            out / ("ft-" + ("pretrained" if weights else "random")) / "export"
            if args.reuse
            else finetune(out, weights, args.finetune_steps, args.seed)
        )
        timings[f"finetune_{name}_s"] = time.perf_counter() - t0
        results[name] = test_dice(export, DATA / "abdomen_dicom/dicom", DATA / "abdomen_dicom/seg.nii.gz")
        # In-sample Dice on the training scan: shows whether the network learned at all, apart
        # from whether it carries over to another patient and scanner.
        training_fit[name] = test_dice(
            export, DATA / "abdomen_3mm/example_ct_sm.nii.gz", DATA / "abdomen_3mm/example_seg.nii.gz"
        )
        t0 = time.perf_counter()
        product[name] = product_dice(export, out / f"product-{name}")
        timings[f"predict_and_evaluate_{name}_s"] = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "settings": vars(args),
                "arch": ARCH,
                "spacing_mm": SPACING,
                "patch": PATCH,
                "timings": timings,
                "dice": results,
                "training_scan_dice": training_fit,
                "product_path_dice": product,
            },
            indent=2,
        )
    )
    names = list(results["random-init"])

    def cell(value: float) -> str:
        return "n/a" if value != value else f"{value:.3f}"

    arms = ("random-init", "ctfm-pretrained")
    print(
        "\n| class | random init | pretrained | random init, series grid | pretrained, series grid | random init, "
        "training scan | pretrained, training scan |\n|---|---|---|---|---|---|---|"
    )
    for n in names:
        cells = (
            [results[a][n] for a in arms]
            + [product[a].get(n, float("nan")) for a in arms]
            + [training_fit[a][n] for a in arms]
        )
        print(f"| {n} | " + " | ".join(cell(v) for v in cells) + " |")
    import numpy as np

    for key in results:
        vals = [v for v in results[key].values() if v == v]
        fit = [v for v in training_fit[key].values() if v == v]
        grid = [v for v in product[key].values() if v == v]
        print(
            f"macro ({key}): test scan {np.mean(vals):.3f} over {len(vals)} classes present (series grid, ctfm predict "
            f"seg: {np.mean(grid):.3f} over {len(grid)}); training scan {np.mean(fit):.3f} over {len(fit)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
