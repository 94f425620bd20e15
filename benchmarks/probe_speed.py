"""Speed of the logistic probe's cross-validation: today's path (scikit-learn's lbfgs) against the
fast path and each of its techniques, on the same synthetic embeddings, folds and targets.

Data: ``--n`` x ``--dim`` float32 vectors shaped like real embeddings (a rank-``--rank`` signal with
decaying scales plus isotropic noise, fixed seed) and ``--targets`` targets drawn from the latent
signal (every third one multi-class with 3-5 classes, the others binary at prevalences 10-50 %;
``--binary-only``: all binary, as ``ctfm probe --task multilabel``).
Each target: 5 outer stratified folds; on each training part, 3 inner folds choose C from the
13-value grid by AUROC (binary) or balanced accuracy (multi-class); the refit predicts the test
part (``ctfm.evaluate.probes.probe.cross_validated_predictions``, the code behind ``ctfm probe``).
Targets run in ``--jobs`` processes, as ``ctfm probe --jobs``. Every variant sees the same folds.

Variants (``--variants``, comma-separated):

- ``today``: scikit-learn LogisticRegression(lbfgs), warm-started along C (the reference path);
- ``today-cold``: the same without its warm start;
- ``standardised``: the new L-BFGS on standardised features, no whitening, warm-started;
- ``whitened-inner``: + whitening by the covariance eigendecomposition of each fit's own data;
- ``shared-cold``: + one eigendecomposition per outer fold shared by its inner fits, every C and
  the refit, but every fit started from zero;
- ``all``: shared per fold + warm starts along C and into the refit (the default path).

Reported per variant: wall seconds, CPU seconds (summed over the targets' processes: the steadier
figure on a shared machine), ratios to ``today``, the largest out-of-fold AUROC difference
from ``today`` (binary AUROC; multi-class: one-vs-rest macro AUROC) and how many of the outer
folds' chosen C differ from ``today``'s.

    python benchmarks/probe_speed.py [--n 10000] [--dim 512] [--targets 15] [--jobs 2]
        [--variants today,today-cold,standardised,whitened-inner,shared-cold,all] [--binary-only]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from joblib import Parallel, delayed

from ctfm.evaluate.metrics.classification import binary_metrics, encode_target, multiclass_metrics
from ctfm.evaluate.probes.probe import cross_validated_predictions, outer_folds

VARIANTS = {
    "today": {"solver": "sklearn"},
    "today-cold": {"solver": "sklearn", "warm_start": False},
    "standardised": {"preconditioner": "none"},
    "whitened-inner": {"preconditioner": "inner"},
    "shared-cold": {"preconditioner": "fold", "warm_start": False},
    "all": {},
}


def synthetic(n: int, dim: int, n_targets: int, rank: int = 32, seed: int = 0, binary_only: bool = False):
    """(features [n, dim] float32, targets: list of label lists) with a low-rank signal."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, rank))
    loadings = rng.normal(size=(rank, dim)) * (0.85 ** np.arange(rank))[:, None]
    features = (latent @ loadings + 0.7 * rng.normal(size=(n, dim)) + rng.normal(size=dim)).astype(np.float32)
    targets = []
    for t in range(n_targets):
        direction = rng.normal(size=(rank, 5))
        score = latent @ direction[:, 0] / np.sqrt(rank) * 1.5 + rng.normal(size=n)
        if t % 3 == 2 and not binary_only:
            k = 3 + (t // 3) % 3
            scores = latent @ direction[:, :k] / np.sqrt(rank) * 1.5 + rng.normal(size=(n, k))
            labels = [f"class{c}" for c in np.argmax(scores, axis=1)]
        else:
            prevalence = 0.1 + 0.4 * (t % 5) / 4
            labels = [str(int(v)) for v in score > np.quantile(score, 1 - prevalence)]
        targets.append(labels)
    return features, targets


def one_target(features, labels, name, options, seed=0):
    cpu = time.process_time()
    target = encode_target(name, labels, "auto")
    labelled = target.labelled
    folds = outer_folds(target.y[labelled], None, cv=5, seed=seed)
    preds = cross_validated_predictions(features, target, folds, "logistic", None, 3, seed, options)
    if target.task == "binary":
        auroc = binary_metrics(preds.y, preds.score)["auroc"]
    else:
        auroc = multiclass_metrics(preds.y, preds.score)["auroc_ovr"]
    return float(auroc), [fit.value for fit in preds.fits], target.task, time.process_time() - cpu


def run_variant(features, targets, options, jobs):
    started = time.perf_counter()
    jobs_list = [delayed(one_target)(features, labels, f"t{i}", options) for i, labels in enumerate(targets)]
    results = Parallel(n_jobs=jobs)(jobs_list) if jobs > 1 else [job[0](*job[1], **job[2]) for job in jobs_list]
    return time.perf_counter() - started, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--targets", type=int, default=15)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--binary-only", action="store_true", help="every target binary (as ctfm probe --task multilabel)"
    )
    args = parser.parse_args()
    names = args.variants.split(",")
    if names[0] != "today":
        names = ["today", *[v for v in names if v != "today"]]
    features, targets = synthetic(args.n, args.dim, args.targets, binary_only=args.binary_only)
    tasks = [encode_target(f"t{i}", t, "auto").task for i, t in enumerate(targets)]
    print(
        f"# {platform.machine()}, nproc {os.cpu_count()}, load before {os.getloadavg()}; {args.n} x {args.dim}, "
        f"{args.targets} targets ({tasks.count('binary')} binary, {tasks.count('multiclass')} multi-class), "
        f"jobs {args.jobs}"
    )
    print(
        "| variant | wall s | ratio today / variant (wall) | CPU s (sum over targets) | ratio (CPU) | max AUROC diff "
        "vs today | folds with another C | mean AUROC |"
    )
    print("|---|---|---|---|---|---|---|---|")
    reference = None
    for name in names:
        seconds, results = run_variant(features, targets, VARIANTS[name], args.jobs)
        aurocs = np.array([r[0] for r in results])
        chosen = [r[1] for r in results]
        cpu = sum(r[3] for r in results)
        if reference is None:
            reference = (seconds, aurocs, chosen, cpu)
        diff = float(np.max(np.abs(aurocs - reference[1])))
        other = sum(a != b for x, y in zip(chosen, reference[2]) for a, b in zip(x, y))
        print(
            f"| {name} | {seconds:.1f} | {reference[0] / seconds:.2f} | {cpu:.1f} | {reference[3] / cpu:.2f} | "
            f"{diff:.2e} | {other} of "
            f"{sum(map(len, chosen))} | {aurocs.mean():.4f} |",
            flush=True,
        )
        print(f"#   {name}: CPU s per target {[round(r[3], 1) for r in results]} ({[r[2] for r in results]})")
    print(f"# load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
