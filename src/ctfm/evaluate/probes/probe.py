"""Probes on frozen embeddings: labels joined to a store's scan rows, cross-validated fits.

The frozen-encoder protocol:

- **Join.** A label sheet (CSV, TSV, Parquet or XLSX) joins the scan rows of one run of the store
  (``run``/``where``, as :meth:`ctfm.store.EmbeddingStore.select`) by a key column (``scan_id``, ``series_uid``
  or ``source_path``); scans without a label and labels without a scan are counted and reported.
- **Outer split.** ``cv`` folds (stratified; grouped by ``group`` so that every patient stays in
  one fold) or a ``split`` column (``train``/``val`` rows fit, ``test`` rows are scored). The folds
  depend on the labels, groups and seed only, so every store compared sees the same folds.
- **Inner selection.** On each outer training part only: an inner stratified (grouped) CV picks the
  hyperparameter (logistic: 13 values of C from 1e-6 to 1e6 on standardised features; kNN with
  cosine distance: k; MLP: the L2 weight) by AUROC (binary) or balanced accuracy (multi-class),
  and, for a binary target, the decision threshold (Youden's J on the inner out-of-fold scores).
  The test part is never looked at until its probabilities are predicted.
- **Targets.** Each target column gets its own probe (several binary columns = multi-label).

    >>> inputs = load_probe_inputs("store/", "labels.csv", ["abnormal"], key="series_uid")   # doctest: +SKIP
    >>> target = encode_target("abnormal", inputs.columns["abnormal"], "auto")                # doctest: +SKIP
    >>> folds = outer_folds(target.y, None, cv=5)                                             # doctest: +SKIP
    >>> fit = cross_validated_predictions(inputs.features, target, folds, method="logistic")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctfm.errors import CTInputError, OptionError, optional_import
from ctfm.evaluate.metrics.classification import (
    Target,
    binary_metrics,
    multiclass_metrics,
    primary_metric,
    youden_threshold,
)
from ctfm.io.tables import read_table
from ctfm.store import RUN_KEY, open_store

KEYS = ("scan_id", "series_uid", "source_path")
METHODS = ("logistic", "knn", "mlp")
TASKS = ("auto", "binary", "multiclass", "multilabel")
C_GRID = tuple(float(c) for c in np.logspace(-6, 6, 13))  # the 13 regularisation strengths
K_GRID = (1, 3, 5, 7, 11, 15, 21, 31, 51)
MLP_ALPHA_GRID = (1e-4, 1e-2, 1.0)
MLP_HIDDEN = 256
TRAIN_VALUES, TEST_VALUES = {"train", "training", "val", "valid", "validation"}, {"test", "testing"}


# ---- the join --------------------------------------------------------------------------------
@dataclass
class ProbeInputs:
    """Store rows that have a label row: features [N, D] and the label file's columns for them."""

    store: str
    keys: list[str]
    scan_ids: list[str]
    features: np.ndarray
    columns: dict[str, list[str]]
    join: dict
    run: dict


