"""Weights: the published layout, lighter-zoo compatibility, sources, strict loading, conversion.

Everything runs on narrow encoders (init_filters=4, ~1.2 M parameters, 4.9 MB files) written
into tmp_path; the Hugging Face cache is built by hand, offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import torch
from huggingface_hub import PyTorchModelHubMixin
from monai.networks.nets.segresnet_ds import SegResEncoder
from safetensors.torch import load_file, save_file

from ctfm.errors import CTInputError
from ctfm.io.hashing import file_sha256
from ctfm.models import create_model, init_model, load_weights, resolve_weights, save_pretrained
from ctfm.models.weights import (
    CONFIG_NAME,
    SIDECAR_NAME,
    WEIGHTS_NAME,
    convert_state_dict,
    parse_hub_id,
)

FILTERS = 4
TINY_CONFIG = {"blocks_down": [1, 2, 2, 4, 4], "in_channels": 1, "init_filters": FILTERS, "spatial_dims": 3}
PUBLISHED_CONFIG = {"blocks_down": [1, 2, 2, 4, 4], "in_channels": 1, "init_filters": 32, "spatial_dims": 3}


class ZooEncoder(SegResEncoder, PyTorchModelHubMixin, library_name="project-lighter"):
    """lighter-zoo's wrapper, as in lighter_zoo/wrappers.py: the mixin forwards every config key."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)


class NotATensor:
    """A pickled Python object that weights_only loading must refuse."""


def tiny(seed: int = 0, filters: int = FILTERS):
    return init_model("ct-fm", seed, init_filters=filters).eval()


def tiny_input(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(seed))  # [B, 1, D, H, W]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_outputs(m1, m2, x) -> None:
    with torch.no_grad():
        for f1, f2 in zip(m1.eval()(x), m2.eval()(x), strict=True):
            assert torch.equal(f1, f2)


# --------------------------------------------------------------------------------------------
# layout and round trip


@pytest.mark.slow
def test_save_load_round_trip(tmp_path):
    model = tiny(1)
    folder = save_pretrained(model, tmp_path / "w", provenance={"source": "test"})
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, SIDECAR_NAME])
    assert json.loads((folder / CONFIG_NAME).read_text()) == TINY_CONFIG  # constructor kwargs only
    tensors = load_file(folder / WEIGHTS_NAME)
    assert {
        "conv_init.weight",
        "layers.0.blocks.0.norm1.weight",
        "layers.0.blocks.0.norm1.running_var",
        "layers.0.blocks.0.norm1.num_batches_tracked",
        "layers.3.downsample.weight",
    } <= set(tensors)
    assert_same_tensors(tensors, model.state_dict())

    loaded = create_model("ct-fm", init_filters=FILTERS, weights=str(folder))
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    assert_same_outputs(model, loaded, tiny_input())

    info = loaded.weights_info
    sidecar = json.loads((folder / SIDECAR_NAME).read_text())
    assert (
        info.sha256
        == file_sha256(folder / WEIGHTS_NAME)
        == hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    )
    assert sidecar["weights"]["sha256"] == info.sha256
    assert (info.format, info.ignored_keys, info.loaded_into, info.config) == ("folder", (), "model", TINY_CONFIG)
    assert sidecar["model"] == "ct-fm" and sidecar["preprocess"]["name"] == "ct-fm-patches"
    assert (
        sidecar["embedding"]["pooling"] == "avg" and sidecar["embedding"]["dim"] == FILTERS * 16 == loaded.embedding_dim
    )
    assert sidecar["provenance"]["source"] == "test" and "ctfm_version" in sidecar["provenance"]
    assert info.to_dict()["source"] == "w" and info.to_dict()["model"] == "ct-fm"  # no machine path


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = save_pretrained(tiny(3), tmp_path / "a", provenance={"source": "random-init", "seed": 3})
    b = save_pretrained(tiny(3), tmp_path / "b", provenance={"source": "random-init", "seed": 3})
    c = save_pretrained(tiny(4), tmp_path / "c", provenance={"source": "random-init", "seed": 4})
    for name in (CONFIG_NAME, WEIGHTS_NAME, SIDECAR_NAME):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert file_sha256(a / WEIGHTS_NAME) != file_sha256(c / WEIGHTS_NAME)


