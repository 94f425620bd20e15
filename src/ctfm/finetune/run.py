"""Task-agnostic fine-tuning runs: typed config, run folder, Lightning trainer, exact resume, export.

The conventions are those of ``ctfm pretrain``: a config is a dataclass of values; a preset <
a YAML/JSON file < ``--set key=value`` overrides resolve it; the run folder holds::

    config.yaml            the resolved config
    metrics.csv            losses, learning rate and validation metrics (Lightning CSVLogger)
    tensorboard/           TensorBoard event files
    checkpoints/           epoch=E-step=S.ckpt every N epochs, last.ckpt, best.ckpt (by the task's monitor)
    export/                the trained model as a weights folder (from best.ckpt, else the last state)

A task (segmentation, classification) plugs in through :class:`FinetuneTask`: its config class
and presets, its LightningModule, its data loaders and its export. Training samples are
identified by (epoch, index) (:class:`ctfm.pretrain.data.EpochIndexSampler`), and a task's
dataset draws its random state from :func:`sample_random_state`, so a run resumed from
``last.ckpt`` sees exactly the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ctfm.errors import CTInputError, OptionError, one_line
from ctfm.pretrain.config import parse_set
from ctfm.runtime import rank_and_world_size, run_folder_trainer, write_text_atomic
from ctfm.pretrain.data import EpochIndexSampler

__all__ = [
    "FinetuneTask",
    "RunConfig",
    "parse_set",
    "read_config_file",
    "resolve_config",
    "rank_share",
    "run_finetune",
    "run_provenance",
    "sample_random_state",
    "samples_per_epoch",
    "save_config",
    "training_loader",
]


@dataclass
class RunConfig:
    """Settings every fine-tuning run shares; a task's config subclasses it and adds its own."""

    out: str = "runs/finetune"  # the run folder
    data: str = ""  # the training data (a manifest or a dataset folder: the task says which)
    cache: str = ""  # preprocessed cases (default <out>/cache)
    percentage: float = 100.0  # few-shot: keep the first round(n * percentage / 100) cases (the task says of which splits)
    encoder_weights: str = ""  # CT-FM encoder to start from (folder, hf-hub:, .ckpt, run folder); empty: random init
    model_kwargs: dict = field(default_factory=dict)  # network arguments, e.g. {"init_filters": 8} for a narrow network
    freeze: list = field(default_factory=list)  # parameter-name prefixes kept fixed, e.g. ["encoder"] or ["encoder.conv_init", "encoder.layers.0"]
    freeze_until_epoch: int = -1  # unfreeze from this epoch on (-1: frozen throughout)
    seed: int = 0
    batch_size: int = 2  # samples per device and step
    num_workers: int = 4
    max_epochs: int = 300
    steps_per_epoch: int = -1  # -1: one pass over the training cases per epoch
    max_steps: int = -1  # stop early after this many optimiser steps (-1: run max_epochs)
    lr: float = 2e-4
    weight_decay: float = 1e-5
    warmup_epochs: int = 3
    end_lr: float = 2e-6  # learning rate at the end of the cosine
    warmup_multiplier: float = 0.1  # the warm-up starts at lr * warmup_multiplier
    precision: str = "16-mixed"  # Lightning precision: 32-true, 16-mixed, bf16-mixed
    accelerator: str = "auto"
    devices: int = 4
    num_nodes: int = 1
    strategy: str = "ddp"
    sync_batchnorm: bool = True
    val_every_n_epochs: int = 5  # validate (and pick the best checkpoint) every N epochs; 0: never
    checkpoint_every_n_epochs: int = 10

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cache_dir(self) -> Path:
        """Where preprocessed cases are kept: ``cache``, else ``<out>/cache``."""
        return Path(self.cache) if self.cache else Path(self.out) / "cache"


