"""Anatomical clustering: do embeddings group by label without being told?

CT-FM shows a t-SNE of OrganMNIST3D embeddings coloured by organ (perplexity 100, seed 42) and
computes no number. Here the same figure (and a UMAP one) comes with three numbers against the
labels: the **silhouette** (cosine), the leave-one-out **kNN accuracy** (cosine, k = 5, majority
vote, ties to the nearest), and the **adjusted Rand index** of k-means (k = number of labels, on
unit vectors) against the labels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctfm.errors import CTInputError, OptionError, optional_import
from ctfm.evaluate.reports.figures import scatter_labelled
from ctfm.evaluate.reports.report import Report
from ctfm.evaluate.zeroshot.inputs import (
    ZeroShotResult,
    encode_batches,
    load_eval_encoder,
    store_vectors,
    unit_rows,
    write_evaluation_outputs,
)
from ctfm.evaluate.zeroshot.retrieval import ORGANMNIST_LABELS, load_organmnist3d
from ctfm.io.hashing import file_sha256
from ctfm.io.tables import read_table
from ctfm.runtime import require_output_dir

PAPER_NOTE = "CT-FM publishes a t-SNE figure of OrganMNIST3D embeddings coloured by organ and no clustering number"


@dataclass
class ClusteringResult(ZeroShotResult):
    """What the clustering evaluation returns: the keys of its results.json,
    the paths of results.json and report.html (``result["results"]``, ``result["report"]``), and ``provenance``."""


def knn_accuracy(vectors: np.ndarray, labels, k: int = 5) -> float:
    """Leave-one-out kNN accuracy by cosine similarity: majority label of the ``k`` nearest other
    rows; a tie goes to the tied label whose member ranks nearest."""

    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        raise OptionError("kNN accuracy needs at least 2 labelled vectors")
    k = min(k, n - 1)
    unit = unit_rows(np.asarray(vectors, dtype=np.float64))
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    correct = 0
    for i in range(n):
        neighbours = labels[order[i]]
        values, counts = np.unique(neighbours, return_counts=True)
        tied = set(values[counts == counts.max()])
        predicted = next(v for v in neighbours if v in tied)
        correct += predicted == labels[i]
    return correct / n


def kmeans_ari(vectors: np.ndarray, labels, seed: int = 0) -> float:
    """Adjusted Rand index of k-means (k = number of distinct labels, unit vectors) against labels."""
    KMeans = optional_import("sklearn.cluster", "eval").KMeans
    adjusted_rand_score = optional_import("sklearn.metrics", "eval").adjusted_rand_score

    labels = np.asarray(labels)
    n_clusters = len(np.unique(labels))
    if n_clusters < 2:
        raise OptionError("clustering needs at least 2 distinct labels")
    assigned = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(
        unit_rows(np.asarray(vectors, dtype=np.float64))
    )
    return float(adjusted_rand_score(labels, assigned))


def silhouette(vectors: np.ndarray, labels) -> float:
    """Mean silhouette of the labels under cosine distance (needs 2 <= labels < rows)."""
    silhouette_score = optional_import("sklearn.metrics", "eval").silhouette_score

    labels = np.asarray(labels)
    n_labels = len(np.unique(labels))
    if not 2 <= n_labels < len(labels):
        raise OptionError(f"silhouette needs between 2 and {len(labels) - 1} distinct labels, got {n_labels}")
    return float(silhouette_score(np.asarray(vectors, dtype=np.float64), labels, metric="cosine"))


def clustering_metrics(vectors: np.ndarray, labels, k: int = 5, seed: int = 0) -> dict:
    return {
        "silhouette_cosine": silhouette(vectors, labels),
        f"knn{k}_accuracy": knn_accuracy(vectors, labels, k),
        "kmeans_ari": kmeans_ari(vectors, labels, seed),
        "n": int(len(labels)),
        "n_labels": int(len(np.unique(labels))),
    }


def tsne_2d(vectors: np.ndarray, perplexity: float = 100.0, seed: int = 42) -> np.ndarray:
    """[N, 2] t-SNE (CT-FM: perplexity 100, random_state 42; perplexity capped below N)."""
    TSNE = optional_import("sklearn.manifold", "eval").TSNE

    n = len(vectors)
    return TSNE(
        n_components=2, perplexity=float(min(perplexity, max(1.0, (n - 1) / 3))), random_state=seed, init="pca"
    ).fit_transform(np.asarray(vectors, dtype=np.float64))


def umap_2d(vectors: np.ndarray, seed: int = 42, n_neighbors: int = 15) -> np.ndarray:
    """[N, 2] UMAP (umap-learn, cosine metric)."""
    umap = optional_import("umap", "eval", "the UMAP figure (--no-umap leaves it out)")
    import warnings

    n = len(vectors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reducer = umap.UMAP(
            n_components=2,
            n_neighbors=int(max(2, min(n_neighbors, n - 1))),
            metric="cosine",
            random_state=seed,
            init="random" if n < 10 else "spectral",
        )
        return reducer.fit_transform(np.asarray(vectors, dtype=np.float32))


def check_clustering_options(k, perplexity, batch_size: int = 1, limit=None) -> None:
    """Refuse settings the metrics and figures cannot use (one-line :class:`OptionError`), before any work."""
    for name, value in (("--k", k), ("--batch-size", batch_size), ("--limit", 1 if limit is None else limit)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise OptionError(f"{name} {value!r}: expected a whole number >= 1")
    if not isinstance(perplexity, (int, float)) or not math.isfinite(perplexity) or perplexity <= 0:
        raise OptionError(f"--perplexity {perplexity!r}: expected a finite number > 0 (CT-FM: 100)")


def run_clustering(
    vectors: np.ndarray,
    labels,
    out,
    provenance_fields: dict,
    title: str,
    k: int = 5,
    seed: int = 0,
    perplexity: float = 100.0,
    with_umap: bool = True,
) -> ClusteringResult:
    """Metrics, t-SNE and UMAP figures, results.json and report.html in ``out``."""

    check_clustering_options(k, perplexity)
    labels = np.asarray([str(v) for v in labels])
    metrics = clustering_metrics(vectors, labels, k, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = [
        scatter_labelled(
            tsne_2d(vectors, perplexity),
            labels,
            out / "tsne.png",
            f"t-SNE (perplexity {min(perplexity, max(1.0, (len(labels) - 1) / 3)):g}, seed 42)",
        )
    ]
    if with_umap:
        figures.append(scatter_labelled(umap_2d(vectors), labels, out / "umap.png", "UMAP (cosine, seed 42)"))
    report = Report(f"Clustering: {title}", f"{metrics['n']} embeddings, {metrics['n_labels']} labels")
    report.heading("Agreement with the labels").table(
        [{"metric": name, "value": value} for name, value in metrics.items() if name not in ("n", "n_labels")], digits=4
    )
    report.paragraph(
        f"Silhouette under cosine distance (-1..1); leave-one-out {k}-NN accuracy by cosine; adjusted Rand index of "
        f"k-means with one cluster per label. Paper: {PAPER_NOTE}."
    )
    for figure in figures:
        report.figure(figure, figure.stem)
    counts = {name: int((labels == name).sum()) for name in sorted(set(labels))}
    report.heading("Labels").table([{"label": name, "n": n} for name, n in counts.items()])
    results = {
        "evaluation": "clustering",
        "metrics": metrics,
        "label_counts": counts,
        "paper": PAPER_NOTE,
        "figures": [f.name for f in figures],
    }
    return write_evaluation_outputs(out, results, provenance_fields, report, ClusteringResult)


def labelled_store_vectors(
    store,
    labels_path,
    scan_column: str = "scan",
    label_column: str = "label",
    run: str | None = None,
    where: dict | None = None,
) -> tuple[np.ndarray, list[str], dict]:
    """``(vectors [N, D], labels, provenance)`` for the rows of a labels sheet found in a store."""

    vectors = store_vectors(store, run=run, where=where)
    sheet = read_table(labels_path, required=(scan_column, label_column)).to_pylist()
    index = [vectors.index_of(row[scan_column], labels_path) for row in sheet]
    labels = [str(row[label_column]) for row in sheet]
    if len(set(index)) != len(index):
        raise CTInputError(labels_path, "a scan is listed twice", "list each scan once")
    return (
        vectors.matrix[index],
        labels,
        {**vectors.provenance(), "labels": os.path.abspath(labels_path), "labels_sha256": file_sha256(labels_path)},
    )


def organmnist_vectors(
    npz,
    weights: str | None,
    model: str = "ct-fm",
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 8,
    limit: int | None = None,
) -> tuple[np.ndarray, list[str], dict]:
    """All OrganMNIST3D volumes (train + val + test, flipped as CT-FM's clustering notebook does)
    embedded, with organ names."""

    splits = load_organmnist3d(npz, "clustering")
    volumes = np.concatenate([splits[s][0] for s in ("train", "val", "test")])
    labels = np.concatenate([splits[s][1] for s in ("train", "val", "test")])
    if limit:
        volumes, labels = volumes[:limit], labels[:limit]
    encoder, fields = load_eval_encoder(weights, model, seed, device)
    vectors = encode_batches(encoder, volumes, batch_size, device)
    names = [ORGANMNIST_LABELS[i] if 0 <= i < len(ORGANMNIST_LABELS) else str(i) for i in labels]
    return vectors, names, {**fields, "input": os.path.abspath(npz), "input_sha256": file_sha256(npz), "limit": limit}


def evaluate_clustering(
    store=None,
    *,
    out,
    labels=None,
    organmnist=None,
    scan_column: str = "scan",
    label_column: str = "label",
    weights: str | None = None,
    model: str = "ct-fm",
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 8,
    limit: int | None = None,
    k: int = 5,
    perplexity: float = 100.0,
    with_umap: bool = True,
    run: str | None = None,
    where: dict | None = None,
) -> ClusteringResult:
    """Clustering of ``store``'s vectors labelled by the ``labels`` sheet, or of OrganMNIST3D
    (``organmnist=NPZ``) encoded with ``weights``; see :func:`run_clustering`."""
    if bool(organmnist) == bool(store):
        raise OptionError("clustering: give either STORE --labels SHEET or --organmnist NPZ")
    check_clustering_options(k, perplexity, batch_size, limit)
    out = require_output_dir(out, "clustering output folder")
    if organmnist:
        vectors, names, prov = organmnist_vectors(organmnist, weights, model, seed, device, batch_size, limit)
        title = "OrganMNIST3D"
    else:
        if not labels:
            raise OptionError("clustering STORE needs --labels SHEET (columns scan, label)")
        vectors, names, prov = labelled_store_vectors(store, labels, scan_column, label_column, run=run, where=where)
        title = str(labels)
    return run_clustering(vectors, names, out, prov, title, k=k, perplexity=perplexity, with_umap=with_umap)
