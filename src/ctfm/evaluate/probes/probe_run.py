"""One probe run: stores x targets, metrics with bootstrap CIs, paired comparisons, few-shot
curves, and the outputs (results.json with provenance, predictions.csv, PNG curves, report.html).

    >>> result = run_probe(["store_a/", "store_b/"], "labels.csv", ["abnormal"], key="series_uid",
    ...                    cv=5, group_column="patient_id", out="probe_out")      # doctest: +SKIP
    >>> result["targets"][0]["stores"][0]["metrics"]["auroc"]                     # doctest: +SKIP
    {'estimate': 0.91, 'low': 0.88, 'high': 0.93, ...}

Several stores are probed on the same cases (the scans labelled in all of them), the same folds
and the same few-shot draws; each store after the first is compared with the first (DeLong and a
paired bootstrap for AUROC; a paired bootstrap for every other metric).
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctfm.errors import CTInputError, OptionError, optional_import
from ctfm.evaluate.metrics import classification as cm
from ctfm.evaluate.metrics.classification import encode_target
from ctfm.evaluate.metrics.stats import delong_test
from ctfm.evaluate.probes.probe import (
    METHODS,
    TASKS,
    cross_validated_predictions,
    few_shot_curve,
    load_probe_inputs,
    outer_folds,
)
from ctfm.evaluate.reports.report import Report, provenance, write_results
from ctfm.io.hashing import file_sha256
from ctfm.runtime import DocumentResult, write_text_atomic

PREDICTIONS_NAME = "predictions.csv"


def _common_rows(inputs):
    """Restrict every store's inputs to the keys matched in all of them, in the first's order."""
    common = set(inputs[0].keys)
    for other in inputs[1:]:
        common &= set(other.keys)
    if not common:
        raise CTInputError(
            inputs[1].store if len(inputs) > 1 else inputs[0].store,
            "no labelled scan is in every store",
            "probe stores that embed the same scans (joined by --key)",
        )
    order = [k for k in inputs[0].keys if k in common]
    for item in inputs:
        position = {k: i for i, k in enumerate(item.keys)}
        idx = [position[k] for k in order]
        item.join["not_in_every_store"] = len(item.keys) - len(order)
        item.keys = order
        item.scan_ids = [item.scan_ids[i] for i in idx]
        item.features = item.features[idx]
        item.columns = {c: [v[i] for i in idx] for c, v in item.columns.items()}
    return inputs


def _metric_fn(target, predictions):
    y, score = predictions.y, predictions.score
    if target.task == "binary":
        threshold = predictions.threshold
        return lambda w: cm.binary_metrics_weighted(y, score, threshold, w)
    return lambda w: cm.multiclass_metrics_weighted(y, score, w)


def _probe_target(
    name, inputs, task, method, cv, split, groups, inner_cv, seed, n_resamples, shots, repeats, labels_path
):
    target = encode_target(name, inputs[0].columns[name], task, labels_path)
    labelled = target.labelled
    folds = outer_folds(
        target.y[labelled],
        None if groups is None else groups[labelled],
        cv,
        None if split is None else split[labelled],
        seed,
    )
    counts = np.bincount(target.y[labelled], minlength=len(target.classes))
    entry = {
        "target": name,
        "task": target.task,
        "classes": target.classes,
        "n_labelled": int(len(labelled)),
        "n_missing": target.missing,
        "class_counts": dict(zip(target.classes, counts.tolist())),
        "folds": len(folds),
        "stores": [],
        "comparisons": [],
        "_predictions": [],
    }
    for item in inputs:
        started = time.perf_counter()
        preds = cross_validated_predictions(item.features, target, folds, method, groups, inner_cv, seed)
        fit_seconds = time.perf_counter() - started
        case_groups = None if groups is None else groups[preds.rows]
        metrics = cm.bootstrap_metrics(_metric_fn(target, preds), len(preds.rows), n_resamples, seed, case_groups)
        fits = [
            {
                "fold": f,
                "param": fit.param,
                "value": fit.value,
                "selection": fit.selection,
                "threshold": fit.threshold,
                "inner_scores": fit.inner_scores,
            }
            for f, fit in enumerate(preds.fits)
        ]
        store_entry = {
            "store": item.store,
            "metrics": {k: v.as_dict() for k, v in metrics.items()},
            "n_test": int(len(preds.rows)),
            "fits": fits,
            "fit_seconds": fit_seconds,
        }
        if shots:
            store_entry["few_shot"] = few_shot_curve(
                item.features, target, folds, shots, repeats, method, groups, inner_cv, seed
            )
        entry["stores"].append(store_entry)
        entry["_predictions"].append(preds)
    base = entry["_predictions"][0]
    for s in range(1, len(inputs)):
        other = entry["_predictions"][s]
        assert np.array_equal(base.rows, other.rows)  # same folds, same order: paired by construction
        case_groups = None if groups is None else groups[base.rows]
        paired = cm.paired_bootstrap_metrics(
            _metric_fn(target, other), _metric_fn(target, base), len(base.rows), n_resamples, seed, case_groups
        )
        comparison = {
            "a": inputs[s].store,
            "b": inputs[0].store,
            "difference": "a - b",
            "paired_bootstrap": {k: v.as_dict() for k, v in paired.items()},
        }
        if target.task == "binary":
            comparison["delong_auroc"] = delong_test(base.y, other.score, base.score).as_dict()
        entry["comparisons"].append(comparison)
    return entry


@dataclass
class ProbeResult(DocumentResult):
    """What :func:`run_probe` returns: ``data`` holds the keys of results.json (settings, join,
    targets, seconds); ``provenance`` the stores' runs and the labels file's sha256."""

    def summary(self) -> str:
        targets = ", ".join(f"{t['target']} ({t['task']}, {t['n_labelled']} labelled)" for t in self.data["targets"])
        return f"probe: {len(self.data['join'])} store(s), target(s) {targets}; {self.data['seconds']:.1f} s"


def run_probe(
    stores: list[str],
    labels: str,
    targets: list[str],
    *,
    key: str = "scan_id",
    task: str = "auto",
    method: str = "logistic",
    cv: int = 5,
    split_column: str | None = None,
    group_column: str | None = None,
    run: str | None = None,
    where: dict | None = None,
    inner_cv: int = 3,
    shots: list | None = None,
    repeats: int = 10,
    n_resamples: int = 1000,
    seed: int = 0,
    jobs: int = 1,
    out: str | None = None,
) -> ProbeResult:
    """Probe every target on every store; write the outputs to ``out`` when given. Returns the
    results document (also results.json): join counts, per target and store the metrics with CIs,
    the chosen hyperparameters per fold, comparisons with the first store, few-shot curves.
    ``run`` (a digest or unique prefix) and ``where`` (``{column: value}``) pick one run in every
    store (:meth:`ctfm.store.EmbeddingStore.select`)."""
    if method not in METHODS:
        raise OptionError(f"--method {method}: unknown (choose {', '.join(METHODS)})")
    if task not in TASKS:
        raise OptionError(f"--task {task}: unknown (choose {', '.join(TASKS)})")
    if not targets:
        raise OptionError("--target: give at least one label column")
    if task in ("binary", "multiclass") and len(targets) > 1:
        raise OptionError(f"--task {task} takes one --target; several binary targets are --task multilabel")
    if n_resamples < 1 or repeats < 1 or inner_cv < 2:
        raise OptionError("--resamples and --repeats must be at least 1, --inner-cv at least 2")
    started = time.perf_counter()
    needed = list(dict.fromkeys([*targets, *(c for c in (group_column, split_column) if c)]))
    inputs = _common_rows([load_probe_inputs(s, labels, needed, key, run=run, where=where) for s in stores])
    groups = split = None
    if group_column:
        groups = np.asarray(inputs[0].columns[group_column], dtype=object)
        if any(g == "" for g in groups):
            raise CTInputError(
                labels,
                f"{sum(g == '' for g in groups)} matched rows have no {group_column!r}",
                "fill the group column for every labelled scan",
            )
    if split_column:
        split = np.asarray(inputs[0].columns[split_column], dtype=object)
    args = (inputs, task, method, cv, split, groups, inner_cv, seed, n_resamples, shots, repeats, labels)
    if jobs > 1 and len(targets) > 1:
        Parallel = optional_import("joblib", "eval").Parallel
        delayed = optional_import("joblib", "eval").delayed

        entries = Parallel(n_jobs=jobs)(delayed(_probe_target)(t, *args) for t in targets)
    else:
        entries = [_probe_target(t, *args) for t in targets]
    seconds = time.perf_counter() - started
    result = {
        "settings": {
            "key": key,
            "task": task,
            "method": method,
            "cv": None if split_column else cv,
            "split_column": split_column,
            "group_column": group_column,
            "inner_cv": inner_cv,
            "shots": shots,
            "repeats": repeats,
            "n_resamples": n_resamples,
            "seed": seed,
            "run": run,
            "where": where or {},
        },
        "join": [dict(item.join, store=item.store) for item in inputs],
        "targets": [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries],
        "seconds": seconds,
    }

    result = ProbeResult(
        result,
        provenance(
            stores=[{"path": item.store, **item.run} for item in inputs],
            labels={"path": str(labels), "sha256": file_sha256(labels)},
        ),
    )
    if out:
        _write_outputs(out, result, entries, inputs)
    return result


# ---- outputs ---------------------------------------------------------------------------------
def _predictions_csv(entries, inputs, key) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    key_columns = ["scan_id"] if key == "scan_id" else [key, "scan_id"]
    writer.writerow(
        ["store", "target", *key_columns, "fold", "label", "predicted", "probability", "threshold", "probabilities"]
    )
    for entry in entries:
        classes = entry["classes"]
        for item, preds in zip(inputs, entry["_predictions"]):
            for row, fold, proba, threshold in zip(preds.rows, preds.fold, preds.proba, preds.threshold):
                label = classes[preds.target.y[row]]
                if entry["task"] == "binary":
                    predicted, probability = int(proba[1] >= threshold), proba[1]
                else:
                    predicted, probability = classes[int(np.argmax(proba))], float(np.max(proba))
                writer.writerow(
                    [
                        item.store,
                        entry["target"],
                        *([item.keys[row]] if key != "scan_id" else []),
                        item.scan_ids[row],
                        int(fold),
                        label,
                        predicted,
                        f"{probability:.6g}",
                        "" if not np.isfinite(threshold) else f"{threshold:.6g}",
                        ";".join(f"{p:.6g}" for p in proba),
                    ]
                )
    return buffer.getvalue()


def _short_names(paths: list[str]) -> list[str]:
    names = [Path(p).name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _curves(entry, names, folder: Path) -> list[tuple[Path, str]]:
    """ROC and PR PNGs of a binary target (every store on one axis), a few-shot PNG if any."""
    matplotlib = optional_import("matplotlib", "eval")

    matplotlib.use("Agg")
    plt = optional_import("matplotlib.pyplot", "eval")
    precision_recall_curve = optional_import("sklearn.metrics", "eval").precision_recall_curve
    roc_curve = optional_import("sklearn.metrics", "eval").roc_curve

    figures = []
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in entry["target"])
    if entry["task"] == "binary":
        for kind in ("roc", "pr"):
            fig, ax = plt.subplots(figsize=(4.6, 4.2))
            for name, store, preds in zip(names, entry["stores"], entry["_predictions"]):
                if kind == "roc":
                    x, y, _ = roc_curve(preds.y, preds.score)
                    m = store["metrics"]["auroc"]
                    ax.plot(x, y, label=f"{name}: AUROC {m['estimate']:.3f} [{m['low']:.3f}, {m['high']:.3f}]")
                else:
                    y, x, _ = precision_recall_curve(preds.y, preds.score)
                    m = store["metrics"]["average_precision"]
                    ax.step(
                        x, y, where="post", label=f"{name}: AP {m['estimate']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"
                    )
            if kind == "roc":
                ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
                ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC: {entry['target']}")
            else:
                prevalence = float(np.mean(entry["_predictions"][0].y))
                ax.axhline(prevalence, color="0.7", lw=0.8, ls="--")
                ax.set(xlabel="recall", ylabel="precision", title=f"PR: {entry['target']}", ylim=(0, 1.02))
            ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
            fig.tight_layout()
            path = folder / f"{kind}_{safe}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            figures.append(
                (path, f"{kind.upper()} curve of {entry['target']} (out-of-fold predictions, 95% bootstrap CI)")
            )
    if any("few_shot" in s for s in entry["stores"]):
        fig, ax = plt.subplots(figsize=(5.2, 4.0))
        for name, store in zip(names, entry["stores"]):
            points = list(store["few_shot"]["points"].values())
            labels = [str(p["shots"]) for p in points]
            x = np.arange(len(points))
            mean, sd = np.array([p["mean"] for p in points]), np.array([p["sd"] for p in points])
            ax.plot(x, mean, marker="o", label=name)
            ax.fill_between(x, mean - sd, mean + sd, alpha=0.2)
            for xi, p in zip(x, points):
                ax.scatter([xi] * len(p["values"]), p["values"], s=6, color=ax.lines[-1].get_color(), alpha=0.5)
            ax.set_xticks(x, labels)
        metric = entry["stores"][0]["few_shot"]["metric"]
        ax.set(xlabel="labelled cases per class", ylabel=metric, title=f"few-shot: {entry['target']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"fewshot_{safe}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures.append((path, f"{metric} against labelled cases per class (mean ± sd over repeats; dots: repeats)"))
    return figures


def _ci_text(m: dict) -> str:
    if m["estimate"] is None or not np.isfinite(m["estimate"]):
        return "–"
    return f"{m['estimate']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def _write_outputs(out, result: ProbeResult, entries, inputs) -> Path:
    """results.json, predictions.csv, PNG curves and report.html in ``out``, each written atomically."""

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    provenance_fields = result.provenance
    document = result.data
    write_text_atomic(folder / PREDICTIONS_NAME, _predictions_csv(entries, inputs, result["settings"]["key"]))
    names = _short_names([item.store for item in inputs])
    page = Report(
        "Probe on frozen embeddings",
        f"{result['settings']['method']} probe; {len(entries)} target(s); {len(inputs)} store(s)",
    )
    page.heading("Labels joined to the stores")
    page.table(
        [
            {
                "store": n,
                **{
                    k: j[k]
                    for k in (
                        "key",
                        "store_rows",
                        "label_rows",
                        "matched",
                        "scans_without_label",
                        "labels_without_scan",
                    )
                },
                "not in every store": j.get("not_in_every_store", 0),
            }
            for n, j in zip(names, result["join"])
        ]
    )
    settings = result["settings"]
    split_text = (
        f"split column {settings['split_column']!r}"
        if settings["split_column"]
        else f"{settings['cv']}-fold cross-validation"
    )
    page.paragraph(
        f"Outer evaluation: {split_text}"
        + (
            f", grouped by {settings['group_column']!r} (no group on both sides; CIs resample groups)"
            if settings["group_column"]
            else ""
        )
        + f". Hyperparameters and the binary threshold are chosen by {settings['inner_cv']}-fold inner CV on each "
        f"training part. 95% percentile bootstrap CIs over {settings['n_resamples']} resamples of the test cases."
    )
    for entry in entries:
        page.heading(
            f"Target {entry['target']} ({entry['task']}, {entry['n_labelled']} labelled, {entry['n_missing']} missing)"
        )
        metric_names = cm.BINARY_METRICS if entry["task"] == "binary" else cm.MULTICLASS_METRICS
        page.table(
            [
                {"store": n, **{k: _ci_text(s["metrics"][k]) for k in metric_names}}
                for n, s in zip(names, entry["stores"])
            ],
            ["store", *metric_names],
            caption="metrics (estimate [95% CI])",
        )
        page.table(
            [
                {
                    "store": n,
                    **{
                        f"fold {f['fold']}": f"{f['param']}={f['value']:g} ({f['selection']})"
                        + (f", t={f['threshold']:.3f}" if f["threshold"] is not None else "")
                        for f in s["fits"]
                    },
                }
                for n, s in zip(names, entry["stores"])
            ],
            caption="chosen hyperparameter per fold",
        )
        for comparison in entry["comparisons"]:
            rows = [
                {
                    "metric": k,
                    "a": v["estimate_a"],
                    "b": v["estimate_b"],
                    "a - b": v["difference"],
                    "low": v["low"],
                    "high": v["high"],
                    "p": v["p_value"],
                    "method": v["method"],
                }
                for k, v in comparison["paired_bootstrap"].items()
            ]
            if "delong_auroc" in comparison:
                d = comparison["delong_auroc"]
                rows.insert(
                    0,
                    {
                        "metric": "auroc",
                        "a": d["estimate_a"],
                        "b": d["estimate_b"],
                        "a - b": d["difference"],
                        "low": d["low"],
                        "high": d["high"],
                        "p": d["p_value"],
                        "method": d["method"],
                    },
                )
            page.table(
                rows, caption=f"{Path(comparison['a']).name} (a) vs {Path(comparison['b']).name} (b), same cases"
            )
        for path, caption in _curves(entry, names, folder):
            page.figure(path, caption)
    page.provenance(provenance_fields)
    write_results(folder, document, provenance_fields)
    page.write(folder / "report.html")
    return folder