def read_label_file(path, key: str, needed: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(key values, {column: values}) of a label sheet (CSV, TSV, Parquet, XLSX; :func:`ctfm.io.read_table`);
    one-line errors for a missing file or column."""
    path = Path(path)
    if not path.is_file():
        raise CTInputError(path, "no such label file", "give a CSV, TSV, Parquet or XLSX sheet with a header row")
    table = read_table(path)
    header = table.column_names
    for column in [key, *needed]:
        if column not in header:
            raise CTInputError(
                path,
                f"no column {column!r} (columns: {', '.join(header) or 'none'})",
                "add it, or choose another with --key/--target/--group-column/--split-column",
            )
    keys = _text_column(table, key)
    seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k and k in seen:
            raise CTInputError(
                path, f"key {key}={k!r} appears on rows {seen[k] + 2} and {i + 2}", "give one label row per scan"
            )
        seen[k] = i
    return keys, {c: _text_column(table, c) for c in needed}


def _text_column(table, name: str) -> list[str]:
    """A column as stripped text ('' for nulls), whatever its type in the sheet."""
    column = table.column(name)
    if not pa.types.is_string(column.type):
        column = pc.cast(column, pa.string())
    return [v.strip() for v in pc.fill_null(column, "").to_pylist()]


def _normalise_key(key: str, value) -> str | None:
    if value is None or value == "":
        return None
    return os.path.abspath(value) if key == "source_path" else str(value)


def load_probe_inputs(
    store_path, labels_path, columns: list[str], key: str = "scan_id", run: str | None = None, where: dict | None = None
) -> ProbeInputs:
    """Join the label file to the scan rows of one run of a store (see the module docstring);
    ``run`` (a digest or unique prefix) and ``where`` (``{column: value}``) pick the run, as
    :meth:`ctfm.store.EmbeddingStore.select`."""
    if key not in KEYS:
        raise OptionError(f"--key {key}: not a join key (choose {', '.join(KEYS)})")
    store = open_store(store_path)
    label_keys, label_columns = read_label_file(labels_path, key, columns)
    vectors = store.select("scan", run=run, where=where)
    n_rows = vectors.metadata.num_rows
    if vectors.vectors.shape[1] == 0:
        raise CTInputError(
            store.root, f"{n_rows} of {n_rows} scan rows have no embedding", "re-run `ctfm embed` into a fresh store"
        )
    store_keys = [_normalise_key(key, v) for v in vectors.metadata.column(key).to_pylist()]
    by_key: dict[str, int] = {}
    duplicated = 0
    for i, value in enumerate(store_keys):
        if value is None:
            continue
        if value in by_key:
            duplicated += 1
        by_key[value] = i
    if duplicated:
        raise CTInputError(
            store.root,
            f"{duplicated} scan rows share a {key} with another row",
            "join on a unique key, e.g. --key scan_id",
        )
    label_index = {}
    for i, k in enumerate(label_keys):
        value = _normalise_key(key, k)
        if value is not None:
            label_index[value] = i
    matched = [k for k in by_key if k in label_index]
    if not matched:
        example_store = next(iter(by_key), None)
        example_label = next(iter(label_index), None)
        raise CTInputError(
            labels_path,
            f"no label row matches a scan of the store by {key} (store has e.g. {example_store!r}, labels e.g. "
            f"{example_label!r})",
            "check --key and the key column's values",
        )
    order = [label_index[k] for k in matched]
    rows = np.asarray([by_key[k] for k in matched], dtype=np.int64)
    features = np.ascontiguousarray(vectors.vectors[rows], dtype=np.float32)
    if not np.all(np.isfinite(features)):
        raise CTInputError(
            store.root, "embeddings contain NaN or infinity", "run `ctfm store check` and re-embed those scans"
        )
    join = {
        "key": key,
        "store_rows": n_rows,
        "label_rows": len(label_keys),
        "matched": len(matched),
        "scans_without_label": len(by_key) - len(matched) + sum(1 for v in store_keys if v is None),
        "labels_without_scan": len(label_keys) - len(matched),
        "examples_scans_without_label": [k for k in by_key if k not in label_index][:5],
        "examples_labels_without_scan": [k for k in label_index if k not in by_key][:5],
    }
    first = vectors.metadata.slice(int(rows[0]), 1).to_pylist()[0]
    run_fields = {k: first.get(k) for k in RUN_KEY} | {
        "preset": first.get("preset"),
        "package_version": first.get("package_version"),
        "dim": int(features.shape[1]),
    }
    scan_ids = vectors.metadata.column("scan_id").to_pylist()
    return ProbeInputs(
        store=str(store.root),
        keys=matched,
        scan_ids=[scan_ids[by_key[k]] for k in matched],
        features=features,
        columns={c: [vals[i] for i in order] for c, vals in label_columns.items()},
        join=join,
        run=run_fields,
    )


# ---- splits ----------------------------------------------------------------------------------
def outer_folds(y, groups=None, cv: int = 5, split=None, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(train, test)] positions into ``y`` (the labelled rows of one target).

    ``split`` (values train/val/test) gives one fold; otherwise ``cv`` stratified folds, grouped by
    ``groups`` (StratifiedGroupKFold) so that no group is on both sides.
    """
    StratifiedGroupKFold = optional_import("sklearn.model_selection", "eval").StratifiedGroupKFold
    StratifiedKFold = optional_import("sklearn.model_selection", "eval").StratifiedKFold

    y = np.asarray(y)
    if split is not None:
        split = np.asarray([str(s).strip().lower() for s in split])
        unknown = sorted(set(split) - TRAIN_VALUES - TEST_VALUES)
        if unknown:
            raise OptionError(
                f"--split-column: values {unknown} are neither train/val nor test (rename them, or leave them out of "
                "the label file)"
            )
        train, test = (
            np.flatnonzero(np.isin(split, list(TRAIN_VALUES))),
            np.flatnonzero(np.isin(split, list(TEST_VALUES))),
        )
        if not len(train) or not len(test):
            raise OptionError("--split-column: needs both training (train/val) and test rows among the labelled scans")
        if groups is not None:
            shared = set(np.asarray(groups)[train]) & set(np.asarray(groups)[test])
            if shared:
                raise OptionError(
                    f"--split-column puts {len(shared)} group(s) on both sides (e.g. {sorted(shared)[0]!r}); fix the "
                    "split or drop --group-column"
                )
        return [(train, test)]
    counts = np.bincount(y)
    counts = counts[counts > 0]
    n_groups = len(set(groups)) if groups is not None else len(y)
    if cv < 2:
        raise OptionError(f"--cv {cv}: needs at least 2 folds")
    if cv > n_groups:
        raise OptionError(
            f"--cv {cv}: more folds than {'groups' if groups is not None else 'labelled scans'} ({n_groups})"
        )
    if counts.min() < cv:
        warnings.warn(
            f"the rarest class has {counts.min()} scans, fewer than --cv {cv}: some test folds lack it", stacklevel=2
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if groups is not None:
            splitter = StratifiedGroupKFold(n_splits=cv, shuffle=True, random_state=seed)
            return [(tr, te) for tr, te in splitter.split(np.zeros(len(y)), y, np.asarray(groups))]
        splitter = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
        return [(tr, te) for tr, te in splitter.split(np.zeros(len(y)), y)]


def _inner_folds(y, groups, k: int, seed: int):
    """Inner folds on a training part, or None when a class is too rare to split."""
    counts = np.bincount(y)
    counts = counts[counts > 0]
    n_groups = len(set(groups)) if groups is not None else len(y)
    k = min(k, int(counts.min()), n_groups)
    if k < 2 or len(counts) < 2:
        return None
    folds = outer_folds(y, groups, cv=k, seed=seed) if groups is not None else None
    if folds is None:
        StratifiedKFold = optional_import("sklearn.model_selection", "eval").StratifiedKFold

        folds = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    # every inner training part must hold every class
    if any(len(np.unique(y[tr])) < len(counts) for tr, _ in folds):
        return None
    return folds


# ---- the three probes ------------------------------------------------------------------------
def _full_proba(model, X, n_classes: int) -> np.ndarray:
    """predict_proba with a column for every class (a class absent from training gets 0)."""
    proba = model.predict_proba(X)
    out = np.zeros((len(X), n_classes))
    out[:, model.classes_.astype(int)] = proba
    return out


LOGISTIC_SOLVERS = ("whitened", "sklearn")
PRECONDITIONERS = ("fold", "inner", "none")
LOGISTIC_TOL = 1e-4  # scikit-learn's lbfgs rule: stop when every |gradient| of the mean loss is <= this


class _Converged(Exception):
    """Raised inside the objective at a point that meets :data:`LOGISTIC_TOL`."""

    def __init__(self, theta):
        self.theta = theta


def standardise(X_train, X_eval):
    """(X_train, X_eval) as float32, centred and scaled by X_train's mean and sd (as scikit-learn's
    StandardScaler: sd with ddof 0, a constant column scaled by 1)."""
    X_train = np.asarray(X_train)
    mean = X_train.mean(axis=0, dtype=np.float64)
    sd = X_train.std(axis=0, dtype=np.float64)
    sd[sd < 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)] = 1.0
    mean, sd = mean.astype(np.float32), sd.astype(np.float32)
    return ((X_train - mean) / sd).astype(np.float32), ((np.asarray(X_eval) - mean) / sd).astype(np.float32)


def covariance_basis(X) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues [d], eigenvectors [d, d]) of the covariance X^T X / n of standardised X: the
    preconditioner of :func:`fit_logistic` (it changes the solver's path, not its solution)."""
    X = np.asarray(X, dtype=np.float32)
    covariance = (X.T @ X).astype(np.float64) / len(X)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    return np.clip(eigenvalues, 0.0, None), eigenvectors


def fit_logistic(X, y, n_classes: int, C: float, basis=None, start=None, max_iter: int = 1000):
    """L2 logistic regression as scikit-learn's lbfgs fits it (binary, or multinomial with one
    weight vector per class; unpenalised intercepts): minimise mean log-loss + ||W||^2 / (2 C n),
    stopping when every gradient entry is at most :data:`LOGISTIC_TOL`.

    ``X`` [n, d] standardised float32, ``y`` class indices 0..n_classes-1 (every class present).
    L-BFGS runs in whitened coordinates: W = V diag(1 / sqrt(d_k lam + 1/(C n))) Z, with (lam, V)
    = ``basis`` (a covariance eigendecomposition close to X's, e.g. :func:`covariance_basis` of the
    fold; None: the identity) and d_k = pi_k (1 - pi_k) at the class prior, so that the Hessian in Z
    is near the identity for every C. ``start`` = (W, b) warm-starts it. Returns (W [d, K], b [K]),
    K = 1 for a binary target."""
    X = np.asarray(X, dtype=np.float32)
    n, d = X.shape
    eigenvalues, vectors = (np.ones(d), None) if basis is None else basis
    binary = n_classes == 2
    K = 1 if binary else n_classes
    Y = (np.asarray(y) == 1).astype(np.float64)[:, None] if binary else np.eye(n_classes)[np.asarray(y)]
    prior = Y.mean(axis=0)
    weight = np.clip(prior * (1 - prior), 1e-3, None)  # the Hessian's weight per output at the prior
    reg = 1.0 / (C * n)
    scale = 1.0 / np.sqrt(eigenvalues[:, None] * weight[None, :] + reg)  # [d, K]
    intercept_scale = 1.0 / np.sqrt(weight)

    def weights(theta):
        U = scale * theta[: d * K].reshape(d, K)
        return U, (U if vectors is None else vectors @ U), theta[d * K :] * intercept_scale

    def objective(theta):
        U, W, b = weights(theta)
        eta = (X @ W.astype(np.float32)).astype(np.float64) + b
        if binary:
            e = eta[:, 0]
            loss = float(np.mean(np.logaddexp(0.0, e) - Y[:, 0] * e))
            R = ((0.5 * (1.0 + np.tanh(0.5 * e))) - Y[:, 0])[:, None] / n
        else:
            top = eta.max(axis=1, keepdims=True)
            log_norm = top + np.log(np.exp(eta - top).sum(axis=1, keepdims=True))
            loss = float(np.mean(log_norm[:, 0] - (Y * eta).sum(axis=1)))
            R = (np.exp(eta - log_norm) - Y) / n
        loss += 0.5 * reg * float((U * U).sum())
        gW = (X.T @ R.astype(np.float32)).astype(np.float64) + reg * W
        gb = R.sum(axis=0)
        if max(np.abs(gW).max(), np.abs(gb).max()) <= LOGISTIC_TOL:
            raise _Converged(theta)
        gZ = scale * (gW if vectors is None else vectors.T @ gW)
        return loss, np.concatenate([gZ.ravel(), gb * intercept_scale])

    W0, b0 = (np.zeros((d, K)), np.zeros(K)) if start is None else start
    theta = np.concatenate([((W0 if vectors is None else vectors.T @ W0) / scale).ravel(), b0 / intercept_scale])
    minimize = optional_import("scipy.optimize", "eval").minimize
    try:
        theta = minimize(
            objective,
            theta,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iter, "gtol": 0.0, "ftol": 64 * np.finfo(float).eps, "maxls": 50},
        ).x
    except _Converged as done:
        theta = done.theta
    _, W, b = weights(theta)
    return W, b


