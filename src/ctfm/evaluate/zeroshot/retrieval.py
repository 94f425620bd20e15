"""Scan retrieval in CT-FM's two protocols.

**OrganMNIST3D** (CT-FM's organ-retrieval notebook): gallery = the train split, queries = val +
test; each 64^3 volume as MedMNIST serves it (uint8 / 255, axes transposed (0, 3, 2, 1)) embedded
with the encoder (stride-16 map averaged, 512-d); gallery ranked by **L2** distance; per query
and k in (3, 5, 10), with ``rel`` the top-k relevance (same organ label):

- ``AP@k`` = mean over the hits in the top k of the precision at each hit's rank (0 without a hit);
- ``HR@k`` = 1 if any of the top k is relevant;
- ``F1@k`` = 2 AP HR / (AP + HR) per query (0 when both are 0);

each averaged over queries.

**3D-MIR** (CT-FM's 3D-MIR notebook): scan vector = element-wise **minimum** over its patch
vectors; within each group (organ), test scans query the train scans by **cosine** distance;
top 10; relevance = same value of an attribute (lesion flag, lesion group); ``P@k`` = mean
relevance in the top k; ``AP`` = ``sklearn.metrics.average_precision_score`` of the top-10
relevance against the rank scores 10..1; per group and over all queries (means over queries).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctfm.errors import CTInputError, OptionError, optional_import
from ctfm.evaluate.metrics.stats import bootstrap_ci
from ctfm.evaluate.reports.figures import grouped_bars
from ctfm.evaluate.reports.report import Report
from ctfm.evaluate.zeroshot.inputs import (
    ZeroShotResult,
    encode_batches,
    load_eval_encoder,
    store_vectors,
    write_evaluation_outputs,
)
from ctfm.evaluate.zeroshot.saliency import onto_grid
from ctfm.io import load_labels
from ctfm.io.hashing import file_sha256
from ctfm.io.tables import read_table
from ctfm.preprocess import get_preset, load_usable_ct, preprocess

KS = (3, 5, 10)
METRICS = ("l2", "cosine")

# CT-FM's published figures (the organ-retrieval and 3D-MIR notebooks of the reference code).
PAPER_ORGANMNIST = {
    "CT-FM": {
        "AP@3": 0.9319,
        "HR@3": 0.9676,
        "F1@3": 0.9444,
        "AP@5": 0.9257,
        "HR@5": 0.9792,
        "F1@5": 0.9444,
        "AP@10": 0.9054,
        "HR@10": 0.9909,
        "F1@10": 0.9352,
    },
    "SuPreM": {
        "AP@3": 0.9229,
        "HR@3": 0.9585,
        "F1@3": 0.9347,
        "AP@5": 0.9145,
        "HR@5": 0.9715,
        "F1@5": 0.9341,
        "AP@10": 0.8928,
        "HR@10": 0.9896,
        "F1@10": 0.9261,
    },
}
PAPER_MIR = {  # percent: P@3, P@5, P@10, mAP per organ and relevance attribute
    "lesion flag": {
        "liver": (84.21, 78.95, 77.89, 83.68),
        "colon": (80.56, 80.83, 77.92, 82.73),
        "pancreas": (97.92, 97.50, 97.50, 98.83),
        "lung": (97.92, 96.88, 96.56, 98.19),
        "overall": (91.59, 90.28, 89.35, 92.34),
    },
    "lesion group": {
        "liver": (56.14, 48.42, 46.84, 61.96),
        "colon": (48.61, 50.00, 44.58, 59.30),
        "pancreas": (58.33, 56.25, 55.00, 62.20),
        "lung": (70.83, 71.25, 69.06, 77.32),
        "overall": (59.50, 57.94, 55.42, 66.03),
    },
}


# --------------------------------------------------------------------------- metrics
def rank(
    queries: np.ndarray, gallery: np.ndarray, metric: str = "l2", k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(indices [Q, k], distances [Q, k])`` of the nearest gallery rows, nearest first (ties by
    gallery order). ``metric``: "l2" (Euclidean) or "cosine" (1 - cosine similarity)."""
    from scipy.spatial.distance import cdist

    if metric not in METRICS:
        raise OptionError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    queries, gallery = np.atleast_2d(queries).astype(np.float64), np.atleast_2d(gallery).astype(np.float64)
    if queries.shape[1] != gallery.shape[1]:
        raise OptionError(f"query vectors have {queries.shape[1]} dimensions, gallery vectors {gallery.shape[1]}")
    distances = cdist(queries, gallery, "euclidean" if metric == "l2" else "cosine")
    k = min(k or gallery.shape[0], gallery.shape[0])
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(distances, order, axis=1)


