"""Uncertainty for evaluation figures: bootstrap confidence intervals over cases, paired
comparisons of two systems on the same cases (paired bootstrap, DeLong for AUROC, Wilcoxon).

Every evaluation in ctfm reports a figure with its 95 % interval, computed here, so that two
reports are comparable. The bootstrap resamples *cases* (rows) with replacement; with ``groups``
it resamples whole groups (patients), so that scans of one patient move together. Intervals are
percentile intervals. A resample on which the statistic is undefined (for example an AUROC drawn
with one class only) is skipped and counted, never replaced by a made-up value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95
CHUNK = 128  # resamples drawn at a time (memory: CHUNK x units)


@dataclass(frozen=True)
class Interval:
    """A figure with its bootstrap interval: ``estimate`` on all cases, ``low``/``high`` the
    percentile bounds, ``n_valid`` the resamples on which the statistic was defined."""

    estimate: float
    low: float
    high: float
    confidence: float
    n_resamples: int
    n_valid: int

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class PairedComparison:
    """System A minus system B on the same cases: the difference, its interval and a two-sided p."""

    estimate_a: float
    estimate_b: float
    difference: float
    low: float
    high: float
    p_value: float
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


# ---- the one bootstrap engine: every bootstrap in ctfm draws its resamples here ------------------
def resample_units(n: int, groups=None) -> tuple[np.ndarray, int]:
    """``(codes [n], n_units)``: the unit each case belongs to. Without ``groups`` every case is
    its own unit; with ``groups [n]`` a unit is a group (patient), numbered in sorted order."""
    if groups is None:
        return np.arange(n), n
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    return codes, int(codes.max()) + 1 if len(codes) else 0


def resample_draws(n_units: int, n_resamples: int, seed: int = 0):
    """Yield ``[chunk, n_units]`` arrays: the units each resample draws with replacement.

    The one random stream of every bootstrap: resample ``r`` is row ``r`` of
    ``default_rng(seed).integers(0, n_units, size=(n_resamples, n_units))``, drawn ``CHUNK``
    resamples at a time to bound memory. Index resamples (:func:`resample_indices`) and weight
    resamples (:func:`resample_weights`) are two views of the same draws.
    """
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_resamples:
        chunk = min(CHUNK, n_resamples - done)
        yield rng.integers(0, n_units, size=(chunk, n_units))
        done += chunk


def resample_indices(n: int, n_resamples: int, seed: int = 0, groups=None):
    """Yield the row indices of each resample: rows drawn with replacement, or whole groups drawn
    (the rows of each drawn group, in the order drawn)."""
    codes, n_units = resample_units(n, groups)
    members = None if groups is None else [np.flatnonzero(codes == g) for g in range(n_units)]
    for draws in resample_draws(n_units, n_resamples, seed):
        for drawn in draws:
            yield drawn if members is None else np.concatenate([members[g] for g in drawn])


def resample_weights(n: int, n_resamples: int, seed: int = 0, groups=None):
    """Yield weight matrices [chunk, n]: how often each case is drawn in each resample.

    ``groups`` (length n): resample whole groups (a cluster bootstrap, e.g. over patients), each
    case weighted by how often its group was drawn. The same resamples as :func:`resample_indices`.
    """
    codes, n_units = resample_units(n, groups)
    for draws in resample_draws(n_units, n_resamples, seed):
        chunk = len(draws)
        counts = np.bincount((draws + np.arange(chunk)[:, None] * n_units).ravel(), minlength=chunk * n_units).reshape(
            chunk, n_units
        )
        yield counts[:, codes].astype(np.float64)


def _safe(statistic: Callable[..., float], arrays: Sequence[np.ndarray]) -> float:
    """The statistic, or NaN where it is undefined on these cases (one class, empty input)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = float(statistic(*arrays))
    except (ValueError, ZeroDivisionError, FloatingPointError):
        return math.nan
    return value


def _as_arrays(arrays: Sequence, groups) -> tuple[list[np.ndarray], np.ndarray | None, int]:
    arrays = [np.asarray(a) for a in arrays]
    if not arrays:
        raise ValueError("bootstrap needs at least one array of cases")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"bootstrap arrays must have one row per case; got lengths {[len(a) for a in arrays]}")
    if groups is not None:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} entries for {n} cases")
    return arrays, groups, n


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval of resampled values (undefined resamples, NaN, left out)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_p_value(differences: np.ndarray) -> float:
    """Two-sided p of resampled differences A - B: twice the share on the far side of zero (at most 1)."""
    finite = differences[np.isfinite(differences)]
    if finite.size == 0:
        return math.nan
    # share of resamples with the difference at or beyond zero, on each side
    return float(min(1.0, 2.0 * min(np.mean(finite <= 0.0), np.mean(finite >= 0.0))))


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays,
    groups=None,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """``statistic(*arrays)`` on all cases with a percentile bootstrap interval.

    ``arrays``: one or more arrays with one row per case (e.g. ``y_true [N]``, ``score [N]``);
    every resample draws the same rows from each. ``groups [N]``: resample whole groups instead.
    """
    arrays, groups, n = _as_arrays(arrays, groups)
    estimate = _safe(statistic, arrays)
    values = np.empty(n_resamples)
    for r, rows in enumerate(resample_indices(n, n_resamples, seed, groups)):
        values[r] = _safe(statistic, [a[rows] for a in arrays])
    low, high = percentile_interval(values, confidence)
    return Interval(estimate, low, high, confidence, n_resamples, int(np.isfinite(values).sum()))


