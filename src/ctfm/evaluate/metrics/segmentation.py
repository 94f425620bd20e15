"""Segmentation scores: per-class Dice, HD95 and normalised surface distance, with CIs.

Scores of two masks on one grid (:func:`mask_metrics`; distances use the truth's voxel spacing in
mm) and their summaries over cases. Metrics come from MONAI (``compute_dice``,
``compute_hausdorff_distance(percentile=95)``, ``compute_surface_dice``). Reading prediction and
truth files and the ``ctfm evaluate seg`` run are :mod:`ctfm.predict.scoring`.

Rules for empty masks, per case and class:

==================  =====  =====  =====  =========================================
truth / prediction  Dice   NSD    HD95   status
==================  =====  =====  =====  =========================================
both non-empty      value  value  value  ``ok``
truth only          0      0      NaN    ``missed`` (no surface to measure to)
prediction only     0      0      NaN    ``false_positive``
both empty          NaN    NaN    NaN    ``absent`` (not counted in any mean)
==================  =====  =====  =====  =========================================

These are MONAI's own results for HD95 (NaN when a side is empty) and NSD (0 with one side
empty, NaN with both), computed without calling MONAI on an empty mask. Dice of a
prediction-only class is 0, as nnU-Net's evaluation counts it, where MONAI's
``compute_dice(ignore_empty=True)`` gives NaN: a false-positive class counts against the model.
(The validation Dice during fine-tuning keeps CT-FM's ``ignore_empty=True``.)

A class's mean is over the cases where the value is defined; the macro figure is the mean over
classes of those class means; 95 % intervals bootstrap the cases (:mod:`ctfm.evaluate.metrics.stats`).
:func:`compare_dice` tests per-case Dice of two prediction sets on the same truths with a paired
Wilcoxon signed-rank test, per class and for the per-case macro Dice.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from ctfm.evaluate.metrics.stats import bootstrap_ci, wilcoxon_paired
from ctfm.runtime import DocumentResult

METRICS = ("dice", "hd95", "nsd")
DEFAULT_NSD_TOLERANCE_MM = 2.0


# --------------------------------------------------------------------------- one pair of masks


def mask_metrics(
    truth: np.ndarray, prediction: np.ndarray, spacing, nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM
) -> dict:
    """Dice, HD95 (mm), NSD at ``nsd_tolerance_mm`` and the status of two boolean masks [X, Y, Z]."""
    import torch

    t, p = bool(truth.any()), bool(prediction.any())
    if not t and not p:
        return {"dice": math.nan, "hd95": math.nan, "nsd": math.nan, "status": "absent"}
    if t != p:
        return {"dice": 0.0, "hd95": math.nan, "nsd": 0.0, "status": "missed" if t else "false_positive"}
    y = torch.from_numpy(np.ascontiguousarray(truth))[None, None].float()
    y_pred = torch.from_numpy(np.ascontiguousarray(prediction))[None, None].float()
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about its own internal use of a deprecated argument; not the user's concern
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        dice, hd95, nsd = _monai_metrics(y, y_pred, spacing, nsd_tolerance_mm)
    return {"dice": dice, "hd95": hd95, "nsd": nsd, "status": "ok"}


def _monai_metrics(y, y_pred, spacing, nsd_tolerance_mm) -> tuple[float, float, float]:
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    dice = float(compute_dice(y_pred, y, include_background=True)[0, 0])
    hd95 = float(compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)[0, 0])
    nsd = float(
        compute_surface_dice(
            y_pred, y, class_thresholds=[float(nsd_tolerance_mm)], include_background=True, spacing=spacing
        )[0, 0]
    )
    return dice, hd95, nsd


# --------------------------------------------------------------------------- over cases


def _matrix(rows: list[dict], metric: str, cases: list[str], classes: list[int]) -> np.ndarray:
    """[cases, classes] of ``metric`` (NaN where undefined)."""
    index = {(r["case"], r["label"]): r[metric] for r in rows}
    return np.array([[index.get((c, k), math.nan) for k in classes] for c in cases], dtype=float)


def _class_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _macro(matrix: np.ndarray) -> float:
    means = np.array([_class_mean(matrix[:, k]) for k in range(matrix.shape[1])])
    finite = means[np.isfinite(means)]
    return float(finite.mean()) if finite.size else math.nan


def summarise_cases(rows: list[dict], labels: dict[int, str], n_resamples: int = 2000, seed: int = 0) -> dict:
    """Per-class means with bootstrap 95 % intervals over cases, and the macro means."""

    cases = sorted({r["case"] for r in rows})
    classes = [v for v in sorted(labels) if v != 0]
    summary = {"cases": len(cases), "per_class": {}, "macro": {}}
    if not cases:
        return summary
    for metric in METRICS:
        matrix = _matrix(rows, metric, cases, classes)
        for k, value in enumerate(classes):
            column = matrix[:, k]
            entry = summary["per_class"].setdefault(
                labels[value], {"label": value, "n_defined": int(np.isfinite(matrix[:, k]).sum())}
            )
            entry[metric] = (
                bootstrap_ci(_class_mean, column, n_resamples=n_resamples, seed=seed).as_dict()
                if np.isfinite(column).any()
                else None
            )
        summary["macro"][metric] = (
            bootstrap_ci(_macro, matrix, n_resamples=n_resamples, seed=seed).as_dict()
            if np.isfinite(matrix).any()
            else None
        )
    statuses = {}
    for r in rows:
        statuses.setdefault(r["class"], {}).setdefault(r["status"], 0)
        statuses[r["class"]][r["status"]] += 1
    for name, counts in statuses.items():
        summary["per_class"][name]["status_counts"] = counts
    return summary


def compare_dice(rows_a: list[dict], rows_b: list[dict], labels: dict[int, str]) -> dict:
    """Paired Wilcoxon of per-case Dice, A (``--pred``) vs B (``--compare``), per class and for the per-case macro Dice."""

    cases = sorted({r["case"] for r in rows_a} & {r["case"] for r in rows_b})
    classes = [v for v in sorted(labels) if v != 0]
    a, b = _matrix(rows_a, "dice", cases, classes), _matrix(rows_b, "dice", cases, classes)
    out = {
        "cases": len(cases),
        "per_class": {},
        "method": "Wilcoxon signed-rank on per-case Dice (A = --pred, B = --compare)",
    }
    for k, value in enumerate(classes):
        out["per_class"][labels[value]] = {
            "mean_a": _class_mean(a[:, k]),
            "mean_b": _class_mean(b[:, k]),
            **wilcoxon_paired(a[:, k], b[:, k]),
        }
    with np.errstate(all="ignore"):
        macro_a = np.array([np.nanmean(r) if np.isfinite(r).any() else math.nan for r in a])
        macro_b = np.array([np.nanmean(r) if np.isfinite(r).any() else math.nan for r in b])
    out["macro_per_case"] = {
        "mean_a": _class_mean(macro_a),
        "mean_b": _class_mean(macro_b),
        **wilcoxon_paired(macro_a, macro_b),
    }
    return out


@dataclass
class SegEvaluation(DocumentResult):
    """What :func:`evaluate_segmentation` returns: ``data`` holds the keys of results.json (rules,
    labels, summary, per_case, failures, unmatched_predictions[, compare]); ``provenance`` the inputs' hashes."""

    def summary(self) -> str:
        summary = self.data["summary"]
        macro = summary["macro"].get("dice")
        dice = f", macro Dice {macro['estimate']:.3f} [{macro['low']:.3f}, {macro['high']:.3f}]" if macro else ""
        return f"evaluate seg: {summary['cases']} case(s) scored, {len(self.data['failures'])} failed{dice}"
