"""Pretraining: views are deterministic and follow CT-FM's recipe; a few training steps on the
tiny preset; exact resume; export loads in `ctfm embed`; 2-process DDP on CPU (gloo)."""

from __future__ import annotations

import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch

import ctfm
from ctfm.pretrain.config import PretrainConfig, resolve_pretrain_config
from ctfm.pretrain.losses import LOSSES
from ctfm.pretrain.views import CROP_SIZE, MultiCropViews, sample_state
from ctfm.runs import EpochIndexSampler, parse_set
from ctfm.synth import make_phantom, write_phantom


def reader(volume):
    return lambda start, size: volume[
        start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]
    ]


def test_views_shape_determinism_and_variety():
    rng = np.random.default_rng(0)
    volume = rng.random((40, 70, 60)).astype(np.float32)
    views = MultiCropViews(num_crops=3, crop_size=(16, 32, 32))
    a = views(volume.shape, reader(volume), sample_state(0, 1, 5))
    b = views(volume.shape, reader(volume), sample_state(0, 1, 5))
    c = views(volume.shape, reader(volume), sample_state(0, 1, 6))
    assert a.shape == (3, 2, 1, 16, 32, 32) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert not torch.equal(a[:, 0], a[:, 1])  # the two views are augmented independently
    assert CROP_SIZE == (32, 128, 128)


def test_augmentations_fire_with_their_probabilities():
    """Over many draws each p=0.5 augmentation is applied about half the time (CT-FM's recipe),
    and the crop scale stays in [0.33, 1] with the crop inside the view."""
    import math

    from ctfm.pretrain.views import ViewAugment

    aug = ViewAugment(size=(8, 16, 16))
    drawn = [aug.get_params(sample_state(1, 0, i)) for i in range(200)]
    for name, fired in (
        ("flip", sum(p.flip for p in drawn)),
        ("histogram", sum(p.histogram is not None for p in drawn)),
        ("smooth", sum(p.smooth_sigma is not None for p in drawn)),
    ):
        assert 70 <= fired <= 130, (name, fired)
    for p in drawn:
        assert 0.33 <= p.scale <= 1.0
        assert p.crop_size == tuple(math.ceil(p.scale * c) for c in (8, 16, 16))
        assert all(0 <= a and a + n <= c for a, n, c in zip(p.crop_start, p.crop_size, (8, 16, 16)))
        assert p.smooth_sigma is None or all(0.25 <= v <= 1.5 for v in p.smooth_sigma)
        if p.histogram is not None:
            assert p.histogram.reference == (0.0, 0.25, 0.5, 0.75, 1.0)
            assert (
                p.histogram.floating[0] == 0.0
                and p.histogram.floating[-1] == 1.0
                and list(p.histogram.floating) == sorted(p.histogram.floating)
            )


def test_views_are_drawn_parameters_then_a_deterministic_transform():
    """``__call__`` = ``apply(get_params(state))``; the same parameters give the same views."""
    rng = np.random.default_rng(2)
    volume = rng.random((30, 50, 40)).astype(np.float32)
    views = MultiCropViews(num_crops=3, crop_size=(8, 16, 16))
    params = views.get_params(sample_state(0, 2, 9), volume.shape)
    assert params.starts.shape == (3, 3) and len(params.views) == 3
    assert all(0 <= s and s + c <= v for start in params.starts for s, c, v in zip(start, (8, 16, 16), volume.shape))
    drawn = views(volume.shape, reader(volume), sample_state(0, 2, 9))
    torch.testing.assert_close(views.apply(reader(volume), params), drawn, rtol=0, atol=0)
    torch.testing.assert_close(views.apply(reader(volume), params), drawn, rtol=0, atol=0)  # apply draws nothing


def test_augmentation_settings_reach_the_views_and_bad_values_are_refused():
    """Config keys flip_p / histogram_shift_p / smooth_p / crop_scale drive the views: with every
    augmentation off and crop scale 1, both views are the crop itself."""
    from ctfm.pretrain.train import build_loader

    rng = np.random.default_rng(0)
    volume = rng.random((20, 40, 40)).astype(np.float32)
    plain = MultiCropViews(num_crops=2, crop_size=(8, 16, 16), scale=(1.0, 1.0), flip_p=0, histogram_p=0, smooth_p=0)
    views = plain(volume.shape, reader(volume), sample_state(0, 0, 0))
    torch.testing.assert_close(views[:, 0], views[:, 1], rtol=0, atol=1e-6)
    config = resolve_pretrain_config(
        "tiny", overrides={"crop_scale": [1.0, 1.0], "flip_p": 0.0, "histogram_shift_p": 0.0, "smooth_p": 0.0}
    )
    augment = build_loader(config, cache=[volume]).dataset.views.augment
    assert (augment.scale, augment.flip_p, augment.histogram.prob, augment.smooth_p) == ((1.0, 1.0), 0.0, 0.0, 0.0)
    drawn = augment.get_params(sample_state(0, 0, 1))
    assert (drawn.scale, drawn.crop_start, drawn.flip, drawn.histogram, drawn.smooth_sigma) == (
        1.0,
        (0, 0, 0),
        False,
        None,
        None,
    )
    with pytest.raises(ValueError, match="histogram_shift_p"):
        resolve_pretrain_config("tiny", overrides={"histogram_shift_p": 1.5})
    with pytest.raises(ValueError, match="crop_scale"):
        resolve_pretrain_config("tiny", overrides={"crop_scale": [0.0, 1.0]})