def paired_bootstrap(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    truth,
    prediction_a,
    prediction_b,
    *,
    groups=None,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> PairedComparison:
    """Compare ``statistic(truth, prediction)`` of two systems on the same cases.

    Each resample draws one set of cases and scores both systems on it, so the interval of the
    difference A − B accounts for their correlation. The p-value is two-sided: twice the share of
    resampled differences on the far side of zero (at most 1).
    """
    arrays, groups, n = _as_arrays([truth, prediction_a, prediction_b], groups)
    truth, a, b = arrays
    estimate_a, estimate_b = _safe(statistic, [truth, a]), _safe(statistic, [truth, b])
    differences = np.empty(n_resamples)
    for r, rows in enumerate(resample_indices(n, n_resamples, seed, groups)):
        differences[r] = _safe(statistic, [truth[rows], a[rows]]) - _safe(statistic, [truth[rows], b[rows]])
    low, high = percentile_interval(differences, confidence)
    return PairedComparison(
        estimate_a, estimate_b, estimate_a - estimate_b, low, high, paired_p_value(differences), "paired bootstrap"
    )


# --------------------------------------------------------------------------- DeLong


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given the mean of their ranks."""
    from scipy.stats import rankdata

    return rankdata(x, method="average")


def _delong_components(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUROCs and DeLong structural components for ``scores [K, N]`` against binary ``y_true [N]``.

    Returns ``auc [K]``, ``v10 [K, m]`` (one per positive case) and ``v01 [K, n]`` (one per
    negative), computed from mid-ranks in O(N log N) (Sun & Xu's formulation of DeLong 1988).
    """
    positive = y_true == 1
    m, n = int(positive.sum()), int((~positive).sum())
    if m == 0 or n == 0:
        raise ValueError("AUROC needs at least one positive and one negative case")
    auc = np.empty(len(scores))
    v10 = np.empty((len(scores), m))
    v01 = np.empty((len(scores), n))
    for k, s in enumerate(scores):
        ranks_all = _midranks(s)
        ranks_pos = _midranks(s[positive])
        ranks_neg = _midranks(s[~positive])
        # v10[i]: share of negatives below positive i (ties count half); v01[j]: share of positives above negative j
        v10[k] = (ranks_all[positive] - ranks_pos) / n
        v01[k] = 1.0 - (ranks_all[~positive] - ranks_neg) / m
        auc[k] = v10[k].mean()
    return auc, v10, v01


def delong_variance(y_true, score) -> tuple[float, float]:
    """AUROC of one score and its DeLong variance."""
    auc, v10, v01 = _delong_components(np.asarray(y_true).astype(int), np.asarray(score, dtype=float)[None])
    variance = np.var(v10[0], ddof=1) / v10.shape[1] + np.var(v01[0], ddof=1) / v01.shape[1]
    return float(auc[0]), float(variance)


def delong_test(y_true, score_a, score_b) -> PairedComparison:
    """DeLong's test of two correlated AUROCs on the same cases (two-sided normal p-value).

    The difference's interval is the normal interval from the DeLong covariance.
    """
    from scipy.stats import norm

    y = np.asarray(y_true).astype(int)
    scores = np.stack([np.asarray(score_a, dtype=float), np.asarray(score_b, dtype=float)])
    auc, v10, v01 = _delong_components(y, scores)
    covariance = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    difference = float(auc[0] - auc[1])
    variance = float(covariance[0, 0] + covariance[1, 1] - 2.0 * covariance[0, 1])
    if variance <= 0.0:  # identical scores, or both perfect: no evidence of a difference
        return PairedComparison(float(auc[0]), float(auc[1]), difference, difference, difference, 1.0, "DeLong")
    sd = math.sqrt(variance)
    z = difference / sd
    half = norm.ppf(0.5 + DEFAULT_CONFIDENCE / 2.0) * sd
    return PairedComparison(
        float(auc[0]),
        float(auc[1]),
        difference,
        difference - half,
        difference + half,
        float(2.0 * norm.sf(abs(z))),
        "DeLong",
    )


# --------------------------------------------------------------------------- Wilcoxon


def wilcoxon_paired(values_a, values_b) -> dict:
    """Wilcoxon signed-rank test of paired per-case values (e.g. Dice of two systems per case).

    Cases where either value is NaN are left out and counted. Returns ``statistic``, ``p_value``,
    ``n`` (pairs used), ``n_excluded`` and ``median_difference`` (A − B); when every difference is
    zero the systems are indistinguishable and ``p_value`` is 1.
    """
    from scipy.stats import wilcoxon

    a, b = np.asarray(values_a, dtype=float), np.asarray(values_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values must match one to one; got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    difference = a[keep] - b[keep]
    result = {
        "n": int(keep.sum()),
        "n_excluded": int((~keep).sum()),
        "median_difference": float(np.median(difference)) if difference.size else math.nan,
    }
    if difference.size == 0:
        return {**result, "statistic": math.nan, "p_value": math.nan}
    if np.all(difference == 0):
        return {**result, "statistic": 0.0, "p_value": 1.0}
    test = wilcoxon(a[keep], b[keep])
    return {**result, "statistic": float(test.statistic), "p_value": float(test.pvalue)}
