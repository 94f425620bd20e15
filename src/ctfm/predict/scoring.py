"""Scoring predicted label maps against truths: ``ctfm evaluate seg``.

>>> result = evaluate_segmentation("preds/", "truth/", labels="totalseg-v2", out="eval/")   # doctest: +SKIP
>>> result["summary"]["macro"]["dice"]["estimate"]                                         # doctest: +SKIP

Predictions and truths are label-map files, or folders of them matched by name (the file name
without its extension). The prediction must lie on the truth's grid (axis order and flips may
differ); distances use the truth's voxel spacing in mm.

Classes are matched by name. The names come from the class map given (both sides), else from the
predictions' ``<name>.labels.json`` (written by ``ctfm predict seg``) or the names stored in the
prediction files, and from the names stored in the truth files; a side that names nothing takes
the other side's names by value, and a value nothing names is the class ``label_<value>`` (with a
notice). So two binary masks need no class map: both hold ``label_1``. A class that only one side
holds in a case is scored, not refused: ``missed`` (truth only) or ``false_positive``
(prediction only). The scores and their rules for empty masks are :mod:`ctfm.evaluate.metrics.segmentation`;
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
import warnings
from dataclasses import dataclass
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
from ctfm.io.labels import UnnamedLabelsWarning, label_names, named_value, require_same_grid, unnamed_label_name
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


def load_pair(truth_path: Path, pred_path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(truth [X, Y, Z], prediction [X, Y, Z] on the truth grid, spacing mm); refuses another grid."""

    grid, spacing = _read_truth(truth_path)
    truth = load_labels(truth_path, grid).labels.numpy()[0]
    require_same_grid(pred_path, grid)
    prediction = load_labels(pred_path, grid).labels.numpy()[0]
    return truth, prediction, spacing


@dataclass
class ClassNames:
    """Label value -> class name of each side; classes are matched across the two by name.

    A value a side does not name is ``label_<value>``; ``source`` says where the names came from.
    """

    truth: dict[int, str]
    prediction: dict[int, str]
    source: str
    listed: list[str]  # the classes of the class map: scored in every case, absent ones included

    def of_truth(self, value: int) -> str:
        return self.truth.get(int(value)) or unnamed_label_name(value)

    def of_prediction(self, value: int) -> str:
        return self.prediction.get(int(value)) or unnamed_label_name(value)


def _own_names(names: dict[int, str]) -> dict[int, str]:
    """Names another side may take by value: not ``label_<w>`` names standing for another value w."""
    return {v: n for v, n in names.items() if v != 0 and named_value(n) in (None, v)}


def _sidecar_labels(pred: Path) -> dict[int, str] | None:
    sidecar = pred.with_name(label_name(pred) + ".labels.json")
    if not sidecar.is_file():
        return None
    try:
        table = json.loads(sidecar.read_text(encoding="utf-8"))
        table = table.get("labels", table)
        return {int(k): str(v) for k, v in table.items()}
    except (ValueError, AttributeError, TypeError):
        raise CTInputError(sidecar, "not a JSON object of label value -> name", "give --labels MAP") from None


def class_names(labels, pairs) -> ClassNames:
    """The names of both sides: ``labels`` given (both sides), else the predictions'
    ``<name>.labels.json`` (ctfm predict seg) or the names stored in the prediction files, and the
    names stored in the truth files; a side that names nothing takes the other side's names by value."""
    if labels is not None:
        given = {k: v for k, v in resolve_labels(labels, channels=False).items() if k != 0}
        return ClassNames(given, given, "given", [given[k] for k in sorted(given)])
    first = next(((t, p) for _, t, p in pairs if p is not None), None)
    if first is None:
        return ClassNames({}, {}, "none", [])
    truth_path, pred_path = first
    pred, source = _sidecar_labels(pred_path), f"{label_name(pred_path)}.labels.json"
    if pred is None:
        try:
            pred, source = label_names(pred_path), "prediction file"
        except UserError:  # a damaged prediction fails as its case, not the whole run
            pred, source = {}, "prediction file"
    truth = {k: v for k, v in label_names(truth_path).items() if k != 0}
    pred = {k: v for k, v in pred.items() if k != 0}
    if truth and not pred:
        pred, source = _own_names(truth), "truth file"
    elif pred and not truth:
        truth = _own_names(pred)
    elif truth and pred:
        source = f"{source} and truth file"
    listed = list(dict.fromkeys([*(pred[k] for k in sorted(pred)), *(truth[k] for k in sorted(truth))]))
    return ClassNames(truth, pred, source if (truth or pred) else "none", listed)