def read_config_file(path: str | Path, presets: dict[str, dict[str, Any]], what: str = "fine-tuning") -> dict[str, Any]:
    """Values of a YAML or JSON config file; ``preset: NAME`` in it starts from that preset."""
    path = Path(path)
    if not path.is_file():
        raise CTInputError(path, "no such config file", "check the path given to --config")
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        if is_yaml:
            import yaml

            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError
        raise CTInputError(path, f"not valid {'YAML' if is_yaml else 'JSON'} ({one_line(exc, 120)})", "fix the syntax; a config holds key: value pairs") from None
    if not isinstance(data, dict):
        raise CTInputError(path, "a config file holds a mapping of keys to values", "write key: value pairs")
    if "preset" in data:
        data = {**presets[_preset_name(data.pop("preset"), presets, what)], **data}
    return data


def _preset_name(name: str, presets: dict, what: str) -> str:
    if name not in presets:
        raise OptionError(f"unknown {what} preset {name!r}; known: {', '.join(sorted(presets))}")
    return name


def resolve_config(cls, presets: dict[str, dict[str, Any]], preset: str | None = None, file: str | Path | None = None, overrides: dict[str, Any] | None = None, what: str = "fine-tuning"):
    """``cls(**(preset < file < overrides))``; unknown keys and bad shared values are refused.

    ``cls`` is a dataclass subclassing :class:`RunConfig`; a ``check()`` method on it, if any,
    validates the task's own keys.
    """
    values: dict[str, Any] = dict(presets[_preset_name(preset, presets, what)]) if preset else {}
    if file:
        values.update(read_config_file(file, presets, what))
    values.update(overrides or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionError(f"unknown config keys {unknown}; known keys: {', '.join(sorted(known))}")
    config = cls(**values)
    _check_run(config)
    if hasattr(config, "check"):
        config.check()
    return config


def _check_run(config: RunConfig) -> None:
    for key in ("batch_size", "devices", "num_nodes", "max_epochs"):
        value = getattr(config, key)
        if not isinstance(value, int) or value < 1:
            raise OptionError(f"{key} {value!r}: expected a whole number >= 1")
    for key in ("num_workers", "val_every_n_epochs", "warmup_epochs"):
        value = getattr(config, key)
        if not isinstance(value, int) or value < 0:
            raise OptionError(f"{key} {value!r}: expected a whole number >= 0")
    if not isinstance(config.checkpoint_every_n_epochs, int) or config.checkpoint_every_n_epochs < 1:
        raise OptionError(f"checkpoint_every_n_epochs {config.checkpoint_every_n_epochs!r}: expected a whole number >= 1")
    if config.steps_per_epoch == 0 or config.steps_per_epoch < -1:
        raise OptionError(f"steps_per_epoch {config.steps_per_epoch}: expected a positive number, or -1 for one pass over the cases")
    if not config.lr > 0:
        raise OptionError(f"lr {config.lr}: expected a positive learning rate")
    if not 0 < float(config.percentage) <= 100:
        raise OptionError(f"percentage {config.percentage}: expected a share of the cases in (0, 100]")
    if not isinstance(config.freeze, list) or not all(isinstance(p, str) and p for p in config.freeze):
        raise OptionError(f"freeze {config.freeze!r}: expected a list of parameter-name prefixes, e.g. [\"encoder\"]")
    if not isinstance(config.model_kwargs, dict):
        raise OptionError(f"model_kwargs {config.model_kwargs!r}: expected a mapping of network arguments, e.g. {{\"init_filters\": 8}}")


def save_config(config: RunConfig, path: str | Path) -> None:
    import yaml

    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=True))


# --------------------------------------------------------------------------- data helpers