def logistic_proba(X, W, b, n_classes: int) -> np.ndarray:
    """Class probabilities [n, n_classes] of :func:`fit_logistic`'s (W, b) on standardised X."""
    eta = (np.asarray(X, dtype=np.float32) @ W.astype(np.float32)).astype(np.float64) + b
    if n_classes == 2:
        p = 0.5 * (1.0 + np.tanh(0.5 * eta[:, 0]))
        return np.stack([1.0 - p, p], axis=1)
    eta = np.exp(eta - eta.max(axis=1, keepdims=True))
    return eta / eta.sum(axis=1, keepdims=True)


class LogisticPath:
    """Standardised features, L2 logistic regression along :data:`C_GRID` (warm-started).

    ``solver="whitened"`` (the default): :func:`fit_logistic`, preconditioned by one covariance
    eigendecomposition of the outer fold's training part (``preconditioner="fold"``, shared by its
    inner folds, every C and the refit; ``"inner"``: one per inner fit; ``"none"``), each C started
    from the previous C's solution and the refit from the inner folds' mean at the chosen C.
    ``solver="sklearn"``: scikit-learn's LogisticRegression (lbfgs), the reference the fast path is
    tested against. ``warm_start=False`` starts every fit from zero (for measurements).

    The fast path serves binary targets. Multi-class targets stay on scikit-learn's solver: their
    balanced accuracy at the smallest C values is decided by the intercepts' last digits (the
    weights are almost zero), so any other solver, within the same stopping rule, can choose
    another C there. :func:`fit_logistic` itself solves the multinomial problem too.
    """

    grid = C_GRID
    param = "C"
    default = 1.0

    def __init__(self, seed: int = 0, solver: str = "whitened", warm_start: bool = True, preconditioner: str = "fold"):
        if solver not in LOGISTIC_SOLVERS:
            raise OptionError(f"logistic solver {solver!r}: unknown (choose {', '.join(LOGISTIC_SOLVERS)})")
        if preconditioner not in PRECONDITIONERS:
            raise OptionError(f"preconditioner {preconditioner!r}: unknown (choose {', '.join(PRECONDITIONERS)})")
        self.seed, self.solver, self.warm_start, self.preconditioner = seed, solver, warm_start, preconditioner
        self._solutions: dict[int, list] = {}

    def prepare(self, X_train):
        """What the outer fold's fits share: its covariance basis ("fold" preconditioner), else None."""
        self._solutions = {}
        if self.solver == "whitened" and self.preconditioner == "fold":
            return covariance_basis(standardise(X_train, X_train[:0])[0])
        return None

    def _basis(self, Xt, shared):
        if self.preconditioner == "fold" and shared is not None:
            return shared
        return covariance_basis(Xt) if self.preconditioner in ("fold", "inner") else None

    def path(self, X_train, y_train, X_eval, n_classes, shared=None):
        """[len(grid)] probabilities [n_eval, C] along the grid (small C first)."""
        present, y_index = np.unique(np.asarray(y_train), return_inverse=True)
        if self.solver == "sklearn" or len(present) != 2:
            return self._sklearn_path(X_train, y_train, X_eval, n_classes)
        Xt, Xe = standardise(X_train, X_eval)
        basis, start, out = self._basis(Xt, shared), None, []
        for i, c in enumerate(self.grid):
            W, b = fit_logistic(Xt, y_index, len(present), c, basis, start if self.warm_start else None, max_iter=300)
            start = (W, b)
            self._solutions.setdefault(i, []).append(start)
            proba = np.zeros((len(Xe), n_classes))
            proba[:, present.astype(int)] = logistic_proba(Xe, W, b, len(present))
            out.append(proba)
        return out

    def fit_predict(self, X_train, y_train, X_eval, n_classes, value, shared=None):
        present, y_index = np.unique(np.asarray(y_train), return_inverse=True)
        if self.solver == "sklearn" or len(present) != 2:
            return self._sklearn_fit_predict(X_train, y_train, X_eval, n_classes, value)
        Xt, Xe = standardise(X_train, X_eval)
        starts = self._solutions.get(self.grid.index(value) if value in self.grid else -1, [])
        start = None
        if self.warm_start and starts and all(len(s[1]) == len(starts[0][1]) for s in starts):
            start = (np.mean([s[0] for s in starts], axis=0), np.mean([s[1] for s in starts], axis=0))
        W, b = fit_logistic(Xt, y_index, len(present), value, self._basis(Xt, shared), start)
        proba = np.zeros((len(Xe), n_classes))
        proba[:, present.astype(int)] = logistic_proba(Xe, W, b, len(present))
        return proba

    def _sklearn_path(self, X_train, y_train, X_eval, n_classes):
        ConvergenceWarning = optional_import("sklearn.exceptions", "eval").ConvergenceWarning
        LogisticRegression = optional_import("sklearn.linear_model", "eval").LogisticRegression
        StandardScaler = optional_import("sklearn.preprocessing", "eval").StandardScaler

        scaler = StandardScaler().fit(X_train)
        Xt, Xe = scaler.transform(X_train), scaler.transform(X_eval)
        model = LogisticRegression(max_iter=300, warm_start=self.warm_start)
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for c in self.grid:
                model.set_params(C=c)
                model.fit(Xt, y_train)
                out.append(_full_proba(model, Xe, n_classes))
        return out

    def _sklearn_fit_predict(self, X_train, y_train, X_eval, n_classes, value):
        ConvergenceWarning = optional_import("sklearn.exceptions", "eval").ConvergenceWarning
        LogisticRegression = optional_import("sklearn.linear_model", "eval").LogisticRegression
        make_pipeline = optional_import("sklearn.pipeline", "eval").make_pipeline
        StandardScaler = optional_import("sklearn.preprocessing", "eval").StandardScaler

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = make_pipeline(StandardScaler(), LogisticRegression(C=value, max_iter=1000)).fit(X_train, y_train)
        return _full_proba(model, X_eval, n_classes)


