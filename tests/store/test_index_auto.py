"""The index chooses its kind by size, measures its recall at build, extends without retraining,
and survives a SIGKILL mid-update."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ctfm
from ctfm.cli import main
from ctfm.store import open_store
from ctfm.store.index import (
    AUTO_EXACT_BELOW,
    AUTO_HNSW_UPTO,
    RECALL_QUERIES,
    IndexParams,
    auto_params,
    build_index,
    exact_neighbours,
    ivf_part,
    load_index,
    prepare_vectors,
    retrain_advice,
    update_index,
)
from ctfm.store.schema import schemas


def _vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Clustered vectors (50 clusters), as embeddings are, not uniform noise."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(50, dim)).astype(np.float32)
    return (centres[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)


def _write_store(root: Path, vectors: np.ndarray) -> Path:
    """A compacted store of one whole-scan run, one row per vector (scan ``s<i>``)."""
    n, dim = vectors.shape
    (root / "parts").mkdir(parents=True, exist_ok=True)
    schema = schemas()["scans"]
    columns = {
        "scan_id": pa.array([f"s{i:07d}" for i in range(n)]),
        "mode": pa.array(["whole"] * n),
        "model": pa.array(["ct-fm"] * n),
        "weights_sha256": pa.array(["w" * 64] * n),
        "preset_hash": pa.array(["p" * 64] * n),
        "pool": pa.array(["avg"] * n),
        "precision": pa.array(["fp32"] * n),
        "overlap": pa.array(np.zeros(n, np.float32)),
        "write_id": pa.array([f"{i:032x}" for i in range(n)]),
        "embedding": pa.ListArray.from_arrays(
            pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), np.ascontiguousarray(vectors).ravel()
        ),
    }
    table = pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema)
    pq.write_table(table, root / "scans.parquet")
    return root


def test_auto_params_choose_exact_then_hnsw_then_ivf_by_size():
    assert auto_params(AUTO_EXACT_BELOW - 1).kind == "flat"
    assert auto_params(AUTO_EXACT_BELOW).kind == "hnsw"
    assert auto_params(AUTO_HNSW_UPTO).kind == "hnsw"
    big = auto_params(AUTO_HNSW_UPTO + 1, "l2")
    assert (big.kind, big.codec, big.refine, big.metric) == ("ivf", "sq8", 10, "l2")


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_neighbours_match_a_flat_faiss_search_and_never_return_skipped_rows(metric):
    faiss = pytest.importorskip("faiss")
    x = _vectors(3000, 16)
    queries = prepare_vectors(_vectors(20, 16, seed=5), metric)
    base = prepare_vectors(x, metric)
    flat = faiss.IndexFlatIP(16) if metric == "cosine" else faiss.IndexFlatL2(16)
    flat.add(base)
    _, truth = flat.search(queries, 10)
    assert (exact_neighbours(queries, x, metric, 10) == truth).mean() > 0.99  # ties may swap
    skip = np.unique(truth[:, 0])
    found = exact_neighbours(queries, x, metric, 10, skip=skip)
    assert not np.isin(found, skip).any()


def test_a_small_store_gets_an_exact_index_and_status_says_so(tmp_path, capsys):
    store = _write_store(tmp_path / "store", _vectors(500, 16))
    assert main(["index", "build", str(store)]) == 0
    assert "(chosen by size)" in capsys.readouterr().out
    index = load_index(open_store(store))
    m = index.manifest
    assert (m["params"]["kind"], m["auto"], m["recall_at_10"], m["recall_queries"]) == ("flat", True, 1.0, 0)
    assert m["index_bytes"] == (store / "index" / m["faiss_file"]).stat().st_size
    assert main(["index", "status", str(store)]) == 0
    out = capsys.readouterr().out
    assert "flat (chosen by size)" in out and "exact (recall@10 1.0)" in out and "MiB" in out


@pytest.mark.slow
def test_a_store_above_the_threshold_gets_hnsw_with_its_recall_measured_on_held_out_vectors(tmp_path, capsys):
    x = _vectors(AUTO_EXACT_BELOW, 16)
    store = _write_store(tmp_path / "store", x)
    assert main(["index", "build", str(store)]) == 0
    capsys.readouterr()
    index = load_index(open_store(store))
    m = index.manifest
    assert m["params"]["kind"] == "hnsw" and m["auto"] and m["recall_queries"] == RECALL_QUERIES
    assert 0.95 <= m["recall_at_10"] <= 1.0
    # the held-out rows were added after the measurement: every row is in the index, under its own id
    assert index.ntotal == len(x) and sorted(index.ids["scan_id"]) == [f"s{i:07d}" for i in range(len(x))]
    probe = np.random.default_rng(3).choice(len(x), 100, replace=False)
    _, rows = index.search(x[probe], 1)
    assert (index.ids["scan_id"][rows[:, 0]] == np.asarray([f"s{i:07d}" for i in probe], dtype=object)).mean() > 0.95
    # an independent recall, fresh queries against exact search over the whole store
    queries = _vectors(200, 16, seed=7)
    truth = exact_neighbours(prepare_vectors(queries, "cosine"), x, "cosine", 10)
    _, found = index.search(queries, 10)
    rows_of = np.asarray([int(s[1:]) for s in index.ids["scan_id"]])
    recall = np.mean([len(set(rows_of[f]) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.9
    assert main(["index", "status", str(store), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["indexes"][0]
    assert shown["kind"] == "hnsw" and shown["auto"] and shown["recall_at_10"] == m["recall_at_10"]
    assert set(shown["params"]) == {"m", "ef_construction", "ef_search"} and shown["index_bytes"] > 0


def test_a_forced_kind_is_built_as_given_and_measured_without_tuning(tmp_path):
    store = _write_store(tmp_path / "store", _vectors(3000, 16))
    assert main(["index", "build", str(store), "--kind", "ivf", "--nlist", "16", "--nprobe", "1"]) == 0
    m = load_index(open_store(store)).manifest
    assert (m["params"]["kind"], m["params"]["nprobe"], m["auto"]) == ("ivf", 1, False)
    assert m["recall_queries"] == RECALL_QUERIES and 0.0 < m["recall_at_10"] < 1.0  # one list of 16: not exact


def test_a_setting_without_a_kind_is_refused_in_one_line(tmp_path, capsys):
    store = _write_store(tmp_path / "store", _vectors(100, 16))
    assert main(["index", "build", str(store), "--nprobe", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nprobe" in err[0] and "--kind ivf" in err[0]


def test_update_adds_to_the_trained_lists_without_retraining_and_advises_a_rebuild_when_grown(tmp_path, capsys):
    x = _vectors(4000, 16)
    store = _write_store(tmp_path / "store", x[:1500])
    build_index(open_store(store), params=IndexParams(kind="ivf", nlist=16))
    before = load_index(open_store(store))
    centroids = ivf_part(before.faiss_index).quantizer.reconstruct_n(0, 16)
    _write_store(store, x[:1700])
    index, done = update_index(open_store(store))
    assert done == "extended" and index.ntotal == 1700
    assert np.array_equal(ivf_part(index.faiss_index).quantizer.reconstruct_n(0, 16), centroids)
    assert (
        index.manifest["trained_vectors"] == 1500 and index.manifest["recall_at_10"] == before.manifest["recall_at_10"]
    )
    assert index.manifest["build_seconds"] == before.manifest["build_seconds"] and "update_seconds" in index.manifest
    assert retrain_advice(index.manifest) is None
    _write_store(store, x)  # 4000 >= 2 x 1500
    assert main(["index", "update", str(store)]) == 0
    out = capsys.readouterr().out
    assert "extended" in out and "rebuild advised" in out and "2.7x the 1500" in out


@pytest.mark.slow
def test_an_index_update_killed_mid_write_leaves_the_previous_index_serving(tmp_path):
    """SIGKILL while ``ctfm index update`` writes the extended FAISS file: the manifest still
    names the previous build, which loads, is whole and answers as before."""
    n, dim = 200_000, 64  # ~50 MB of vectors: the write takes long enough to be caught
    x = np.random.default_rng(0).normal(size=(n + 2000, dim)).astype(np.float32)
    store = _write_store(tmp_path / "store", x[:n])
    build_index(open_store(store), params=IndexParams(kind="flat"))
    old = load_index(open_store(store))
    manifest_before = old.path.read_text()
    _, rows_before = old.search(x[:5], 5)
    _write_store(store, x)  # 2000 scans more: the update extends
    env = {**os.environ, "PYTHONPATH": str(Path(ctfm.__file__).parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-m", "ctfm", "index", "update", str(store)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not [p for p in os.listdir(store / "index") if p.endswith(".partial")]:
            assert process.poll() is None and time.monotonic() < deadline, "the update ended before it could be killed"
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert old.path.read_text() == manifest_before
    served = load_index(open_store(store), on_stale="ignore")  # checks every file against its sha256
    assert served.ntotal == n
    assert np.array_equal(served.search(x[:5], 5)[1], rows_before)
    index, done = update_index(open_store(store))  # and the next update completes it
    assert done == "extended" and index.ntotal == n + 2000
