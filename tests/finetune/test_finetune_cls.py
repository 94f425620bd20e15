"""Classification fine-tuning (`ctfm finetune cls`) and prediction (`ctfm predict cls`): the
head-ct input against CT-FM's reference chain, the reference split and percentages, a few steps
of the tiny preset end to end, multi-label heads, one-line errors."""

from __future__ import annotations

import csv
import json
import random
import warnings

import numpy as np
import pytest
import torch

from conftest import data_path
from ctfm.cli import main
from ctfm.finetune.cls import input_channels, input_spec, preprocess_input, reference_split, resolve_cls_config
from ctfm.models.classifier import CTClassifier, load_classifier
from ctfm.synth import make_phantom, write_phantom
from reference_chains import head_ct


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls_phantoms")
    paths = [
        write_phantom(
            make_phantom(seed, shape=(40, 32, 24), spacing_mm=(3.0, 3.0, 3.0)), root / "scans", stem=f"p{seed}"
        )[0]
        for seed in range(6)
    ]
    return {"root": root, "paths": paths}


def _manifest(path, rows, header):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("layout", ["stack", "channels"])
def test_head_ct_input_is_the_reference_chain(layout):
    """The head-ct preset as `finetune cls` builds it: [1, 192, 128, 128], equal to CT-FM's chain
    (four windows concatenated along the first spatial axis); the channel layout holds the same
    voxels as [4, 48, 128, 128]."""
    from ctfm.io import load_ct

    path = data_path("head_tilt_dicom/dicom")
    config = resolve_cls_config("head-ct", overrides={"window_layout": layout})
    spec = input_spec(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = preprocess_input(str(path), spec)
        reference = np.asarray(head_ct(load_ct(path)[0]))
    assert reference.shape == (1, 192, 128, 128)
    if layout == "stack":
        assert ours.shape == (1, 192, 128, 128) and input_channels(spec) == 1
        np.testing.assert_allclose(ours, reference, atol=1e-5)
    else:
        assert ours.shape == (4, 48, 128, 128) and input_channels(spec) == 4
        np.testing.assert_allclose(ours, reference.reshape(4, 48, 128, 128), atol=1e-5)


def test_reference_split_and_percentages():
    units = [f"patient{i:02d}" for i in range(20)]
    split = reference_split(list(reversed(units)), [0.8, 0.1, 0.1], seed=0)
    expected = sorted(units)
    random.seed(0)
    random.shuffle(expected)
    assert [u for u in expected if split[u] == "train"] == expected[:16] and [
        u for u in expected if split[u] == "test"
    ] == expected[18:]
    from ctfm.finetune.cls import few_shot_cases

    assert few_shot_cases(list(range(100)), 10) == list(range(10)) and few_shot_cases(list(range(30)), 2) == [0]


def test_head_ct_preset_is_the_recipe():
    config = resolve_cls_config("head-ct")
    assert (
        config.max_epochs,
        config.lr,
        config.weight_decay,
        config.batch_size,
        config.devices,
        config.strategy,
        config.head_hidden,
    ) == (40, 1e-4, 1e-5, 16, 4, "ddp", 256)
    assert (
        config.warmup_epochs,
        config.end_lr,
        config.warmup_multiplier,
        config.val_every_n_epochs,
        config.precision,
    ) == (0, 1e-6, 0.1, 1, "16-mixed")
    model = CTClassifier(n_outputs=1, head_hidden=256)
    assert [type(m).__name__ for m in model.head] == ["AdaptiveAvgPool3d", "Flatten", "Linear", "ReLU", "Linear"]
    assert (model.head[2].in_features, model.head[2].out_features, model.head[4].out_features) == (512, 256, 1)


@pytest.mark.slow
def test_tiny_finetune_and_predict_end_to_end(phantoms, tmp_path, capsys):
    paths = phantoms["paths"]
    manifest = _manifest(
        tmp_path / "cases.csv",
        [[p, i % 2, "train" if i < 4 else "val"] for i, p in enumerate(paths)],
        ["path", "abnormal", "split"],
    )
    run = tmp_path / "run"
    assert main(["finetune", "cls", "--preset", "tiny", "--set", f"data={manifest}", "--set", f"out={run}"]) == 0
    assert (
        (run / "config.yaml").is_file()
        and (run / "checkpoints" / "last.ckpt").is_file()
        and (run / "checkpoints" / "best.ckpt").is_file()
    )
    with open(run / "metrics.csv") as fh:
        logged = [r for r in csv.DictReader(fh) if r.get("val/auroc")]
    assert len(logged) == 2 and all(0.0 <= float(r["val/auroc"]) <= 1.0 for r in logged)
    model, meta = load_classifier(run)
    assert (
        meta["task"] == "binary" and meta["labels"] == ["abnormal"] and meta["provenance"]["checkpoint"] == "best.ckpt"
    )
    assert tuple(model(torch.zeros(1, 1, 64, 32, 32)).shape) == (1, 1)
    preds = tmp_path / "preds.csv"
    capsys.readouterr()
    assert main(["predict", "cls", *map(str, paths), "--model", str(run), "-o", str(preds), "--no-progress"]) == 0
    with open(preds) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and all(0.0 <= float(r["p_abnormal"]) <= 1.0 and not r["error"] for r in rows)
    provenance = json.loads((tmp_path / "preds.csv.json").read_text())
    assert provenance["weights_sha256"] and provenance["preset_hash"] and provenance["ctfm_version"]
    # the exported trunk is an ordinary encoder folder: the probabilities are reproducible
    again = tmp_path / "again.csv"
    assert (
        main(["predict", "cls", str(paths[0]), "--model", str(run / "export"), "-o", str(again), "--no-progress"]) == 0
    )
    with open(again) as fh:
        first = next(csv.DictReader(fh))
    assert first["p_abnormal"] == next(r for r in rows if r["path"] == str(paths[0]))["p_abnormal"]


@pytest.mark.slow
def test_multilabel_and_multiclass_heads(phantoms, tmp_path):
    from ctfm.finetune.cls import finetune_cls

    paths = phantoms["paths"]
    rows = [
        [p, i % 2, (i // 2) % 2, ["low", "mid", "high"][i % 3], "train" if i < 4 else "val"]
        for i, p in enumerate(paths)
    ]
    manifest = _manifest(tmp_path / "cases.csv", rows, ["path", "bleed", "fracture", "grade", "split"])
    for labels, task, n_outputs in ((["bleed", "fracture"], "multilabel", 2), (["grade"], "multiclass", 3)):
        config = resolve_cls_config(
            "tiny",
            overrides={
                "data": str(manifest),
                "out": str(tmp_path / task),
                "labels": labels,
                "max_epochs": 1,
                "steps_per_epoch": 1,
            },
        )
        export = finetune_cls(config, progress_bar=False)
        model, meta = load_classifier(export)
        assert meta["task"] == task and model.arch["n_outputs"] == n_outputs
    assert meta["labels"] == ["high", "low", "mid"]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no path column", "no 'path' column"),
        ("non-binary label", "not 0 or 1"),
        ("no data", "data: give the manifest"),
    ],
)
def test_bad_manifests_are_one_line_errors(phantoms, tmp_path, capsys, case, expected):
    paths = phantoms["paths"]
    if case == "no path column":
        manifest = _manifest(tmp_path / "m.csv", [[p, 1] for p in paths], ["image", "abnormal"])
    else:
        manifest = _manifest(
            tmp_path / "m.csv", [[p, "yes" if i % 2 else "no"] for i, p in enumerate(paths)], ["path", "abnormal"]
        )
    sets = [] if case == "no data" else ["--set", f"data={manifest}"]
    task = ["--set", "task=binary"] if case == "non-binary label" else []
    assert main(["finetune", "cls", "--preset", "tiny", *sets, *task, "--set", f"out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and expected in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_predict_records_unreadable_inputs_and_exits_1(phantoms, tmp_path, capsys):
    from ctfm.finetune.cls import finetune_cls

    paths = phantoms["paths"]
    manifest = _manifest(
        tmp_path / "cases.csv",
        [[p, i % 2, "train" if i < 4 else "val"] for i, p in enumerate(paths)],
        ["path", "abnormal", "split"],
    )
    export = finetune_cls(
        resolve_cls_config(
            "tiny",
            overrides={"data": str(manifest), "out": str(tmp_path / "run"), "max_epochs": 1, "steps_per_epoch": 1},
        ),
        progress_bar=False,
    )
    label_map = paths[0].with_name(paths[0].name.replace(".nii.gz", "_labels.nii.gz"))
    preds = tmp_path / "preds.csv"
    capsys.readouterr()
    assert (
        main(
            ["predict", "cls", str(paths[1]), str(label_map), "--model", str(export), "-o", str(preds), "--no-progress"]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not HU" in err[0]
    with open(preds) as fh:
        rows = list(csv.DictReader(fh))
    assert [bool(r["error"]) for r in rows] == [False, True] and rows[1]["p_abnormal"] == ""
