"""ctfm finetune seg: tiny runs on phantoms, deterministic samples, data adapters, bad inputs."""

from __future__ import annotations

import csv
import json

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch

from ctfm.errors import CTInputError, OptionError
from ctfm.synth import make_phantom, write_phantom

CLASSES = ["liver", "spleen", "kidney_left", "kidney_right"]


@pytest.fixture(scope="module")
def phantom_manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    rows = []
    for seed in range(3):
        image, label = write_phantom(
            make_phantom(seed=seed, shape=(40, 32, 36), spacing_mm=(6.0, 6.0, 6.0)), folder, stem=f"p{seed}"
        )
        rows.append({"image": image.name, "label": label.name, "split": "val" if seed == 2 else "train"})
    manifest = folder / "cases.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


class Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"].detach()))


@pytest.mark.slow
def test_tiny_run_learns_validates_and_exports(phantom_manifest, tmp_path):
    from ctfm.finetune.seg import finetune_seg, resolve_seg_config
    from ctfm.models.segmentation import load_segmentation_model

    config = resolve_seg_config(
        "tiny",
        None,
        {"data": str(phantom_manifest), "out": str(tmp_path / "run"), "classes": CLASSES, "val_fraction": 0.0},
    )
    losses = Losses()
    export = finetune_seg(config, extra_callbacks=[losses], progress_bar=False)
    assert len(losses.losses) == 12 and np.mean(losses.losses[-4:]) < np.mean(losses.losses[:4])
    run = tmp_path / "run"
    assert {"best.ckpt", "last.ckpt"} <= {p.name for p in (run / "checkpoints").iterdir()}
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "val/macro_dice" in header and "val/dice/liver" in header
    model, labels, spec, info = load_segmentation_model(str(run))  # the run folder resolves to its export
    assert labels == {0: "background", 1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right"}
    assert spec.spacing_mm == (4.0, 4.0, 4.0) and info["kind"] == "segmentation"
    sidecar = json.loads((export / "ctfm.json").read_text())
    assert sidecar["provenance"]["checkpoint"] == "best.ckpt" and sidecar["inference"]["roi_size"] == [32, 32, 32]


@pytest.mark.slow
def test_samples_are_functions_of_seed_epoch_index_and_crops_centre_on_foreground(phantom_manifest, tmp_path):
    from ctfm.finetune.data import open_seg_data
    from ctfm.finetune.seg import PreprocessedCases, SegTrainDataset, resolve_seg_config, training_spec

    config = resolve_seg_config("tiny", None, {"data": str(phantom_manifest), "out": str(tmp_path), "classes": CLASSES})
    data = open_seg_data(config.data).select(CLASSES)
    cases = PreprocessedCases(data.split("train"), data, training_spec(config), tmp_path / "cache")
    dataset = SegTrainDataset(cases, config, len(data.classes))
    a, b, c = dataset[(1, 3)], dataset[(1, 3)], dataset[(2, 3)]
    assert a["image"].shape == (1, 32, 32, 32) and a["label"].dtype == torch.int64
    torch.testing.assert_close(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])
    centre = [s // 2 for s in a["label"].shape[1:]]
    foreground = sum(int(dataset[(e, 0)]["label"][0, centre[0], centre[1], centre[2]] > 0) for e in range(6))
    assert foreground >= 4  # centred on a foreground class (affine augmentation may move it)


def test_paired_transforms_give_the_image_chain_exactly(phantom_manifest):
    from ctfm.finetune.data import load_case, open_seg_data
    from ctfm.finetune.seg import resolve_seg_config, training_spec
    from ctfm.preprocess import build_paired_transforms, build_transforms

    spec = training_spec(resolve_seg_config("tiny", None, {"data": str(phantom_manifest)}))
    data = open_seg_data(phantom_manifest).select(CLASSES)
    image, label = load_case(data.cases[0], data)
    paired = build_paired_transforms(spec)({"image": image.float(), "label": label.float()})
    torch.testing.assert_close(paired["image"].as_tensor(), build_transforms(spec)(image.float()).as_tensor())
    assert paired["label"].shape == paired["image"].shape and set(torch.unique(paired["label"]).tolist()) <= {
        0,
        1,
        2,
        3,
        4,
    }


def _nifti(array, path, affine=None):
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine), str(path))


