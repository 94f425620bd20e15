"""Semantic search across labelled scans, as CT-FM's quantitative semantic-search script.

For each label (e.g. the heart) and each (query, target) pair of labelled scans: the query point is
the label's centroid in the query scan (world mm); the query region is the 64^3-voxel window at
1 mm (SPL, crop to HU > 0, [-1024, 2048] -> [0, 1]) centred there, zero-padded where it leaves the
scan; the target is cut into 64^3 windows with overlap 0.625; cosine similarity; the predicted
point is the best window's centre (CT-FM's protocol; ``refine="none"``) or ctfm's refinement of
it (``"weighted"``: similarity-weighted centre of the top windows; ``"fine"``: pattern search
with the encoder, to a voxel). Reported per label:

- **error (mm)**: Euclidean distance, in world millimetres, from the predicted point to the
  label's centroid in the target (CT-FM reports it in cm);
- **inside-label rate**: the fraction of predictions whose target voxel (nearest to the
  predicted point) carries the label. CT-FM's own check tests whether any voxel of the
  predicted patch's label crop matches, which is looser.

Region embedding and matching are ctfm.search's (the same code as ``ctfm search --point``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import ctfm
from ctfm.errors import CTInputError, OptionError
from ctfm.evaluate.metrics.stats import bootstrap_ci
from ctfm.evaluate.reports.figures import grouped_bars
from ctfm.evaluate.reports.report import Report
from ctfm.evaluate.zeroshot.inputs import ZeroShotResult, load_eval_encoder, write_evaluation_outputs
from ctfm.io import load_labels
from ctfm.io.hashing import file_sha256
from ctfm.io.tables import read_table
from ctfm.models.preprocessing import PreprocessOverrideWarning
from ctfm.preprocess import get_preset, load_usable_ct
from ctfm.search import SearchSession

WINDOW_MM = (64.0, 64.0, 64.0)
OVERLAP = 0.625
REFINEMENTS = ("none", "weighted", "fine")
PAPER = {  # CT-FM's heart-centroid search over 469 thorax pairs of TotalSegmentator (cm -> mm)
    "label": "heart",
    "CT-FM": {
        "pairs": 469,
        "error_mm_mean": 56.1,
        "error_mm_sd": 54.4,
        "error_mm_median": 35.8,
        "inside_label_rate": 0.977,
    },
    "SuPreM": {
        "pairs": 469,
        "error_mm_mean": 234.4,
        "error_mm_sd": 70.6,
        "error_mm_median": 227.1,
        "inside_label_rate": 0.819,
    },
    "note": "the paper's inside-label rate uses a looser test than this one",
}


@dataclass
class SemanticSearchResult(ZeroShotResult):
    """What the semantic search evaluation returns: the keys of its results.json,
    the paths of results.json and report.html (``result["results"]``, ``result["report"]``), and ``provenance``."""


def search_spec(spacing_mm: float = 1.0, window_voxels: int = 64):
    """CT-FM's semantic-search preprocessing: ct-fm-patches at 1 mm isotropic, 64^3 windows
    (other spacings and window sizes for quick looks; the default is the protocol)."""

    if spacing_mm <= 0 or window_voxels < 16:
        raise OptionError(
            f"spacing {spacing_mm} mm, window {window_voxels} voxels: expected a positive spacing and a window of at "
            "least 16 voxels"
        )
    if (spacing_mm, window_voxels) == (1.0, 64):
        return get_preset("ct-fm-patches").with_(
            name="ct-fm-search-1mm",
            spacing_mm=(1.0, 1.0, 1.0),
            patch_size_mm=WINDOW_MM,
            description="CT-FM semantic search: SPL, 1 mm, crop to HU > 0, [-1024, 2048] -> [0, 1], 64^3 windows",
        )
    size = (float(window_voxels * spacing_mm),) * 3
    return get_preset("ct-fm-patches").with_(
        name=f"ct-fm-search-{spacing_mm:g}mm-{window_voxels}",
        spacing_mm=(float(spacing_mm),) * 3,
        patch_size_mm=size,
        description=f"semantic search at {spacing_mm:g} mm, {window_voxels}^3 windows",
    )


def label_value(names: dict[int, str], label: str | int, where=None) -> int:
    """The value of ``label`` (a name, case-insensitive, or a number) in a label map's names."""
    text = str(label).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    for value, name in names.items():
        if str(name).lower() == text.lower():
            return int(value)
    raise CTInputError(
        where,
        f"no label named {text!r} (known: "
        f"{', '.join(sorted(str(n) for n in names.values())[:12]) or 'none: the file names no labels'})",
        "give a label name from the file or its value",
    )