def sample_random_state(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.RandomState:
    """A NumPy RandomState that is a pure function of (seed, epoch, index): for MONAI's
    ``Randomizable.set_random_state``, so resumed runs and DDP ranks draw what one run would."""
    entropy = np.random.SeedSequence([int(seed), int(epoch), int(index), int(stream), 11]).generate_state(1)[0]
    return np.random.RandomState(int(entropy))


def samples_per_epoch(config: RunConfig, n_cases: int) -> int:
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
        import torch

        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        hyper = dict(state["hyper_parameters"])
        hyper.update({key: None for key in self.initial_weight_keys if key in hyper})
        module = self.module_class(**hyper)
        module.load_state_dict(state["state_dict"])
        return module, state


def training_loader(config: RunConfig, dataset, n_cases: int):
    """The training DataLoader: samples identified by (epoch, index), ``samples_per_epoch`` an epoch."""
    from torch.utils.data import DataLoader


    sampler = EpochIndexSampler(samples_per_epoch(config, n_cases))
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers, persistent_workers=config.num_workers > 0)


def rank_share(cases: list) -> list:
    """This process's share of the validation cases (every ``world``-th from its rank); the
    metrics are gathered across ranks."""
    rank, world = rank_and_world_size()
    return cases[rank::world] if world > 1 else cases


def run_provenance(config: RunConfig, train: list, val: list) -> dict[str, Any]:
    """What an export records of the data and start of its run (task-specific keys added by the task)."""
    return {
        "data": str(config.data),
        "train_cases": len(train),
        "val_cases": len(val),
        "percentage": config.percentage,
        "encoder_weights": config.encoder_weights or "random-init",
        "seed": config.seed,
    }


def build_trainer(config: RunConfig, task: FinetuneTask, has_validation: bool, extra_callbacks=(), progress_bar: bool = True):
    """The run folder's Trainer (:func:`ctfm.runtime.run_folder_trainer`) with validation every
    ``val_every_n_epochs`` epochs and ``best.ckpt`` kept by the task's monitor."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    validate = has_validation and config.val_every_n_epochs > 0
    callbacks = []
    if validate:
        callbacks.append(ModelCheckpoint(dirpath=Path(config.out) / "checkpoints", filename="best", monitor=task.monitor, mode=task.monitor_mode, save_top_k=1, enable_version_counter=False, auto_insert_metric_name=False))
    return run_folder_trainer(
        config,
        [*callbacks, *extra_callbacks],
        progress_bar=progress_bar,
        check_val_every_n_epoch=config.val_every_n_epochs if validate else 1,
        limit_val_batches=1.0 if validate else 0,
        num_sanity_val_steps=0,
    )


def run_finetune(config: RunConfig, task: FinetuneTask, resume: bool = True, extra_callbacks=(), progress_bar: bool = True) -> Path:
    """Train ``task`` with ``config``, resuming from ``<out>/checkpoints/last.ckpt`` when it exists;
    export the best (else the last) state to ``<out>/export``. Returns the export folder."""
    import lightning as L

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = rank_and_world_size()[0]
    if rank == 0:
        save_config(config, out / "config.yaml")
    L.seed_everything(config.seed, workers=True, verbose=False)
    train_loader, val_loader = task.build_dataloaders(config)
    module = task.build_module(config)
    trainer = build_trainer(config, task, val_loader is not None, extra_callbacks, progress_bar=progress_bar)
    last = out / "checkpoints" / "last.ckpt"
    warnings.filterwarnings("ignore", message=".*validation_step.*but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=str(last) if resume and last.exists() else None)
    best = out / "checkpoints" / "best.ckpt"
    if trainer.global_rank != 0:
        return out / "export"
    provenance = {"source": f"ctfm finetune {task.name}", "run": out.name, "global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch)}
    if best.exists():
        module, state = task.load_module(best)
        provenance.update(checkpoint="best.ckpt", best_epoch=int(state.get("epoch", -1)), best_step=int(state.get("global_step", -1)), monitor=task.monitor)
        callbacks = state.get("callbacks", {})
        for key, value in callbacks.items():
            if key.startswith("ModelCheckpoint") and isinstance(value, dict) and value.get("monitor") == task.monitor and value.get("best_model_score") is not None:
                provenance["best_score"] = float(value["best_model_score"])
    else:
        provenance["checkpoint"] = "last state"
    return task.export(module.cpu().eval(), out / "export", config, provenance)