@dataclass
class RetrievalResult(ZeroShotResult):
    """What the retrieval (OrganMNIST3D or 3D-MIR) evaluation returns: the keys of its results.json,
    the paths of results.json and report.html (``result["results"]``, ``result["report"]``), and ``provenance``."""


def ap_at_k(relevant, k: int) -> float:
    """Mean precision at the ranks of the hits within the top ``k`` (0 without a hit)."""
    rel = np.asarray(relevant, dtype=bool)[:k]
    hits = np.flatnonzero(rel)
    if hits.size == 0:
        return 0.0
    return float(np.mean(np.arange(1, hits.size + 1) / (hits + 1.0)))


def hit_rate_at_k(relevant, k: int) -> float:
    """1.0 if any of the top ``k`` is relevant, else 0.0."""
    return float(np.any(np.asarray(relevant, dtype=bool)[:k]))


def f1_of(ap: float, hr: float) -> float:
    """Harmonic mean of AP@k and HR@k (0 when both are 0), per query as the reference computes it."""
    return 0.0 if ap + hr == 0 else 2 * ap * hr / (ap + hr)


def precision_at_k(relevant, k: int) -> float:
    """Mean relevance of the top ``k`` (the list must hold at least ``k`` items)."""
    rel = np.asarray(relevant, dtype=float)
    if rel.size < k:
        raise OptionError(f"precision@{k} needs {k} retrieved items, got {rel.size} (the gallery is too small)")
    return float(rel[:k].mean())


def ranked_average_precision(relevant) -> float:
    """``average_precision_score(relevant, [n, ..., 1])`` as the 3D-MIR notebook computes it; 0
    when nothing is relevant."""
    import warnings

    average_precision_score = optional_import("sklearn.metrics", "eval").average_precision_score

    rel = np.asarray(relevant, dtype=int)
    if not rel.any():
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(average_precision_score(rel, np.arange(rel.size, 0, -1)))


def label_retrieval_metrics(query_labels, gallery_labels, neighbours: np.ndarray, ks=KS) -> dict:
    """Per-query ``AP@k``, ``HR@k``, ``F1@k`` arrays for labelled retrieval (OrganMNIST3D protocol).

    ``neighbours`` [Q, >= max(ks)]: gallery indices ranked nearest first."""
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    relevant = gallery_labels[neighbours] == query_labels[:, None]  # [Q, K]
    out = {}
    for k in ks:
        ap = np.array([ap_at_k(r, k) for r in relevant])
        hr = np.array([hit_rate_at_k(r, k) for r in relevant])
        out[f"AP@{k}"] = ap
        out[f"HR@{k}"] = hr
        out[f"F1@{k}"] = np.array([f1_of(a, h) for a, h in zip(ap, hr)])
    return out


def summarise_per_query(per_query: dict, seed: int = 0, n_resamples: int = 1000) -> dict:
    """``{metric: {"mean", "low", "high"}}`` with bootstrap 95 % intervals over queries."""

    out = {}
    for name, values in per_query.items():
        interval = bootstrap_ci(np.mean, np.asarray(values, dtype=float), n_resamples=n_resamples, seed=seed)
        out[name] = {"mean": interval.estimate, "low": interval.low, "high": interval.high, "n": int(len(values))}
    return out


# --------------------------------------------------------------------------- OrganMNIST3D
ORGANMNIST_LABELS = [
    "liver",
    "kidney-right",
    "kidney-left",
    "femur-right",
    "femur-left",
    "bladder",
    "heart",
    "lung-right",
    "lung-left",
    "spleen",
    "pancreas",
]