class KNNPath:
    """k nearest neighbours by cosine distance, uniform votes; one neighbour search serves every k."""

    grid = K_GRID
    param = "k"
    default = 5

    def __init__(self, seed: int = 0):
        self.seed = seed

    @staticmethod
    def _neighbours(X_train, X_eval, k):
        NearestNeighbors = optional_import("sklearn.neighbors", "eval").NearestNeighbors

        return (
            NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute")
            .fit(X_train)
            .kneighbors(X_eval, return_distance=False)
        )

    @staticmethod
    def _votes(neighbour_labels, k, n_classes):
        first = neighbour_labels[:, :k]
        return np.stack([(first == c).mean(axis=1) for c in range(n_classes)], axis=1)

    def prepare(self, X_train):
        return None

    def path(self, X_train, y_train, X_eval, n_classes, shared=None):
        ks = [k for k in self.grid if k <= len(X_train)]
        labels = np.asarray(y_train)[self._neighbours(X_train, X_eval, max(ks))]
        return [self._votes(labels, k, n_classes) if k <= len(X_train) else None for k in self.grid]

    def fit_predict(self, X_train, y_train, X_eval, n_classes, value, shared=None):
        k = min(int(value), len(X_train))
        labels = np.asarray(y_train)[self._neighbours(X_train, X_eval, k)]
        return self._votes(labels, k, n_classes)


