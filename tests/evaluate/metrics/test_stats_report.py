"""Bootstrap intervals, paired tests and the results/report writers, against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ctfm.evaluate.metrics.stats import bootstrap_ci, delong_test, delong_variance, paired_bootstrap, wilcoxon_paired
from ctfm.evaluate.reports.report import Report, jsonable, provenance, write_results


def test_bootstrap_of_a_constant_has_no_width():
    interval = bootstrap_ci(np.mean, np.full(20, 3.0), n_resamples=200)
    assert (interval.estimate, interval.low, interval.high) == (3.0, 3.0, 3.0)
    assert interval.n_valid == 200


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded():
    values = np.arange(1.0, 41.0)
    first = bootstrap_ci(np.mean, values, n_resamples=500, seed=3)
    again = bootstrap_ci(np.mean, values, n_resamples=500, seed=3)
    assert first == again
    assert first.estimate == pytest.approx(20.5)
    assert 1.0 < first.low < 20.5 < first.high < 40.0
    # the standard error of a mean of 40 values with sd ~11.7 is ~1.85: a 95 % interval ~ +-3.6
    assert 2.5 < (first.high - first.low) / 2 < 5.0


def test_group_bootstrap_moves_whole_groups():
    values = np.array([1.0, 1.0, 5.0, 5.0])
    groups = np.array(["p1", "p1", "p2", "p2"])
    seen = []

    def recording_mean(x):
        seen.append(float(np.mean(x)))
        return np.mean(x)

    bootstrap_ci(recording_mean, values, groups=groups, n_resamples=100, seed=0)
    # two groups drawn with replacement: every resampled mean is 1, 3 or 5, never 2 or 4
    assert set(seen) == {1.0, 3.0, 5.0}


@pytest.mark.slow
def test_undefined_resamples_are_skipped_and_counted():
    y = np.array([0, 1, 0, 1, 0, 0])
    score = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.4])
    interval = bootstrap_ci(roc_auc_score, y, score, n_resamples=300, seed=0)
    assert interval.estimate == 1.0
    assert 0 < interval.n_valid < 300  # some resamples drew one class only


def test_delong_variance_matches_the_structural_components_computed_pairwise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    score = y + rng.normal(0, 1.0, 60)
    score[:5] = score[5]  # ties count half
    auc, variance = delong_variance(y, score)
    assert auc == pytest.approx(roc_auc_score(y, score))
    positives, negatives = score[y == 1], score[y == 0]
    psi = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    expected = v10.var(ddof=1) / len(v10) + v01.var(ddof=1) / len(v01)
    assert variance == pytest.approx(expected, rel=1e-12)


def test_delong_test_of_identical_scores_and_of_a_better_score():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    good = y + rng.normal(0, 0.5, 200)
    noise = rng.normal(0, 1.0, 200)
    same = delong_test(y, good, good)
    assert same.difference == 0.0 and same.p_value == 1.0
    better = delong_test(y, good, noise)
    assert better.estimate_a == pytest.approx(roc_auc_score(y, good))
    assert better.difference > 0.3 and better.p_value < 1e-6
    assert better.low < better.difference < better.high


@pytest.mark.slow
def test_paired_bootstrap_difference_and_p_value():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 150)
    good = y + rng.normal(0, 0.5, 150)
    same = paired_bootstrap(roc_auc_score, y, good, good, n_resamples=200)
    assert same.difference == 0.0 and same.p_value == 1.0
    better = paired_bootstrap(roc_auc_score, y, good, rng.normal(0, 1, 150), n_resamples=300)
    assert better.difference > 0.3 and better.p_value < 0.01 and better.low > 0


def test_wilcoxon_matches_scipy_and_leaves_out_nan_pairs():
    from scipy.stats import wilcoxon

    a = np.array([0.9, 0.8, 0.85, 0.7, 0.95, np.nan, 0.6, 0.75])
    b = np.array([0.8, 0.7, 0.86, 0.5, 0.90, 0.5, 0.4, 0.70])
    result = wilcoxon_paired(a, b)
    keep = ~np.isnan(a)
    assert result["n"] == 7 and result["n_excluded"] == 1
    assert result["p_value"] == pytest.approx(wilcoxon(a[keep], b[keep]).pvalue)
    assert wilcoxon_paired([0.5, 0.6], [0.5, 0.6])["p_value"] == 1.0


def test_results_json_has_provenance_and_no_nan(tmp_path):
    path = write_results(
        tmp_path / "out",
        {"dice": {"liver": np.float32(0.5), "empty": math.nan}, "n": np.int64(3)},
        provenance(model="ct-fm", weights_sha256="ab" * 32),
    )
    document = json.loads(path.read_text())
    assert document["dice"] == {"liver": 0.5, "empty": None} and document["n"] == 3
    assert document["provenance"]["model"] == "ct-fm" and document["provenance"]["ctfm_version"]
    assert not list((tmp_path / "out").glob(".*partial*"))


def test_report_is_self_contained(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure_path = tmp_path / "curve.png"
    plt.figure(figsize=(2, 2))
    plt.plot([0, 1], [0, 1])
    plt.savefig(figure_path)
    plt.close("all")
    page = Report("Probe <AUROC>", subtitle="two stores")
    page.heading("Results").table([{"target": "liver", "auroc": 0.91234, "ci": None}], caption="per target").figure(
        figure_path, "ROC"
    )
    page.provenance({"model": "ct-fm"})
    written = page.write(tmp_path / "report")
    text = written.read_text()
    assert written.name == "report.html"
    assert "Probe &lt;AUROC&gt;" in text and "0.912" in text and "data:image/png;base64," in text
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert jsonable({"a": (np.float64(1.5), float("inf"))}) == {"a": [1.5, None]}


def _old_stream_interval(statistic, values, groups, n_resamples, seed, confidence=0.95):
    """The resampling bootstrap_ci has always used, written out: per resample, ``integers(0, units, units)``."""
    rng = np.random.default_rng(seed)
    n = len(values)
    if groups is not None:
        labels, inverse = np.unique(groups, return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(len(labels))]
    out = []
    for _ in range(n_resamples):
        if groups is None:
            rows = rng.integers(0, n, size=n)
        else:
            rows = np.concatenate([members[g] for g in rng.integers(0, len(labels), size=len(labels))])
        out.append(statistic(values[rows]))
    return np.quantile(np.asarray(out), [(1 - confidence) / 2, 1 - (1 - confidence) / 2])


@pytest.mark.parametrize("n, grouped", [(37, False), (150, False), (151, True), (60, True)])
def test_one_engine_keeps_the_bootstrap_stream(n, grouped):
    """bootstrap_ci draws from the shared engine the same resamples, in the same order, as before."""
    values = np.random.default_rng(1).normal(size=n)
    groups = np.array([f"p{i // 3:03d}" for i in range(n)]) if grouped else None
    interval = bootstrap_ci(np.mean, values, groups=groups, n_resamples=300, seed=5)
    low, high = _old_stream_interval(np.mean, values, groups, 300, 5)
    assert (interval.low, interval.high) == (float(low), float(high))


@pytest.mark.parametrize("grouped", [False, True])
def test_index_and_weight_resamples_are_the_same_draws(grouped):
    """The loop bootstrap (row indices) and the vectorised one (case weights) see identical resamples."""
    from ctfm.evaluate.metrics.stats import CHUNK, resample_indices, resample_weights

    n = 41
    groups = np.array([i % 7 for i in range(n)]) if grouped else None
    n_resamples = CHUNK + 9  # spans two chunks
    rows = list(resample_indices(n, n_resamples, seed=11, groups=groups))
    weights = np.concatenate(list(resample_weights(n, n_resamples, seed=11, groups=groups)))
    assert len(rows) == n_resamples and weights.shape == (n_resamples, n)
    for r, drawn in enumerate(rows):
        np.testing.assert_array_equal(np.bincount(drawn, minlength=n), weights[r])


def test_vectorised_and_loop_bootstrap_agree_on_an_odd_grouped_cohort():
    from ctfm.evaluate.metrics import classification as cm

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 151)
    p = rng.random(151) + 0.4 * y
    q = rng.random(151) + 0.1 * y
    groups = np.array([f"g{i // 4:03d}" for i in range(151)])
    ours = cm.bootstrap_binary(y, p, 0.5, n_resamples=150, seed=2, groups=groups)["auroc"]
    reference = bootstrap_ci(roc_auc_score, y, p, groups=groups, n_resamples=150, seed=2)
    expected = (reference.estimate, reference.low, reference.high, reference.n_valid)
    assert (ours.estimate, ours.low, ours.high, ours.n_valid) == pytest.approx(expected)
    paired = cm.paired_bootstrap_metrics(
        lambda w: cm.binary_metrics_weighted(y, p, 0.5, w),
        lambda w: cm.binary_metrics_weighted(y, q, 0.5, w),
        151,
        150,
        2,
        groups,
    )["auroc"]
    reference = paired_bootstrap(roc_auc_score, y, p, q, groups=groups, n_resamples=150, seed=2)
    expected = (reference.difference, reference.low, reference.high, reference.p_value)
    assert (paired.difference, paired.low, paired.high, paired.p_value) == pytest.approx(expected)
