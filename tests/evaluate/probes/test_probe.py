"""Probes on stored embeddings (`ctfm probe`): metrics against hand counts and scikit-learn, CIs
against ctfm.evaluate.metrics.stats, planted signal vs shuffled labels, group splitting against leakage,
the join's counts, few-shot draws, the outputs, and one-line errors for bad input.

Stores are written with the real store writer from synthetic vectors.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

from ctfm.cli import main
from ctfm.evaluate.metrics import classification as cm
from ctfm.evaluate.metrics.classification import encode_target
from ctfm.evaluate.metrics.stats import bootstrap_ci, paired_bootstrap
from ctfm.evaluate.probes.probe import few_shot_draw, outer_folds
from ctfm.evaluate.probes.probe_run import run_probe
from ctfm.store import EmbeddingStore

RUN = {
    "mode": "whole",
    "model": "ct-fm",
    "weights_sha256": "a" * 64,
    "preset_hash": "b" * 64,
    "pool": "mean",
    "precision": "fp32",
    "overlap": 0.0,
}


def write_store(root, features, run=RUN, ids=None):
    """A store of one scan row per feature vector (scan ids s0000, s0001, ...)."""
    store = EmbeddingStore(root)
    for i, vector in enumerate(features):
        scan_id = ids[i] if ids else f"s{i:04d}"
        store.add(
            {
                "scan_id": scan_id,
                "source_path": f"/archive/{scan_id}.nii.gz",
                "series_uid": f"1.2.840.{i}",
                **run,
                "n_patches": 0,
                "preset": "ct-fm-1mm-320",
                "embedding": [float(v) for v in vector],
            }
        )
    return root


def write_labels(path, columns: dict, key="scan_id", ids=None):
    n = len(next(iter(columns.values())))
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([key, *columns])
        for i in range(n):
            writer.writerow([ids[i] if ids else f"s{i:04d}", *(columns[c][i] for c in columns)])
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """120 scans, 16-d: dimension 0 carries the label (+3 sd), the rest is noise; shuffled labels too."""
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    rng.shuffle(y)
    features = rng.normal(size=(120, 16))
    features[:, 0] += 3.0 * y
    shuffled = rng.permutation(y)
    tissue = np.where(features[:, 1] > 0.4, "bone", np.where(features[:, 1] < -0.4, "fat", "muscle"))
    write_store(root / "store", features)
    write_store(root / "weak", np.c_[features[:, :1] * 0.2 + rng.normal(size=(120, 1)), features[:, 1:]])
    labels = write_labels(
        root / "labels.csv",
        {"label": y, "shuffled": shuffled, "tissue": tissue, "patient": [f"p{i // 2}" for i in range(120)]},
    )
    return {"root": root, "store": root / "store", "weak": root / "weak", "labels": labels, "y": y}


# ---- metrics -----------------------------------------------------------------------------------
def test_binary_metrics_match_hand_counts():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.6, 0.6])
    m = cm.binary_metrics(y, p, threshold=0.5)
    # pairs (pos, neg): 0.35 beats 0.1 only; 0.8 beats all three; 0.6 beats 0.1, 0.4 and ties 0.6
    assert m["auroc"] == pytest.approx((1 + 3 + 2.5) / 9)
    # predicted positive at >= 0.5: cases 3, 4, 5 -> TP 2 (3, 5), FP 1 (4), FN 1 (2), TN 2
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1)) and m["balanced_accuracy"] == pytest.approx(2 / 3)
    # descending thresholds: 0.8 (TP 1, P 1), 0.6 (TP 2 of 3 at that step), 0.4, 0.35 (TP 3 of 5)
    assert m["average_precision"] == pytest.approx((1 / 3) * 1 + (1 / 3) * (2 / 3) + (1 / 3) * (3 / 5))
    at_high = cm.binary_metrics(y, p, threshold=0.7)
    assert (
        at_high["sensitivity"] == pytest.approx(1 / 3)
        and at_high["specificity"] == 1.0
        and at_high["sensitivity@0.5"] == pytest.approx(2 / 3)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    p = np.round(rng.random(40) * 0.7 + 0.3 * y, 1)  # rounded: many ties
    m = cm.binary_metrics(y, p, threshold=0.5)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["average_precision"] == pytest.approx(average_precision_score(y, p))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p >= 0.5))
    assert m["f1"] == pytest.approx(f1_score(y, p >= 0.5))
    classes = rng.integers(0, 3, 40)
    proba = rng.dirichlet([1, 1, 1], 40)
    mc = cm.multiclass_metrics(classes, proba)
    assert mc["auroc_ovr"] == pytest.approx(roc_auc_score(classes, proba, multi_class="ovr"))
    assert mc["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(classes, proba.argmax(1)))
    assert mc["f1_macro"] == pytest.approx(f1_score(classes, proba.argmax(1), average="macro"))


@pytest.mark.slow
@pytest.mark.parametrize("grouped", [False, True])
def test_vectorised_bootstrap_equals_stats_bootstrap(grouped):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 150)
    p = rng.random(150) + 0.4 * y
    q = rng.random(150) + 0.2 * y
    groups = np.array([f"g{i // 3:03d}" for i in range(150)]) if grouped else None
    ours = cm.bootstrap_binary(y, p, 0.5, n_resamples=100, seed=7, groups=groups)["auroc"]
    reference = bootstrap_ci(roc_auc_score, y, p, groups=groups, n_resamples=100, seed=7)
    assert (ours.estimate, ours.low, ours.high) == pytest.approx((reference.estimate, reference.low, reference.high))
    paired = cm.paired_bootstrap_metrics(
        lambda w: cm.binary_metrics_weighted(y, p, 0.5, w),
        lambda w: cm.binary_metrics_weighted(y, q, 0.5, w),
        150,
        100,
        7,
        groups,
    )["auroc"]
    reference = paired_bootstrap(roc_auc_score, y, p, q, groups=groups, n_resamples=100, seed=7)
    assert (paired.difference, paired.low, paired.high, paired.p_value) == pytest.approx(
        (reference.difference, reference.low, reference.high, reference.p_value)
    )


def test_youden_threshold_separates_a_separable_score():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    t = cm.youden_threshold(y, p)
    assert 0.3 < t <= 0.7 and cm.binary_metrics(y, p, t)["balanced_accuracy"] == 1.0


# ---- probes on stores ----------------------------------------------------------------------------
@pytest.mark.slow
def test_planted_signal_is_found_and_shuffled_labels_give_chance(planted):
    result = run_probe([str(planted["store"])], str(planted["labels"]), ["label", "shuffled"], cv=4, n_resamples=300)
    real, shuffled = (t["stores"][0]["metrics"]["auroc"] for t in result["targets"])
    assert real["estimate"] > 0.85 and real["low"] > 0.75
    assert shuffled["low"] < 0.5 < shuffled["high"], shuffled
    # the C chosen by inner CV on each training part is one of the 13 grid values
    fits = result["targets"][0]["stores"][0]["fits"]
    assert len(fits) == 4 and all(f["selection"] == "inner-cv" and len(f["inner_scores"]) == 13 for f in fits)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["knn", "mlp"])
def test_other_methods_find_the_planted_signal(planted, method):
    result = run_probe(
        [str(planted["store"])], str(planted["labels"]), ["label"], method=method, cv=2, inner_cv=2, n_resamples=100
    )
    assert result["targets"][0]["stores"][0]["metrics"]["auroc"]["estimate"] > 0.8


@pytest.mark.slow
def test_group_column_prevents_leakage(tmp_path):
    """Each patient's scans sit near one patient vector and the label is random per patient: a
    split that puts one patient on both sides scores almost perfectly, a grouped split at chance."""
    rng = np.random.default_rng(1)
    n_patients, per = 120, 3
    centres = rng.normal(size=(n_patients, 32))
    features = np.repeat(centres, per, axis=0) + 0.01 * rng.normal(size=(n_patients * per, 32))
    patient_label = np.repeat([0, 1], n_patients // 2)
    rng.shuffle(patient_label)
    labels = write_labels(
        tmp_path / "labels.csv",
        {"label": np.repeat(patient_label, per), "patient": np.repeat([f"p{i}" for i in range(n_patients)], per)},
    )
    store = write_store(tmp_path / "store", features)
    leaky = run_probe([str(store)], str(labels), ["label"], method="knn", cv=5, n_resamples=200)
    grouped = run_probe(
        [str(store)], str(labels), ["label"], method="knn", cv=5, group_column="patient", n_resamples=200
    )
    assert leaky["targets"][0]["stores"][0]["metrics"]["auroc"]["estimate"] > 0.95
    honest = grouped["targets"][0]["stores"][0]["metrics"]["auroc"]
    assert honest["low"] < 0.5 < honest["high"], honest
    patients = np.repeat(np.arange(n_patients), per)
    for train, test in outer_folds(np.repeat(patient_label, per), patients, cv=5):
        assert not set(patients[train]) & set(patients[test])


@pytest.mark.slow
def test_join_counts_unmatched_rows_on_both_sides(planted, tmp_path):
    y = planted["y"]
    ids = [f"s{i:04d}" for i in range(10, 120)] + ["ghost1", "ghost2"]  # 10 scans unlabelled, 2 labels without scan
    labels = write_labels(tmp_path / "labels.csv", {"label": list(y[10:]) + [0, 1]}, ids=ids)
    result = run_probe([str(planted["store"])], str(labels), ["label"], cv=3, n_resamples=50)
    join = result["join"][0]
    assert (
        join["store_rows"],
        join["label_rows"],
        join["matched"],
        join["scans_without_label"],
        join["labels_without_scan"],
    ) == (120, 112, 110, 10, 2)
    assert set(join["examples_labels_without_scan"]) == {"ghost1", "ghost2"}


@pytest.mark.slow
@pytest.mark.parametrize("key", ["series_uid", "source_path"])
def test_other_join_keys(planted, tmp_path, key):
    ids = [f"1.2.840.{i}" if key == "series_uid" else f"/archive/s{i:04d}.nii.gz" for i in range(120)]
    labels = write_labels(tmp_path / "labels.csv", {"label": planted["y"]}, key=key, ids=ids)
    result = run_probe([str(planted["store"])], str(labels), ["label"], key=key, cv=3, n_resamples=50)
    assert result["join"][0]["matched"] == 120


@pytest.mark.slow
def test_multiclass_and_multilabel_targets(planted):
    result = run_probe([str(planted["store"])], str(planted["labels"]), ["tissue"], cv=3, n_resamples=100)
    entry = result["targets"][0]
    assert entry["task"] == "multiclass" and entry["classes"] == ["bone", "fat", "muscle"]
    assert entry["stores"][0]["metrics"]["balanced_accuracy"]["estimate"] > 0.6  # dimension 1 decides the tissue
    multi = run_probe(
        [str(planted["store"])], str(planted["labels"]), ["label", "shuffled"], task="multilabel", cv=3, n_resamples=50
    )
    assert [t["task"] for t in multi["targets"]] == ["binary", "binary"]


def test_few_shot_draws_depend_on_labels_and_seed_only():
    y = np.repeat([0, 1, 2], 10)
    first = few_shot_draw(y, 3, np.random.default_rng([0, 1, 2]))
    again = few_shot_draw(y, 3, np.random.default_rng([0, 1, 2]))
    assert np.array_equal(first, again) and np.bincount(y[first]).tolist() == [3, 3, 3]
    assert few_shot_draw(y, 11, np.random.default_rng(0)) is None


@pytest.mark.slow
def test_compare_two_stores_with_few_shot_curves_and_outputs(planted, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "probe",
            str(planted["store"]),
            str(planted["weak"]),
            "--labels",
            str(planted["labels"]),
            "--target",
            "label",
            "--cv",
            "3",
            "--inner-cv",
            "2",
            "--shots",
            "2,5,all",
            "--repeats",
            "2",
            "--resamples",
            "200",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    document = json.loads((out / "results.json").read_text())
    entry = document["targets"][0]
    strong, weak = (s["metrics"]["auroc"]["estimate"] for s in entry["stores"])
    delong = entry["comparisons"][0]["delong_auroc"]
    assert strong > weak and delong["difference"] == pytest.approx(weak - strong) and delong["p_value"] < 0.05
    curve = entry["stores"][0]["few_shot"]["points"]
    assert (
        list(curve) == ["2", "5", "all"]
        and len(curve["2"]["values"]) == 2
        and curve["all"]["mean"] == pytest.approx(strong)
    )
    provenance = document["provenance"]
    assert (
        provenance["labels"]["sha256"]
        and provenance["stores"][0]["weights_sha256"] == "a" * 64
        and provenance["ctfm_version"]
    )
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 120 and {r["label"] for r in rows} == {"0", "1"}
    for name in ("roc_label.png", "pr_label.png", "fewshot_label.png"):
        assert (out / name).stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "<script" not in page and "DeLong" in page


@pytest.mark.slow
def test_a_store_with_several_runs_needs_run_or_where(planted, tmp_path, capsys):
    root = tmp_path / "two_runs"
    rng = np.random.default_rng(0)
    write_store(root, rng.normal(size=(120, 4)))
    write_store(root, rng.normal(size=(120, 4)), run={**RUN, "mode": "patches", "overlap": 0.5})
    assert main(["probe", str(root), "--labels", str(planted["labels"]), "--target", "label", "--cv", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--where" in err and "--run" in err and len(err.splitlines()) == 1
    assert (
        main(
            [
                "probe",
                str(root),
                "--labels",
                str(planted["labels"]),
                "--target",
                "label",
                "--cv",
                "3",
                "--resamples",
                "20",
                "--where",
                "mode=whole",
            ]
        )
        == 0
    )
    capsys.readouterr()
    digest = next(r["digest"] for r in EmbeddingStore(root).runs("scan") if r["mode"] == "patches")
    assert (
        main(
            [
                "probe",
                str(root),
                "--labels",
                str(planted["labels"]),
                "--target",
                "label",
                "--cv",
                "3",
                "--resamples",
                "20",
                "--run",
                digest[:6],
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["provenance"]["stores"][0]["mode"] == "patches"
    assert (
        main(
            [
                "probe",
                str(root),
                "--labels",
                str(planted["labels"]),
                "--target",
                "label",
                "--cv",
                "3",
                "--select",
                "mode=whole",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: --select mode=whole: this option was removed")
        and "--run DIGEST" in err
        and len(err.splitlines()) == 1
    )


# ---- bad input ---------------------------------------------------------------------------------
def _bad(tmp_path, planted, label_columns, *extra, store=None, key="scan_id"):
    labels = (
        write_labels(tmp_path / "labels.csv", label_columns, key=key)
        if label_columns is not None
        else planted["labels"]
    )
    return [
        "probe",
        str(store or planted["store"]),
        "--labels",
        str(labels),
        "--target",
        "label",
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, expected",
    [
        ("no key column", "no column 'scan_id'"),
        ("one class", "has one class"),
        ("non-numeric binary", "not 0 or 1"),
        ("no embeddings", "no embedding"),
        ("not a store", "not an embedding store"),
        ("missing target", "no column 'label'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(planted, tmp_path, capsys, case, expected):
    n = 120
    if case == "no key column":
        argv = _bad(tmp_path, planted, {"label": planted["y"]}, key="patient_id")
    elif case == "one class":
        argv = _bad(tmp_path, planted, {"label": [1] * n})
    elif case == "non-numeric binary":
        argv = _bad(
            tmp_path, planted, {"label": ["abnormal" if v else "normal" for v in planted["y"]]}, "--task", "binary"
        )
    elif case == "no embeddings":
        store = write_store(tmp_path / "empty_vectors", [[] for _ in range(n)])
        argv = _bad(tmp_path, planted, None, store=store)
    elif case == "not a store":
        (tmp_path / "folder").mkdir()
        argv = _bad(tmp_path, planted, None, store=tmp_path / "folder")
    else:
        argv = _bad(tmp_path, planted, {"other": planted["y"]})
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and expected in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_encode_target_rules():
    t = encode_target("x", ["1", "0", "", "1.0", "NA"], "auto")
    assert t.task == "binary" and t.y.tolist() == [1, 0, -1, 1, -1] and t.missing == 2
    m = encode_target("grade", ["10", "2", "2", "1"], "auto")
    assert m.task == "multiclass" and m.classes == ["1", "2", "10"]


def test_label_sheets_in_every_table_format_join_alike(planted, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctfm.io import read_table

    table = read_table(planted["labels"])
    pq.write_table(
        table.set_column(
            table.column_names.index("label"), "label", pa.array([int(v) for v in table.column("label").to_pylist()])
        ),
        tmp_path / "labels.parquet",
    )
    (tmp_path / "labels.tsv").write_text(
        "\n".join(
            "\t".join(row)
            for row in [table.column_names, *zip(*[table.column(c).to_pylist() for c in table.column_names])]
        )
        + "\n"
    )
    results = [
        run_probe([str(planted["store"])], str(path), ["label"], cv=3, n_resamples=20)
        for path in (planted["labels"], tmp_path / "labels.parquet", tmp_path / "labels.tsv")
    ]
    assert [r["join"][0]["matched"] for r in results] == [120, 120, 120]
    aurocs = [r["targets"][0]["stores"][0]["metrics"]["auroc"]["estimate"] for r in results]
    assert aurocs[0] == aurocs[1] == aurocs[2] and aurocs[0] > 0.9