class MLPPath:
    """Standardised features, one hidden layer of 256 ReLU units (Adam), L2 weight from the grid."""

    grid = MLP_ALPHA_GRID
    param = "alpha"
    default = 1e-2

    def __init__(self, seed: int = 0):
        self.seed = seed

    def prepare(self, X_train):
        return None

    def fit_predict(self, X_train, y_train, X_eval, n_classes, value, shared=None):
        ConvergenceWarning = optional_import("sklearn.exceptions", "eval").ConvergenceWarning
        MLPClassifier = optional_import("sklearn.neural_network", "eval").MLPClassifier
        make_pipeline = optional_import("sklearn.pipeline", "eval").make_pipeline
        StandardScaler = optional_import("sklearn.preprocessing", "eval").StandardScaler

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = make_pipeline(
                StandardScaler(),
                MLPClassifier(hidden_layer_sizes=(MLP_HIDDEN,), alpha=value, max_iter=200, random_state=self.seed),
            ).fit(X_train, y_train)
        proba = model.predict_proba(X_eval)
        out = np.zeros((len(X_eval), n_classes))
        out[:, model.classes_.astype(int)] = proba
        return out

    def path(self, X_train, y_train, X_eval, n_classes, shared=None):
        return [self.fit_predict(X_train, y_train, X_eval, n_classes, a) for a in self.grid]