def test_totalsegmentator_folder_combines_masks_and_reads_splits(tmp_path):
    from ctfm.finetune.data import load_case, open_seg_data

    rows = ["image_id;split;vista_split"]
    for i, split in enumerate(["train", "test"]):
        subject = tmp_path / f"s{i:04d}"
        (subject / "segmentations").mkdir(parents=True)
        ct = np.full((8, 8, 6), -500, np.int16)
        ct[..., 0] = -1000  # a usable CT: a blank one is refused
        _nifti(ct, subject / "ct.nii.gz")
        liver, spleen = np.zeros((8, 8, 6), np.uint8), np.zeros((8, 8, 6), np.uint8)
        liver[1:4, 1:4, 1:3] = 1
        spleen[5:7, 5:7, 2:4] = 1
        _nifti(liver, subject / "segmentations" / "liver.nii.gz")
        _nifti(spleen, subject / "segmentations" / "spleen.nii.gz")
        rows.append(f"s{i:04d};{split};{'val' if i else 'train'}")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    class_map = {0: "background", 1: "liver", 2: "spleen", 3: "heart"}
    data = open_seg_data(tmp_path, class_map=class_map, split_column="vista_split").select(["spleen", "liver"])
    assert [c.split for c in data.cases] == ["train", "val"]
    _, label = load_case(data.cases[0], data)
    values = label.numpy()[0]
    assert (values == 2).sum() == 18 and (values == 1).sum() == 8  # channel order follows `classes`
    with pytest.raises(CTInputError, match="missing mask of class 'heart'"):
        load_case(
            data.cases[0], open_seg_data(tmp_path, class_map=class_map, split_column="vista_split").select(["heart"])
        )
    with pytest.raises(CTInputError, match="lacks split column 'fold'"):
        open_seg_data(tmp_path, class_map=class_map, split_column="fold")


def test_msd_folder_folds_and_few_shot(tmp_path):
    from ctfm.finetune.data import few_shot, open_seg_data

    (tmp_path / "imagesTr").mkdir()
    entries = [
        {"image": f"./imagesTr/lung_{i:03d}.nii.gz", "label": f"./labelsTr/lung_{i:03d}.nii.gz", "fold": i % 5}
        for i in range(10)
    ]
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "cancer"},
                "training": entries,
                "testing": ["./imagesTs/lung_100.nii.gz"],
            }
        )
    )
    data = open_seg_data(tmp_path)
    assert data.kind == "msd" and data.source_labels == {0: "background", 1: "cancer"}
    assert [c.name for c in data.split("val")] == ["lung_004", "lung_009"] and len(data.split("test")) == 1
    train = data.split("train")
    assert [c.name for c in few_shot(train, 25)] == ["lung_000", "lung_001"]  # the first round(8 * 0.25) cases
    assert len(few_shot(train, 1)) == 1
    with pytest.raises(OptionError, match="percentage"):
        few_shot(train, 0)