def centroid_mm(labels: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray | None:
    """World (RAS mm) centroid of the voxels equal to ``value`` in ``labels`` [X, Y, Z]; None if absent."""
    voxels = np.argwhere(labels == value)
    if len(voxels) == 0:
        return None
    return (np.asarray(affine, np.float64) @ np.append(voxels.mean(axis=0), 1.0))[:3]


def label_at(labels: np.ndarray, affine: np.ndarray, point_mm) -> int:
    """The label of the voxel nearest to ``point_mm`` (0 outside the grid)."""
    ijk = np.round(
        np.linalg.solve(np.asarray(affine, np.float64), np.append(np.asarray(point_mm, np.float64), 1.0))[:3]
    ).astype(int)
    if np.any(ijk < 0) or np.any(ijk >= np.asarray(labels.shape)):
        return 0
    return int(labels[tuple(ijk)])


def summarise_label(cases: list[dict], seed: int = 0) -> dict:
    """Error (mm) mean, SD, median with a bootstrap interval of the mean; inside-label rate."""

    errors = np.asarray([c["error_mm"] for c in cases], float)
    inside = np.asarray([c["inside_label"] for c in cases], float)
    if not len(errors):
        return {"pairs": 0}
    mean = bootstrap_ci(np.mean, errors, n_resamples=1000, seed=seed)
    rate = bootstrap_ci(np.mean, inside, n_resamples=1000, seed=seed)
    return {
        "pairs": int(len(errors)),
        "error_mm_mean": mean.estimate,
        "error_mm_low": mean.low,
        "error_mm_high": mean.high,
        "error_mm_sd": float(errors.std(ddof=1)) if len(errors) > 1 else 0.0,
        "error_mm_median": float(np.median(errors)),
        "inside_label_rate": rate.estimate,
        "inside_low": rate.low,
        "inside_high": rate.high,
    }


def read_labelled_sheet(path) -> list[dict]:
    """Rows ``{"image", "labels"}`` of a sheet; relative paths are relative to the sheet."""

    rows = read_table(path, required=("image", "labels")).to_pylist()
    base = Path(path).resolve().parent
    out = []
    for row in rows:
        image, labels = (str(row[c]) for c in ("image", "labels"))
        out.append(
            {
                "image": str(base / image) if not os.path.isabs(image) else image,
                "labels": str(base / labels) if not os.path.isabs(labels) else labels,
            }
        )
    if len(out) < 2:
        raise CTInputError(path, f"{len(out)} labelled scan(s)", "give at least two rows (a query and a target)")
    return out


def semantic_search_cases(
    scans: list[dict],
    labels: list,
    pairs: list[tuple[int, int]],
    encoder,
    refinements=("none", "weighted"),
    store=None,
    overlap: float = OVERLAP,
    batch_size: int = 4,
    device: str = "cpu",
    spec=None,
    progress: bool = False,
) -> dict:
    """Embed ``scans`` ({"image", "labels"}) into ``store`` (patch windows), then search each
    label's centroid of scan ``q`` in scan ``t`` for every ``(q, t)`` in ``pairs``.

    Returns ``{"cases": [...], "skipped": [...]}``; a case has the query, target, label, predicted
    point per refinement, the true centroid, error (mm) and inside-label flag per refinement.
    """

    for refine in refinements:
        if refine not in REFINEMENTS:
            raise OptionError(f"refinement {refine!r}: expected one of {', '.join(REFINEMENTS)}")
    spec = spec or search_spec()
    maps = []
    for scan in scans:
        image, _ = load_usable_ct(scan["image"], spec=spec)
        label_map = load_labels(scan["labels"], image)
        maps.append(
            {
                "array": np.asarray(label_map.labels[0]),
                "affine": np.asarray(image.affine, np.float64),
                "names": label_map.names,
            }
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreprocessOverrideWarning)  # the protocol's own preprocessing, on purpose
        run = ctfm.embed(
            [s["image"] for s in scans],
            encoder=encoder,
            mode="patches",
            preset=spec,
            overlap=overlap,
            out=store,
            device=device,
            progress=progress,
        )
    if run.totals.failed:
        source, message = run.totals.failed[0]
        raise CTInputError(source, f"could not be embedded: {message}", "check the scan with ctfm info")
    session = SearchSession(store, encoder=encoder, device=device)
    cases, skipped = [], []
    for label in labels:
        for q, t in pairs:
            qv = label_value(maps[q]["names"], label, scans[q]["labels"])
            tv = label_value(maps[t]["names"], label, scans[t]["labels"])
            query_point = centroid_mm(maps[q]["array"], maps[q]["affine"], qv)
            truth = centroid_mm(maps[t]["array"], maps[t]["affine"], tv)
            if query_point is None or truth is None:
                skipped.append(
                    {
                        "query": scans[q]["image"],
                        "target": scans[t]["image"],
                        "label": str(label),
                        "reason": "label absent from the " + ("query" if query_point is None else "target"),
                    }
                )
                continue
            region = session.region_query(scans[q]["image"], query_point, query_from="centred")
            case = {
                "query": scans[q]["image"],
                "target": scans[t]["image"],
                "label": str(label),
                "query_point_mm": query_point.tolist(),
                "target_centroid_mm": truth.tolist(),
            }
            for refine in refinements:
                hit = session.search_point(region, None, k=1, target=scans[t]["image"], refine=refine)[0]
                predicted = np.asarray(hit.point_mm, np.float64)
                case[refine] = {
                    "point_mm": predicted.tolist(),
                    "score": hit.score,
                    "error_mm": float(np.linalg.norm(predicted - truth)),
                    "inside_label": label_at(maps[t]["array"], maps[t]["affine"], predicted) == tv,
                }
            cases.append(case)
    return {"cases": cases, "skipped": skipped, "store_computation": list(session.patch_vectors.key)}


def run_semantic_search(
    sheet,
    out,
    labels: list,
    query: str | None = None,
    all_pairs: bool = False,
    weights: str | None = None,
    model: str = "ct-fm",
    seed: int = 0,
    overlap: float = OVERLAP,
    batch_size: int = 4,
    device: str = "cpu",
    refinements=("none", "weighted"),
    encoder=None,
    weights_fields: dict | None = None,
    spacing_mm: float = 1.0,
    window_voxels: int = 64,
) -> SemanticSearchResult:
    """The evaluation end to end: store in ``out/store``, results.json, figure, report.html."""

    spec = search_spec(spacing_mm, window_voxels)
    for refine in refinements:
        if refine not in REFINEMENTS:
            raise OptionError(f"refinement {refine!r}: expected one of {', '.join(REFINEMENTS)}")
    scans = read_labelled_sheet(sheet)
    for scan in scans:
        for key in ("image", "labels"):
            if not Path(scan[key]).exists():
                raise CTInputError(scan[key], "no such file or folder", f"fix the {key} column of {sheet}")
    if query is not None:
        names = [s["image"] for s in scans]
        matches = [
            i
            for i, s in enumerate(names)
            if os.path.abspath(s) == os.path.abspath(query) or Path(s).name == Path(query).name
        ]
        if not matches:
            raise CTInputError(
                sheet, f"query {query!r} is not one of its images", "give --query as it appears in the image column"
            )
        first = matches[0]
    else:
        first = 0
    n = len(scans)
    pairs = (
        [(q, t) for q in range(n) for t in range(n) if q != t]
        if all_pairs
        else [(first, t) for t in range(n) if t != first]
    )
    if encoder is None:
        encoder, weights_fields = load_eval_encoder(weights, model, seed, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = semantic_search_cases(
        scans,
        labels,
        pairs,
        encoder,
        refinements,
        store=out / "store",
        overlap=overlap,
        batch_size=batch_size,
        device=device,
        spec=spec,
    )
    per_label = {}
    for label in labels:
        cases = [c for c in run["cases"] if c["label"] == str(label)]
        per_label[str(label)] = {refine: summarise_label([c[refine] for c in cases]) for refine in refinements}
    rows = []
    for label, by_refine in per_label.items():
        for refine, s in by_refine.items():
            if s.get("pairs"):
                rows.append(
                    {
                        "label": label,
                        "prediction": "best window centre (CT-FM)" if refine == "none" else refine,
                        "pairs": s["pairs"],
                        "error mm mean": s["error_mm_mean"],
                        "95% CI": f"[{s['error_mm_low']:.1f}, {s['error_mm_high']:.1f}]",
                        "SD": s["error_mm_sd"],
                        "median": s["error_mm_median"],
                        "inside label": s["inside_label_rate"],
                    }
                )
    for name in ("CT-FM", "SuPreM"):
        p = PAPER[name]
        rows.append(
            {
                "label": f"heart ({name}, paper)",
                "prediction": "best window centre",
                "pairs": p["pairs"],
                "error mm mean": p["error_mm_mean"],
                "95% CI": "",
                "SD": p["error_mm_sd"],
                "median": p["error_mm_median"],
                "inside label": p["inside_label_rate"],
            }
        )
    figure = grouped_bars(
        {
            f"{label} ({'CT-FM protocol' if r == 'none' else r})": {
                "error mm (mean)": s["error_mm_mean"],
                "error mm (median)": s["error_mm_median"],
            }
            for label, by in per_label.items()
            for r, s in by.items()
            if s.get("pairs")
        }
        | {
            "heart (CT-FM paper)": {
                "error mm (mean)": PAPER["CT-FM"]["error_mm_mean"],
                "error mm (median)": PAPER["CT-FM"]["error_mm_median"],
            }
        },
        out / "semantic_search_error.png",
        "distance from the predicted point to the target's label centroid",
        "mm",
    )
    report = Report(
        "Semantic search (label centroids)",
        f"{len(scans)} labelled scans, {len(pairs)} query-target pairs, labels {', '.join(map(str, labels))}; "
        f"{window_voxels}^3 windows at {spacing_mm:g} mm, overlap {overlap}, cosine"
        + ("" if spec.name == "ct-fm-search-1mm" else " (not CT-FM's 64^3 at 1 mm)"),
    )
    report.heading("Results beside the paper's").table(rows, digits=3).figure(
        figure, "errors in mm; the paper's figures are for the heart over 469 thorax pairs"
    )
    report.paragraph(
        "The inside-label rate tests the one target voxel at the predicted point; the paper's test is looser (any "
        "voxel of a label crop), so its rate is an upper bound on this one."
    )
    case_rows = [
        {
            "query": Path(c["query"]).name,
            "target": Path(c["target"]).name,
            "label": c["label"],
            **{f"{r} error mm": c[r]["error_mm"] for r in refinements},
            **{f"{r} inside": c[r]["inside_label"] for r in refinements},
        }
        for c in run["cases"]
    ]
    report.heading("Cases").table(case_rows, digits=1)
    if run["skipped"]:
        report.heading("Skipped").table(run["skipped"])
    results = {
        "evaluation": "semantic-search",
        "labels": [str(v) for v in labels],
        "window_voxels": window_voxels,
        "spacing_mm": [float(spacing_mm)] * 3,
        "protocol": "ct-fm" if spec.name == "ct-fm-search-1mm" else "custom",
        "overlap": overlap,
        "refinements": list(refinements),
        "per_label": per_label,
        "per_case": run["cases"],
        "skipped": run["skipped"],
        "paper": PAPER,
        "figures": [figure.name],
    }
    prov = {
        **(weights_fields or {}),
        "sheet": os.path.abspath(sheet),
        "sheet_sha256": file_sha256(sheet),
        "store": os.path.abspath(out / "store"),
        "computation": run["store_computation"],
        "preset": spec.name,
        "preset_hash": spec.content_hash(),
    }
    return write_evaluation_outputs(out, results, prov, report, SemanticSearchResult)