PROBES = {"logistic": LogisticPath, "knn": KNNPath, "mlp": MLPPath}


def _selection_score(task: str, y, proba) -> float:

    if proba is None:
        return -np.inf
    if task == "binary":
        value = binary_metrics(y, proba[:, 1])["auroc"]
    else:
        value = multiclass_metrics(y, proba)["balanced_accuracy"]
    return float(value) if np.isfinite(value) else -np.inf


@dataclass
class FoldFit:
    """One outer fold: the chosen hyperparameter, how it was chosen, the threshold, test probabilities."""

    param: str
    value: float
    selection: str  # inner-cv | fixed
    inner_scores: list[float]
    threshold: float | None
    test_proba: np.ndarray


def fit_fold(
    method: str,
    X_train,
    y_train,
    groups_train,
    X_test,
    task: str,
    n_classes: int,
    inner_cv: int = 3,
    seed: int = 0,
    probe_options: dict | None = None,
) -> FoldFit:
    """Choose the hyperparameter (and binary threshold) by inner CV on the training part, refit on
    all of it, predict the test part. Too few cases per class for inner CV: the method's default.
    ``probe_options`` go to the probe's class (e.g. ``{"solver": "sklearn"}`` for the logistic
    reference path)."""

    probe = PROBES[method](seed, **(probe_options or {}))
    shared = probe.prepare(X_train)  # what every fit of this fold shares
    folds = _inner_folds(y_train, groups_train, inner_cv, seed)
    if folds is None:
        value = probe.default
        if method == "knn":
            value = min(value, len(X_train))
        proba = probe.fit_predict(X_train, y_train, X_test, n_classes, value, shared)
        return FoldFit(probe.param, float(value), "fixed", [], 0.5 if task == "binary" else None, proba)
    oof = [np.zeros((len(y_train), n_classes)) for _ in probe.grid]
    valid = [True] * len(probe.grid)
    for tr, va in folds:
        for i, proba in enumerate(probe.path(X_train[tr], y_train[tr], X_train[va], n_classes, shared)):
            if proba is None:
                valid[i] = False
            else:
                oof[i][va] = proba
    scores = [_selection_score(task, y_train, oof[i]) if valid[i] else -np.inf for i in range(len(probe.grid))]
    best = int(np.argmax(scores))  # the first best: the strongest regularisation / smallest k
    threshold = youden_threshold(y_train, oof[best][:, 1]) if task == "binary" else None
    proba = probe.fit_predict(X_train, y_train, X_test, n_classes, probe.grid[best], shared)
    return FoldFit(probe.param, float(probe.grid[best]), "inner-cv", [float(s) for s in scores], threshold, proba)


