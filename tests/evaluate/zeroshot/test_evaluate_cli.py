"""``ctfm evaluate ...``: outputs (results.json with provenance, figures, report.html), the JSON
printed with --json, and one-line errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctfm.store import EmbeddingStore


def _key(weights="w" * 64, mode="patches", pool="mean"):
    return {
        "mode": mode,
        "model": "ct-fm",
        "weights_sha256": weights,
        "preset_hash": "p" * 64,
        "pool": pool,
        "precision": "fp32",
        "overlap": 0.5,
    }


def _write_store(root, vectors: dict[str, np.ndarray], weights="w" * 64, patches=True):
    """A real store whose scan rows carry the given vectors; with ``patches`` each scan also gets
    two patch rows (the vector and the vector + 1) so that min pooling gives the vector back."""
    store = EmbeddingStore(root)
    for name, vector in vectors.items():
        row = {
            "scan_id": name,
            **_key(weights),
            "source_path": f"/data/{name}.nii.gz",
            "content_hash": f"h{name}",
            "n_patches": 2,
            "preset": "ct-fm-patches",
            "embedding": np.asarray(vector, np.float32),
        }
        rows = (
            [
                {
                    "patch_index": i,
                    "center_mm": [0.0, 0.0, float(i)],
                    "start_voxel": [0, 0, i],
                    "embedding": np.asarray(vector, np.float32) + i,
                }
                for i in range(2)
            ]
            if patches
            else []
        )
        store.add(row, rows)
    store.compact()
    return root


@pytest.mark.slow
def test_stability_cli_json_and_outputs(tmp_path, run_cli):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 16))
    vectors = {f"a{i}": base[i] for i in range(4)} | {f"b{i}": base[i] + rng.normal(0, 0.05, 16) for i in range(4)}
    store = _write_store(tmp_path / "store", vectors)
    (tmp_path / "pairs.csv").write_text(
        "scan_a,scan_b,subject\n" + "".join(f"a{i},b{i}.nii.gz,s{i}\n" for i in range(4))
    )
    code, out, err = run_cli(
        "evaluate",
        "stability",
        str(store),
        "--manifest",
        str(tmp_path / "pairs.csv"),
        "--out",
        str(tmp_path / "eval"),
        "--json",
    )
    assert code == 0, err
    printed = json.loads(out)
    assert printed["evaluation"] == "stability" and printed["n_pairs"] == 4
    assert printed["rank1_reidentification"]["a_to_b"]["mean"] == 1.0
    assert printed["separation_auc"] == 1.0
    assert printed["pair_cosine"]["mean"] > 0.99
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert written["provenance"]["computation"]["weights_sha256"] == "w" * 64
    assert written["provenance"]["manifest_sha256"] and written["provenance"]["ctfm_version"]
    assert len(written["per_dimension_icc"]) == 16
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "data:image/png;base64" in html and "Test-retest stability" in html
    assert (tmp_path / "eval" / "pair_cosine.png").stat().st_size > 1000


@pytest.mark.slow
def test_mir_retrieval_and_clustering_cli(tmp_path, run_cli):
    vectors = {"q1": [1, 0], "q2": [0, 1], "t1": [1, 0.1], "t2": [0.1, 1], "t3": [1, 1]}
    store = _write_store(tmp_path / "store", {k: np.asarray(v, float) for k, v in vectors.items()})
    (tmp_path / "mir.csv").write_text(
        "scan,split,group,flag\nq1,test,liver,1\nq2,test,liver,0\nt1,train,liver,1\nt2,train,liver,1\nt3,train,liver,0\n"
    )
    # min over the patches (v, v + 1) is v itself: the hand-worked case of test_evaluate_metrics, at k = 3
    code, out, err = run_cli(
        "evaluate",
        "retrieval",
        str(store),
        "--annotations",
        str(tmp_path / "mir.csv"),
        "--relevance",
        "flag",
        "--out",
        str(tmp_path / "mir"),
        "--json",
    )
    assert code == 2 and "fewer than k=10" in err and len(err.strip().splitlines()) == 1
    extra = {f"e{i}": np.array([1.0, 0.2 + 0.1 * i]) for i in range(8)}  # 11 train scans, flag 0
    _write_store(tmp_path / "store", extra)
    (tmp_path / "mir.csv").write_text(
        (tmp_path / "mir.csv").read_text() + "".join(f"{n},train,liver,0\n" for n in extra)
    )
    code, out, err = run_cli(
        "evaluate",
        "retrieval",
        str(store),
        "--annotations",
        str(tmp_path / "mir.csv"),
        "--relevance",
        "flag",
        "--out",
        str(tmp_path / "mir"),
        "--json",
    )
    assert code == 0, err
    printed = json.loads(out)
    assert printed["pool"] == "min" and printed["overall"]["n_queries"] == 2
    # q1 = (1, 0), flag 1: t1 (1), e0 (0), e1 (0); q2 = (0, 1), flag 0: t2 (1), t3 (0), e7 (0)
    results = json.loads((tmp_path / "mir" / "results.json").read_text())
    assert [q["retrieved"][:3] for q in results["per_query"]] == [["t1", "e0", "e1"], ["t2", "t3", "e7"]]
    assert [q["flag P@3"] for q in results["per_query"]] == pytest.approx([1 / 3, 2 / 3])
    assert printed["overall"]["flag P@3"]["mean"] == pytest.approx(0.5)
    (tmp_path / "labels.csv").write_text(
        "scan,label\n" + "".join(f"{n},{'x' if v[0] > v[1] else 'y'}\n" for n, v in vectors.items() if n != "t3")
    )
    code, out, err = run_cli(
        "evaluate",
        "clustering",
        str(store),
        "--labels",
        str(tmp_path / "labels.csv"),
        "--no-umap",
        "--k",
        "1",
        "--out",
        str(tmp_path / "clusters"),
        "--json",
    )
    assert code == 0, err
    printed = json.loads(out)
    assert printed["metrics"]["knn1_accuracy"] == 1.0 and printed["metrics"]["kmeans_ari"] == 1.0
    assert printed["label_counts"] == {"x": 2, "y": 2}
    assert (tmp_path / "clusters" / "tsne.png").exists() and (tmp_path / "clusters" / "report.html").exists()


def test_bad_inputs_are_one_line_errors(tmp_path, run_cli):
    store = _write_store(tmp_path / "store", {"a": np.ones(4), "b": np.arange(4.0)})
    _write_store(tmp_path / "store", {"a": np.ones(4)}, weights="v" * 64)  # a second computation
    (tmp_path / "pairs.csv").write_text("scan_a,scan_b\na,b\n")
    cases = [
        (
            (
                "evaluate",
                "stability",
                str(store),
                "--manifest",
                str(tmp_path / "pairs.csv"),
                "--out",
                str(tmp_path / "o1"),
            ),
            "holds 2 scan-level runs",
        ),
        (
            (
                "evaluate",
                "stability",
                str(store),
                "--manifest",
                str(tmp_path / "nope.csv"),
                "--where",
                "weights_sha256=" + "w" * 64,
                "--out",
                str(tmp_path / "o2"),
            ),
            "no such file",
        ),
        (
            (
                "evaluate",
                "stability",
                str(tmp_path / "nostore"),
                "--manifest",
                str(tmp_path / "pairs.csv"),
                "--out",
                str(tmp_path / "o3"),
            ),
            "no such store folder",
        ),
        (
            ("evaluate", "retrieval", "--organmnist", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o4")),
            "no such file",
        ),
        (
            ("evaluate", "retrieval", str(store), "--organmnist", "x.npz", "--out", str(tmp_path / "o5")),
            "either --organmnist",
        ),
        (("evaluate", "saliency", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "o6")), "missing.nii.gz"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(*argv)
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "pairs.csv").write_text("scan_a,scan_b\na,zzz\n")
    code, _, err = run_cli(
        "evaluate",
        "stability",
        str(store),
        "--manifest",
        str(tmp_path / "pairs.csv"),
        "--where",
        "weights_sha256=" + "w" * 64,
        "--out",
        str(tmp_path / "o7"),
    )
    assert code == 2 and "'zzz' is not in the store" in err
    (tmp_path / "pairs.csv").write_text("first,second\na,b\n")
    code, _, err = run_cli(
        "evaluate",
        "stability",
        str(store),
        "--manifest",
        str(tmp_path / "pairs.csv"),
        "--where",
        "weights_sha256=" + "w" * 64,
        "--out",
        str(tmp_path / "o8"),
    )
    assert code == 2 and "missing column(s) scan_a, scan_b" in err
    assert not any((tmp_path / f"o{i}" / "results.json").exists() for i in range(1, 9))


def test_store_reading_evaluations_take_run_and_where_and_refuse_the_old_flags(tmp_path, run_cli):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 16))
    vectors = {f"a{i}": base[i] for i in range(4)} | {f"b{i}": base[i] + rng.normal(0, 0.05, 16) for i in range(4)}
    store = _write_store(tmp_path / "store", vectors)
    _write_store(tmp_path / "store", vectors, weights="v" * 64)  # a second run
    (tmp_path / "pairs.csv").write_text("scan_a,scan_b\n" + "".join(f"a{i},b{i}\n" for i in range(4)))
    runs = {r["weights_sha256"]: r["digest"] for r in EmbeddingStore(store).runs("scan")}
    common = ("evaluate", "stability", str(store), "--manifest", str(tmp_path / "pairs.csv"), "--json")
    code, out, err = run_cli(*common, "--run", runs["v" * 64][:8], "--out", str(tmp_path / "by_run"))
    assert code == 0, err
    assert (
        json.loads((tmp_path / "by_run" / "results.json").read_text())["provenance"]["computation"]["weights_sha256"]
        == "v" * 64
    )
    code, out, err = run_cli(
        *common, "--where", "weights_sha256=" + "w" * 64, "--where", "overlap=0.5", "--out", str(tmp_path / "by_where")
    )
    assert code == 0, err
    assert (
        json.loads((tmp_path / "by_where" / "results.json").read_text())["provenance"]["computation"]["weights_sha256"]
        == "w" * 64
    )
    for old in (
        ("--weights-sha256", "www"),
        ("--mode", "patches"),
        ("--pool", "mean"),
        ("--overlap", "0.5"),
        ("--select", "mode=patches"),
    ):
        for verb in (
            ("stability", str(store), "--manifest", str(tmp_path / "pairs.csv")),
            ("clustering", str(store), "--labels", str(tmp_path / "pairs.csv")),
            ("retrieval", str(store), "--annotations", str(tmp_path / "pairs.csv")),
        ):
            code, _, err = run_cli("evaluate", *verb, *old, "--out", str(tmp_path / "old"))
            assert (
                code == 2
                and err.startswith(f"error: {old[0]} {old[1]}: this option was removed")
                and "--run DIGEST" in err
                and "--where COLUMN=VALUE" in err
            ), err
            assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "old").exists()


@pytest.mark.slow
def test_organmnist_retrieval_cli(tmp_path, run_cli, tiny_weights):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 3), ("test", 5)):
        labels = np.arange(n) % 3
        images = np.zeros((n, 16, 16, 16), np.uint8)
        for i, label in enumerate(labels):  # three "organs": a bright block in one of three places
            images[i, 2 + 4 * label : 6 + 4 * label, 4:12, 4:12] = 200 + rng.integers(0, 40)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(tmp_path / "organmnist3d_64.npz", **arrays)
    code, out, err = run_cli(
        "evaluate",
        "retrieval",
        "--organmnist",
        str(tmp_path / "organmnist3d_64.npz"),
        "--weights",
        str(tiny_weights),
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "om"),
        "--json",
    )
    assert code == 0, err
    printed = json.loads(out)
    assert printed["n_gallery"] == 12 and printed["n_queries"] == 8
    assert set(printed["metrics"]) == {f"{m}@{k}" for m in ("AP", "HR", "F1") for k in (3, 5, 10)}
    for values in printed["metrics"].values():
        assert 0.0 <= values["low"] <= values["mean"] <= values["high"] <= 1.0
    assert printed["paper"]["CT-FM"]["AP@3"] == 0.9319
    provenance = json.loads((tmp_path / "om" / "results.json").read_text())["provenance"]
    assert provenance["input_sha256"] and provenance["weights_sha256"]


def _phantom(tmp_path, seed=0):
    from ctfm.synth import make_phantom, write_phantom

    return write_phantom(
        make_phantom(seed=seed, shape=(40, 32, 24), spacing_mm=(4.0, 4.0, 4.0)), tmp_path, stem=f"p{seed}"
    )


@pytest.mark.slow
def test_saliency_and_concepts_cli(tmp_path, run_cli, tiny_weights):
    import nibabel as nib

    image, labels = _phantom(tmp_path)
    code, out, err = run_cli(
        "evaluate",
        "saliency",
        str(image),
        "--labels",
        str(labels),
        "--weights",
        str(tiny_weights),
        "--device",
        "cpu",
        "--mask-size",
        "10",
        "--out",
        str(tmp_path / "sal"),
        "--json",
    )
    assert code == 0, err
    printed = json.loads(out)
    assert printed["mask_size"] == 10 and printed["overlap"] == 0.25
    saved = nib.load(str(tmp_path / "sal" / "saliency.nii.gz"))
    assert saved.shape == nib.load(str(image)).shape  # on the input grid
    np.testing.assert_allclose(saved.affine, nib.load(str(image)).affine, atol=1e-5)
    assert float(np.asarray(saved.dataobj).max()) > 0
    assert 0 <= printed["in_label"]["top1pct_inside_fraction"] <= 1
    code, out, err = run_cli(
        "evaluate",
        "concepts",
        str(image),
        str(_phantom(tmp_path, 1)[0]),
        "--weights",
        str(tiny_weights),
        "--device",
        "cpu",
        "--zoom",
        "2",
        "--out",
        str(tmp_path / "concepts"),
        "--json",
    )
    assert code == 0, err
    printed = json.loads(out)
    assert len(printed["explained_variance_ratio"]) == 3 and sum(printed["explained_variance_ratio"]) <= 1.0 + 1e-6
    assert len(printed["figures"]) == 2 and all((tmp_path / "concepts" / f).exists() for f in printed["figures"])


@pytest.mark.slow
def test_semantic_search_cli_on_phantoms(tmp_path, run_cli, tiny_weights):
    import shutil

    image, labels = _phantom(tmp_path, 0)
    other, other_labels = _phantom(tmp_path, 1)
    copy = tmp_path / "copy.nii.gz"
    shutil.copy(image, copy)
    (tmp_path / "sheet.csv").write_text(
        f"image,labels\n{image.name},{labels.name}\n{copy.name},{labels.name}\n{other.name},{other_labels.name}\n"
    )
    argv = [
        "evaluate",
        "semantic-search",
        str(tmp_path / "sheet.csv"),
        "--label",
        "liver",
        "--weights",
        str(tiny_weights),
        "--device",
        "cpu",
        "--spacing-mm",
        "4",
        "--window",
        "16",
        "--overlap",
        "0.5",
        "--out",
        str(tmp_path / "ss"),
        "--json",
    ]
    code, out, err = run_cli(*argv)
    assert code == 0, err
    printed = json.loads(out)
    assert printed["protocol"] == "custom" and printed["window_voxels"] == 16
    summary = printed["per_label"]["liver"]["none"]
    assert summary["pairs"] == 2 and 0 <= summary["inside_label_rate"] <= 1 and summary["error_mm_mean"] >= 0
    cases = json.loads((tmp_path / "ss" / "results.json").read_text())["per_case"]
    to_copy = next(c for c in cases if c["target"].endswith("copy.nii.gz"))
    assert to_copy["target_centroid_mm"] == pytest.approx(to_copy["query_point_mm"])  # the same scan
    assert to_copy["none"]["error_mm"] < 64.0  # within a window of the truth
    assert set(to_copy["weighted"]) == {"point_mm", "score", "error_mm", "inside_label"}
    code, _, err = run_cli(*argv[:3], "--label", "heart", *argv[5:])
    assert code == 2 and "no label named 'heart'" in err and len(err.strip().splitlines()) == 1