def test_views_refuse_volumes_smaller_than_the_crop():
    with pytest.raises(ValueError, match="smaller than the crop"):
        MultiCropViews(num_crops=2, crop_size=(32, 128, 128))((20, 128, 128), lambda s, z: None, sample_state(0, 0, 0))


def test_sampler_splits_indices_across_ranks_without_overlap(monkeypatch):
    sampler = EpochIndexSampler(10)
    sampler.set_epoch(3)
    import ctfm.runs

    monkeypatch.setattr(ctfm.runs, "rank_and_world_size", lambda environment=True: (1, 3))
    assert list(sampler) == [(3, 1), (3, 4), (3, 7)] and len(sampler) == 3


def test_config_presets_files_and_overrides(tmp_path):
    ct_fm = resolve_pretrain_config("ct-fm")
    assert (ct_fm.max_epochs, ct_fm.steps_per_epoch, ct_fm.batch_size, ct_fm.devices, ct_fm.num_crops) == (
        500,
        500,
        4,
        4,
        15,
    )
    assert (ct_fm.lr, ct_fm.weight_decay, ct_fm.warmup_epochs, ct_fm.temperature) == (1e-4, 1e-6, 10, 0.1)
    (tmp_path / "run.yaml").write_text("preset: tiny\nlr: 0.0003\n")
    config = resolve_pretrain_config(
        None, tmp_path / "run.yaml", parse_set(["max_steps=7", "data=scans/", 'model_kwargs={"init_filters": 4}'])
    )
    assert (
        config.lr == 3e-4
        and config.max_steps == 7
        and config.data == "scans/"
        and config.model_kwargs == {"init_filters": 4}
    )
    assert config.devices == 1 and config.precision == "32-true"
    with pytest.raises(ValueError, match="unknown config keys"):
        resolve_pretrain_config("tiny", overrides={"learning_rate": 1})


# config.yaml of a tiny run written before the shared run system (ctfm.runs): every key it held.
OLD_TINY_CONFIG = """\
accelerator: cpu
batch_size: 2
cache: ''
cache_workers: 1
checkpoint_every_n_epochs: 1
crop_scale: [0.33, 1.0]
crop_size: [32, 128, 128]
data: scans/
devices: 1
flip_p: 0.5
histogram_shift_p: 0.5
loss: intrasample_ntxent
loss_kwargs: {}
lr: 0.0001
max_epochs: 2
max_steps: -1
model: ct-fm
model_kwargs: {init_filters: 8}
num_crops: 4
num_nodes: 1
num_workers: 0
out: runs/old
precision: 32-true
seed: 0
smooth_p: 0.5
spacing_mm: []
steps_per_epoch: 4
strategy: auto
sync_batchnorm: false
temperature: 0.1
warmup_epochs: 0
weight_decay: 1.0e-06
"""


def test_a_config_saved_before_the_run_system_still_resolves(tmp_path):
    from ctfm.runs import save_config

    (tmp_path / "config.yaml").write_text(OLD_TINY_CONFIG)
    config = resolve_pretrain_config(None, tmp_path / "config.yaml")
    assert config == resolve_pretrain_config("tiny", overrides={"data": "scans/", "out": "runs/old"})
    save_config(config, tmp_path / "again.yaml")
    saved = (tmp_path / "again.yaml").read_text()
    old_keys = {line.split(":")[0] for line in OLD_TINY_CONFIG.splitlines()}
    assert old_keys <= {line.split(":")[0] for line in saved.splitlines() if not line.startswith(" ")}  # no key renamed


