"""The FAISS index beside a store: round trips, exactness, staleness, extension, one run only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctfm.cli import main
from ctfm.errors import OptionError
from ctfm.store import EmbeddingStore
from ctfm.store.index import (
    IndexParams,
    MixedKeysError,
    StaleIndexError,
    build_index,
    list_indexes,
    load_index,
    update_index,
)

KEY = {
    "mode": "patches",
    "model": "ct-fm",
    "weights_sha256": "w" * 64,
    "preset_hash": "p" * 64,
    "pool": "mean",
    "precision": "fp32",
    "overlap": 0.5,
}
DIM = 16


def _add(store, scan_id: str, rng, key=KEY, n_patches: int = 4, **record):
    vectors = rng.normal(size=(n_patches, DIM)).astype(np.float32)
    patches = [
        {"patch_index": i, "center_mm": [float(i), 0.0, 0.0], "start_voxel": [i, 0, 0], "embedding": vectors[i]}
        for i in range(n_patches)
    ]
    row = {
        "scan_id": scan_id,
        "source_path": f"/data/{scan_id}.nii.gz",
        **key,
        "n_patches": n_patches,
        "preset": "p",
        "embedding": vectors.mean(0),
        **record,
    }
    store.add(row, patches)
    return row, vectors


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    store = EmbeddingStore(tmp_path / "store")
    rows = {}
    for i in range(30):
        row, patches = _add(store, f"scan{i:02d}", rng, body_part="CHEST" if i % 3 else "ABDOMEN")
        rows[row["scan_id"]] = (row, patches)
    store.compact()
    store.rows = rows
    return store


def _exact_cosine(matrix, query):
    m = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return m @ (query / np.linalg.norm(query))


def test_flat_index_round_trip_equals_exact_search(store):
    index = build_index(store, "scan")
    files = sorted(p.name for p in (store.root / "index").iterdir())
    assert (
        len(files) == 3 and any(f.endswith(".faiss") for f in files) and any(f.endswith(".ids.parquet") for f in files)
    )
    loaded = load_index(store, "scan")
    assert loaded.ntotal == 30 and loaded.key == tuple(KEY.values()) and loaded.manifest["scans"] == 30
    ids = list(loaded.ids["scan_id"])
    matrix = np.stack([store.rows[s][0]["embedding"] for s in ids])
    query = matrix[7] + 0.1
    scores, rows = loaded.search(query[None], 5)
    expected = _exact_cosine(matrix, query)
    order = np.argsort(-expected)[:5]
    assert list(rows[0]) == list(order)
    np.testing.assert_allclose(scores[0], expected[order], atol=1e-5)
    assert index.manifest["rows_sha256"] == loaded.manifest["rows_sha256"]


@pytest.mark.slow
def test_l2_ivf_and_hnsw_indexes_find_the_exact_neighbours_on_a_small_store(store):
    ids_matrix = None
    for kind, codec, refine in (
        ("flat", "flat", 0),
        ("ivf", "flat", 0),
        ("ivf", "pq4x4", 30),
        ("ivf", "sq8", 5),
        ("hnsw", "flat", 0),
    ):
        index = build_index(
            store, "patch", IndexParams(kind=kind, metric="l2", nlist=2, nprobe=2, codec=codec, refine=refine)
        )
        kind = f"{kind}/{codec}/{refine}"
        ids = list(zip(index.ids["scan_id"], index.ids["patch_index"]))
        matrix = np.stack([store.rows[s][1][p] for s, p in ids])
        if ids_matrix is None:
            ids_matrix = matrix
        query = matrix[11] + 0.05
        scores, rows = index.search(query[None], 3)
        distances = np.linalg.norm(matrix - query, axis=1)
        assert list(rows[0]) == list(np.argsort(distances)[:3]), kind
        np.testing.assert_allclose(-scores[0], np.sort(distances)[:3], rtol=1e-4)
    assert index.manifest["params"]["kind"] == "hnsw" and len(list_indexes(store)) == 1  # one index per level and run


def test_filters_restrict_hits_to_matching_records(store):
    from ctfm.store.vectors import matching_scans

    index = build_index(store, "scan")
    allowed = matching_scans(store.scans(), {"body_part": "abdomen"})
    assert len(allowed) == 10
    scores, rows = index.search(store.rows["scan01"][0]["embedding"][None], 30, allowed=index.allowed_rows(allowed))
    found = {index.ids["scan_id"][r] for r in rows[0] if r >= 0}
    assert found == allowed
    with pytest.raises(OptionError, match="not a scan record column"):
        matching_scans(store.scans(), {"collection_name": "x"})


def test_a_grown_store_makes_the_index_stale_and_update_extends_it(store):
    build_index(store, "patch", IndexParams(kind="ivf", nlist=2))
    rng = np.random.default_rng(5)
    _add(store, "scan_new", rng)
    with pytest.raises(StaleIndexError, match=r"stale: 1 scan\(s\) added .*ctfm index update"):
        load_index(store, "patch")
    index, done = update_index(store, "patch")
    assert done == "extended" and index.ntotal == 31 * 4 and index.manifest["scans"] == 31
    reloaded = load_index(store, "patch")  # the extended index it returns is the one on disk
    assert index.manifest == reloaded.manifest and set(index.ids) == set(reloaded.ids) == {
        "scan_id",
        "write_id",
        "patch_index",
    }
    assert all(np.array_equal(index.ids[k], reloaded.ids[k]) for k in reloaded.ids)
    assert not index.staleness(store).stale
    assert update_index(store, "patch")[1] == "up to date"
    # Re-embedding a scan (a new write id) replaces its vectors: the index is rebuilt.
    _add(store, "scan03", rng)
    assert "re-embedded or removed" in load_index(store, "patch", on_stale="ignore").staleness(store).describe()
    index, done = update_index(store, "patch")
    assert done == "rebuilt" and index.ntotal == 31 * 4 and index.params.kind == "ivf"
    # Only the current build's files remain.
    assert len(list((store.root / "index").glob("*.faiss"))) == 1


def test_runs_are_never_mixed(store):
    rng = np.random.default_rng(9)
    other = {**KEY, "weights_sha256": "v" * 64}
    _add(store, "scan00", rng, key=other)
    with pytest.raises(OptionError, match="2 scan-level runs .* --run DIGEST"):
        build_index(store, "scan")
    runs = {r["weights_sha256"]: r["digest"] for r in store.runs("scan")}
    index = build_index(store, "scan", run=runs["w" * 64][:6])
    assert index.ntotal == 30 and index.key[2] == "w" * 64
    with pytest.raises(MixedKeysError, match="weights_sha256"):
        index.check_key(tuple(other.values()), "the query")


def test_index_cli_build_status_check_and_update(store, capsys):
    assert main(["index", "build", str(store.root), "--level", "patch", "--kind", "hnsw", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert (
        manifest["vectors"] == 120
        and manifest["params"]["kind"] == "hnsw"
        and manifest["key"]["weights_sha256"] == "w" * 64
    )
    assert main(["index", "check", str(store.root)]) == 0
    _add(store, "scan_more", np.random.default_rng(1))
    capsys.readouterr()
    assert main(["index", "check", str(store.root), "--json"]) == 1
    status = json.loads(capsys.readouterr().out)
    assert status["indexes"][0]["stale"] and status["indexes"][0]["added"] == 1
    assert main(["index", "update", str(store.root), "--level", "patch"]) == 0
    assert "extended; 124 vectors from 31 scan(s)" in capsys.readouterr().out
    assert main(["index", "build", str(store.root), "--level", "scan", "--run", "ffff"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run 'ffff': matches no scan-level run") and "\n" not in err
