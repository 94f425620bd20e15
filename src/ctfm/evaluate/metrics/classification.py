"""Classification metrics with bootstrap confidence intervals, vectorised over resamples.

Every metric is computed from case *weights*: the point estimate uses weight 1 for every case,
a bootstrap resample uses how many times it drew each case (or each case's group, for a cluster
bootstrap over patients). Scores are sorted once; a resample is a row of a weight matrix, so a
thousand resamples of 10,000 cases cost a few matrix sums, not a thousand sklearn calls.
The point estimates agree with scikit-learn (``roc_auc_score``, ``average_precision_score``,
``balanced_accuracy_score``, ``f1_score``); tests check them against it and against hand counts.

    >>> m = binary_metrics(y, p, threshold=0.4)                   # doctest: +SKIP
    >>> m["auroc"], m["sensitivity"]                              # doctest: +SKIP
    >>> ci = bootstrap_binary(y, p, threshold=0.4, n_resamples=1000)  # doctest: +SKIP
    >>> str(ci["auroc"])                                              # doctest: +SKIP
    '0.910 [0.880, 0.930]'
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctfm.errors import CTInputError, optional_import
from ctfm.evaluate.metrics.stats import (
    Interval,
    PairedComparison,
    paired_p_value,
    percentile_interval,
    resample_weights,
)

BINARY_METRICS = (
    "auroc",
    "average_precision",
    "balanced_accuracy",
    "f1",
    "sensitivity",
    "specificity",
    "balanced_accuracy@0.5",
    "f1@0.5",
    "sensitivity@0.5",
    "specificity@0.5",
)
MULTICLASS_METRICS = ("auroc_ovr", "balanced_accuracy", "f1_macro", "accuracy")
MISSING = {"", "na", "nan", "none", "null"}  # label values read as "no label"


# ---- targets ---------------------------------------------------------------------------------
@dataclass
class Target:
    """One label column encoded: ``y`` [N] class index, -1 where the label is missing."""

    name: str
    task: str  # binary | multiclass
    classes: list[str]
    y: np.ndarray
    missing: int = 0

    @property
    def labelled(self) -> np.ndarray:
        return np.flatnonzero(self.y >= 0)


def _as_number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def encode_target(name: str, values: list[str], task: str = "auto", source=None) -> Target:
    """Encode a label column. Binary: 0/1 (numeric) only; multi-class: any values (numbers sort
    numerically). ``auto``: binary when every value is 0 or 1, multi-class otherwise."""
    missing = np.array([v.strip().lower() in MISSING for v in values])
    present = [v.strip() for v, m in zip(values, missing) if not m]
    numbers = [_as_number(v) for v in present]
    zero_one = all(n is not None and n in (0.0, 1.0) for n in numbers)
    if task == "auto":
        task = "binary" if zero_one else "multiclass"
    elif task == "multilabel":
        task = "binary"
    if task == "binary":
        bad = next((v for v, n in zip(present, numbers) if n is None or n not in (0.0, 1.0)), None)
        if bad is not None:
            raise CTInputError(
                source,
                f"column {name!r} has the label {bad!r}, not 0 or 1, for a binary task",
                "code the target as 0/1, or use --task multiclass",
            )
        classes = ["0", "1"]
        codes = [int(n) for n in numbers]
    else:
        if all(n is not None for n in numbers):
            distinct = sorted(set(present), key=lambda v: float(v))
        else:
            distinct = sorted(set(present))
        classes = distinct
        index = {c: i for i, c in enumerate(classes)}
        codes = [index[v] for v in present]
    y = np.full(len(values), -1, dtype=int)
    y[~missing] = codes
    counts = np.bincount(y[y >= 0], minlength=len(classes))
    if (counts > 0).sum() < 2:
        only = classes[int(np.argmax(counts))] if counts.sum() else "none"
        raise CTInputError(
            source,
            f"target {name!r} has one class ({int(counts.sum())} labelled scans, all {only!r})",
            "a probe needs at least two classes; check the column and the join",
        )
    return Target(name=name, task=task, classes=classes, y=y, missing=int(missing.sum()))


# ---- weights ---------------------------------------------------------------------------------
def _safe_div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


# ---- ranking metrics on weights --------------------------------------------------------------
class _Ranking:
    """Scores sorted once, with tie blocks, for weighted AUROC and average precision."""

    def __init__(self, y, scores):
        scores = np.asarray(scores, dtype=np.float64)
        self.order = np.argsort(scores, kind="mergesort")
        sorted_scores = scores[self.order]
        self.starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
        self.positive = (np.asarray(y) == 1)[self.order].astype(np.float64)

    def _blocks(self, weights):
        w = np.atleast_2d(weights)[:, self.order]
        pos = np.add.reduceat(w * self.positive, self.starts, axis=1)
        neg = np.add.reduceat(w * (1.0 - self.positive), self.starts, axis=1)
        return pos, neg

    def auroc(self, weights, blocks=None):
        """[R] AUROC per weight row (ties count one half): Mann-Whitney on weighted counts."""
        pos, neg = blocks if blocks is not None else self._blocks(weights)
        below = np.cumsum(neg, axis=1) - neg
        return _safe_div((pos * (below + 0.5 * neg)).sum(axis=1), pos.sum(axis=1) * neg.sum(axis=1))

    def average_precision(self, weights, blocks=None):
        """[R] average precision per weight row (scikit-learn's step definition)."""
        pos, neg = blocks if blocks is not None else self._blocks(weights)
        pos, neg = pos[:, ::-1], neg[:, ::-1]  # thresholds from the highest score down
        tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
        precision = np.nan_to_num(_safe_div(tp, tp + fp))
        return _safe_div((pos * precision).sum(axis=1), pos.sum(axis=1))


def _threshold_metrics(y, predicted, weights, suffix=""):
    y = np.asarray(y) == 1
    predicted = np.asarray(predicted, dtype=bool)
    w = np.atleast_2d(weights)
    tp, fn = w @ (y & predicted), w @ (y & ~predicted)
    tn, fp = w @ (~y & ~predicted), w @ (~y & predicted)
    sensitivity, specificity = _safe_div(tp, tp + fn), _safe_div(tn, tn + fp)
    precision = _safe_div(tp, tp + fp)
    f1 = np.where(tp > 0, _safe_div(2 * tp, 2 * tp + fp + fn), 0.0)
    return {
        f"balanced_accuracy{suffix}": (sensitivity + specificity) / 2,
        f"f1{suffix}": f1,
        f"sensitivity{suffix}": sensitivity,
        f"specificity{suffix}": specificity,
        f"precision{suffix}": precision,
    }


def binary_metrics_weighted(y, p, threshold: float, weights) -> dict[str, np.ndarray]:
    """Every binary metric for each row of ``weights`` [R, n]: name -> [R]."""
    ranking = _Ranking(y, p)
    p = np.asarray(p, dtype=np.float64)
    blocks = ranking._blocks(weights)
    out = {"auroc": ranking.auroc(weights, blocks), "average_precision": ranking.average_precision(weights, blocks)}
    out.update(_threshold_metrics(y, p >= threshold, weights))
    out.update(_threshold_metrics(y, p >= 0.5, weights, "@0.5"))
    return out


def multiclass_metrics_weighted(y, probabilities, weights) -> dict[str, np.ndarray]:
    """Multi-class metrics for each row of ``weights`` [R, n]; ``probabilities`` [n, C], y in 0..C-1.
    AUROC is the macro mean of one-vs-rest AUROCs; the prediction is the most probable class."""
    y = np.asarray(y)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    w = np.atleast_2d(weights)
    predicted = probabilities.argmax(axis=1)
    recalls, f1s, aurocs = [], [], []
    for c in range(probabilities.shape[1]):
        is_c, said_c = y == c, predicted == c
        tp, fn, fp = w @ (is_c & said_c), w @ (is_c & ~said_c), w @ (~is_c & said_c)
        recalls.append(_safe_div(tp, tp + fn))
        f1s.append(np.where(tp > 0, _safe_div(2 * tp, 2 * tp + fp + fn), 0.0))
        aurocs.append(_Ranking(is_c.astype(int), probabilities[:, c]).auroc(w))
    with np.errstate(invalid="ignore"):
        return {
            "auroc_ovr": np.nanmean(np.stack(aurocs), axis=0),
            "balanced_accuracy": np.nanmean(np.stack(recalls), axis=0),
            "f1_macro": np.mean(np.stack(f1s), axis=0),
            "accuracy": _safe_div(w @ (predicted == y), w.sum(axis=1)),
        }


# ---- point estimates -------------------------------------------------------------------------
def binary_metrics(y, p, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, average precision, and balanced accuracy, F1, sensitivity, specificity at
    ``threshold`` and at 0.5; ``y`` [n] in {0, 1}, ``p`` [n] scores."""
    values = binary_metrics_weighted(y, p, threshold, np.ones((1, len(y))))
    return {k: float(v[0]) for k, v in values.items()}


def multiclass_metrics(y, probabilities) -> dict[str, float]:
    values = multiclass_metrics_weighted(y, probabilities, np.ones((1, len(y))))
    return {k: float(v[0]) for k, v in values.items()}


def primary_metric(task: str) -> str:
    """The metric a few-shot curve and a comparison report first: AUROC (binary), balanced accuracy (multi-class)."""
    return "auroc" if task == "binary" else "balanced_accuracy"


# ---- intervals (the shapes of ctfm.evaluate.metrics.stats) ---------------------------------------
def _interval(point: float, samples: np.ndarray, n_resamples: int, confidence: float):

    low, high = percentile_interval(samples, confidence) if np.isfinite(point) else (float("nan"), float("nan"))
    return Interval(point, low, high, confidence, n_resamples, int(np.isfinite(samples).sum()))


def bootstrap_metrics(
    metric_fn, n: int, n_resamples: int = 1000, seed: int = 0, groups=None, confidence: float = 0.95
) -> dict:
    """Percentile bootstrap intervals of several metrics at once: ``metric_fn(weights [R, n]) ->
    {name: [R]}``, the estimate at unit weights. Returns name -> :class:`ctfm.evaluate.metrics.stats.Interval`.

    The resamples are those of :func:`ctfm.evaluate.metrics.stats.bootstrap_ci` with the same seed (the
    same draws of cases or groups), so both give the same interval; this one is vectorised.
    """
    point = {k: float(v[0]) for k, v in metric_fn(np.ones((1, n))).items()}
    samples: dict[str, list] = {k: [] for k in point}
    for weights in resample_weights(n, n_resamples, seed, groups):
        for k, v in metric_fn(weights).items():
            samples[k].append(v)
    return {
        k: _interval(point[k], np.concatenate(samples[k]) if samples[k] else np.array([]), n_resamples, confidence)
        for k in point
    }


def bootstrap_binary(
    y, p, threshold: float = 0.5, n_resamples: int = 1000, seed: int = 0, groups=None, confidence: float = 0.95
) -> dict:
    return bootstrap_metrics(
        lambda w: binary_metrics_weighted(y, p, threshold, w), len(y), n_resamples, seed, groups, confidence
    )


def bootstrap_multiclass(
    y, probabilities, n_resamples: int = 1000, seed: int = 0, groups=None, confidence: float = 0.95
) -> dict:
    return bootstrap_metrics(
        lambda w: multiclass_metrics_weighted(y, probabilities, w), len(y), n_resamples, seed, groups, confidence
    )


def paired_bootstrap_metrics(
    metric_fn_a, metric_fn_b, n: int, n_resamples: int = 1000, seed: int = 0, groups=None, confidence: float = 0.95
) -> dict:
    """A minus B of every metric on the same resamples of the same cases; name ->
    :class:`ctfm.evaluate.metrics.stats.PairedComparison` (two-sided p: twice the smaller tail at zero)."""

    ones = np.ones((1, n))
    a0, b0 = metric_fn_a(ones), metric_fn_b(ones)
    diffs: dict[str, list] = {k: [] for k in a0}
    for weights in resample_weights(n, n_resamples, seed, groups):
        a, b = metric_fn_a(weights), metric_fn_b(weights)
        for k in a0:
            diffs[k].append(a[k] - b[k])
    out = {}
    for k in a0:
        d = np.concatenate(diffs[k]) if diffs[k] else np.array([])
        low, high = percentile_interval(d, confidence)
        p_value = paired_p_value(d)
        out[k] = PairedComparison(
            float(a0[k][0]), float(b0[k][0]), float(a0[k][0] - b0[k][0]), low, high, p_value, "paired bootstrap"
        )
    return out


# ---- thresholds ------------------------------------------------------------------------------
def youden_threshold(y, p) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (predict positive at >= it).
    Chosen on training predictions only; ties go to the threshold nearest 0.5."""
    roc_curve = optional_import("sklearn.metrics", "eval").roc_curve

    fpr, tpr, thresholds = roc_curve(np.asarray(y), np.asarray(p, dtype=np.float64))
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if not len(thresholds):
        return 0.5
    j = tpr - fpr
    best = np.flatnonzero(np.isclose(j, j.max()))
    return float(thresholds[best[np.argmin(np.abs(thresholds[best] - 0.5))]])