@dataclass
class TargetPredictions:
    """Out-of-fold predictions of one target: rows (positions in the labelled rows), fold, probabilities."""

    target: Target
    rows: np.ndarray
    fold: np.ndarray
    proba: np.ndarray
    threshold: np.ndarray
    fits: list[FoldFit] = field(default_factory=list)

    @property
    def y(self) -> np.ndarray:
        return self.target.y[self.rows]

    @property
    def score(self) -> np.ndarray:
        """Binary: the positive-class probability [n]; multi-class: probabilities [n, C]."""
        return self.proba[:, 1] if self.target.task == "binary" else self.proba


def cross_validated_predictions(
    features,
    target: Target,
    folds,
    method: str = "logistic",
    groups=None,
    inner_cv: int = 3,
    seed: int = 0,
    probe_options: dict | None = None,
) -> TargetPredictions:
    """Out-of-fold probabilities of ``target`` over ``folds`` (positions into its labelled rows);
    ``probe_options`` as :func:`fit_fold`."""
    if method not in PROBES:
        raise OptionError(f"--method {method}: unknown (choose {', '.join(METHODS)})")
    labelled = target.labelled
    X, y = np.asarray(features)[labelled], target.y[labelled]
    g = None if groups is None else np.asarray(groups)[labelled]
    rows, fold_ids, probas, thresholds, fits = [], [], [], [], []
    for f, (tr, te) in enumerate(folds):
        fit = fit_fold(
            method,
            X[tr],
            y[tr],
            None if g is None else g[tr],
            X[te],
            target.task,
            len(target.classes),
            inner_cv,
            seed + f,
            probe_options,
        )
        rows.append(labelled[te])
        fold_ids.append(np.full(len(te), f))
        probas.append(fit.test_proba)
        thresholds.append(np.full(len(te), fit.threshold if fit.threshold is not None else np.nan))
        fits.append(fit)
    return TargetPredictions(
        target, np.concatenate(rows), np.concatenate(fold_ids), np.concatenate(probas), np.concatenate(thresholds), fits
    )


