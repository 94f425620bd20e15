"""Store integrity: runs that differ in one key field keep their own rows; concurrent writers
lose nothing; `ctfm store check` finds orphaned and inconsistent rows; `ctfm store info`.

Also what the store records: the preprocessing the weights carry (and a user override), and the
scan record's DICOM fields as columns.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ctfm
from ctfm.cli import main
from ctfm.preprocess import get_preset
from ctfm.preprocess.spec import embedding_spec
from ctfm.store import RUN_KEY, EmbeddingStore, check_store, is_consistent
from ctfm.store.schema import schemas
from ctfm.synth import make_phantom, write_phantom


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, tiny_weights):
    """Three small phantoms (3 mm voxels) and two narrow random CT-FM weights folders (seeds 0, 1)."""
    root = tmp_path_factory.mktemp("store_cohort")
    scans = [
        write_phantom(
            make_phantom(seed, shape=(40, 32, 24), spacing_mm=(3.0, 3.0, 3.0)), root / "scans", stem=f"p{seed}"
        )[0]
        for seed in range(3)
    ]
    # One phantom larger than a 72x128x128 mm window, so that overlap changes the window count.
    large = write_phantom(
        make_phantom(7, shape=(110, 100, 40), spacing_mm=(2.0, 2.0, 3.0)), root / "large", stem="large"
    )[0]
    assert main(["models", "init", "ct-fm", "--seed", "1", "--out", str(root / "weights1"), "--init-filters", "4"]) == 0
    return {"root": root, "scans": scans, "large": large, "weights": tiny_weights, "weights_b": root / "weights1"}


# ---- the key, at the level of the store ------------------------------------------------------
BASE_KEY = {
    "mode": "patches",
    "model": "ct-fm",
    "weights_sha256": "w" * 64,
    "preset_hash": "p" * 64,
    "pool": "mean",
    "precision": "fp32",
    "overlap": 0.5,
}
OTHER_VALUE = {
    "mode": "whole",
    "model": "other-model",
    "weights_sha256": "v" * 64,
    "preset_hash": "q" * 64,
    "pool": "min",
    "precision": "bf16",
    "overlap": 0.0,
}


def _scan_row(key: dict, n_patches: int, fill: float) -> dict:
    return {
        "scan_id": "abc",
        "source_path": "/x.nii.gz",
        **key,
        "n_patches": n_patches,
        "preset": "p",
        "embedding": [fill] * 8,
    }


def _patch_rows(n: int, fill: float) -> list[dict]:
    return [
        {"patch_index": i, "center_mm": [float(i), 0.0, 0.0], "start_voxel": [i, 0, 0], "embedding": [fill + i] * 8}
        for i in range(n)
    ]


@pytest.mark.parametrize("field", RUN_KEY)
def test_runs_differing_in_one_key_field_keep_their_own_rows(tmp_path, field):
    store = EmbeddingStore(tmp_path / "store")
    first = dict(BASE_KEY)
    second = {**BASE_KEY, field: OTHER_VALUE[field]}
    # The second run has fewer patches (in whole mode none), as overlap 0 has fewer windows.
    n_second = 0 if second["mode"] == "whole" else 3
    store.add(_scan_row(first, 5, 1.0), _patch_rows(5, 100.0))
    store.add(_scan_row(second, n_second, 2.0), _patch_rows(n_second, 200.0))
    for compacted in (False, True):
        if compacted:
            store.compact()
        scans = store.scans().to_pylist()
        assert len(scans) == 2, f"{field}: both scan rows survive (compacted={compacted})"
        patches = store.patches().to_pylist()
        for row, n, base in ((scans[0], 5, 100.0), (scans[1], n_second, 200.0)):
            own = sorted(
                (p for p in patches if all(p[k] == row[k] for k in (*RUN_KEY, "write_id"))),
                key=lambda p: p["patch_index"],
            )
            assert [p["patch_index"] for p in own] == list(range(n))
            assert [p["embedding"][0] for p in own] == [base + i for i in range(n)], (
                f"{field}: patches are the run's own"
            )
        assert is_consistent(check_store(store)), check_store(store)


def test_a_rewritten_scan_replaces_its_patches_as_a_set(tmp_path):
    store = EmbeddingStore(tmp_path / "store")
    store.add(_scan_row(BASE_KEY, 5, 1.0), _patch_rows(5, 100.0))
    store.add(_scan_row(BASE_KEY, 2, 2.0), _patch_rows(2, 300.0))  # same key, written again
    for _ in range(2):
        patches = store.patches().to_pylist()
        assert [p["embedding"][0] for p in sorted(patches, key=lambda p: p["patch_index"])] == [300.0, 301.0]
        assert store.scans().num_rows == 1 and is_consistent(check_store(store))
        store.compact()


# ---- the reproduction, end to end ---------------------------------------------------
@pytest.mark.slow
def test_overlap_runs_into_one_store_stay_consistent(cohort, tmp_path, run_cli):
    store = tmp_path / "store"
    scan = cohort["large"]
    common = ["--weights", cohort["weights"], "--mode", "patches", "--out", store, "--no-progress"]
    assert run_cli("embed", scan, *common, "--overlap", "0.5").returncode == 0
    assert run_cli("embed", scan, *common, "--overlap", "0").returncode == 0
    rows = {r["overlap"]: r for r in EmbeddingStore(store).scans().to_pylist()}
    assert set(rows) == {0.0, 0.5} and rows[0.5]["n_patches"] > rows[0.0]["n_patches"]
    patches = EmbeddingStore(store).patches().to_pylist()
    for overlap, row in rows.items():
        own = [p for p in patches if p["overlap"] == overlap]
        assert len(own) == row["n_patches"]
        np.testing.assert_allclose(row["embedding"], np.mean([p["embedding"] for p in own], axis=0), atol=1e-6)
    # The same records come back through the API, per run.
    for overlap in (0.0, 0.5):
        (record,) = ctfm.embed(str(scan), weights=str(cohort["weights"]), mode="patches", overlap=overlap, out=store)
        assert record["n_patches"] == rows[overlap]["n_patches"] == len(record["patches"])
    check = run_cli("store", "check", store)
    assert check.returncode == 0 and "consistent" in check.stdout, check.stdout + check.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "first, second",
    [
        (["--pool", "mean"], ["--pool", "max"]),
        (["--precision", "fp32"], ["--precision", "bf16"]),
        (["--mode", "patches"], ["--mode", "whole"]),
        ([], ["--preset", "ct-fm-ssl"]),
        ([], ["WEIGHTS_B"]),
    ],
    ids=["pool", "precision", "mode", "preset", "weights"],
)
def test_real_runs_differing_in_one_option_keep_both(cohort, tmp_path, first, second, run_cli):
    store = tmp_path / "store"
    scans = cohort["scans"][:2]

    def args(extra):
        weights = cohort["weights_b"] if extra == ["WEIGHTS_B"] else cohort["weights"]
        extra = [] if extra == ["WEIGHTS_B"] else extra
        mode = [] if "--mode" in extra else ["--mode", "patches"]
        return [*scans, "--weights", weights, *mode, *extra, "--out", store, "--no-progress"]

    one = run_cli("embed", *args(first))
    assert one.returncode == 0, one.stderr
    two = run_cli("embed", *args(second))
    assert two.returncode == 0, two.stderr
    assert "embedded 2 scan(s), skipped 0" in two.stdout
    scans_table = EmbeddingStore(store).scans()
    assert scans_table.num_rows == 4
    assert is_consistent(check_store(EmbeddingStore(store)))


@pytest.mark.slow
def test_two_embed_processes_into_one_store_lose_nothing(cohort, tmp_path):
    store = tmp_path / "store"
    base = [
        sys.executable,
        "-m",
        "ctfm",
        "embed",
        "--weights",
        str(cohort["weights"]),
        "--out",
        str(store),
        "--no-progress",
    ]
    # Two processes at once: one in patches mode over all scans, one in whole mode over all scans.
    procs = [
        subprocess.Popen(
            [*base, *map(str, cohort["scans"]), "--mode", "patches"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        subprocess.Popen(
            [*base, *map(str, cohort["scans"]), "--mode", "whole"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    s = EmbeddingStore(store)
    modes = sorted(r["mode"] for r in s.scans().to_pylist())
    assert modes == ["patches"] * 3 + ["whole"] * 3
    assert s.patches().num_rows == sum(r["n_patches"] for r in s.scans().to_pylist())
    assert not list((store / "parts").glob("*.parquet")), "both compactions folded everything"
    assert is_consistent(check_store(s))


# ---- ctfm store check / info -------------------------------------------------------------------
@pytest.mark.slow
def test_store_check_reports_orphans_and_mismatches(cohort, tmp_path, run_cli):
    store = tmp_path / "store"
    assert (
        run_cli(
            "embed",
            *cohort["scans"][:2],
            "--weights",
            cohort["weights"],
            "--mode",
            "patches",
            "--out",
            store,
            "--no-progress",
        ).returncode
        == 0
    )
    ok = run_cli("store", "check", store, "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["consistent"] is True
    patches = pq.read_table(store / "patches.parquet")
    rows = patches.to_pylist()
    victim = rows[0]["scan_id"]
    # Drop one patch of the first scan and add a patch row that belongs to no scan row.
    kept = [r for r in rows if not (r["scan_id"] == victim and r["patch_index"] == 0)]
    orphan = {**rows[0], "scan_id": "0123456789abcdef", "write_id": "f" * 32}
    pq.write_table(pa.Table.from_pylist(kept + [orphan], schema=schemas()["patches"]), store / "patches.parquet")
    bad = run_cli("store", "check", store)
    assert bad.returncode == 1
    assert "orphan_patches (1)" in bad.stderr and "0123456789abcdef" in bad.stderr
    assert "patch_count_mismatch (1)" in bad.stderr and victim in bad.stderr
    assert "INCONSISTENT" in bad.stdout
    codes = {p["code"] for p in json.loads(run_cli("store", "check", store, "--json").stdout)["problems"]}
    assert codes == {"orphan_patches", "patch_count_mismatch"}


@pytest.mark.slow
def test_store_check_flags_patch_rows_without_the_key(tmp_path, run_cli):
    """A store whose patch rows carry only scan id, weights and preset (the old layout)."""
    store = tmp_path / "store"
    store.mkdir()
    old_patch = pa.table(
        {
            "scan_id": ["abc"],
            "patch_index": pa.array([0], pa.int32()),
            "weights_sha256": ["w"],
            "preset_hash": ["p"],
            "embedding": [[0.0] * 4],
        }
    )
    pq.write_table(old_patch, store / "patches.parquet")
    result = run_cli("store", "check", store)
    assert result.returncode == 1 and "patch_without_key" in result.stderr


@pytest.mark.slow
def test_store_check_finds_damaged_files_and_refuses_non_stores(tmp_path, run_cli):
    store = tmp_path / "store"
    (store / "parts").mkdir(parents=True)
    (store / "scans.parquet").write_bytes(b"PAR1 not really")
    result = run_cli("store", "check", store)
    assert result.returncode == 1 and "unreadable_file" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = run_cli("store", "info", empty)
    assert refused.returncode == 2 and refused.stderr.startswith(f"error: {empty}: not an embedding store")
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_store_info_summarises_runs(cohort, tmp_path, run_cli):
    store = tmp_path / "store"
    for overlap in ("0", "0.5"):
        assert (
            run_cli(
                "embed",
                *cohort["scans"][:2],
                "--weights",
                cohort["weights"],
                "--mode",
                "patches",
                "--overlap",
                overlap,
                "--out",
                store,
                "--no-progress",
            ).returncode
            == 0
        )
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"x")
    assert run_cli("embed", broken, "--weights", cohort["weights"], "--out", store, "--no-progress").returncode == 1
    info = json.loads(run_cli("store", "info", store, "--json").stdout)
    assert info["scans"] == 2 and info["scan_rows"] == 4 and info["failures"] == 1
    assert sorted(r["overlap"] for r in info["runs"]) == [0.0, 0.5]
    assert all(r["scans"] == 2 and r["patches"] > 0 and r["preset"] == "ct-fm-patches" for r in info["runs"])
    assert info["patches"] == sum(r["patches"] for r in info["runs"])
    text = run_cli("store", "info", store)
    assert text.returncode == 0 and "2 scan(s) in 4 row(s)" in text.stdout and "ct-fm-patches" in text.stdout


# ---- what the rows record ------------------------------------------------------------------------
@pytest.mark.slow
def test_weights_carry_their_preprocessing(cohort, tmp_path, run_cli):
    """A model trained at 2 mm embeds at 2 mm; --preset overrides it with a warning."""
    folder = tmp_path / "weights_2mm"
    assert main(["models", "init", "ct-fm", "--seed", "0", "--out", str(folder), "--init-filters", "4"]) == 0
    sidecar = json.loads((folder / "ctfm.json").read_text())
    trained = get_preset("ct-fm-ssl").with_(name="my-2mm", spacing_mm=(2.0, 2.0, 2.0))
    sidecar["preprocess"] = trained.to_dict()
    (folder / "ctfm.json").write_text(json.dumps(sidecar))
    store = tmp_path / "store"
    for mode in ("whole", "patches"):
        result = run_cli(
            "embed", cohort["scans"][0], "--weights", folder, "--mode", mode, "--out", store, "--no-progress"
        )
        assert result.returncode == 0, result.stderr
        assert "warning" not in result.stderr
    rows = {r["mode"]: r for r in EmbeddingStore(store).scans().to_pylist()}
    for mode, row in rows.items():
        expected = embedding_spec(trained, mode)
        assert row["preset_hash"] == expected.content_hash() and row["preset"] == expected.name
        assert json.loads(row["preprocess_spec"])["spacing_mm"] == [2.0, 2.0, 2.0]
    override = run_cli(
        "embed",
        cohort["scans"][0],
        "--weights",
        folder,
        "--mode",
        "whole",
        "--preset",
        "ct-fm-1mm-320",
        "--out",
        store,
        "--no-progress",
    )
    assert override.returncode == 0
    assert (
        "warning: preset ct-fm-1mm-320 overrides the preprocessing these weights expect for whole mode (my-2mm+whole)"
        in override.stderr
    )
    used = [r for r in EmbeddingStore(store).scans().to_pylist() if r["preset"] == "ct-fm-1mm-320"]
    assert len(used) == 1 and json.loads(used[0]["preprocess_spec"])["spacing_mm"] == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_ct_fm_weights_keep_the_published_presets(cohort):
    records = ctfm.embed(str(cohort["scans"][0]), weights=str(cohort["weights"]), mode="whole")
    assert records[0]["preset"] == "ct-fm-1mm-320" and records.spec.name == "ct-fm-1mm-320"
    records = ctfm.embed(str(cohort["scans"][0]), weights=str(cohort["weights"]), mode="patches")
    assert records[0]["preset"] == "ct-fm-patches"


@pytest.mark.slow
def test_dicom_record_fields_become_columns(tmp_path, cohort, run_cli):
    from dicom_factory import axial_positions, write_series

    folder = tmp_path / "series"
    write_series(
        folder,
        axial_positions(12, gap=2.5),
        rows=40,
        cols=36,
        pixel_spacing=(2.0, 2.0),
        values=lambda pts: -1000.0 + 1100.0 * (np.abs(pts[..., 0]) < 20),
    )
    store = tmp_path / "store"
    result = run_cli(
        "embed", folder, cohort["scans"][0], "--weights", cohort["weights"], "--out", store, "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    rows = {r["format"]: r for r in EmbeddingStore(store).scans().to_pylist()}
    dicom = rows["dicom"]
    assert (dicom["modality"], dicom["kernel"], dicom["manufacturer"], dicom["body_part"]) == (
        "CT",
        "B30f",
        "TEST",
        "CHEST",
    )
    assert dicom["series_description"] == "test series" and dicom["slice_thickness_mm"] is not None
    assert dicom["spacing_mm"] == pytest.approx([2.0, 2.0, 2.5]) and dicom["shape"] == [36, 40, 12]
    nifti = rows["nifti"]
    assert (
        nifti["modality"] is None
        and nifti["spacing_mm"] == pytest.approx([3.0, 3.0, 3.0])
        and nifti["shape"] == [40, 32, 24]
    )
    # The store can be split on them without the DICOM files.
    table = pq.read_table(store / "scans.parquet", filters=[("kernel", "=", "B30f")])
    assert table.num_rows == 1