def load_organmnist3d(path: str | os.PathLike, layout: str = "retrieval") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train" | "val" | "test": (volumes [N, S, S, S] float32 in [0, 1], labels [N] int)}``
    from MedMNIST's ``organmnist3d*.npz``. ``layout``: "retrieval" transposes each volume's axes
    (0, 3, 2, 1) as the retrieval notebook does, "clustering" flips axes 1 and 2 as the clustering
    notebook does, "raw" leaves them."""
    path = Path(path)
    if not path.is_file():
        raise CTInputError(
            path,
            "no such file",
            "give the path of MedMNIST's organmnist3d_64.npz (download it once with the medmnist package)",
        )
    try:
        data = np.load(path, allow_pickle=False)
        names = set(data.files)
    except (ValueError, OSError) as exc:
        raise CTInputError(
            path, f"not a readable .npz archive ({exc})", "give MedMNIST's organmnist3d_64.npz"
        ) from None
    splits = {}
    for split in ("train", "val", "test"):
        if f"{split}_images" not in names or f"{split}_labels" not in names:
            raise CTInputError(
                path,
                f"no {split}_images / {split}_labels arrays (found: {', '.join(sorted(names))})",
                "give MedMNIST's organmnist3d_64.npz",
            )
        images = np.asarray(data[f"{split}_images"])
        if images.ndim == 5 and images.shape[-1] == 1:
            images = images[..., 0]
        if images.ndim != 4 or len(set(images.shape[1:])) != 1:
            raise CTInputError(
                path,
                f"{split}_images has shape {images.shape}, expected [N, S, S, S] cubes",
                "give MedMNIST's organmnist3d_64.npz",
            )
        volumes = images.astype(np.float32)
        if images.dtype == np.uint8 or volumes.max(initial=0) > 1.0:
            volumes /= 255.0  # MedMNIST's 3D datasets serve uint8 / 255
        if layout == "retrieval":
            volumes = volumes.transpose(0, 3, 2, 1)
        elif layout == "clustering":
            volumes = volumes[:, ::-1, ::-1, :]
        elif layout != "raw":
            raise OptionError(f"layout {layout!r}: expected retrieval, clustering or raw")
        splits[split] = (np.ascontiguousarray(volumes), np.asarray(data[f"{split}_labels"]).reshape(-1).astype(int))
    return splits


def organmnist_retrieval(
    splits: dict, encoder, queries: str = "val+test", batch_size: int = 8, device: str = "cpu", limit: int | None = None
) -> dict:
    """Run the OrganMNIST3D protocol on ``load_organmnist3d(path, "retrieval")``; returns per-query
    arrays, summaries and the vectors."""

    query_splits = {"val+test": ("val", "test"), "test": ("test",), "val": ("val",)}.get(queries)
    if query_splits is None:
        raise OptionError(f"queries {queries!r}: expected val+test, test or val")
    gallery_x, gallery_y = splits["train"]
    query_x = np.concatenate([splits[s][0] for s in query_splits])
    query_y = np.concatenate([splits[s][1] for s in query_splits])
    if limit:
        gallery_x, gallery_y, query_x, query_y = gallery_x[:limit], gallery_y[:limit], query_x[:limit], query_y[:limit]
    gallery = encode_batches(encoder, gallery_x, batch_size, device)
    query = encode_batches(encoder, query_x, batch_size, device)
    neighbours, _ = rank(query, gallery, "l2", max(KS))
    per_query = label_retrieval_metrics(query_y, gallery_y, neighbours)
    return {
        "per_query": per_query,
        "summary": summarise_per_query(per_query),
        "n_gallery": int(len(gallery)),
        "n_queries": int(len(query)),
        "query_labels": query_y,
        "gallery_labels": gallery_y,
        "query_vectors": query,
        "gallery_vectors": gallery,
    }


# --------------------------------------------------------------------------- 3D-MIR
def mir_retrieval(
    vectors,
    sheet: list[dict],
    attributes: list[str],
    scan_column: str = "scan",
    split_column: str = "split",
    group_column: str | None = "group",
    ks=KS,
    sheet_path=None,
) -> dict:
    """3D-MIR protocol over ``vectors`` (a :class:`~ctfm.evaluate.zeroshot.inputs.StoreVectors`).

    ``sheet`` rows name a scan, its split ("train" / "test"), optionally a group (organ), and the
    ``attributes`` whose equality makes a hit. Returns ``{"per_query": [...], "groups": {group:
    {attribute: {P@k, mAP}}}, "overall": {...}}`` (fractions, not percent)."""
    max_k = max(ks)
    rows = []
    for row in sheet:
        split = str(row.get(split_column, "")).lower()
        if split not in ("train", "test"):
            raise CTInputError(
                sheet_path,
                f"row {row.get(scan_column)!r}: split {row.get(split_column)!r}",
                "use train or test in the split column",
            )
        for attribute in attributes:
            if attribute not in row:
                raise CTInputError(
                    sheet_path,
                    f"no column {attribute!r} (columns: {', '.join(row)})",
                    "name existing columns with --relevance",
                )
        rows.append(
            {
                **row,
                "_index": vectors.index_of(row[scan_column], sheet_path),
                "_split": split,
                "_group": str(row.get(group_column, "all")) if group_column else "all",
            }
        )
    per_query = []
    groups: dict[str, dict] = {}
    for group in sorted({r["_group"] for r in rows}):
        test = [r for r in rows if r["_group"] == group and r["_split"] == "test"]
        train = [r for r in rows if r["_group"] == group and r["_split"] == "train"]
        if not test or not train:
            raise CTInputError(
                sheet_path,
                f"group {group!r} has {len(test)} test and {len(train)} train scans",
                "give each group at least one of each",
            )
        if len(train) < max_k:
            raise CTInputError(
                sheet_path,
                f"group {group!r} has {len(train)} train scans, fewer than k={max_k}",
                "add train scans or lower k",
            )
        order, _ = rank(
            vectors.matrix[[r["_index"] for r in test]], vectors.matrix[[r["_index"] for r in train]], "cosine", max_k
        )
        for q, neighbours in zip(test, order):
            entry = {"scan": q[scan_column], "group": group, "retrieved": [train[j][scan_column] for j in neighbours]}
            for attribute in attributes:
                relevant = [str(train[j][attribute]) == str(q[attribute]) for j in neighbours]
                entry.update({f"{attribute} P@{k}": precision_at_k(relevant, k) for k in ks})
                entry[f"{attribute} AP"] = ranked_average_precision(relevant)
            per_query.append(entry)
    metric_names = [f"{a} {m}" for a in attributes for m in [*(f"P@{k}" for k in ks), "AP"]]
    for group in sorted({q["group"] for q in per_query}):
        members = [q for q in per_query if q["group"] == group]
        groups[group] = {
            "n_queries": len(members),
            **{m: float(np.mean([q[m] for q in members])) for m in metric_names},
        }
    overall = {"n_queries": len(per_query), **summarise_per_query({m: [q[m] for q in per_query] for m in metric_names})}
    return {
        "per_query": per_query,
        "groups": groups,
        "overall": overall,
        "attributes": list(attributes),
        "ks": list(ks),
    }


# --------------------------------------------------------------------------- runs with reports
def run_organmnist(
    npz,
    out,
    weights: str | None = None,
    model: str = "ct-fm",
    seed: int = 0,
    queries: str = "val+test",
    device: str = "cpu",
    batch_size: int = 8,
    limit: int | None = None,
) -> RetrievalResult:
    """OrganMNIST3D retrieval end to end: results.json, a figure and report.html in ``out``."""

    splits = load_organmnist3d(npz, "retrieval")
    encoder, fields = load_eval_encoder(weights, model, seed, device)
    run = organmnist_retrieval(splits, encoder, queries=queries, batch_size=batch_size, device=device, limit=limit)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ours = {m: v["mean"] for m, v in run["summary"].items()}
    figure = grouped_bars(
        {"ctfm (this run)": ours, **PAPER_ORGANMNIST},
        out / "organmnist_retrieval.png",
        "OrganMNIST3D retrieval (L2)",
        "score",
    )
    rows = [
        {
            "metric": m,
            "this run": v["mean"],
            "95% CI": f"[{v['low']:.3f}, {v['high']:.3f}]",
            "CT-FM (paper)": PAPER_ORGANMNIST["CT-FM"][m],
            "SuPreM (paper)": PAPER_ORGANMNIST["SuPreM"][m],
        }
        for m, v in run["summary"].items()
    ]
    report = Report(
        "Retrieval: OrganMNIST3D",
        f"gallery {run['n_gallery']} train volumes, {run['n_queries']} queries ({queries}), L2 distance, AP/HR/F1 at 3, "
        "5, 10",
    )
    report.heading("Results beside the paper's").table(rows, digits=4).figure(
        figure, "this run beside CT-FM's and SuPreM's published figures"
    )
    report.paragraph(
        "AP@k averages the precision at each hit's rank over the hits in the top k (0 without a hit); HR@k is 1 when "
        "any of the top k has the query's organ; F1@k is their harmonic mean per query. Means over queries with 95% "
        "bootstrap intervals."
    )
    results = {
        "evaluation": "retrieval",
        "protocol": "organmnist3d",
        "metric": "l2",
        "queries": queries,
        "n_gallery": run["n_gallery"],
        "n_queries": run["n_queries"],
        "metrics": run["summary"],
        "paper": PAPER_ORGANMNIST,
        "figures": [figure.name],
    }
    prov = {**fields, "input": os.path.abspath(npz), "input_sha256": file_sha256(npz), "limit": limit}
    return write_evaluation_outputs(out, results, prov, report, RetrievalResult)


def run_mir(
    store,
    sheet_path,
    out,
    attributes: list[str],
    scan_column: str = "scan",
    split_column: str = "split",
    group_column: str | None = "group",
    ks=KS,
    run: str | None = None,
    where: dict | None = None,
) -> RetrievalResult:
    """3D-MIR retrieval from a store of patch embeddings (min-pooled here) and an annotation sheet."""

    if not attributes:
        raise OptionError("3D-MIR needs at least one relevance attribute column (--relevance COLUMN[,COLUMN])")
    sheet = read_table(sheet_path, required=(scan_column, split_column)).to_pylist()
    if group_column and group_column not in sheet[0]:
        group_column = None
    vectors = store_vectors(store, run=run, where=where, pool_patches="min")
    run = mir_retrieval(vectors, sheet, attributes, scan_column, split_column, group_column, ks, sheet_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(
        "Retrieval: 3D-MIR protocol",
        f"min-pooled patch embeddings, cosine distance, top {max(ks)}; {run['overall']['n_queries']} queries",
    )
    figures = []
    for attribute in attributes:
        rows = []
        for group, values in run["groups"].items():
            row = {
                "group": group,
                "queries": values["n_queries"],
                **{
                    m.split(" ", 1)[1] if m.startswith(attribute + " ") else m: 100 * v
                    for m, v in values.items()
                    if m.startswith(attribute + " ")
                },
            }
            rows.append(row)
        overall = {
            m.split(" ", 1)[1]: 100 * v["mean"]
            for m, v in run["overall"].items()
            if isinstance(v, dict) and m.startswith(attribute + " ")
        }
        rows.append({"group": "overall", "queries": run["overall"]["n_queries"], **overall})
        report.heading(f"Relevance: same {attribute} (percent)").table(rows, digits=2)
        figure = grouped_bars(
            {
                "this run (overall)": overall,
                **{
                    f"CT-FM paper ({name}, overall)": dict(zip([*(f"P@{k}" for k in KS), "AP"], values["overall"]))
                    for name, values in PAPER_MIR.items()
                },
            },
            out / f"mir_{attribute}.png",
            f"3D-MIR: same {attribute}",
            "percent",
        )
        figures.append(figure.name)
        report.figure(
            figure, "overall P@k and mAP beside CT-FM's published overall figures (lesion flag and lesion group)"
        )
    paper_rows = [
        {"attribute": name, "organ": organ, "P@3": v[0], "P@5": v[1], "P@10": v[2], "mAP": v[3]}
        for name, table in PAPER_MIR.items()
        for organ, v in table.items()
    ]
    report.heading("CT-FM's published 3D-MIR figures (MSD liver, colon, pancreas, lung; percent)").table(
        paper_rows, digits=2
    )
    results = {
        "evaluation": "retrieval",
        "protocol": "3d-mir",
        "metric": "cosine",
        "pool": "min",
        **{k: run[k] for k in ("groups", "overall", "attributes", "ks")},
        "per_query": run["per_query"],
        "paper": PAPER_MIR,
        "figures": figures,
    }
    prov = {
        **vectors.provenance(),
        "annotations": os.path.abspath(sheet_path),
        "annotations_sha256": file_sha256(sheet_path),
    }
    return write_evaluation_outputs(out, results, prov, report, RetrievalResult)


# --------------------------------------------------------------------------- organ crops
ORGAN_CROP_VOXELS = (8, 64, 64)  # at ct-fm-patches' 3x1x1 mm: 24x64x64 mm


def labelled_volume(image_path, labels_path, spec=None):
    """``(volume [S, P, L] in [0, 1], labels on that grid, {value: name}, affine)``: a scan
    preprocessed with ``spec`` (default ct-fm-patches) and its label map put on the same grid."""

    spec = spec or get_preset("ct-fm-patches")
    image, _ = load_usable_ct(image_path, spec=spec)
    labels = load_labels(labels_path, image)
    prepared = preprocess(image, spec)
    affine = np.asarray(prepared.affine, np.float64)
    on_grid = (
        onto_grid(
            np.asarray(labels.labels[0], np.float32),
            np.asarray(image.affine, np.float64),
            affine,
            prepared.shape[1:],
            order=0,
        )
        .round()
        .astype(int)
    )
    return np.asarray(prepared[0], np.float32), on_grid, dict(labels.names), affine


def _inner(labels: np.ndarray, crop) -> np.ndarray:
    half = np.asarray(crop) // 2
    inner = np.zeros(labels.shape, dtype=bool)
    inner[
        half[0] : labels.shape[0] - crop[0] + half[0] + 1,
        half[1] : labels.shape[1] - crop[1] + half[1] + 1,
        half[2] : labels.shape[2] - crop[2] + half[2] + 1,
    ] = True
    return inner


def common_labels(volumes: list, crop=ORGAN_CROP_VOXELS, min_centres: int = 50) -> list[str]:
    """Label names with at least ``min_centres`` possible crop centres in every labelled volume."""
    names = None
    for _, labels, label_names, _ in volumes:
        inner = _inner(labels, crop)
        present = {
            name
            for value, name in label_names.items()
            if value > 0 and int(((labels == value) & inner).sum()) >= min_centres
        }
        names = present if names is None else names & present
    return sorted(names or [])


def organ_crops(
    volume, labels, names: dict, organs: list[str], per_organ: int, seed: int, crop=ORGAN_CROP_VOXELS
) -> tuple[np.ndarray, np.ndarray]:
    """``(crops [N, 1, d, h, w], organ names [N])``: up to ``per_organ`` crops per organ centred on
    random voxels of it (whole crops inside the volume)."""
    rng = np.random.default_rng(seed)
    half = np.asarray(crop) // 2
    inner = _inner(labels, crop)
    by_name = {n: v for v, n in names.items()}
    crops, tags = [], []
    for organ in organs:
        centres = np.argwhere((labels == by_name[organ]) & inner)
        for c in centres[rng.choice(len(centres), size=min(per_organ, len(centres)), replace=False)]:
            lo = c - half
            crops.append(volume[lo[0] : lo[0] + crop[0], lo[1] : lo[1] + crop[1], lo[2] : lo[2] + crop[2]])
            tags.append(organ)
    if not crops:
        raise OptionError("no organ crops: no label has enough voxels away from the volume's edges")
    return np.stack(crops)[:, None], np.asarray(tags)


def crop_retrieval(
    encoder, crops_a, tags_a, crops_b, tags_b, ks=(1, 5, 10), batch_size: int = 16, device: str = "cpu"
) -> dict:
    """Organ crops of scan A query those of scan B and the reverse (cosine); relevance = same
    organ; ``P@k`` with bootstrap intervals and the chance level (the expected P@k of a random
    ranking) per direction."""

    va, vb = encode_batches(encoder, crops_a, batch_size, device), encode_batches(encoder, crops_b, batch_size, device)
    out = {}
    for name, (q, qt, g, gt) in {"A->B": (va, tags_a, vb, tags_b), "B->A": (vb, tags_b, va, tags_a)}.items():
        usable = [k for k in ks if k <= len(g)]
        order, _ = rank(q, g, "cosine", max(usable))
        relevant = gt[order] == qt[:, None]
        per_query = {f"P@{k}": [precision_at_k(r, k) for r in relevant] for k in usable}
        chance = float(np.mean([np.mean(gt == t) for t in qt]))
        out[name] = {
            **summarise_per_query(per_query),
            "chance": chance,
            "n_queries": int(len(q)),
            "n_gallery": int(len(g)),
        }
    return out


def evaluate_retrieval(
    store=None,
    *,
    out,
    organmnist=None,
    annotations=None,
    relevance=(),
    weights: str | None = None,
    model: str = "ct-fm",
    seed: int = 0,
    queries: str = "val+test",
    device: str = "cpu",
    batch_size: int = 8,
    limit: int | None = None,
    scan_column: str = "scan",
    split_column: str = "split",
    group_column: str | None = "group",
    run: str | None = None,
    where: dict | None = None,
) -> RetrievalResult:
    """Retrieval by either protocol: ``organmnist=NPZ`` (OrganMNIST3D, :func:`run_organmnist`) or
    ``store`` with ``annotations`` and ``relevance`` columns (3D-MIR, :func:`run_mir`)."""
    if bool(organmnist) == bool(store):
        raise OptionError(
            "retrieval: give either --organmnist NPZ (OrganMNIST3D protocol) or STORE --annotations SHEET (3D-MIR "
            "protocol)"
        )
    if organmnist:
        return run_organmnist(organmnist, out, weights, model, seed, queries, device, batch_size, limit)
    if not annotations:
        raise OptionError("retrieval STORE needs --annotations SHEET (3D-MIR protocol)")
    return run_mir(
        store, annotations, out, list(relevance), scan_column, split_column, group_column, run=run, where=where
    )
