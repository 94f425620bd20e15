"""`ctfm models`: list, init, convert, download (offline), exit codes and messages."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ctfm.cli import main
from ctfm.io.hashing import file_sha256
from ctfm.models import create_model, init_model
from ctfm.models.weights import SIDECAR_NAME, WEIGHTS_NAME


def init(folder, seed=3, *extra) -> int:
    return main(["models", "init", "ct-fm", "--seed", str(seed), "--out", str(folder), "--init-filters", "4", *extra])


def test_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "77,760,992" in out and "project-lighter/ct_fm_feature_extractor" in out and "ct-fm-patches" in out
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert (
        rows["ct-fm"]["params"] == 77_760_992 and rows["ct-fm-segresnet"]["hub_id"] == "project-lighter/ct_fm_segresnet"
    )


def test_init_is_reproducible_and_loads(tmp_path, capsys):
    assert init(tmp_path / "a") == 0
    assert str(tmp_path / "a") in capsys.readouterr().out
    assert init(tmp_path / "b") == 0 and init(tmp_path / "c", 4) == 0
    sha = {d: file_sha256(tmp_path / d / WEIGHTS_NAME) for d in "abc"}
    assert sha["a"] == sha["b"] != sha["c"]
    sidecar = json.loads((tmp_path / "a" / SIDECAR_NAME).read_text())
    assert (
        sidecar["provenance"]["seed"] == 3
        and sidecar["provenance"]["source"] == "random-init"
        and sidecar["weights"]["sha256"] == sha["a"]
    )
    model = create_model("ct-fm", init_filters=4, weights=tmp_path / "a")
    assert model.weights_info.sha256 == sha["a"]


def test_init_refuses_a_non_empty_folder_unless_overwrite(tmp_path, capsys):
    assert init(tmp_path / "a") == 0
    capsys.readouterr()
    assert init(tmp_path / "a", 5) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and err.count("\n") == 1
    assert init(tmp_path / "a", 5, "--overwrite") == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["models", "init", "no-such-model", "--out", "x"], "unknown model 'no-such-model'"),
        (
            ["models", "init", "ct-fm", "--out", "x", "--init-filters", "0"],
            "--init-filters 0: expected a whole number >= 1",
        ),
        (
            ["models", "init", "ct-fm", "--out", "x", "--out-channels", "3"],
            "--out-channels applies to segmentation models",
        ),
        (
            ["models", "convert", "project-lighter/ct_fm_feature_extractor", "--out", "x"],
            "hf-hub:project-lighter/ct_fm_feature_extractor",
        ),
    ],
)
def test_bad_input_exits_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_convert_checkpoint_writes_a_loadable_folder(tmp_path, capsys):
    source = init_model("ct-fm", 8, init_filters=4)
    ckpt = tmp_path / "epoch=449-step=225000-v1.ckpt"
    state = {f"model.backbone.{k}": v for k, v in source.state_dict().items()} | {
        "model.projection_head.layers.0.weight": torch.zeros(8, 64)
    }
    torch.save({"state_dict": state, "epoch": 449, "global_step": 225000}, ckpt)

    out = tmp_path / "converted"
    assert main(["models", "convert", str(ckpt), "--model", "ct-fm", "--out", str(out), "--init-filters", "4"]) == 0
    assert "1 keys ignored" in capsys.readouterr().out
    model = create_model("ct-fm", init_filters=4, weights=out)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values(), strict=True)
    )
    provenance = json.loads((out / SIDECAR_NAME).read_text())["provenance"]
    assert provenance["converted_from"] == ckpt.name and provenance["converted_from_sha256"] == file_sha256(ckpt)
    assert provenance["epoch"] == 449 and provenance["ignored_keys"] == 1

    seg_out = tmp_path / "seg"
    assert (
        main(
            [
                "models",
                "convert",
                str(ckpt),
                "--model",
                "ct-fm-segresnet",
                "--out",
                str(seg_out),
                "--init-filters",
                "4",
                "--out-channels",
                "3",
            ]
        )
        == 0
    )
    seg = create_model("ct-fm-segresnet", init_filters=4, out_channels=3, weights=seg_out)
    assert (
        seg.weights_info.loaded_into == "model"
        and json.loads((seg_out / SIDECAR_NAME).read_text())["provenance"]["loaded_into"] == "encoder"
    )
    assert torch.equal(seg.encoder.conv_init.weight, source.conv_init.weight)


def test_convert_mismatch_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "wide.pt"
    torch.save(init_model("ct-fm", 0, init_filters=8).state_dict(), ckpt)
    assert main(["models", "convert", str(ckpt), "--out", str(tmp_path / "out"), "--init-filters", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ckpt}: weights do not fit the CTEncoder") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_download_offline_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["models", "download", "project-lighter/ct_fm_feature_extractor"]) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE is set" in err and "network" in err and err.count("\n") == 1


def test_download_to_a_folder(tmp_path, monkeypatch, capsys):
    """The download path with snapshot_download stubbed (no network here): ORG/NAME, names, --out."""
    import huggingface_hub

    published = tmp_path / "published"
    assert init(published) == 0
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, cache_dir=None, local_dir=None, **kwargs):
        calls.append((repo_id, revision, sorted(allow_patterns)))
        shutil.copytree(published, local_dir)
        return local_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert main(["models", "download", "ct-fm", "--out", str(tmp_path / "dl")]) == 0
    assert main(["models", "download", "hf-hub:org/name@v2", "--out", str(tmp_path / "dl2")]) == 0
    assert calls[0] == (
        "project-lighter/ct_fm_feature_extractor",
        None,
        ["config.json", "ctfm.json", "model.safetensors"],
    )
    assert calls[1][:2] == ("org/name", "v2")
    assert file_sha256(published / WEIGHTS_NAME) in capsys.readouterr().out
    assert create_model("ct-fm", init_filters=4, weights=tmp_path / "dl").weights_info.format == "folder"