def test_init_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    init_model("ct-fm", 7, init_filters=FILTERS)
    assert torch.equal(torch.rand(3), expected)


def test_save_is_atomic_and_refuses_to_clobber(tmp_path, monkeypatch):
    import safetensors.torch

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tiny(), tmp_path / "w")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a hidden partial one
    monkeypatch.undo()

    folder = save_pretrained(tiny(1), tmp_path / "w")
    with pytest.raises(CTInputError, match="already exists and is not empty"):
        save_pretrained(tiny(2), folder)
    save_pretrained(tiny(2), folder, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
    assert_same_tensors(load_file(folder / WEIGHTS_NAME), tiny(2).state_dict())

    (folder / "notes.txt").write_text("mine")
    with pytest.raises(CTInputError, match="holds other files"):
        save_pretrained(tiny(3), folder, overwrite=True)
    with pytest.raises(ValueError, match="builds a CTSegResNet"):
        save_pretrained(tiny(), tmp_path / "x", name="ct-fm-segresnet")


@pytest.mark.slow
def test_full_size_ct_fm_round_trip(tmp_path):
    start = time.perf_counter()
    model = init_model("ct-fm", 0)
    folder = save_pretrained(model, tmp_path / "ct-fm", provenance={"source": "random-init", "seed": 0})
    config_bytes = (folder / CONFIG_NAME).read_bytes()
    assert len(config_bytes) == 123 and json.loads(config_bytes) == PUBLISHED_CONFIG  # as on the Hub
    loaded = create_model("ct-fm", weights=folder)
    assert sum(p.numel() for p in loaded.parameters()) == 77_760_992
    assert json.loads((folder / SIDECAR_NAME).read_text())["weights"]["parameters"] == 77_760_992
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    assert time.perf_counter() - start < 10


# --------------------------------------------------------------------------------------------
# lighter-zoo compatibility


def test_ctfm_folder_loads_in_lighter_zoo_wrapper(tmp_path):
    model = tiny(5)
    folder = save_pretrained(model, tmp_path / "w")
    zoo = ZooEncoder.from_pretrained(folder)  # forwards every config.json key to SegResEncoder
    assert zoo.init_filters == FILTERS and tuple(zoo.blocks_down) == (1, 2, 2, 4, 4)
    assert_same_tensors(zoo.state_dict(), model.state_dict())
    assert_same_outputs(model, zoo, tiny_input())


def test_an_extra_config_key_would_break_lighter_zoo(tmp_path):
    """Why ctfm's metadata is in ctfm.json: PyTorchModelHubMixin passes **kwargs keys through."""
    folder = save_pretrained(tiny(), tmp_path / "w")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "model": "ct-fm"}))
    with pytest.raises(TypeError, match="model"):
        ZooEncoder.from_pretrained(folder)


def test_lighter_zoo_folder_loads_in_ctfm(tmp_path):
    torch.manual_seed(9)
    zoo = ZooEncoder(spatial_dims=3, in_channels=1, init_filters=FILTERS, blocks_down=[1, 2, 2, 4, 4]).eval()
    zoo.save_pretrained(tmp_path / "zoo")
    assert not (tmp_path / "zoo" / SIDECAR_NAME).exists()
    loaded = create_model("ct-fm", init_filters=FILTERS, weights=tmp_path / "zoo")
    assert loaded.weights_info.metadata is None and loaded.weights_info.config == TINY_CONFIG
    assert_same_outputs(zoo, loaded, tiny_input())
    # Same tensors, same bytes: ctfm writes config.json and model.safetensors as the mixin does.
    ours = save_pretrained(loaded, tmp_path / "ours")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (ours / name).read_bytes() == (tmp_path / "zoo" / name).read_bytes(), name
    assert json.loads((ours / SIDECAR_NAME).read_text())["provenance"]["loaded_from"] == "zoo"


@pytest.mark.slow
def test_real_lighter_zoo_package(tmp_path):
    lighter_zoo = pytest.importorskip("lighter_zoo")
    model = tiny(6)
    folder = save_pretrained(model, tmp_path / "w")
    zoo = lighter_zoo.SegResEncoder.from_pretrained(str(folder))
    assert_same_outputs(model, zoo, tiny_input())
    torch.manual_seed(1)
    theirs = lighter_zoo.SegResEncoder(spatial_dims=3, in_channels=1, init_filters=FILTERS, blocks_down=[1, 2, 2, 4, 4])
    theirs.save_pretrained(tmp_path / "theirs")
    assert_same_outputs(theirs, create_model("ct-fm", init_filters=FILTERS, weights=tmp_path / "theirs"), tiny_input())


