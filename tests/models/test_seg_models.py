"""ct-fm-segresnet from every weights source, label names in ctfm.json, the TotalSegmentator v2 map."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ctfm.cli import main
from ctfm.errors import CTInputError, OptionError
from ctfm.models import init_model, save_pretrained
from ctfm.models.labelmaps import BUILTIN_LABELS, resolve_labels, select_classes
from ctfm.models.segmentation import load_segmentation_model, save_segmentation_model

FILTERS = 4


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_totalseg_v2_map():
    m = BUILTIN_LABELS["totalseg-v2"]
    assert len(m) == 118 and m[0] == "background"
    assert (m[5], m[26], m[33], m[51], m[52], m[116], m[117]) == (
        "liver",
        "vertebrae_S1",
        "vertebrae_T11",
        "heart",
        "aorta",
        "sternum",
        "costal_cartilages",
    )
    assert select_classes(m, "liver,spleen") == [5, 1]


def test_label_specs(tmp_path):
    assert resolve_labels("liver,spleen") == {0: "background", 1: "liver", 2: "spleen"}
    (tmp_path / "m.json").write_text(json.dumps({"0": "background", "1": "tumour"}))
    assert resolve_labels(tmp_path / "m.json")[1] == "tumour"
    (tmp_path / "gap.json").write_text(json.dumps({"0": "background", "2": "tumour"}))
    with pytest.raises(CTInputError, match="without gaps"):
        resolve_labels(tmp_path / "gap.json")
    with pytest.raises(CTInputError, match="unique"):
        resolve_labels("liver,liver")


def test_folder_round_trip_keeps_labels(tmp_path):
    model, labels, spec, info = load_segmentation_model(None, labels="liver,spleen", init_filters=FILTERS, seed=3)
    folder = save_segmentation_model(model, tmp_path / "seg", labels, spec=spec, provenance={"source": "test"})
    sidecar = json.loads((folder / "ctfm.json").read_text())
    assert (
        sidecar["labels"] == {"0": "background", "1": "liver", "2": "spleen"}
        and sidecar["inference"]["overlap"] == 0.625
    )
    again = load_segmentation_model(folder)
    assert again.labels == labels and again.info["kind"] == "segmentation" and again.info["labels_source"] == "weights"
    assert _same(model, again.model)
    # a run folder: its export/ weights folder
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CTInputError, match="run folder without export"):
        load_segmentation_model(tmp_path / "run")
    shutil.copytree(folder, tmp_path / "run" / "export")
    assert _same(load_segmentation_model(tmp_path / "run").model, model)


def test_encoder_sources_load_into_encoder(tmp_path):
    encoder = init_model("ct-fm", 1, init_filters=FILTERS)
    save_pretrained(encoder, tmp_path / "enc")
    seg = load_segmentation_model(tmp_path / "enc", labels="totalseg-v2", seed=5)
    assert (
        seg.model.out_channels == 118
        and seg.info["kind"] == "encoder"
        and seg.model.weights_info.loaded_into == "encoder"
    )
    assert _same(seg.model.encoder, encoder)
    assert _same(
        load_segmentation_model(tmp_path / "enc", labels="totalseg-v2", seed=5).model, seg.model
    )  # decoder from the seed
    with pytest.raises(CTInputError, match="encoder weights only"):
        load_segmentation_model(tmp_path / "enc")
    ckpt = tmp_path / "epoch=1.ckpt"
    state = {"model.backbone." + k: v for k, v in encoder.state_dict().items()}
    state["model.projection_head.0.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": state, "epoch": 1}, ckpt)
    from_ckpt = load_segmentation_model(ckpt, out_channels=3)
    assert _same(from_ckpt.model.encoder, encoder) and from_ckpt.labels[2] == "class_2"


def test_full_checkpoint_and_wrong_class_count(tmp_path):
    model, labels, _, _ = load_segmentation_model(None, out_channels=4, init_filters=FILTERS)
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()}}, tmp_path / "seg.ckpt")
    loaded = load_segmentation_model(tmp_path / "seg.ckpt")
    assert loaded.model.out_channels == 4 and _same(loaded.model, model)
    with pytest.raises(CTInputError, match="4 output channels but the class map given has 118"):
        load_segmentation_model(tmp_path / "seg.ckpt", labels="totalseg-v2")
    with pytest.raises(OptionError):
        load_segmentation_model(None, labels="a,b", out_channels=5)


def test_cli_init_byte_identical_per_seed(tmp_path, capsys):
    def init(out, seed, *extra):
        assert (
            main(
                [
                    "models",
                    "init",
                    "ct-fm-segresnet",
                    "--seed",
                    str(seed),
                    "--init-filters",
                    str(FILTERS),
                    "--out",
                    str(out),
                    *extra,
                ]
            )
            == 0
        )
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    a = init(tmp_path / "a", 7, "--out-channels", "3")
    assert a == init(tmp_path / "b", 7, "--out-channels", "3")
    assert a["model.safetensors"] != init(tmp_path / "c", 8, "--out-channels", "3")["model.safetensors"]
    named = init(tmp_path / "d", 7, "--labels", "liver,spleen")
    assert named["model.safetensors"] == a["model.safetensors"]
    assert json.loads(named["ctfm.json"])["labels"]["2"] == "spleen"
    assert (
        main(
            [
                "models",
                "init",
                "ct-fm-segresnet",
                "--out-channels",
                "5",
                "--labels",
                "liver",
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 2
    )
    assert "disagrees with --labels" in capsys.readouterr().err
