"""The logistic probe's fast path (whitened, warm-started L-BFGS with one covariance basis per
fold) against the reference path (scikit-learn's LogisticRegression): same inner choice of C, the
same out-of-fold AUROC to 1e-3, on small real problems; both paths really run. Multi-class targets
use the reference solver in both (seed 3's multi-class target is one where another solver chose
another C); fit_logistic's multinomial fit is checked against scikit-learn's directly."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ctfm.errors import OptionError
from ctfm.evaluate.metrics.classification import binary_metrics, encode_target, multiclass_metrics
from ctfm.evaluate.probes.probe import (
    LogisticPath,
    covariance_basis,
    cross_validated_predictions,
    fit_logistic,
    logistic_proba,
    outer_folds,
    standardise,
)


def embeddings(n=360, dim=24, rank=4, seed=0):
    """Low-rank signal plus noise, as real embeddings; a binary and a 3-class target from the signal."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, rank))
    features = (latent @ rng.normal(size=(rank, dim)) + 0.8 * rng.normal(size=(n, dim)) + 3.0).astype(np.float32)
    score = latent[:, 0] + 0.5 * latent[:, 1] + rng.normal(size=n)
    binary = [str(int(s > 0.6)) for s in score]
    three = [f"c{k}" for k in np.argmax(latent[:, :3] + rng.normal(size=(n, 3)), axis=1)]
    return features, binary, three


@pytest.mark.parametrize("column, seed", [(1, 0), (1, 3), (2, 3)], ids=["binary", "binary-3", "multiclass-3"])
def test_fast_path_chooses_the_same_C_and_gives_the_same_auroc(column, seed):
    data = embeddings(seed=seed)
    features, target = data[0], encode_target("t", data[column], "auto")
    folds = outer_folds(target.y[target.labelled], None, cv=4, seed=0)
    reference = cross_validated_predictions(features, target, folds, "logistic", None, 3, 0, {"solver": "sklearn"})
    fast = cross_validated_predictions(features, target, folds, "logistic", None, 3, 0)
    assert [f.value for f in fast.fits] == [f.value for f in reference.fits]
    assert len({f.value for f in fast.fits}) >= 1 and all(f.selection == "inner-cv" for f in fast.fits)
    np.testing.assert_array_equal(fast.rows, reference.rows)
    if target.task == "binary":
        a, b = binary_metrics(fast.y, fast.score)["auroc"], binary_metrics(reference.y, reference.score)["auroc"]
    else:
        a = multiclass_metrics(fast.y, fast.score)["auroc_ovr"]
        b = multiclass_metrics(reference.y, reference.score)["auroc_ovr"]
    assert 0.6 < b < 1.0  # a real signal, not a separable toy
    assert abs(a - b) <= 1e-3
    for f, r in zip(fast.fits, reference.fits):  # the best inner score agrees too
        assert abs(max(f.inner_scores) - max(r.inner_scores)) <= 1e-3


def test_fit_logistic_solves_sklearns_problem_whatever_the_preconditioner():
    features, binary, three = embeddings(n=300, seed=1)
    Xt, _ = standardise(features, features[:0])
    sk = StandardScaler().fit(features).transform(features)
    np.testing.assert_allclose(Xt, sk, atol=1e-5)
    for labels in (binary, three):
        y = np.unique(labels, return_inverse=True)[1]
        k = int(y.max()) + 1
        model = LogisticRegression(C=0.1, max_iter=5000, tol=1e-10).fit(sk, y)
        expected = model.predict_proba(sk)
        for basis in (None, covariance_basis(Xt)):
            W, b = fit_logistic(Xt, y, k, 0.1, basis)
            np.testing.assert_allclose(logistic_proba(Xt, W, b, k), expected, atol=2e-3)


def test_warm_start_and_shared_basis_change_the_path_not_the_answer():
    features, binary, _ = embeddings(n=240, seed=2)
    y = np.asarray([int(v) for v in binary])
    tr, va = np.arange(160), np.arange(160, 240)
    paths = []
    for options in ({}, {"warm_start": False}, {"preconditioner": "inner"}, {"preconditioner": "none"}):
        probe = LogisticPath(0, **options)
        shared = probe.prepare(features)  # the outer part (all 240) serves the inner fit on 160
        paths.append(np.stack(probe.path(features[tr], y[tr], features[va], 2, shared)))
    for other in paths[1:]:  # equal up to the solver's stopping rule (|gradient| <= 1e-4)
        np.testing.assert_allclose(other, paths[0], atol=5e-3)


def test_unknown_solver_is_one_line():
    with pytest.raises(OptionError, match="unknown"):
        LogisticPath(0, solver="newton")