def _masks_by_class(array: np.ndarray, name_of) -> dict[str, np.ndarray]:
    """Class name -> bool mask [X, Y, Z] of the non-zero values of ``array`` (values of one name merged)."""
    out: dict[str, np.ndarray] = {}
    for value in np.unique(array):
        if value == 0:
            continue
        name = name_of(int(value))
        mask = array == value
        out[name] = out[name] | mask if name in out else mask
    return out


def score_cases(pairs, names: ClassNames, nsd_tolerance_mm: float) -> tuple[list[dict], list[dict]]:
    """Per case and class metric rows, and failures (missing or refused predictions).

    A class is every name either side holds in that case: one only in the prediction is a
    ``false_positive`` row, one only in the truth a ``missed`` row; the classes of the class map,
    or of another case, that neither holds are ``absent`` rows.
    """

    rows, failures = [], []
    for name, truth_path, pred_path in pairs:
        if pred_path is None:
            failures.append({"case": name, "error": f"{truth_path.name}: no prediction of that name"})
            continue
        try:
            truth, prediction, spacing = load_pair(truth_path, pred_path)
        except UserError as exc:
            failures.append({"case": name, "error": str(exc)})
            continue
        truth_masks = _masks_by_class(truth, names.of_truth)
        pred_masks = _masks_by_class(prediction, names.of_prediction)
        classes = list(dict.fromkeys([*names.listed, *sorted({*truth_masks, *pred_masks}, key=_class_order)]))
        empty = np.zeros(truth.shape, dtype=bool)
        for cls in classes:
            t, p = truth_masks.get(cls, empty), pred_masks.get(cls, empty)
            rows.append(
                {
                    "case": name,
                    "class": cls,
                    **mask_metrics(t, p, spacing, nsd_tolerance_mm),
                    "truth_voxels": int(t.sum()),
                    "pred_voxels": int(p.sum()),
                }
            )
    return _with_absent_rows(rows), failures


def _with_absent_rows(rows: list[dict]) -> list[dict]:
    """Rows plus an ``absent`` row for each case and class another case holds (a value present in
    some cases only is a class of every case), in case order then class order."""
    classes = sorted({r["class"] for r in rows}, key=_class_order)
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["class"]] = r
    absent = {"dice": math.nan, "hd95": math.nan, "nsd": math.nan, "status": "absent"}
    out = []
    for case, held in by_case.items():
        order = [*held, *(c for c in classes if c not in held)]
        for cls in order:
            out.append(held.get(cls) or {"case": case, "class": cls, **absent, "truth_voxels": 0, "pred_voxels": 0})
    return out


def _class_order(name: str):
    value = named_value(name)
    return (0, value, "") if value is not None else (1, 0, name)


def class_table(rows: list[dict], names: ClassNames) -> dict[int, str]:
    """{0: "background", id: class name}: each class scored gets a unique integer id, the value it
    has in the truth files where it can (else in the predictions); ``label`` of every row is set to it."""
    truth_value = {n: v for v, n in sorted(names.truth.items(), reverse=True)}
    pred_value = {n: v for v, n in sorted(names.prediction.items(), reverse=True)}
    order = list(dict.fromkeys([*names.listed, *sorted({r["class"] for r in rows}, key=_class_order)]))
    ids: dict[str, int] = {}
    for cls in order:
        for candidate in (truth_value.get(cls, named_value(cls)), pred_value.get(cls)):
            if candidate is not None and candidate > 0 and candidate not in ids.values():
                ids[cls] = candidate
                break
    for cls in order:
        if cls not in ids:
            ids[cls] = max([0, *ids.values()]) + 1
    for r in rows:
        r["label"] = ids[r["class"]]
    return {0: "background", **{v: n for n, v in sorted(ids.items(), key=lambda item: item[1])}}