def test_a_checkpoint_with_the_old_optimizer_keys_exports(tmp_path):
    from ctfm.models import create_model
    from ctfm.pretrain.module import ContrastivePretrainer
    from ctfm.pretrain.train import export_checkpoint

    module = ContrastivePretrainer(model_kwargs={"init_filters": 4})
    old_hyper = {
        "model": "ct-fm",
        "model_kwargs": {"init_filters": 4},
        "loss": "intrasample_ntxent",
        "loss_kwargs": {"temperature": 0.1},
        "lr": 1e-4,
        "weight_decay": 1e-6,
        "warmup_epochs": 10,
        "max_epochs": 500,
        "projection": (256, 128),
    }
    checkpoint = {"hyper_parameters": old_hyper, "state_dict": module.state_dict(), "global_step": 8, "epoch": 1}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    export = export_checkpoint(tmp_path / "old.ckpt", tmp_path / "export")
    encoder = create_model("ct-fm", weights=str(export))
    for key, value in module.encoder.state_dict().items():
        torch.testing.assert_close(encoder.state_dict()[key], value)


@pytest.fixture(scope="module")
def phantom_scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    for seed in range(3):
        write_phantom(make_phantom(seed, shape=(40, 32, 24), spacing_mm=(3.0, 3.0, 3.0)), root, stem=f"p{seed}")
    for labels in root.glob("*_labels.nii.gz"):
        labels.unlink()
    return root


def tiny_config(data, out, **changes) -> PretrainConfig:
    values = dict(
        data=str(data),
        out=str(out),
        crop_size=[16, 32, 32],
        num_crops=3,
        steps_per_epoch=2,
        max_epochs=2,
        model_kwargs={"init_filters": 4},
    )
    values.update(changes)
    return resolve_pretrain_config("tiny", overrides=values)


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"].detach()))


@pytest.mark.slow
def test_training_checkpoints_metrics_and_export(phantom_scans, tmp_path):
    from ctfm.pretrain.train import pretrain

    recorder = LossRecorder()
    export = pretrain(tiny_config(phantom_scans, tmp_path / "run"), extra_callbacks=[recorder])
    assert len(recorder.losses) == 4 and all(np.isfinite(recorder.losses))
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "metrics.csv").read_text().count("\n") >= 4
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {
        "last.ckpt",
        "epoch=0-step=2.ckpt",
        "epoch=1-step=4.ckpt",
    }
    assert any((run / "tensorboard").rglob("events.out.tfevents*"))
    # The export is a published-layout folder that `ctfm embed` loads.
    records = ctfm.embed(str(phantom_scans / "p0.nii.gz"), weights=str(export), mode="patches")
    assert records[0]["embedding"].shape == (64,)


