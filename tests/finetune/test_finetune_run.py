"""Generic fine-tuning run plumbing: config resolution, run folder, best/last checkpoints, exact resume."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ctfm.errors import OptionError
from ctfm.finetune.run import (
    FinetuneConfig,
    FinetuneTask,
    epoch_order,
    run_finetune,
    sample_random_state,
    samples_per_epoch,
)
from ctfm.runs import resolve_config


@dataclass
class ToyConfig(FinetuneConfig):
    noise: float = 0.1

    def check(self):
        super().check()
        if self.noise < 0:
            raise OptionError(f"noise {self.noise}: expected >= 0")


TOY_PRESETS = {
    "tiny": {
        "batch_size": 4,
        "num_workers": 0,
        "max_epochs": 3,
        "steps_per_epoch": 2,
        "warmup_epochs": 0,
        "precision": "32-true",
        "accelerator": "cpu",
        "devices": 1,
        "strategy": "auto",
        "val_every_n_epochs": 1,
        "checkpoint_every_n_epochs": 1,
        "lr": 0.05,
    }
}


class ToyData(Dataset):
    """(epoch, index) -> (x [3], y []) with noise drawn from the sample's own random state."""

    def __init__(self, config):
        self.config = config

    def __len__(self):
        return 8

    def __getitem__(self, key):
        epoch, index = key
        rs = sample_random_state(self.config.seed, epoch, index)
        case = int(epoch_order(self.config.seed, epoch, 8)[index % 8])
        x = torch.tensor([case, 1.0, -case / 2], dtype=torch.float32)
        return x, (x.sum() + float(rs.normal(0, self.config.noise))).float()


class ToyModule(L.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x)[:, 0], y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.net(x)[:, 0], y), on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class ToyTask(FinetuneTask):
    name = "toy"
    monitor = "val/loss"
    monitor_mode = "min"
    module_class = ToyModule

    def build_module(self, config):
        return ToyModule(lr=config.lr)

    def build_dataloaders(self, config):
        from ctfm.runs import EpochIndexSampler

        data = ToyData(config)
        train = DataLoader(
            data, batch_size=config.batch_size, sampler=EpochIndexSampler(samples_per_epoch(config, len(data)))
        )
        val = DataLoader([(torch.ones(3), torch.tensor(3.0))], batch_size=1)
        return train, val

    def export(self, module, folder, config, provenance):
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), folder / "state.pt")
        (folder / "provenance.txt").write_text(repr(provenance))
        return folder


class Recorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"].detach()))


def toy_config(out, **sets):
    return resolve_config(ToyConfig, TOY_PRESETS, "tiny", None, {"out": str(out), **sets})


def test_config_layers_and_refusals(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("preset: tiny\nnoise: 0.5\nlr: 0.01\n")
    config = resolve_config(ToyConfig, TOY_PRESETS, None, file, {"lr": 0.02})
    assert (config.noise, config.lr, config.batch_size) == (0.5, 0.02, 4)
    with pytest.raises(OptionError, match="unknown config keys"):
        resolve_config(ToyConfig, TOY_PRESETS, "tiny", None, {"nosie": 1})
    with pytest.raises(OptionError, match="noise"):
        resolve_config(ToyConfig, TOY_PRESETS, "tiny", None, {"noise": -1})
    with pytest.raises(OptionError, match="unknown fine-tuning preset"):
        resolve_config(ToyConfig, TOY_PRESETS, "huge")
    with pytest.raises(OptionError, match="steps_per_epoch"):
        resolve_config(ToyConfig, TOY_PRESETS, "tiny", None, {"steps_per_epoch": 0})


@pytest.mark.slow
def test_run_folder_best_checkpoint_and_exact_resume(tmp_path):
    straight = Recorder()
    export = run_finetune(toy_config(tmp_path / "straight"), ToyTask(), extra_callbacks=[straight], progress_bar=False)
    run = tmp_path / "straight"
    assert (run / "config.yaml").exists() and (run / "metrics.csv").exists()
    assert {"last.ckpt", "best.ckpt", "epoch=0-step=2.ckpt"} <= {p.name for p in (run / "checkpoints").iterdir()}
    assert "val/loss" in (run / "metrics.csv").read_text()
    assert "best.ckpt" in (export / "provenance.txt").read_text()
    assert len(straight.losses) == 6
    first, second = Recorder(), Recorder()
    run_finetune(toy_config(tmp_path / "resumed", max_steps=2), ToyTask(), extra_callbacks=[first], progress_bar=False)
    run_finetune(toy_config(tmp_path / "resumed"), ToyTask(), extra_callbacks=[second], progress_bar=False)
    assert len(first.losses) == 2 and len(second.losses) == 4
    np.testing.assert_allclose(first.losses + second.losses, straight.losses, rtol=1e-6)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key])
