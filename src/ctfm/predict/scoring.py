"""Scoring predicted label maps against truths: ``ctfm evaluate seg``.

>>> result = evaluate_segmentation("preds/", "truth/", labels="totalseg-v2", out="eval/")   # doctest: +SKIP
>>> result["summary"]["macro"]["dice"]["estimate"]                                         # doctest: +SKIP

Predictions and truths are label-map files, or folders of them matched by name (the file name
without its extension). The prediction must lie on the truth's grid (axis order and flips may
differ); distances use the truth's voxel spacing in mm. The class map is given, else read from the
predictions' ``<name>.labels.json`` (written by ``ctfm predict seg``), else from the truth files.
The scores and their rules for empty masks are :mod:`ctfm.evaluate.metrics.segmentation`;
``compare`` scores a second prediction set on the same truths and tests per-case Dice with a
paired Wilcoxon signed-rank test.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from ctfm.errors import CTInputError, OptionError, UserError, optional_import
from ctfm.evaluate.metrics.segmentation import (
    DEFAULT_NSD_TOLERANCE_MM,
    METRICS,
    SegEvaluation,
    compare_dice,
    mask_metrics,
    summarise_cases,
)
from ctfm.evaluate.reports.report import write_results
from ctfm.io import load_labels
from ctfm.io.hashing import file_sha256
from ctfm.io.labels import check_label_values, label_names, require_same_grid
from ctfm.io.volume import read_volume
from ctfm.models.labelmaps import resolve_labels
from ctfm.runtime import atomic_path, write_text_atomic

LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def label_name(path: Path) -> str:
    """A label file's case name: its file name without the extension."""
    name = path.name
    for suffix in LABEL_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def match_cases(
    pred: str | os.PathLike, truth: str | os.PathLike
) -> tuple[list[tuple[str, Path, Path | None]], list[str]]:
    """[(name, truth file, prediction file or None)] matched by name, and prediction names without a truth."""
    pred, truth = Path(pred), Path(truth)
    for path, what in ((pred, "--pred"), (truth, "--truth")):
        if not path.exists():
            raise CTInputError(path, "no such file or folder", f"check {what}")
    if truth.is_file() and (pred.is_file() or pred.is_dir()):
        if pred.is_dir():
            candidate = _label_files(pred).get(label_name(truth))
            return [(label_name(truth), truth, candidate)], []
        return [(label_name(truth), truth, pred)], []
    if not truth.is_dir() or not pred.is_dir():
        raise CTInputError(
            pred if truth.is_dir() else truth,
            "a truth folder needs a prediction folder",
            "give two files or two folders",
        )
    truths, preds = _label_files(truth), _label_files(pred)
    if not truths:
        raise CTInputError(
            truth, "holds no label maps (.nii.gz, .nii, .nrrd, .mha)", "give the folder of reference segmentations"
        )
    pairs = [(name, truths[name], preds.get(name)) for name in sorted(truths)]
    return pairs, sorted(set(preds) - set(truths))