@pytest.mark.slow
def test_resume_gives_the_same_next_losses(phantom_scans, tmp_path):
    from ctfm.pretrain.train import pretrain

    straight = LossRecorder()
    pretrain(tiny_config(phantom_scans, tmp_path / "straight"), extra_callbacks=[straight])
    first = LossRecorder()
    pretrain(
        tiny_config(phantom_scans, tmp_path / "resumed", max_steps=2), extra_callbacks=[first]
    )  # stops after epoch 0
    second = LossRecorder()
    pretrain(tiny_config(phantom_scans, tmp_path / "resumed"), extra_callbacks=[second])  # resumes from last.ckpt
    assert len(first.losses) == 2 and len(second.losses) == 2
    np.testing.assert_allclose(first.losses + second.losses, straight.losses, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_two_process_ddp_on_cpu(phantom_scans, tmp_path):
    out = tmp_path / "ddp"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctfm",
            "pretrain",
            "--preset",
            "tiny",
            "--set",
            f"data={phantom_scans}",
            "--set",
            f"out={out}",
            "--set",
            "devices=2",
            "--set",
            "strategy=ddp",
            "--set",
            "crop_size=[16, 32, 32]",
            "--set",
            "num_crops=3",
            "--set",
            'model_kwargs={"init_filters": 4}',
            "--set",
            "max_epochs=1",
            "--set",
            "steps_per_epoch=2",
            "--set",
            "sync_batchnorm=true",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sync_batchnorm needs GPUs" in result.stderr  # SyncBatchNorm is GPU-only in torch
    assert (out / "export" / "model.safetensors").exists()
    assert (out / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_fast_histogram_shift_equals_monai():
    """Same draws as MONAI's RandHistogramShift from the same state, same mapping to float rounding."""
    from monai.transforms import RandHistogramShift

    from ctfm.pretrain.views import HistogramShift

    x = torch.rand(1, 12, 20, 20) * 0.8 + 0.1
    fired = 0
    for seed in range(40):
        params = HistogramShift(prob=0.5).get_params(np.random.RandomState(seed))
        reference = RandHistogramShift(num_control_points=5, prob=0.5)
        reference.set_random_state(state=np.random.RandomState(seed))
        expected = torch.as_tensor(reference(x))
        assert (params is not None) == reference._do_transform  # MONAI's flag, compared once here
        if params is not None:
            np.testing.assert_array_equal(params.floating, reference.floating_control_points)
            fired += 1
        torch.testing.assert_close(HistogramShift.apply(x, params), expected, atol=1e-6, rtol=0)
    assert 8 <= fired <= 32


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_registered_loss_trains_one_step_through_the_config(loss, phantom_scans, tmp_path):
    """Each name of the loss table is reachable from `ctfm pretrain` (the config's ``loss`` key):
    its module builds, one optimiser step runs and changes the encoder."""
    from ctfm.pretrain.train import build_module, loss_kwargs

    config = tiny_config(phantom_scans, tmp_path, loss=loss, max_steps=1)
    module = build_module(config)
    assert type(module.criterion) is LOSSES[loss]
    assert ("temperature" in loss_kwargs(config)) == ("ntxent" in loss)  # the NT-Xent family takes one
    assert (module.prediction_head is not None) == ("simsiam" in loss)
    optimizer = module.configure_optimizers()["optimizer"]
    before = module.encoder.conv_init.weight.detach().clone()
    value = module.training_step(torch.rand(2, 3, 2, 1, 16, 32, 32, generator=torch.Generator().manual_seed(0)), 0)
    value.backward()
    optimizer.step()
    assert torch.isfinite(value) and not torch.equal(before, module.encoder.conv_init.weight)


@pytest.mark.slow
def test_a_simsiam_run_goes_through_the_trainer(phantom_scans, tmp_path):
    from ctfm.pretrain.train import pretrain

    recorder = LossRecorder()
    export = pretrain(
        tiny_config(phantom_scans, tmp_path / "run", loss="intrasample_simsiam", max_steps=2),
        extra_callbacks=[recorder],
    )
    assert len(recorder.losses) == 2 and all(-1.0 <= v <= 1.0 for v in recorder.losses)  # a negative cosine
    assert (export / "model.safetensors").is_file()


def test_loss_names_and_arguments_are_checked_when_the_config_is_resolved():
    with pytest.raises(
        ValueError, match=r"loss 'simclr': unknown; choose one of intrasample_ntxent, intrasample_simsiam, .*vicreg$"
    ):
        resolve_pretrain_config("tiny", overrides={"loss": "simclr"})
    with pytest.raises(ValueError, match="not arguments of loss 'vicreg'; it takes eps, lambda_, mu, nu"):
        resolve_pretrain_config("tiny", overrides={"loss": "vicreg", "loss_kwargs": {"temperature": 0.2}})
    config = resolve_pretrain_config("tiny", overrides={"loss": "intrasample_vicreg", "loss_kwargs": {"mu": 5.0}})
    from ctfm.pretrain.train import build_module

    assert build_module(config).criterion.loss.mu == 5.0


@pytest.mark.slow
def test_a_non_finite_loss_stops_training_with_a_clear_error():
    from ctfm.errors import CTInputError
    from ctfm.pretrain.module import ContrastivePretrainer

    module = ContrastivePretrainer(model_kwargs={"init_filters": 4})
    views = torch.rand(2, 3, 2, 1, 16, 32, 32)
    views[0, 0, 0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(CTInputError, match="training diverged: non-finite loss"):
        module.training_step(views, 0)


@pytest.mark.slow
def test_a_model_pretrained_at_another_spacing_embeds_at_that_spacing(phantom_scans, tmp_path):
    """spacing_mm=[2,2,2]: the cache, the export's ctfm.json and then `ctfm.embed` all use 2 mm."""
    import json

    from ctfm.pretrain.train import pretrain

    export = pretrain(
        tiny_config(phantom_scans, tmp_path / "run", spacing_mm=[2, 2, 2], max_epochs=1), progress_bar=False
    )
    recorded = json.loads((export / "ctfm.json").read_text())["preprocess"]
    assert recorded["spacing_mm"] == [2.0, 2.0, 2.0] and recorded["name"] == "ct-fm-ssl-2x2x2mm"
    for mode in ("whole", "patches"):
        (record,) = ctfm.embed(str(phantom_scans / "p0.nii.gz"), weights=str(export), mode=mode)
        used = json.loads(record["preprocess_spec"])
        assert used["spacing_mm"] == [2.0, 2.0, 2.0] and record["preset"] == f"ct-fm-ssl-2x2x2mm+{mode}"
    # The whole-scan input keeps CT-FM's 320 mm field of view: 160^3 voxels at 2 mm.
    from ctfm.preprocess import PreprocessSpec

    assert PreprocessSpec.from_json(record["preprocess_spec"]).patch_size_voxels == (32, 64, 64)
    (whole,) = ctfm.embed(str(phantom_scans / "p0.nii.gz"), weights=str(export), mode="whole")
    assert PreprocessSpec.from_json(whole["preprocess_spec"]).patch_size_voxels == (160, 160, 160)
