"""Task-agnostic fine-tuning runs on the shared run system (:mod:`ctfm.runs`): config, run folder,
trainer, exact resume, export.

A task's config extends :class:`FinetuneConfig` (a :class:`ctfm.runs.RunConfig`); a preset < a
YAML/JSON file < ``--set key=value`` overrides resolve it (:func:`ctfm.runs.resolve_config`). The
run folder (:class:`ctfm.runs.RunFolder`) holds ``config.yaml``, ``metrics.csv`` (losses, learning
rate and validation metrics), ``tensorboard/``, ``checkpoints/`` (every N epochs, ``last.ckpt``,
``best.ckpt`` by the task's monitor) and ``export/`` (from ``best.ckpt``, else the last state).

A task (segmentation, classification) plugs in through :class:`FinetuneTask`: its LightningModule,
its data loaders and its export. Training samples are identified by (epoch, index)
(:class:`ctfm.runs.EpochIndexSampler`), and a task's dataset draws its random state from
:func:`sample_random_state`, so a run resumed from ``last.ckpt`` sees exactly the samples an
uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from ctfm.errors import OptionError
from ctfm.runs import EpochIndexSampler, RunConfig, build_trainer, seed_run, upgrade_hyperparameters
from ctfm.runtime import rank_and_world_size

__all__ = [
    "FinetuneConfig",
    "FinetuneTask",
    "rank_share",
    "run_finetune",
    "run_provenance",
    "sample_random_state",
    "samples_per_epoch",
    "training_loader",
]


@dataclass
class FinetuneConfig(RunConfig):
    """Settings every fine-tuning run shares (run keys: :class:`ctfm.runs.RunConfig`, here with CT-FM's
    fine-tuning defaults); a task's config subclasses it and adds its own."""

    kind: ClassVar[str] = "fine-tuning"

    # RunConfig keys, at CT-FM's fine-tuning values.
    out: str = "runs/finetune"
    data: str = ""  # the training data (a manifest or a dataset folder: the task says which)
    batch_size: int = 2  # samples per device and step
    num_workers: int = 4
    max_epochs: int = 300
    steps_per_epoch: int = -1  # -1: one pass over the training cases per epoch
    lr: float = 2e-4
    weight_decay: float = 1e-5
    warmup_epochs: int = 3
    end_lr: float = 2e-6
    warmup_multiplier: float = 0.1
    # Fine-tuning's own keys.
    # few-shot: keep the first round(n * percentage / 100) cases (the task says of which splits)
    percentage: float = 100.0
    encoder_weights: str = ""  # CT-FM encoder to start from (folder, hf-hub:, .ckpt, run folder); empty: random init
    # parameter-name prefixes kept fixed, e.g. ["encoder"] or ["encoder.conv_init", "encoder.layers.0"]
    freeze: list = field(default_factory=list)
    freeze_until_epoch: int = -1  # unfreeze from this epoch on (-1: frozen throughout)
    val_every_n_epochs: int = 5  # validate (and pick the best checkpoint) every N epochs; 0: never

    def check(self) -> None:
        super().check()
        if not isinstance(self.val_every_n_epochs, int) or self.val_every_n_epochs < 0:
            raise OptionError(f"val_every_n_epochs {self.val_every_n_epochs!r}: expected a whole number >= 0")
        if not 0 < float(self.percentage) <= 100:
            raise OptionError(f"percentage {self.percentage}: expected a share of the cases in (0, 100]")
        if not isinstance(self.freeze, list) or not all(isinstance(p, str) and p for p in self.freeze):
            raise OptionError(f'freeze {self.freeze!r}: expected a list of parameter-name prefixes, e.g. ["encoder"]')


# --------------------------------------------------------------------------- data helpers


def sample_random_state(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.RandomState:
    """A NumPy RandomState that is a pure function of (seed, epoch, index): for MONAI's
    ``Randomizable.set_random_state``, so resumed runs and DDP ranks draw what one run would."""
    entropy = np.random.SeedSequence([int(seed), int(epoch), int(index), int(stream), 11]).generate_state(1)[0]
    return np.random.RandomState(int(entropy))


def samples_per_epoch(config: FinetuneConfig, n_cases: int) -> int:
    """Samples drawn per epoch over all ranks: ``steps_per_epoch`` steps, or one pass over the cases."""
    per_step = config.batch_size * max(1, config.devices) * config.num_nodes
    steps = config.steps_per_epoch if config.steps_per_epoch > 0 else max(1, math.ceil(n_cases / per_step))
    return steps * per_step


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which an epoch visits ``n`` cases: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch), 7]).permutation(n)