# --------------------------------------------------------------------------------------------
# checkpoints


def lightning_checkpoint(state: dict, prefix: str, head: bool) -> dict:
    """A dict shaped like a CT-FM Lightning checkpoint, with plain types only (weights_only works)."""
    state_dict = {prefix + k: v for k, v in state.items()}
    if head:
        wrapper = prefix[: -len("backbone.")]
        state_dict |= {
            f"{wrapper}projection_head.layers.0.weight": torch.randn(8, 64),
            f"{wrapper}projection_head.layers.0.bias": torch.zeros(8),
            f"{wrapper}projection_head.layers.2.weight": torch.randn(4, 8),
        }
    return {
        "epoch": 449,
        "global_step": 225000,
        "pytorch-lightning_version": "2.3.0",
        "state_dict": state_dict,
        "optimizer_states": [],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.0002, "batch_size": 8},
    }


@pytest.mark.parametrize(
    "prefix, head",
    [
        ("model.backbone.", True),  # final pre-training run
        ("model._orig_mod.backbone.", True),  # torch.compile'd ablations
        ("encoder.", False),  # older pretrained_segresnet.torch
        ("", False),  # plain MONAI keys
    ],
)
def test_lightning_checkpoint_prefixes(tmp_path, prefix, head):
    source = tiny(11)
    path = tmp_path / "epoch=449-step=225000-v1.ckpt"
    torch.save(lightning_checkpoint(source.state_dict(), prefix, head), path)

    encoder = create_model("ct-fm", init_filters=FILTERS, weights=path)
    assert_same_tensors(encoder.state_dict(), source.state_dict())
    info = encoder.weights_info
    assert (
        info.format == "ckpt"
        and info.sha256 == file_sha256(path)
        and info.metadata == {"epoch": 449, "global_step": 225000}
    )
    assert len(info.ignored_keys) == (3 if head else 0) and all("projection_head." in k for k in info.ignored_keys)

    seg = create_model("ct-fm-segresnet", init_filters=FILTERS, weights=path)
    assert seg.weights_info.loaded_into == "encoder"  # the decoder stays as built
    assert_same_tensors(seg.encoder.state_dict(), source.state_dict())


def test_convert_state_dict_targets():
    w = torch.zeros(1)
    state = {
        "model.backbone.conv_init.weight": w,
        "model.projection_head.layers.0.weight": w,
        "model.up_layers.0.head.weight": w,
    }
    assert convert_state_dict(state, "encoder") == (
        {"conv_init.weight": w, "up_layers.0.head.weight": w},
        ["model.projection_head.layers.0.weight"],
    )
    converted, ignored = convert_state_dict(state, "segresnet")
    assert sorted(converted) == ["encoder.conv_init.weight", "up_layers.0.head.weight"] and len(ignored) == 1
    assert sorted(convert_state_dict({"_orig_mod.encoder.layers.0.downsample.weight": w}, "segresnet")[0]) == [
        "encoder.layers.0.downsample.weight"
    ]
    with pytest.raises(ValueError, match="both become"):
        convert_state_dict({"backbone.conv_init.weight": w, "encoder.conv_init.weight": w}, "encoder")
    with pytest.raises(ValueError, match="unknown conversion target"):
        convert_state_dict(state, "decoder")


def test_segresnet_full_state_dict_loads_strictly(tmp_path):
    source = init_model("ct-fm-segresnet", 2, init_filters=FILTERS)
    path = tmp_path / "finetuned.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    seg = create_model("ct-fm-segresnet", init_filters=FILTERS, weights=path)
    assert seg.weights_info.loaded_into == "model"
    assert_same_tensors(seg.state_dict(), source.state_dict())
    with pytest.raises(CTInputError, match="unexpected: up_layers"):
        create_model("ct-fm", init_filters=FILTERS, weights=path)


