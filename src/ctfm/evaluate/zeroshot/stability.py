"""Test-retest stability of embeddings: do two scans of the same subject embed alike?

From a manifest of pairs (columns ``scan_a``, ``scan_b`` and optionally ``subject``):

- **pair cosine**: cosine similarity of each pair, against the **non-pair** distribution (every
  ``scan_a`` with every ``scan_b`` of another subject); their separation as the probability that
  a pair scores above a non-pair (ROC AUC);
- **per-dimension ICC**: ICC(2,1) (Shrout & Fleiss: two-way random effects, absolute agreement,
  single measurement) of each embedding dimension over the pairs;
- **rank-1 re-identification**: the fraction of ``scan_a`` whose most similar ``scan_b`` is of
  its own subject (and the reverse direction).

CT-FM evaluates test-retest stability on RIDER Lung CT; its method and figures are not in the
published code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctfm.errors import CTInputError, OptionError, optional_import
from ctfm.evaluate.metrics.stats import bootstrap_ci
from ctfm.evaluate.reports.figures import histograms, pyplot, save_figure
from ctfm.evaluate.reports.report import Report
from ctfm.evaluate.zeroshot.inputs import ZeroShotResult, store_vectors, unit_rows, write_evaluation_outputs
from ctfm.io.hashing import file_sha256
from ctfm.io.tables import read_table

PAPER_NOTE = "CT-FM reports 'consistent performance across test-retest datasets' (RIDER Lung CT); the method and numbers are not published in its code"


@dataclass
class StabilityResult(ZeroShotResult):
    """What the test-retest stability evaluation returns: the keys of its results.json,
    the paths of results.json and report.html (``result["results"]``, ``result["report"]``), and ``provenance``."""


def icc_2_1(values: np.ndarray) -> np.ndarray:
    """ICC(2,1) per column set: ``values`` [n_subjects, k_measurements, ...] -> [...].

    (MS_R - MS_E) / (MS_R + (k-1) MS_E + k (MS_C - MS_E) / n), from the two-way ANOVA mean squares
    of rows (subjects), columns (sessions) and error. NaN where the data have no variance."""
    y = np.asarray(values, dtype=np.float64)
    n, k = y.shape[:2]
    if n < 2 or k < 2:
        raise OptionError(f"ICC needs at least 2 subjects and 2 measurements, got {n} x {k}")
    grand = y.mean(axis=(0, 1))
    rows = y.mean(axis=1)
    cols = y.mean(axis=0)
    ss_rows = k * ((rows - grand) ** 2).sum(axis=0)
    ss_cols = n * ((cols - grand) ** 2).sum(axis=0)
    ss_total = ((y - grand) ** 2).sum(axis=(0, 1))
    ss_error = ss_total - ss_rows - ss_cols
    ms_rows, ms_cols, ms_error = ss_rows / (n - 1), ss_cols / (k - 1), ss_error / ((n - 1) * (k - 1))
    denominator = ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ms_rows - ms_error) / denominator, np.nan)


def pair_statistics(a: np.ndarray, b: np.ndarray, subjects=None) -> dict:
    """Pair and non-pair cosines, separation AUC and rank-1 re-identification of pairs ``a[i]``,
    ``b[i]`` ([N, D] each; ``subjects`` [N] groups pairs of one subject, default one per pair)."""
    roc_auc_score = optional_import("sklearn.metrics", "eval").roc_auc_score

    a, b = unit_rows(np.asarray(a, np.float64)), unit_rows(np.asarray(b, np.float64))
    n = len(a)
    if n < 2 or a.shape != b.shape:
        raise OptionError(f"stability needs at least 2 pairs of equal-size vectors, got {a.shape} and {b.shape}")
    subjects = np.arange(n) if subjects is None else np.asarray([str(s) for s in subjects])
    similarity = a @ b.T  # [N_a, N_b]
    same = subjects[:, None] == subjects[None, :]
    pair = np.diag(similarity).copy()
    non_pair = similarity[~same]
    auc = (
        float(roc_auc_score(np.r_[np.ones(len(pair)), np.zeros(len(non_pair))], np.r_[pair, non_pair]))
        if len(non_pair)
        else float("nan")
    )
    a_to_b = (same[np.arange(n), np.argmax(similarity, axis=1)]).astype(float)
    b_to_a = (same[np.argmax(similarity, axis=0), np.arange(n)]).astype(float)
    return {
        "pair_cosine": pair,
        "non_pair_cosine": non_pair,
        "separation_auc": auc,
        "rank1_a_to_b": a_to_b,
        "rank1_b_to_a": b_to_a,
    }


def stability(a: np.ndarray, b: np.ndarray, subjects=None, seed: int = 0) -> dict:
    """Every stability figure, with bootstrap 95 % intervals over subjects."""

    stats = pair_statistics(a, b, subjects)
    icc = icc_2_1(np.stack([np.asarray(a, np.float64), np.asarray(b, np.float64)], axis=1))
    groups = None if subjects is None else np.asarray([str(s) for s in subjects])

    def interval(values):
        ci = bootstrap_ci(np.mean, np.asarray(values, float), groups=groups, n_resamples=1000, seed=seed)
        return {"mean": ci.estimate, "low": ci.low, "high": ci.high}

    finite = icc[np.isfinite(icc)]
    return {
        "n_pairs": int(len(stats["pair_cosine"])),
        "pair_cosine": {
            **interval(stats["pair_cosine"]),
            "median": float(np.median(stats["pair_cosine"])),
            "min": float(stats["pair_cosine"].min()),
        },
        "non_pair_cosine": {
            "mean": float(np.mean(stats["non_pair_cosine"])) if len(stats["non_pair_cosine"]) else None,
            "median": float(np.median(stats["non_pair_cosine"])) if len(stats["non_pair_cosine"]) else None,
            "n": int(len(stats["non_pair_cosine"])),
        },
        "separation_auc": stats["separation_auc"],
        "rank1_reidentification": {
            "a_to_b": interval(stats["rank1_a_to_b"]),
            "b_to_a": interval(stats["rank1_b_to_a"]),
        },
        "icc_2_1": {
            "median": float(np.median(finite)) if finite.size else None,
            "mean": float(np.mean(finite)) if finite.size else None,
            "fraction_above_0.75": float(np.mean(finite > 0.75)) if finite.size else None,
            "fraction_above_0.9": float(np.mean(finite > 0.9)) if finite.size else None,
            "n_dimensions": int(icc.size),
            "n_undefined": int(icc.size - finite.size),
        },
        "_per_dimension_icc": icc,
        "_pair": stats["pair_cosine"],
        "_non_pair": stats["non_pair_cosine"],
    }


def run_stability(
    store, manifest, out, seed: int = 0, run: str | None = None, where: dict | None = None
) -> StabilityResult:
    """Stability of the store's vectors for the pairs in ``manifest``; results.json, figures, report."""

    rows = read_table(manifest, required=("scan_a", "scan_b")).to_pylist()
    vectors = store_vectors(store, run=run, where=where)
    ia = [vectors.index_of(r["scan_a"], manifest) for r in rows]
    ib = [vectors.index_of(r["scan_b"], manifest) for r in rows]
    if any(x == y for x, y in zip(ia, ib)):
        raise CTInputError(manifest, "a pair names the same scan twice", "give two different scans per row")
    subjects = [r["subject"] for r in rows] if "subject" in rows[0] and all(str(r["subject"]) for r in rows) else None
    result = stability(vectors.matrix[ia], vectors.matrix[ib], subjects, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = [
        histograms(
            {"pairs (test-retest)": result["_pair"], "non-pairs": result["_non_pair"]},
            out / "pair_cosine.png",
            "cosine similarity: pairs vs non-pairs",
            "cosine similarity",
        )
    ]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    icc = result["_per_dimension_icc"]
    ax.hist(icc[np.isfinite(icc)], bins=40, range=(-1, 1), color="tab:green")
    ax.set_xlabel("ICC(2,1) per embedding dimension")
    ax.set_title("per-dimension test-retest ICC", fontsize=10)
    figures.append(save_figure(fig, out / "icc.png"))
    per_pair = [
        {"scan_a": r["scan_a"], "scan_b": r["scan_b"], "subject": r.get("subject", ""), "cosine": float(c)}
        for r, c in zip(rows, result["_pair"])
    ]
    summary = {k: v for k, v in result.items() if not k.startswith("_")}
    report = Report("Test-retest stability", f"{summary['n_pairs']} pairs from {Path(manifest).name}")
    report.heading("Summary").table(
        [
            {
                "figure": "pair cosine (mean)",
                "value": summary["pair_cosine"]["mean"],
                "95% CI": f"[{summary['pair_cosine']['low']:.4f}, {summary['pair_cosine']['high']:.4f}]",
            },
            {"figure": "non-pair cosine (mean)", "value": summary["non_pair_cosine"]["mean"], "95% CI": ""},
            {"figure": "separation AUC (pair > non-pair)", "value": summary["separation_auc"], "95% CI": ""},
            {
                "figure": "rank-1 re-identification a->b",
                "value": summary["rank1_reidentification"]["a_to_b"]["mean"],
                "95% CI": f"[{summary['rank1_reidentification']['a_to_b']['low']:.3f}, "
                f"{summary['rank1_reidentification']['a_to_b']['high']:.3f}]",
            },
            {
                "figure": "rank-1 re-identification b->a",
                "value": summary["rank1_reidentification"]["b_to_a"]["mean"],
                "95% CI": "",
            },
            {"figure": "ICC(2,1) median over dimensions", "value": summary["icc_2_1"]["median"], "95% CI": ""},
            {"figure": "dimensions with ICC > 0.75", "value": summary["icc_2_1"]["fraction_above_0.75"], "95% CI": ""},
        ],
        digits=4,
    )
    report.paragraph(f"Paper: {PAPER_NOTE}.")
    for figure in figures:
        report.figure(figure, figure.stem)
    report.heading("Pairs").table(per_pair, digits=4)
    results = {
        "evaluation": "stability",
        **summary,
        "per_pair": per_pair,
        "per_dimension_icc": icc,
        "paper": PAPER_NOTE,
        "figures": [f.name for f in figures],
    }
    prov = {**vectors.provenance(), "manifest": os.path.abspath(manifest), "manifest_sha256": file_sha256(manifest)}
    result = write_evaluation_outputs(out, results, prov, report, StabilityResult)
    del result.data["per_dimension_icc"]  # in results.json, not in the returned summary
    return result