# ---- few-shot --------------------------------------------------------------------------------
def parse_shots(text: str) -> list[int | str]:
    """ "1,2,5,all" -> [1, 2, 5, "all"]."""
    out: list[int | str] = []
    for item in str(text).split(","):
        item = item.strip().lower()
        if item == "all":
            out.append("all")
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise OptionError(
                f"--shots {text}: {item!r} is neither a positive whole number nor 'all' (e.g. --shots 1,2,5,10,all)"
            )
    return out


def few_shot_draw(y_train, shots: int, rng) -> np.ndarray | None:
    """Positions of ``shots`` cases per class drawn from ``y_train``; None if a class has fewer."""
    picks = []
    for c in np.unique(y_train):
        members = np.flatnonzero(y_train == c)
        if len(members) < shots:
            return None
        picks.append(rng.choice(members, size=shots, replace=False))
    return np.sort(np.concatenate(picks))


def few_shot_curve(
    features,
    target: Target,
    folds,
    shots: list,
    repeats: int = 10,
    method: str = "logistic",
    groups=None,
    inner_cv: int = 3,
    seed: int = 0,
) -> dict:
    """The primary metric against k labelled cases per class: for every k and repeat, each outer
    fold's training part is cut to k cases per class (drawn with a seed made of seed, repeat, fold
    and k, so every store sees the same draws), the probe is fitted, and the pooled out-of-fold
    metric is recorded. Returns {shots: {"values": [repeats], "mean", "sd", "selection"}}."""

    labelled = target.labelled
    X, y = np.asarray(features)[labelled], target.y[labelled]
    g = None if groups is None else np.asarray(groups)[labelled]
    metric = primary_metric(target.task)
    curve = {}
    for shot_index, k in enumerate(shots):
        values, selections = [], set()
        for r in range(1 if k == "all" else repeats):
            rows, probas, ok = [], [], True
            for f, (tr, te) in enumerate(folds):
                if k == "all":
                    chosen = tr
                else:
                    pick = few_shot_draw(y[tr], int(k), np.random.default_rng([seed, r, f, shot_index, int(k)]))
                    if pick is None:
                        ok = False
                        break
                    chosen = tr[pick]
                fit = fit_fold(
                    method,
                    X[chosen],
                    y[chosen],
                    None if g is None else g[chosen],
                    X[te],
                    target.task,
                    len(target.classes),
                    inner_cv,
                    seed + f,
                )
                selections.add(fit.selection)
                rows.append(te)
                probas.append(fit.test_proba)
            if not ok:
                break
            rows_all, proba_all = np.concatenate(rows), np.concatenate(probas)
            m = (
                binary_metrics(y[rows_all], proba_all[:, 1])
                if target.task == "binary"
                else multiclass_metrics(y[rows_all], proba_all)
            )
            values.append(float(m[metric]))
        if values:
            curve[str(k)] = {
                "shots": k,
                "values": values,
                "mean": float(np.mean(values)),
                "sd": float(np.std(values)),
                "selection": sorted(selections),
            }
    return {"metric": metric, "repeats": repeats, "points": curve}
