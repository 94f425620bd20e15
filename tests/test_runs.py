"""The run system (ctfm.runs): configs, presets < files < --set, the run folder, the optimiser."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from monai.optimizers import WarmupCosineSchedule

from ctfm.errors import CTInputError, OptionError
from ctfm.runs import (
    OptimizerConfig,
    RunConfig,
    RunFolder,
    parse_set,
    read_config_file,
    resolve_config,
    save_config,
    upgrade_hyperparameters,
    warmup_cosine_optimizer,
)


@dataclass
class DemoConfig(RunConfig):
    kind: ClassVar[str] = "demo"

    lr: float = 3e-4  # a shared key at this run's default
    crops: list = field(default_factory=lambda: [1, 2])

    def check(self) -> None:
        super().check()
        if len(self.crops) != 2:
            raise OptionError(f"crops {self.crops}: expected two values")


PRESETS = {"small": {"batch_size": 1, "devices": 1, "crops": [3, 4]}, "big": {"batch_size": 8}}


def test_parse_set_reads_json_values_and_keeps_the_rest_as_strings():
    values = parse_set(
        [
            "lr=3e-4",
            'model_kwargs={"init_filters": 8}',
            "data=scans/",
            "crops=[1, 2]",
            "sync_batchnorm=false",
            "out=a=b",
        ]
    )
    assert values == {
        "lr": 3e-4,
        "model_kwargs": {"init_filters": 8},
        "data": "scans/",
        "crops": [1, 2],
        "sync_batchnorm": False,
        "out": "a=b",
    }
    for bad in ("lr", "=3"):
        with pytest.raises(OptionError, match="expected key=value"):
            parse_set([bad])


def test_presets_then_files_then_overrides(tmp_path):
    assert resolve_config(DemoConfig, PRESETS) == DemoConfig()
    assert resolve_config(DemoConfig, PRESETS, "small").crops == [3, 4]
    file = tmp_path / "run.yaml"
    file.write_text("preset: small\nbatch_size: 2\nlr: 0.001\n")
    config = resolve_config(DemoConfig, PRESETS, "big", file, {"lr": 0.01})
    assert (config.batch_size, config.devices, config.crops, config.lr) == (2, 1, [3, 4], 0.01)
    json_file = tmp_path / "run.json"
    json_file.write_text('{"seed": 3}')
    assert read_config_file(json_file, PRESETS) == {"seed": 3}


def test_refusals_are_one_line_option_errors(tmp_path):
    cases = [
        ({"preset": "huge"}, "unknown demo preset 'huge'; known: big, small"),
        ({"overrides": {"batch_sise": 2}}, "unknown config keys ['batch_sise']"),
        ({"overrides": {"crops": [1]}}, "crops [1]: expected two values"),  # the subclass's check
        ({"overrides": {"batch_size": 0}}, "batch_size 0: expected a whole number >= 1"),  # the shared checks
        ({"overrides": {"steps_per_epoch": 0}}, "steps_per_epoch 0: expected a positive whole number, or -1"),
        ({"overrides": {"lr": 0}}, "lr 0: expected a positive learning rate"),
        ({"overrides": {"num_workers": "four"}}, "num_workers 'four': expected a whole number >= 0"),
        ({"overrides": {"model_kwargs": [8]}}, "model_kwargs [8]: expected a mapping"),
    ]
    for kwargs, message in cases:
        with pytest.raises(OptionError) as caught:
            resolve_config(DemoConfig, PRESETS, **kwargs)
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_bad_config_files_name_the_file(tmp_path):
    with pytest.raises(CTInputError, match="no such config file"):
        resolve_config(DemoConfig, PRESETS, file=tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [1, 2\n")
    with pytest.raises(CTInputError, match=r"broken.yaml: not valid YAML"):
        resolve_config(DemoConfig, PRESETS, file=broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(CTInputError, match="holds a mapping of keys to values"):
        resolve_config(DemoConfig, PRESETS, file=listed)


def test_the_saved_config_reads_back_as_the_same_config(tmp_path):
    config = resolve_config(
        DemoConfig, PRESETS, "small", overrides={"out": str(tmp_path / "run"), "model_kwargs": {"init_filters": 4}}
    )
    save_config(config, RunFolder(config.out).config)
    assert resolve_config(DemoConfig, PRESETS, file=tmp_path / "run" / "config.yaml") == config


def test_run_folder_names_and_run_checks(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.config == tmp_path / "run" / "config.yaml" and run.metrics == tmp_path / "run" / "metrics.csv"
    assert (
        run.last == tmp_path / "run" / "checkpoints" / "last.ckpt"
        and run.best == tmp_path / "run" / "checkpoints" / "best.ckpt"
    )
    assert (run.export, run.tensorboard, run.cache) == (
        tmp_path / "run" / "export",
        tmp_path / "run" / "tensorboard",
        tmp_path / "run" / "cache",
    )
    assert not RunFolder.is_run(run.path) and run.resume_checkpoint() is None
    run.checkpoints.mkdir(parents=True)
    assert RunFolder.is_run(run.path)
    run.last.write_bytes(b"")
    assert run.resume_checkpoint() == str(run.last) and run.resume_checkpoint(resume=False) is None
    other = tmp_path / "lighter"
    other.mkdir()
    (other / "resolved_config.yaml").write_text("{}")
    assert RunFolder.is_run(other) and not RunFolder.is_run(tmp_path / "nowhere")
    assert (
        DemoConfig(out=str(run.path)).cache_dir() == run.cache
        and DemoConfig(cache="elsewhere").cache_dir().name == "elsewhere"
    )


def test_the_optimizer_config_is_the_runs_and_builds_adamw_with_a_warmup_cosine():
    config = DemoConfig(lr=0.1, weight_decay=0.01, warmup_epochs=2, max_epochs=10, end_lr=0.001, warmup_multiplier=0.1)
    optimizer = config.optimizer()
    assert optimizer == OptimizerConfig(
        lr=0.1, weight_decay=0.01, warmup_epochs=2, total_epochs=10, end_lr=0.001, warmup_multiplier=0.1
    )
    assert OptimizerConfig.of(optimizer.to_dict()) == optimizer and OptimizerConfig.of(None) == OptimizerConfig()
    with pytest.raises(OptionError, match="optimizer keys \\['momentum'\\]"):
        OptimizerConfig.of({"momentum": 0.9})
    weights = torch.nn.Parameter(torch.zeros(3))
    built = warmup_cosine_optimizer([weights], optimizer.to_dict())
    adamw, schedule = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert isinstance(adamw, torch.optim.AdamW) and built["lr_scheduler"]["interval"] == "epoch"
    assert adamw.defaults["weight_decay"] == 0.01
    reference_parameter = torch.nn.Parameter(torch.zeros(3))
    reference_optimizer = torch.optim.AdamW([reference_parameter], lr=0.1)
    reference = WarmupCosineSchedule(
        reference_optimizer, warmup_steps=2, t_total=10, end_lr=0.001, warmup_multiplier=0.1
    )
    ours, theirs = [], []
    for _ in range(10):
        ours.append(adamw.param_groups[0]["lr"])
        theirs.append(reference_optimizer.param_groups[0]["lr"])
        adamw.step()
        reference_optimizer.step()
        schedule.step()
        reference.step()
    assert ours == pytest.approx(theirs) and ours[0] == pytest.approx(0.01) and max(ours) == pytest.approx(0.1)


def test_checkpoints_from_before_the_optimizer_config_still_load():
    legacy = {
        "model": "ct-fm",
        "lr": 2e-4,
        "weight_decay": 1e-5,
        "warmup_epochs": 3,
        "max_epochs": 300,
        "end_lr": 2e-6,
        "warmup_multiplier": 0.1,
    }
    upgraded = upgrade_hyperparameters(legacy)
    assert upgraded == {"model": "ct-fm", "optimizer": OptimizerConfig(2e-4, 1e-5, 3, 300, 2e-6, 0.1).to_dict()}
    assert upgrade_hyperparameters(upgraded) == upgraded and "lr" in legacy  # the caller's mapping is left alone
    # pretraining checkpoints had no end_lr / warmup_multiplier: MONAI's defaults, 0
    assert upgrade_hyperparameters({"lr": 1e-4, "max_epochs": 500})["optimizer"]["end_lr"] == 0.0

    class TakesItsOwnLr:
        def __init__(self, lr: float = 0.1):
            self.lr = lr

    class TakesAnOptimizer:
        def __init__(self, optimizer=None):
            self.optimizer = optimizer

    assert upgrade_hyperparameters({"lr": 0.05}, TakesItsOwnLr) == {"lr": 0.05}
    assert TakesAnOptimizer(**upgrade_hyperparameters({"lr": 0.05}, TakesAnOptimizer)).optimizer["lr"] == 0.05


def test_a_run_folder_is_a_weights_source(tmp_path):
    """Every weights loader takes a run folder for the weights it exported, and says when it has none."""
    from ctfm.models import create_model, save_pretrained

    run = RunFolder(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    with pytest.raises(CTInputError, match="is a run folder without export/model.safetensors"):
        create_model("ct-fm", weights=str(run.path), init_filters=4)
    encoder = create_model("ct-fm", init_filters=4)
    save_pretrained(encoder, run.export, name="ct-fm")
    loaded = create_model("ct-fm", weights=str(run.path), init_filters=4)
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    assert RunFolder.exported(tmp_path / "nowhere", "model.safetensors") is None


@pytest.mark.slow
@pytest.mark.parametrize(
    "verb",
    [
        ["pretrain", "--preset", "tiny"],
        ["finetune", "cls", "--preset", "tiny"],
    ],
)
def test_training_without_the_train_extra_is_one_line(verb, tmp_path):
    """Without lightning (the train extra), a training verb says which pip command installs it: exit 2, one line."""
    import subprocess
    import sys

    without_lightning = (
        "import sys; sys.modules['lightning'] = None; from ctfm.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = [*verb, "--set", "data=scans/", "--set", f"out={tmp_path / 'run'}"]
    result = subprocess.run(
        [sys.executable, "-c", without_lightning, *argv], capture_output=True, text=True, timeout=300
    )
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert errors[0].startswith("error: ") and "pip install 'ctfm[train]'" in errors[0]
    assert not (tmp_path / "run").exists()
