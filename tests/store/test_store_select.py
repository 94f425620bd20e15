"""open_store: the runs of a store and one run's vectors as columns (select by digest, by where)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from ctfm.errors import CTInputError, OptionError
from ctfm.store import EmbeddingStore, RunVectors, open_store

KEY = {
    "mode": "patches",
    "model": "ct-fm",
    "weights_sha256": "w" * 64,
    "preset_hash": "p" * 64,
    "pool": "mean",
    "precision": "fp32",
    "overlap": 0.5,
}
DIM = 8


def _add(store, scan_id, key=KEY, n_patches=3, seed=0, **record):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n_patches, DIM)).astype(np.float32)
    patches = (
        [
            {"patch_index": i, "center_mm": [float(i), 1.0, 2.0], "start_voxel": [i, 0, 0], "embedding": vectors[i]}
            for i in range(n_patches)
        ]
        if key["mode"] == "patches"
        else None
    )
    row = {
        "scan_id": scan_id,
        "source_path": f"/data/{scan_id}.nii.gz",
        **key,
        "n_patches": n_patches if patches else 0,
        "preset": "p",
        "embedding": vectors.mean(0),
        **record,
    }
    store.add(row, patches)
    return vectors


@pytest.fixture
def store(tmp_path):
    store = EmbeddingStore(tmp_path / "store")
    for i in range(4):
        _add(
            store, f"s{i}", seed=i, body_part="CHEST" if i % 2 else "ABDOMEN", slice_thickness_mm=1.5 if i < 2 else 3.0
        )
    for i in range(3):
        _add(store, f"s{i}", key={**KEY, "mode": "whole", "overlap": 0.0}, seed=10 + i, body_part="CHEST")
    store.compact()
    return open_store(store.root)


def test_open_store_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(CTInputError, match="no such store folder"):
        open_store(tmp_path / "nope")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CTInputError, match="not an embedding store"):
        open_store(tmp_path / "folder")


def test_runs_list_digests_key_fields_and_counts(store):
    scan_runs = {r["mode"]: r for r in store.runs("scan")}
    assert set(scan_runs) == {"patches", "whole"}
    assert scan_runs["patches"]["scans"] == 4 and scan_runs["whole"]["scans"] == 3 and scan_runs["patches"]["rows"] == 4
    assert all(len(r["digest"]) == 16 and r["key"] == tuple(r[k] for k in KEY) for r in scan_runs.values())
    (patch_run,) = store.runs("patch")
    assert patch_run["digest"] == scan_runs["patches"]["digest"] and patch_run["rows"] == 12 and patch_run["scans"] == 4
    assert [r["mode"] for r in store.runs("scan", where={"mode": "whole"})] == ["whole"]


def test_select_by_digest_prefix(store):
    digest = next(r["digest"] for r in store.runs("scan") if r["mode"] == "whole")
    run = store.select("scan", run=digest[:5])
    assert isinstance(run, RunVectors) and run.digest == digest and run.key[0] == "whole"
    assert run.vectors.dtype == np.float32 and run.vectors.shape == (3, DIM)
    assert (
        isinstance(run.metadata, pa.Table)
        and run.metadata.num_rows == 3
        and "embedding" not in run.metadata.column_names
    )
    assert sorted(run.metadata.column("scan_id").to_pylist()) == ["s0", "s1", "s2"]


def test_select_by_where_filters_runs_and_rows_with_numbers_parsed(store):
    run = store.select("scan", where={"mode": "patches", "body_part": "chest"})  # text: case-insensitive
    assert run.key[0] == "patches" and sorted(run.scan_id) == ["s1", "s3"]
    thick = store.select("scan", where={"mode": ["patches"], "slice_thickness_mm": "3"})  # "3" read as 3.0
    assert sorted(thick.scan_id) == ["s2", "s3"]
    by_overlap = store.select("scan", where={"overlap": "0.5"})
    assert by_overlap.key[0] == "patches" and len(by_overlap.scan_id) == 4
    either = store.select("scan", where={"mode": "patches", "body_part": ["CHEST", "ABDOMEN"]})
    assert len(either.scan_id) == 4


def test_patch_vectors_come_with_their_windows_as_columns(store):
    run = store.select("patch", where={"body_part": "CHEST"})
    assert run.vectors.shape == (6, DIM) and list(run.scan_id) == ["s1"] * 3 + ["s3"] * 3
    assert run.metadata.column_names == ["scan_id", "write_id", "patch_index", "center_mm", "start_voxel"]
    assert run.patch_index.tolist() == [0, 1, 2, 0, 1, 2]
    np.testing.assert_array_equal(run.centers_mm[:, 0], [0.0, 1.0, 2.0, 0.0, 1.0, 2.0])
    assert run.starts.shape == (6, 3) and run.scan_table.num_rows == 2
    expected = np.random.default_rng(1).normal(size=(3, DIM)).astype(np.float32)
    np.testing.assert_allclose(run.vectors[:3], expected)


def test_ambiguous_and_unmatched_selections_are_one_line_errors_listing_the_runs(store):
    digests = sorted(r["digest"] for r in store.runs("scan"))
    with pytest.raises(OptionError) as info:
        store.select("scan")
    text = str(info.value)
    assert "holds 2 scan-level runs" in text and "--run DIGEST or --where COLUMN=VALUE" in text
    assert all(d in text for d in digests) and "mode=patches" in text and "overlap=0.5" in text and "\n" not in text
    with pytest.raises(OptionError, match="run 'ffff': matches no scan-level run"):
        store.select("scan", run="ffff")
    with pytest.raises(OptionError, match="matches several"):
        store.select("scan", run="")
    with pytest.raises(OptionError, match="no scan-level vectors match --where body_part=HEAD"):
        store.select("scan", where={"body_part": "HEAD"})
    with pytest.raises(OptionError, match="not a scan record column"):
        store.select("scan", where={"collection": "x"})
    with pytest.raises(OptionError, match="is a number column"):
        store.select("scan", where={"slice_thickness_mm": "thin"})
    with pytest.raises(OptionError, match="a list column, not filterable"):
        store.select("scan", where={"spacing_mm": "1"})


def test_a_store_without_patches_has_no_patch_run(tmp_path):
    store = EmbeddingStore(tmp_path / "store")
    _add(store, "s0", key={**KEY, "mode": "whole", "overlap": 0.0})
    with pytest.raises(OptionError, match="no patch-level vectors in the store"):
        open_store(store.root).select("patch")


def test_a_store_written_without_newer_columns_still_reads(store):
    import pyarrow.parquet as pq

    path = store.root / "scans.parquet"
    old = pq.read_table(path).drop_columns(["body_part", "contrast", "package_version", "series_description"])
    pq.write_table(old, path)
    reopened = open_store(store.root)
    assert sorted(r["scans"] for r in reopened.runs("scan")) == [3, 4]
    run = reopened.select("scan", where={"mode": "patches", "slice_thickness_mm": 1.5})
    assert sorted(run.scan_id) == ["s0", "s1"] and run.metadata.column("body_part").null_count == 2
    with pytest.raises(OptionError, match="no scan-level vectors match --where body_part=CHEST"):
        reopened.select("scan", where={"body_part": "CHEST"})
    assert reopened.select("patch").vectors.shape == (12, DIM)


def test_store_info_names_each_run_by_the_digest_run_takes(store, capsys):
    from ctfm.cli import main

    assert main(["store", "info", str(store.root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert sorted(r["digest"] for r in info["runs"]) == sorted(r["digest"] for r in store.runs("scan"))
    assert main(["store", "info", str(store.root)]) == 0
    text = capsys.readouterr().out
    assert all(r["digest"] in text for r in store.runs("scan"))