def test_bare_safetensors_and_pt_state_dict(tmp_path):
    source = tiny(12)
    save_file(source.state_dict(), tmp_path / "bare.safetensors")
    torch.save(source.state_dict(), tmp_path / "state.pth")
    for name, kind in (("bare.safetensors", "safetensors"), ("state.pth", "torch")):
        model = create_model("ct-fm", init_filters=FILTERS, weights=tmp_path / name)
        assert model.weights_info.format == kind
        assert_same_tensors(model.state_dict(), source.state_dict())


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": tiny().state_dict(), "callbacks": NotATensor()}, path)
    with pytest.raises(CTInputError, match="weights_only=True"):
        create_model("ct-fm", init_filters=FILTERS, weights=path)
    torch.save({"epoch": 1}, tmp_path / "empty.ckpt")
    with pytest.raises(CTInputError, match="no state dict"):
        create_model("ct-fm", init_filters=FILTERS, weights=tmp_path / "empty.ckpt")


# --------------------------------------------------------------------------------------------
# strict loading


def test_strict_missing_and_unexpected_keys(tmp_path):
    state = tiny().state_dict()
    del state["layers.4.blocks.3.conv2.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CTInputError) as err:
        create_model("ct-fm", init_filters=FILTERS, weights=tmp_path / "bad.pt")
    message = str(err.value)
    assert "1 missing: layers.4.blocks.3.conv2.weight" in message and "1 unexpected: extra.weight" in message
    assert message.startswith(str(tmp_path / "bad.pt")) and "use weights made for this architecture" in message


def test_strict_shape_mismatch(tmp_path):
    save_file(tiny(filters=8).state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(
        CTInputError, match=r"wrong shape \(weights vs model\): conv_init.weight \[8, 1, 3, 3, 3\] vs \[4, 1, 3, 3, 3\]"
    ):
        create_model("ct-fm", init_filters=FILTERS, weights=tmp_path / "wide.safetensors")


def test_arch_mismatch_names_both(tmp_path):
    folder = save_pretrained(tiny(filters=8), tmp_path / "wide")
    with pytest.raises(CTInputError) as err:
        create_model("ct-fm", init_filters=FILTERS, weights=folder)
    message = str(err.value)
    assert "config.json" in message and '"init_filters": 8' in message and '"init_filters": 4' in message
    assert "init_filters=8 vs 4" in message and "create_model(NAME, init_filters=8)" in message


def test_missing_num_batches_tracked_is_tolerated(tmp_path):
    source = tiny(13)
    save_file(
        {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")},
        tmp_path / "old.safetensors",
    )
    assert_same_outputs(
        source, create_model("ct-fm", init_filters=FILTERS, weights=tmp_path / "old.safetensors"), tiny_input()
    )


def test_sidecar_sha256_is_checked(tmp_path):
    folder = save_pretrained(tiny(), tmp_path / "w")
    sidecar = json.loads((folder / SIDECAR_NAME).read_text())
    sidecar["weights"]["sha256"] = "0" * 64
    (folder / SIDECAR_NAME).write_text(json.dumps(sidecar))
    with pytest.raises(CTInputError, match="records 000000000000"):
        create_model("ct-fm", init_filters=FILTERS, weights=folder)


def test_unsupported_model_type():
    with pytest.raises(TypeError, match="SegResEncoder"):
        load_weights(torch.nn.Linear(2, 2), "anything")


# --------------------------------------------------------------------------------------------
# sources


def fake_hub_cache(cache, repo_id: str, folder, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """The huggingface_hub cache layout: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True)
    (storage / "snapshots" / commit).mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    for file in folder.iterdir():
        digest = file_sha256(file)
        (storage / "blobs" / digest).write_bytes(file.read_bytes())
        os.symlink(os.path.join("..", "..", "blobs", digest), storage / "snapshots" / commit / file.name)
    return storage / "snapshots" / commit


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # huggingface_hub read its own copy at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hf_hub_from_cache_offline(tmp_path, offline_cache):
    source = tiny(21)
    folder = save_pretrained(source, tmp_path / "published")
    snapshot = fake_hub_cache(offline_cache, "project-lighter/tiny_ct_fm", folder)

    model = create_model("ct-fm", init_filters=FILTERS, weights="hf-hub:project-lighter/tiny_ct_fm")
    info = model.weights_info
    assert info.format == "hf-hub" and info.path == snapshot and info.sha256 == file_sha256(folder / WEIGHTS_NAME)
    assert info.to_dict()["source"] == "hf-hub:project-lighter/tiny_ct_fm"
    assert_same_outputs(source, model, tiny_input())
    commit = snapshot.name
    assert resolve_weights(f"hf-hub:project-lighter/tiny_ct_fm@{commit}") == snapshot
    assert resolve_weights("hf-hub:project-lighter/tiny_ct_fm@main") == snapshot


def test_hf_hub_not_cached_offline_names_the_download_command(offline_cache):
    with pytest.raises(CTInputError) as err:
        resolve_weights("hf-hub:project-lighter/ct_fm_feature_extractor")
    message = str(err.value)
    assert (
        "HF_HUB_OFFLINE" in message
        and "`ctfm models download project-lighter/ct_fm_feature_extractor`" in message
        and "network" in message
    )


def test_hf_hub_download_failure_names_the_download_command(tmp_path, monkeypatch):
    import huggingface_hub

    real = huggingface_hub.snapshot_download

    def no_network(*args, local_files_only=False, **kwargs):
        if local_files_only:
            return real(*args, local_files_only=True, **kwargs)
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(CTInputError) as err:
        resolve_weights("hf-hub:org/name@v1")
    message = str(err.value)
    assert (
        "downloading it failed (OSError: [Errno 101] Network is unreachable)" in message
        and "`ctfm models download org/name@v1`" in message
    )


def test_ambiguous_and_malformed_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CTInputError, match="write hf-hub:project-lighter/ct_fm_feature_extractor"):
        resolve_weights("project-lighter/ct_fm_feature_extractor")
    with pytest.raises(CTInputError, match='weights="hf-hub:project-lighter/ct_fm_feature_extractor"'):
        resolve_weights("ct-fm")
    with pytest.raises(CTInputError, match="unknown weights source scheme 'hf'"):
        resolve_weights("hf:project-lighter/ct_fm_feature_extractor")
    with pytest.raises(CTInputError, match="not a Hugging Face model id"):
        resolve_weights("hf-hub:ct_fm_feature_extractor")
    with pytest.raises(CTInputError, match="no such weights file"):
        resolve_weights("missing.ckpt")
    with pytest.raises(CTInputError, match="unknown weights suffix"):
        (tmp_path / "weights.npz").write_bytes(b"")
        resolve_weights("weights.npz")
    with pytest.raises(CTInputError, match="without model.safetensors"):
        (tmp_path / "empty").mkdir()
        resolve_weights("empty")
    # An ORG/NAME-looking relative path that exists is a local folder.
    save_pretrained(tiny(), tmp_path / "project-lighter" / "ct_fm_feature_extractor")
    assert (
        resolve_weights("project-lighter/ct_fm_feature_extractor")
        == tmp_path / "project-lighter" / "ct_fm_feature_extractor"
    )
    assert parse_hub_id("hf-hub:a/b@c") == ("a/b", "c") and parse_hub_id("a/b") == ("a/b", None)


def _ctfm_imports(module: str) -> set[str]:
    """Every ``ctfm.*`` module that ``module``'s source imports, at any depth of its code."""
    import ast
    import importlib.util

    tree = ast.parse(open(importlib.util.find_spec(module).origin, encoding="utf-8").read())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctfm"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ctfm"))
    return found


@pytest.mark.slow
def test_registry_and_weights_do_not_import_each_other():
    """registry is a leaf (networks only), weights knows no model names, factory joins them."""
    registry = _ctfm_imports("ctfm.models.registry")
    weights = _ctfm_imports("ctfm.models.weights")
    assert all(m.startswith(("ctfm.models.networks", "ctfm.errors")) for m in registry), registry
    assert not any(m.startswith(("ctfm.models.registry", "ctfm.models.factory")) for m in weights), weights
    assert not any(m.startswith("ctfm.models.factory") for m in registry)
    factory = _ctfm_imports("ctfm.models.factory")
    assert {"ctfm.models.registry", "ctfm.models.weights"} <= factory
    # weights first, in a fresh interpreter (the package imports factory, then the registry).
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", "import ctfm.models.weights, ctfm.models.registry"], check=True)