def _unnamed_notice(rows: list[dict], names: ClassNames) -> None:
    """One notice line naming the classes called ``label_<value>`` because nothing named their value."""
    named = set(names.truth.values()) | set(names.prediction.values())
    unnamed = sorted({r["class"] for r in rows if r["class"] not in named}, key=_class_order)
    if not unnamed:
        return
    values = ", ".join(str(named_value(n)) for n in unnamed[:12]) + (", ..." if len(unnamed) > 12 else "")
    shown = ", ".join(unnamed) if len(unnamed) <= 3 else f"{unnamed[0]} ... {unnamed[-1]}"
    reason = {
        "none": "the truth and prediction files name no classes",
        "given": "the class map given does not name them",
    }.get(names.source, f"the names from the {names.source} do not cover them")
    warnings.warn(
        UnnamedLabelsWarning(
            f"{reason}: label value(s) {values} scored as {shown} (name them with --labels tumour,... for values "
            '1..N, or --labels FILE.json holding {"1": "tumour", ...})'
        ),
        stacklevel=3,
    )


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
    names = class_names(labels, pairs)
    rows, failures = score_cases(pairs, names, nsd_tolerance_mm)
    compare_rows = compare_failures = compare_pairs = None
    if compare is not None:
        compare_pairs, _ = match_cases(compare, truth)
        compare_rows, compare_failures = score_cases(compare_pairs, names, nsd_tolerance_mm)
    # one class table for both prediction sets, so that their classes line up
    labels = class_table(rows + (compare_rows or []), names)
    _unnamed_notice(rows + (compare_rows or []), names)
    results = {
        "rules": {
            "both_empty": "absent: Dice, NSD, HD95 undefined (not counted)",
            "one_empty": "truth only (missed) or prediction only (false_positive): Dice 0, NSD 0, HD95 undefined",
            "classes": "matched by name; a value nothing names is label_<value>",
            "class_mean": "over cases where defined",
            "macro": "mean over classes of the class means",
            "nsd_tolerance_mm": nsd_tolerance_mm,
            "interval": "95% percentile bootstrap over cases",
        },
        "labels": {str(k): v for k, v in labels.items()},
        "labels_source": names.source,
        "class_values": {
            cls: {
                "truth": next((v for v, n in sorted(names.truth.items()) if n == cls), named_value(cls)),
                "prediction": next((v for v, n in sorted(names.prediction.items()) if n == cls), named_value(cls)),
            }
            for cls in (labels[k] for k in sorted(labels) if k != 0)
        },
        "summary": summarise_cases(rows, labels, n_resamples, seed),
        "per_case": _per_case(rows),
        "failures": failures,
        "unmatched_predictions": unmatched,
    }
    if compare is not None:
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
    for row, (title, truth_path, pred_path) in enumerate(cases):
        truth, prediction, _ = load_pair(truth_path, pred_path)
        z = int(np.argmax((truth > 0).sum(axis=(0, 1)))) if truth.any() else truth.shape[2] // 2
        top = max(2, int(truth.max()), int(prediction.max()))  # label values need not be 0..N-1
        cmap = plt.get_cmap("tab20", top + 1)
        t, p = truth[:, :, z].T, prediction[:, :, z].T
        error = np.where(t == p, 0, np.where(p == 0, 1, np.where(t == 0, 2, 3)))
        for col, (image, name, kwargs) in enumerate(
            (
                (t, "truth", {"cmap": cmap, "vmin": 0, "vmax": top}),
                (p, "prediction", {"cmap": cmap, "vmin": 0, "vmax": top}),
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