# --------------------------------------------------------------------------- tasks and runs


class FinetuneTask:
    """What a task gives the run: its module, its data, its export. Subclass and override.

    ``monitor`` is the logged validation metric that picks ``best.ckpt`` (``monitor_mode`` "max"
    or "min"); without validation data there is no best checkpoint and the export takes the
    last state.
    """

    name = "task"
    monitor = "val/loss"
    monitor_mode = "min"

    def build_module(self, config):  # -> lightning.LightningModule
        raise NotImplementedError

    def build_dataloaders(self, config):  # -> (train DataLoader, validation DataLoader or None)
        raise NotImplementedError

    def export(self, module, folder: Path, config, provenance: dict) -> Path:
        raise NotImplementedError

    # Hyperparameters naming weights to start from: the checkpoint's state dict holds every weight,
    # so a reload sets them to None instead of reading those files again.
    initial_weight_keys: tuple[str, ...] = ("encoder_weights",)
    module_class = None

    def load_module(self, checkpoint: Path):
        """The module of a checkpoint of this task and the checkpoint (loaded with ``weights_only=True``)."""
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        hyper = upgrade_hyperparameters(state["hyper_parameters"], self.module_class)
        hyper.update({key: None for key in self.initial_weight_keys if key in hyper})
        module = self.module_class(**hyper)
        module.load_state_dict(state["state_dict"])
        return module, state


def training_loader(config: FinetuneConfig, dataset, n_cases: int) -> DataLoader:
    """The training DataLoader: samples identified by (epoch, index), ``samples_per_epoch`` an epoch."""
    sampler = EpochIndexSampler(samples_per_epoch(config, n_cases))
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
    )


def rank_share(cases: list) -> list:
    """This process's share of the validation cases (every ``world``-th from its rank); the
    metrics are gathered across ranks."""
    rank, world = rank_and_world_size()
    return cases[rank::world] if world > 1 else cases


def run_provenance(config: FinetuneConfig, train: list, val: list) -> dict[str, Any]:
    """What an export records of the data and start of its run (task-specific keys added by the task)."""
    return {
        "data": str(config.data),
        "train_cases": len(train),
        "val_cases": len(val),
        "percentage": config.percentage,
        "encoder_weights": config.encoder_weights or "random-init",
        "seed": config.seed,
    }


def run_finetune(
    config: FinetuneConfig, task: FinetuneTask, resume: bool = True, extra_callbacks=(), progress_bar: bool = True
) -> Path:
    """Train ``task`` with ``config``, resuming from ``<out>/checkpoints/last.ckpt`` when it exists;
    export the best (else the last) state to ``<out>/export``. Returns the export folder."""
    folder = seed_run(config)
    module = task.build_module(config)  # first: its settings (freeze prefixes) are checked before the data is read
    train_loader, val_loader = task.build_dataloaders(config)
    trainer = build_trainer(
        config,
        extra_callbacks,
        progress_bar=progress_bar,
        val_every_n_epochs=config.val_every_n_epochs if val_loader is not None else 0,
        monitor=task.monitor,
        monitor_mode=task.monitor_mode,
    )
    resume_from = folder.resume_checkpoint(resume)
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=resume_from)
    if trainer.global_rank != 0:
        return folder.export
    provenance = {
        "source": f"ctfm finetune {task.name}",
        "run": folder.path.name,
        "global_step": int(trainer.global_step),
        "epoch": int(trainer.current_epoch),
    }
    if folder.best.exists():
        module, state = task.load_module(folder.best)
        provenance.update(
            checkpoint=folder.BEST,
            best_epoch=int(state.get("epoch", -1)),
            best_step=int(state.get("global_step", -1)),
            monitor=task.monitor,
        )
        callbacks = state.get("callbacks", {})
        for key, value in callbacks.items():
            if (
                key.startswith("ModelCheckpoint")
                and isinstance(value, dict)
                and value.get("monitor") == task.monitor
                and value.get("best_model_score") is not None
            ):
                provenance["best_score"] = float(value["best_model_score"])
    else:
        provenance["checkpoint"] = "last state"
    return task.export(module.cpu().eval(), folder.export, config, provenance)