def _label_files(folder: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(LABEL_SUFFIXES):
            out[label_name(path)] = path
    return out


def _read_truth(path: Path):
    """(MetaTensor grid [1, X, Y, Z] holding the truth labels, spacing (mm) per array axis)."""
    import torch
    from monai.data import MetaTensor

    array, affine, _ = read_volume(path)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise CTInputError(
            path, f"label map of shape {tuple(array.shape)} is not one 3D volume", "give one 3D label map"
        )
    grid = MetaTensor(
        torch.zeros((1, *array.shape), dtype=torch.int8), affine=torch.as_tensor(affine, dtype=torch.float64)
    )
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return grid, tuple(float(s) for s in spacing)


def load_pair(
    truth_path: Path, pred_path: Path, labels: dict[int, str]
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(truth [X, Y, Z], prediction [X, Y, Z] on the truth grid, spacing mm); refuses another grid or unknown values."""

    grid, spacing = _read_truth(truth_path)
    truth = load_labels(truth_path, grid).labels.numpy()[0]
    require_same_grid(pred_path, grid)
    prediction = load_labels(pred_path, grid).labels.numpy()[0]
    check_label_values(truth, labels, truth_path)
    check_label_values(prediction, labels, pred_path)
    return truth, prediction, spacing


def _labels_for(labels, pairs) -> tuple[dict[int, str], str]:
    """The class map: given, else the prediction's ``<name>.labels.json`` (ctfm predict seg), else the truth file's names."""
    if labels is not None:
        return dict(resolve_labels(labels)), "given"
    for _, truth, pred in pairs:
        if pred is None:
            continue
        sidecar = pred.with_name(label_name(pred) + ".labels.json")
        if sidecar.is_file():
            try:
                table = json.loads(sidecar.read_text(encoding="utf-8"))
                table = table.get("labels", table)
                return {int(k): str(v) for k, v in table.items()}, str(sidecar.name)
            except (ValueError, AttributeError, TypeError):
                raise CTInputError(sidecar, "not a JSON object of label value -> name", "give --labels MAP") from None

        names = label_names(truth)
        if names:
            return {0: "background", **{int(k): v for k, v in names.items() if int(k) != 0}}, "truth file"
        break
    raise OptionError(
        "no class map: the predictions carry no <name>.labels.json and the truths name no classes; give --labels "
        "(totalseg-v2, a JSON file, or liver,spleen)"
    )


def score_cases(pairs, labels: dict[int, str], nsd_tolerance_mm: float) -> tuple[list[dict], list[dict]]:
    """Per case and class metric rows, and failures (missing or refused predictions)."""

    rows, failures = [], []
    classes = [v for v in sorted(labels) if v != 0]
    for name, truth_path, pred_path in pairs:
        if pred_path is None:
            failures.append({"case": name, "error": f"{truth_path.name}: no prediction of that name"})
            continue
        try:
            truth, prediction, spacing = load_pair(truth_path, pred_path, labels)
        except UserError as exc:
            failures.append({"case": name, "error": str(exc)})
            continue
        for value in classes:
            metrics = mask_metrics(truth == value, prediction == value, spacing, nsd_tolerance_mm)
            rows.append(
                {
                    "case": name,
                    "label": value,
                    "class": labels[value],
                    **metrics,
                    "truth_voxels": int((truth == value).sum()),
                    "pred_voxels": int((prediction == value).sum()),
                }
            )
    return rows, failures


def evaluate_segmentation(
    pred: str | os.PathLike,
    truth: str | os.PathLike,
    labels=None,
    compare: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    n_resamples: int = 2000,
    seed: int = 0,
) -> SegEvaluation:
    """Score predictions against truths (files or folders matched by name) -> :class:`SegEvaluation`.

    With ``out``: ``results.json`` (with provenance), ``metrics.csv`` (one row per case and
    class) and ``overlay.png`` (worst and best case by macro Dice). Failures (a missing or
    refused prediction) are listed in ``results["failures"]``; the other cases are scored.
    """
    if not nsd_tolerance_mm > 0:
        raise OptionError(f"--nsd-tolerance {nsd_tolerance_mm}: expected a positive distance in mm")
    pairs, unmatched = match_cases(pred, truth)
    labels, labels_source = _labels_for(labels, pairs)
    rows, failures = score_cases(pairs, labels, nsd_tolerance_mm)
    results = {
        "rules": {
            "both_empty": "absent: Dice, NSD, HD95 undefined (not counted)",
            "one_empty": "Dice 0, NSD 0, HD95 undefined",
            "class_mean": "over cases where defined",
            "macro": "mean over classes of the class means",
            "nsd_tolerance_mm": nsd_tolerance_mm,
            "interval": "95% percentile bootstrap over cases",
        },
        "labels": {str(k): v for k, v in labels.items()},
        "labels_source": labels_source,
        "summary": summarise_cases(rows, labels, n_resamples, seed),
        "per_case": _per_case(rows),
        "failures": failures,
        "unmatched_predictions": unmatched,
    }
    if compare is not None:
        compare_pairs, _ = match_cases(compare, truth)
        compare_rows, compare_failures = score_cases(compare_pairs, labels, nsd_tolerance_mm)
        results["compare"] = {
            "path": str(compare),
            "summary": summarise_cases(compare_rows, labels, n_resamples, seed),
            "wilcoxon": compare_dice(rows, compare_rows, labels),
            "failures": compare_failures,
        }
    result = SegEvaluation(results, _provenance(pred, truth, compare, pairs, labels))
    if out is not None:
        _write_outputs(Path(out), result, rows, pairs, labels)
    return result


def _per_case(rows: list[dict]) -> dict:
    cases: dict[str, dict] = {}
    for r in rows:
        cases.setdefault(r["case"], {})[r["class"]] = {m: r[m] for m in (*METRICS, "status")}
    for classes in cases.values():
        dice = [v["dice"] for v in classes.values() if not math.isnan(v["dice"])]
        classes["_macro_dice"] = float(np.mean(dice)) if dice else math.nan
    return cases


def _provenance(pred, truth, compare, pairs, labels) -> dict:
    """Input hashes, the manifest hash and, where the predictions say so, the model that made them."""
    files = [
        {
            "case": name,
            "truth": str(t),
            "truth_sha256": file_sha256(t),
            "prediction_sha256": file_sha256(p) if p else None,
        }
        for name, t, p in pairs
    ]
    manifest = hashlib.sha256(
        json.dumps([(f["case"], f["truth_sha256"], f["prediction_sha256"]) for f in files]).encode()
    ).hexdigest()
    model = {}
    for _, _, p in pairs:
        if p is not None and p.with_name(label_name(p) + ".labels.json").is_file():
            try:
                meta = json.loads(p.with_name(label_name(p) + ".labels.json").read_text(encoding="utf-8"))
            except ValueError:
                meta = {}
            if isinstance(meta, dict):
                model = {
                    k: meta[k]
                    for k in ("model", "weights_sha256", "weights", "preset", "preprocess_hash", "ctfm_version")
                    if k in meta
                }
            break
    return {
        "pred": str(pred),
        "truth": str(truth),
        "compare": str(compare) if compare else None,
        "data_manifest_sha256": manifest,
        "inputs": files,
        "prediction_model": model or None,
        "n_classes": len(labels) - 1,
    }


def _write_outputs(out: Path, results: SegEvaluation, rows: list[dict], pairs, labels: dict[int, str]) -> None:

    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer,
        fieldnames=["case", "label", "class", "dice", "hd95", "nsd", "status", "truth_voxels", "pred_voxels"],
        lineterminator="\n",
    )
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    write_text_atomic(out / "metrics.csv", buffer.getvalue())
    per_case = {name: v["_macro_dice"] for name, v in results["per_case"].items() if not math.isnan(v["_macro_dice"])}
    if per_case:
        worst, best = min(per_case, key=per_case.get), max(per_case, key=per_case.get)
        paths = {name: (t, p) for name, t, p in pairs}
        _case_overlay_figure(
            [
                (f"worst: {worst} (macro Dice {per_case[worst]:.3f})", *paths[worst]),
                (f"best: {best} (macro Dice {per_case[best]:.3f})", *paths[best]),
            ],
            labels,
            out / "overlay.png",
        )
    write_results(out, results.data, results.provenance)


def _case_overlay_figure(cases, labels: dict[int, str], path: Path) -> Path:
    """One row per case: truth, prediction and disagreement on the axial slice with the most truth voxels."""
    matplotlib = optional_import("matplotlib", "eval")

    matplotlib.use("Agg")
    plt = optional_import("matplotlib.pyplot", "eval")

    fig, axes = plt.subplots(len(cases), 3, figsize=(10, 3.4 * len(cases)), squeeze=False)
    cmap = plt.get_cmap("tab20", max(2, len(labels)))
    for row, (title, truth_path, pred_path) in enumerate(cases):
        truth, prediction, _ = load_pair(truth_path, pred_path, labels)
        z = int(np.argmax((truth > 0).sum(axis=(0, 1)))) if truth.any() else truth.shape[2] // 2
        t, p = truth[:, :, z].T, prediction[:, :, z].T
        error = np.where(t == p, 0, np.where(p == 0, 1, np.where(t == 0, 2, 3)))
        for col, (image, name, kwargs) in enumerate(
            (
                (t, "truth", {"cmap": cmap, "vmin": 0, "vmax": len(labels) - 1}),
                (p, "prediction", {"cmap": cmap, "vmin": 0, "vmax": len(labels) - 1}),
                (
                    error,
                    "errors: missed / extra / wrong class",
                    {
                        "cmap": matplotlib.colors.ListedColormap(["black", "tab:blue", "tab:red", "yellow"]),
                        "vmin": 0,
                        "vmax": 3,
                    },
                ),
            )
        ):
            axes[row, col].imshow(
                np.ma.masked_equal(image, 0) if col < 2 else image, origin="lower", interpolation="nearest", **kwargs
            )
            axes[row, col].set_title(f"{title}\n{name}, slice {z}" if col == 0 else name, fontsize=8)
            axes[row, col].axis("off")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