def test_bad_labels_are_refused_in_one_line(tmp_path, capsys):
    from ctfm.cli import main

    image = np.full((10, 10, 6), -300, np.int16)
    image[0] = -1000  # a usable CT (a blank one is refused before its labels are read)
    _nifti(image, tmp_path / "ct.nii.gz")
    _nifti(np.zeros((10, 10, 5), np.uint8), tmp_path / "short.nii.gz")  # another grid
    outside = np.zeros((10, 10, 6), np.uint8)
    outside[2, 2, 2] = 9
    _nifti(outside, tmp_path / "outside.nii.gz")
    (tmp_path / "map.json").write_text(json.dumps({"0": "background", "1": "liver"}))
    for label, message in (
        ("short.nii.gz", "label map on another grid than its image"),
        ("outside.nii.gz", "label values 9 are not in the class map"),
    ):
        (tmp_path / "m.csv").write_text(f"image,label\nct.nii.gz,{label}\n")
        code = main(
            [
                "finetune",
                "seg",
                "--preset",
                "tiny",
                "--set",
                f"data={tmp_path / 'm.csv'}",
                "--set",
                f"out={tmp_path / 'run'}",
                "--set",
                f"class_map={tmp_path / 'map.json'}",
                "--set",
                "val_fraction=0",
            ]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    code = main(["finetune", "seg", "--preset", "tiny", "--set", "pach_size=[8,8,8]"])
    assert code == 2 and "unknown config keys ['pach_size']" in capsys.readouterr().err


@pytest.mark.slow
def test_frozen_encoder_keeps_its_weights(phantom_manifest, tmp_path):
    from ctfm.finetune.seg import SegmentationTask, resolve_seg_config

    config = resolve_seg_config(
        "tiny",
        None,
        {
            "data": str(phantom_manifest),
            "out": str(tmp_path / "frozen"),
            "classes": CLASSES,
            "freeze": ["encoder"],
            "max_epochs": 1,
            "steps_per_epoch": 2,
            "val_every_n_epochs": 0,
        },
    )
    task = SegmentationTask()
    module = task.build_module(config)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    from ctfm.finetune.run import run_finetune

    run_finetune(config, task, progress_bar=False)
    after = torch.load(tmp_path / "frozen" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(
        torch.equal(before[k], after[f"model.{k}"])
        for k in before
        if k.startswith("encoder.") and "running" not in k and "num_batches" not in k
    )
    assert any(not torch.equal(before[k], after[f"model.{k}"]) for k in before if k.startswith("up_layers."))


def test_a_checkpoint_with_the_old_optimizer_keys_loads(tmp_path):
    """Checkpoints written before modules took one OptimizerConfig (lr, weight_decay, ... as keys) still load."""
    from ctfm.finetune.seg import SegmentationTask
    from ctfm.finetune.seg_module import SegmentationFinetuner
    from ctfm.runs import OptimizerConfig

    module = SegmentationFinetuner(class_names=["background", "liver"], model_kwargs={"init_filters": 4})
    old_hyper = {key: value for key, value in module.hparams.items() if key != "optimizer"}
    old_hyper.update(lr=2e-4, weight_decay=1e-5, warmup_epochs=3, max_epochs=300, end_lr=2e-6, warmup_multiplier=0.1)
    checkpoint = {"hyper_parameters": old_hyper, "state_dict": module.state_dict(), "epoch": 4, "global_step": 40}
    torch.save(checkpoint, tmp_path / "best.ckpt")
    loaded, state = SegmentationTask().load_module(tmp_path / "best.ckpt")
    assert OptimizerConfig.of(loaded.hparams.optimizer) == OptimizerConfig(2e-4, 1e-5, 3, 300, 2e-6, 0.1)
    assert state["epoch"] == 4
    for key, value in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


# --------------------------------------------------------------------------- label maps without names


def _unnamed_manifest(tmp_path, masks: dict[str, np.ndarray]):
    image = np.full((10, 10, 6), -300, np.int16)
    image[0] = -1000  # a usable CT (a blank one is refused before its labels are read)
    _nifti(image, tmp_path / "ct.nii.gz")
    rows = ["name,image,label"]
    for name, mask in masks.items():
        _nifti(mask, tmp_path / f"{name}.nii.gz")
        rows.append(f"{name},ct.nii.gz,{name}.nii.gz")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "m.csv"


def test_unnamed_label_maps_give_a_class_per_value_found(tmp_path):
    from ctfm.finetune.data import load_case, open_seg_data
    from ctfm.io.labels import UnnamedLabelsWarning

    a = np.zeros((10, 10, 6), np.uint8)
    a[2:5, 2:5, 1:4] = 1
    b = a.copy()
    b[6:9, 6:9, 1:4] = 2  # value 2 only in this case: still a class
    manifest = _unnamed_manifest(tmp_path, {"a": a, "b": b})
    with pytest.warns(UnnamedLabelsWarning, match=r"training on 2 class\(es\) called label_1, label_2 .*class_map"):
        data = open_seg_data(manifest)
    assert data.source_labels == {0: "background", 1: "label_1", 2: "label_2"}
    data = data.select([])
    assert data.classes == {0: "background", 1: "label_1", 2: "label_2"}
    assert set(np.unique(load_case(data.cases[1], data)[1].numpy()).tolist()) == {0, 1, 2}
    # a class map still names them, with no notice
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        named = open_seg_data(manifest, class_map="tumour,node")
        gaps = open_seg_data(manifest, class_map={"2": "node", "1": "tumour"})
    assert named.source_labels == gaps.source_labels == {0: "background", 1: "tumour", 2: "node"}
    assert open_seg_data(manifest, class_map={"0": "background", "2": "node"}).select([]).value_map == {0: 0, 2: 1}


def test_unusable_unnamed_label_maps_are_refused_in_one_line(tmp_path, run_cli):
    soft = np.zeros((10, 10, 6), np.float32)
    soft[2:5, 2:5, 1:4] = 0.5  # a probability map, not labels
    for masks, message in (
        ({"soft": soft}, "soft.nii.gz: label map holds non-integer values, e.g. 0.5"),
        ({"empty": np.zeros((10, 10, 6), np.uint8)}, "the 1 label map(s) hold no labelled voxel"),
    ):
        manifest = _unnamed_manifest(tmp_path, masks)
        code, _, err = run_cli(
            "finetune", "seg", "--preset", "tiny", "--set", f"data={manifest}", "--set", f"out={tmp_path / 'run'}"
        )
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
        assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.realdata
def test_tiny_run_on_unnamed_binary_masks_exports_label_1(tmp_path, run_cli):
    from conftest import data_path

    sarcoma = data_path("sarcoma_ct")
    manifest = tmp_path / "sarcoma.csv"
    manifest.write_text(
        "name,image,label\n"
        + "".join(
            f"{c},{sarcoma / c / 'CT_image.nii.gz'},{sarcoma / c / 'CT_mask.nii.gz'}\n" for c in ("STS_019", "STS_025")
        )
    )
    run = tmp_path / "run"
    code, out, err = run_cli(
        "finetune", "seg", "--preset", "tiny", "--set", f"data={manifest}", "--set", f"out={run}",
        "--set", "max_epochs=1", "--set", "steps_per_epoch=2", "--set", "val_fraction=0",
    )  # fmt: skip
    assert code == 0, err
    notice = [line for line in err.splitlines() if "name no classes" in line]
    assert notice == [
        f"warning: {manifest}: the label maps name no classes; training on 1 class(es) called label_1 (name them "
        'with --set class_map=FILE.json holding {"0": "background", "1": "tumour"})'
    ]
    sidecar = json.loads((run / "export" / "ctfm.json").read_text())
    assert sidecar["labels"] == {"0": "background", "1": "label_1"}

    # the prediction's metadata names the class as the training labels did
    scan = sarcoma / "STS_019" / "CT_image.nii.gz"
    code, _, err = run_cli(
        "predict", "seg", scan, "--model", run, "-o", tmp_path / "pred", "--statistics", "--no-progress",
        "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    labels_json = json.loads((tmp_path / "pred" / "CT_image.labels.json").read_text())
    assert labels_json["labels"] == {"0": "background", "1": "label_1"}
    statistics = json.loads((tmp_path / "pred" / "CT_image.statistics.json").read_text())
    assert [row["name"] for row in statistics["classes"]] == ["label_1"]

    # and it scores against the unnamed truth with no class map: label_1 on both sides
    (tmp_path / "pred" / "CT_image.nii.gz").rename(tmp_path / "pred" / "CT_mask.nii.gz")
    (tmp_path / "pred" / "CT_image.labels.json").rename(tmp_path / "pred" / "CT_mask.labels.json")
    truth = sarcoma / "STS_019" / "CT_mask.nii.gz"
    code, out, err = run_cli("evaluate", "seg", "--pred", tmp_path / "pred", "--truth", truth, "--resamples", "20")
    assert code == 0, err
    assert "1 case(s) scored, 0 failed" in out and any(line.startswith("label_1 ") for line in out.splitlines())
