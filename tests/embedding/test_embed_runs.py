"""Batch embedding as a user runs it: store schema, manifests, failures, resume, SIGKILL, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

import ctfm
from ctfm.store import EmbeddingStore
from ctfm.synth import make_phantom, write_phantom

SCAN_COLUMNS = {
    "scan_id",
    "source_path",
    "series_uid",
    "study_uid",
    "sop_uids",  # the SOP Instance UIDs of a DICOM series (a PACS source keeps them with its row)
    "content_hash",
    "mode",
    "pool",
    "overlap",
    "n_patches",
    "model",
    "weights_sha256",
    "preset",
    "preset_hash",
    "precision",
    "package_version",
    "created_at",
    "embedding",
    # how it was computed and what the scan record says (filterable without the source files)
    "write_id",
    "preprocess_spec",
    "format",
    "modality",
    "kernel",
    "slice_thickness_mm",
    "manufacturer",
    "body_part",
    "contrast",
    "study_date",
    "series_description",
    "orientation",
    "spacing_mm",
    "shape",
}


def ctfm_cli(*args, timeout=600, **kwargs):
    """A real ``python -m ctfm`` process (for DDP, which starts its own workers)."""
    return subprocess.run(
        [sys.executable, "-m", "ctfm", *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, tiny_weights):
    """Four small phantoms (3 mm voxels) and a narrow random CT-FM weights folder."""
    root = tmp_path_factory.mktemp("cohort")
    scans = [
        write_phantom(
            make_phantom(seed, shape=(40, 32, 24), spacing_mm=(3.0, 3.0, 3.0)), root / "scans", stem=f"p{seed}"
        )[0]
        for seed in range(4)
    ]
    return {"root": root, "scans": scans, "weights": tiny_weights}


@pytest.mark.slow
def test_patch_mode_store_schema_and_api(cohort, tmp_path, run_cli):
    store = tmp_path / "store"
    result = run_cli(
        "embed",
        *cohort["scans"][:2],
        "--weights",
        cohort["weights"],
        "--mode",
        "patches",
        "--pool",
        "min",
        "--out",
        store,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "embedded 2 scan(s), skipped 0 already in the store, 0 failed" in result.stdout
    scans = pq.read_table(store / "scans.parquet")
    assert set(scans.column_names) == SCAN_COLUMNS and scans.num_rows == 2
    assert scans.schema.field("embedding").type == pa.list_(pa.float32())
    rows = scans.to_pylist()
    sidecar = json.loads((cohort["weights"] / "ctfm.json").read_text())
    assert {r["weights_sha256"] for r in rows} == {sidecar["weights"]["sha256"]}
    assert {r["mode"] for r in rows} == {"patches"} and {r["pool"] for r in rows} == {"min"}
    assert all(len(r["embedding"]) == 64 and r["n_patches"] >= 1 and len(r["content_hash"]) == 64 for r in rows)
    patches = pq.read_table(store / "patches.parquet").to_pylist()
    assert len(patches) == sum(r["n_patches"] for r in rows)
    for r in rows:  # the scan vector is the minimum over its patches
        own = np.asarray([p["embedding"] for p in patches if p["scan_id"] == r["scan_id"]])
        np.testing.assert_allclose(r["embedding"], own.min(axis=0), atol=1e-6)
    # A different pooling is a different result: it is computed, not taken from the store.
    mean = run_cli(
        "embed",
        *cohort["scans"][:2],
        "--weights",
        cohort["weights"],
        "--mode",
        "patches",
        "--pool",
        "mean",
        "--out",
        store,
        "--no-progress",
    )
    assert "embedded 2 scan(s), skipped 0" in mean.stdout
    assert EmbeddingStore(store).scans().num_rows == 4
    # The Python API returns the same records.
    records = ctfm.embed(
        [str(p) for p in cohort["scans"][:2]], weights=str(cohort["weights"]), mode="patches", pool="min"
    )
    by_id = {r["scan_id"]: r for r in rows}
    for rec in records:
        np.testing.assert_allclose(rec["embedding"], by_id[rec["scan_id"]]["embedding"], atol=1e-6)
        assert len(rec["patches"]) == by_id[rec["scan_id"]]["n_patches"]


@pytest.mark.slow
def test_folders_manifests_failures_and_resume(cohort, tmp_path, run_cli):
    scans_dir = cohort["root"] / "scans"
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    manifest = tmp_path / "manifest.csv"
    pcsv.write_csv(pa.table({"path": [str(broken), str(cohort["scans"][0])]}), manifest)
    store = tmp_path / "store"
    first = run_cli(
        "embed",
        scans_dir,
        manifest,
        "--weights",
        cohort["weights"],
        "--mode",
        "patches",
        "--out",
        store,
        "--no-progress",
    )
    # 4 phantoms + their 4 label maps from the folder, the broken file from the manifest.
    assert first.returncode == 1
    assert "embedded 4 scan(s)" in first.stdout and "5 failed" in first.stdout
    errors = [line for line in first.stderr.splitlines() if line.startswith("error: ")]
    assert any(str(broken) in e and "unreadable NIfTI" in e for e in errors)
    assert sum("not HU: a label map" in e for e in errors) == 4
    failures = EmbeddingStore(store).failures().to_pylist()
    assert len(failures) == 5 and all(f["error"] for f in failures)
    again = run_cli(
        "embed",
        scans_dir,
        manifest,
        "--weights",
        cohort["weights"],
        "--mode",
        "patches",
        "--out",
        store,
        "--no-progress",
    )
    assert "embedded 0 scan(s), skipped 4 already in the store" in again.stdout
    assert EmbeddingStore(store).scans().num_rows == 4
    # A Parquet manifest works the same way.
    pq.write_table(pa.table({"path": [str(p) for p in cohort["scans"]]}), tmp_path / "m.parquet")
    third = run_cli(
        "embed",
        tmp_path / "m.parquet",
        "--weights",
        cohort["weights"],
        "--mode",
        "patches",
        "--out",
        store,
        "--no-progress",
    )
    assert third.returncode == 0 and "skipped 4" in third.stdout


@pytest.mark.slow
def test_sigkill_loses_nothing_already_written(cohort, tmp_path, run_cli):
    store = tmp_path / "store"
    many = cohort["scans"] * 1  # four scans; kill after the first one lands
    command = [
        sys.executable,
        "-m",
        "ctfm",
        "embed",
        *map(str, many),
        "--weights",
        str(cohort["weights"]),
        "--mode",
        "whole",
        "--out",
        str(store),
        "--no-progress",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    parts = store / "parts"
    while time.time() < deadline and proc.poll() is None:
        if parts.exists() and any(p.name.endswith(".scans.parquet") for p in parts.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = EmbeddingStore(store).scans()
    assert 1 <= written.num_rows < 4
    for f in store.rglob("*.parquet"):
        if not f.name.startswith("."):
            pq.read_table(f)  # every visible file is whole
    rerun = run_cli("embed", *many, "--weights", cohort["weights"], "--mode", "whole", "--out", store, "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    assert f"skipped {written.num_rows} already in the store" in rerun.stdout
    final = EmbeddingStore(store).scans()
    assert final.num_rows == 4 and len(set(final.column("scan_id").to_pylist())) == 4
    assert not list((store / "parts").glob("*")), "compaction leaves no parts or stale temporaries"


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_matches_one_process(cohort, tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    args = [*cohort["scans"], "--weights", cohort["weights"], "--mode", "patches", "--no-progress"]
    r1 = ctfm_cli("embed", *args, "--out", one)
    assert r1.returncode == 0, r1.stderr
    r2 = ctfm_cli("embed", *args, "--out", two, "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu")
    assert r2.returncode == 0, r2.stderr
    assert "embedded 4 scan(s)" in r2.stdout
    a = {r["scan_id"]: r["embedding"] for r in EmbeddingStore(one).scans().to_pylist()}
    b = {r["scan_id"]: r["embedding"] for r in EmbeddingStore(two).scans().to_pylist()}
    assert a.keys() == b.keys() and len(b) == 4
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6)
    assert EmbeddingStore(two).patches().num_rows == EmbeddingStore(one).patches().num_rows
