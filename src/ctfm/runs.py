"""Training runs: typed run configs, the run folder, and the Lightning trainer that writes it.

One system for ``ctfm pretrain`` and ``ctfm finetune``:

- :class:`RunConfig` holds what every run shares; pretraining and each fine-tuning task extend it
  with their own keys. :func:`resolve_config` merges a preset < a YAML/JSON file < ``--set``
  overrides (:func:`parse_set`), refuses unknown keys and bad values in one line
  (:class:`~ctfm.errors.OptionError`), and :func:`save_config` writes the resolved config beside
  the run's outputs.
- :class:`OptimizerConfig` is the optimiser a run's LightningModule receives whole;
  :func:`warmup_cosine_optimizer` builds AdamW with a warm-up cosine from it.
- :class:`RunFolder` is the one place that names a run folder's files::

      config.yaml            the resolved config
      metrics.csv            losses, learning rate, validation metrics (Lightning CSVLogger)
      tensorboard/           TensorBoard event files
      checkpoints/           epoch=E-step=S.ckpt every N epochs, last.ckpt, best.ckpt (with validation)
      export/                the trained weights folder
      cache/                 preprocessed inputs (unless the config names another cache)

- :func:`build_trainer` is the Lightning Trainer of a run folder, resuming from ``last.ckpt``.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from monai.optimizers import WarmupCosineSchedule
from torch.utils.data import Sampler

from ctfm.errors import CTInputError, OptionError, one_line, optional_import
from ctfm.runtime import (
    ACCELERATORS,
    check_accelerator,
    rank_and_world_size,
    require_output_dir,
    write_text_atomic,
)

__all__ = [
    "OptimizerConfig",
    "RunConfig",
    "RunFolder",
    "build_trainer",
    "parse_set",
    "read_config_file",
    "resolve_config",
    "save_config",
    "seed_run",
    "upgrade_hyperparameters",
    "warmup_cosine_optimizer",
]


# --------------------------------------------------------------------------- the optimiser


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with MONAI's warm-up cosine schedule, stepped once per epoch (CT-FM's recipes).

    The learning rate climbs from ``lr * warmup_multiplier`` to ``lr`` over ``warmup_epochs``,
    then follows a cosine down to ``end_lr`` at ``total_epochs``.
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_epochs: int = 0
    total_epochs: int = 100
    end_lr: float = 0.0
    warmup_multiplier: float = 0.0

    @classmethod
    def of(cls, value: OptimizerConfig | Mapping | None) -> OptimizerConfig:
        """An OptimizerConfig from itself, its :meth:`to_dict` mapping (module hyperparameters) or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise OptionError(f"optimizer keys {unknown}: unknown; known keys: {', '.join(sorted(known))}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Checkpoint hyperparameters from before modules took one optimiser config: key -> OptimizerConfig field.
_LEGACY_OPTIMIZER_KEYS = {
    "lr": "lr",
    "weight_decay": "weight_decay",
    "warmup_epochs": "warmup_epochs",
    "max_epochs": "total_epochs",
    "end_lr": "end_lr",
    "warmup_multiplier": "warmup_multiplier",
}


def upgrade_hyperparameters(hyper: Mapping[str, Any], module_class=None) -> dict[str, Any]:
    """A checkpoint's ``hyper_parameters`` in today's spelling, for ``module_class(**hyper)``.

    Older checkpoints hold the optimiser as separate keys (``lr``, ``weight_decay``,
    ``warmup_epochs``, ``max_epochs``, ``end_lr``, ``warmup_multiplier``); for a module that takes
    one ``optimizer`` (any module when ``module_class`` is None) they become that mapping.
    Current checkpoints, and modules without an ``optimizer`` argument, come back unchanged.
    """
    hyper = dict(hyper)
    if "optimizer" in hyper:
        return hyper
    if module_class is not None and "optimizer" not in inspect.signature(module_class).parameters:
        return hyper
    legacy = {new: hyper.pop(old) for old, new in _LEGACY_OPTIMIZER_KEYS.items() if old in hyper}
    if legacy:
        hyper["optimizer"] = OptimizerConfig.of(legacy).to_dict()
    return hyper


def warmup_cosine_optimizer(parameters, optimizer: OptimizerConfig | Mapping | None) -> dict[str, Any]:
    """AdamW over ``parameters`` + the warm-up cosine of ``optimizer``, stepped per epoch: what a
    LightningModule's ``configure_optimizers`` returns."""
    config = OptimizerConfig.of(optimizer)
    adamw = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    schedule = WarmupCosineSchedule(
        adamw,
        warmup_steps=config.warmup_epochs,
        t_total=config.total_epochs,
        end_lr=config.end_lr,
        warmup_multiplier=config.warmup_multiplier,
    )
    return {"optimizer": adamw, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


# --------------------------------------------------------------------------- run configuration


@dataclass
class RunConfig:
    """The settings every training run shares; pretraining and each fine-tuning task subclass it,
    add their own keys and may give shared keys their recipe's defaults.

    A subclass validates its own keys in ``check()`` (calling ``super().check()`` first);
    ``kind`` names the run in error messages ("unknown pretraining preset ...").
    """

    kind: ClassVar[str] = "training"

    out: str = "runs/run"  # the run folder (RunFolder): config, metrics, TensorBoard, checkpoints, export
    data: str = ""  # the training data (the run says what it takes)
    cache: str = ""  # preprocessed inputs (default <out>/cache)
    model_kwargs: dict = field(default_factory=dict)  # network arguments, e.g. {"init_filters": 8} for a narrow network
    seed: int = 0
    batch_size: int = 2  # samples per device and step
    num_workers: int = 4
    max_epochs: int = 100
    steps_per_epoch: int = (
        -1
    )  # optimiser steps an epoch (-1: one pass over the training cases, where the run has cases)
    max_steps: int = -1  # stop early after this many optimiser steps (-1: run max_epochs)
    # The optimiser (OptimizerConfig): AdamW, warm-up then cosine to end_lr, stepped per epoch.
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_epochs: int = 0
    end_lr: float = 0.0  # learning rate at the end of the cosine
    warmup_multiplier: float = 0.0  # the warm-up starts at lr * warmup_multiplier
    # Where and how it runs (Lightning).
    precision: str = "16-mixed"  # Lightning precision: 32-true, 16-mixed, bf16-mixed
    accelerator: str = "auto"
    devices: int = 4
    num_nodes: int = 1
    strategy: str = "ddp"
    sync_batchnorm: bool = True
    checkpoint_every_n_epochs: int = 10

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def optimizer(self) -> OptimizerConfig:
        """The run's optimiser, its cosine ending at ``max_epochs``."""
        return OptimizerConfig(
            lr=float(self.lr),
            weight_decay=float(self.weight_decay),
            warmup_epochs=int(self.warmup_epochs),
            total_epochs=int(self.max_epochs),
            end_lr=float(self.end_lr),
            warmup_multiplier=float(self.warmup_multiplier),
        )

    def folder(self) -> RunFolder:
        return RunFolder(self.out)

    def cache_dir(self) -> Path:
        """Where preprocessed inputs are kept: ``cache``, else ``<out>/cache``."""
        return Path(self.cache) if self.cache else self.folder().cache

    def check(self) -> None:
        """Refuse shared values a run cannot use (one-line :class:`OptionError`)."""
        for key in ("batch_size", "devices", "num_nodes", "max_epochs", "checkpoint_every_n_epochs"):
            _whole_number(key, getattr(self, key), minimum=1)
        for key in ("num_workers", "warmup_epochs", "seed"):
            _whole_number(key, getattr(self, key), minimum=0)
        for key in ("steps_per_epoch", "max_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value == 0 or value < -1:
                raise OptionError(f"{key} {value!r}: expected a positive whole number, or -1 for {_UNSET[key]}")
        for key in ("lr", "weight_decay", "end_lr", "warmup_multiplier"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise OptionError(f"{key} {value!r}: expected a number >= 0")
        if not self.lr > 0:
            raise OptionError(f"lr {self.lr}: expected a positive learning rate")
        if not isinstance(self.model_kwargs, dict):
            raise OptionError(
                f"model_kwargs {self.model_kwargs!r}: expected a mapping of network arguments, e.g. "
                '{"init_filters": 8}'
            )
        if not isinstance(self.out, str) or not self.out.strip():
            raise OptionError(f"out {self.out!r}: expected the run folder's path (--set out=runs/NAME)")
        if not isinstance(self.accelerator, str) or self.accelerator.strip().lower() not in ACCELERATORS:
            raise OptionError(f"accelerator {self.accelerator!r}: unknown; known: {', '.join(ACCELERATORS)}")


_UNSET = {"steps_per_epoch": "one pass over the training cases", "max_steps": "no limit"}


def _whole_number(key: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise OptionError(f"{key} {value!r}: expected a whole number >= {minimum}")


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set`` items -> values: ``["lr=3e-4", 'model_kwargs={"init_filters": 8}', "data=scans/"]``
    -> ``{"lr": 0.0003, "model_kwargs": {"init_filters": 8}, "data": "scans/"}`` (JSON values, else strings)."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--set {item!r}: expected key=value")
        try:
            values[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            values[key.strip()] = value
    return values


def _preset(name: str, presets: Mapping[str, Mapping[str, Any]], kind: str) -> dict[str, Any]:
    if name not in presets:
        raise OptionError(f"unknown {kind} preset {name!r}; known: {', '.join(sorted(presets))}")
    return dict(presets[name])


def read_config_file(
    path: str | Path, presets: Mapping[str, Mapping[str, Any]], kind: str = "training"
) -> dict[str, Any]:
    """The values of a YAML or JSON config file (values only, no code); ``preset: NAME`` in it
    starts from that preset."""
    path = Path(path)
    if not path.is_file():
        raise CTInputError(path, "no such config file", "check the path given to --config")
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    yaml = optional_import("yaml", "train", "YAML config files") if is_yaml else None
    try:
        text = path.read_text(encoding="utf-8")
        data = (yaml.safe_load(text) or {}) if is_yaml else json.loads(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError
        problem = f"not valid {'YAML' if is_yaml else 'JSON'} ({one_line(exc, 120)})"
        raise CTInputError(path, problem, "fix the syntax; a config holds key: value pairs") from None
    if not isinstance(data, dict):
        raise CTInputError(path, "a config file holds a mapping of keys to values", "write key: value pairs")
    if "preset" in data:
        data = {**_preset(data.pop("preset"), presets, kind), **data}
    return data


def resolve_config(
    cls: type[RunConfig],
    presets: Mapping[str, Mapping[str, Any]],
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
):
    """``cls(**(preset < file < overrides))``, checked: unknown keys and bad values are refused in one line.

    ``cls`` is a :class:`RunConfig` dataclass; its ``check()`` validates the values.
    """
    values: dict[str, Any] = _preset(preset, presets, cls.kind) if preset else {}
    if file:
        values.update(read_config_file(file, presets, cls.kind))
    values.update(overrides or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionError(f"unknown config keys {unknown}; known keys: {', '.join(sorted(known))}")
    config = cls(**values)
    config.check()
    return config


def save_config(config: RunConfig, path: str | Path) -> Path:
    """Write the resolved ``config`` as YAML (keys sorted), all or nothing; ``--config`` reads it back."""
    yaml = optional_import("yaml", "train", "saving a run's config.yaml")
    return write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=True))


# --------------------------------------------------------------------------- the run folder


class RunFolder:
    """The files of a run folder (module docstring), named in this one place.

    >>> RunFolder("runs/tiny").last                        # doctest: +SKIP
    PosixPath('runs/tiny/checkpoints/last.ckpt')
    """

    CONFIG = "config.yaml"
    LEGACY_CONFIGS = ("resolved_config.yaml",)  # what other trainers (Lighter) call theirs
    METRICS = "metrics.csv"
    TENSORBOARD = "tensorboard"
    CHECKPOINTS = "checkpoints"
    LAST = "last.ckpt"
    BEST = "best.ckpt"
    PERIODIC = "{epoch}-{step}"  # Lightning's filename pattern of the every-N-epochs checkpoints
    EXPORT = "export"
    CACHE = "cache"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def last(self) -> Path:
        return self.checkpoints / self.LAST

    @property
    def best(self) -> Path:
        return self.checkpoints / self.BEST

    @property
    def export(self) -> Path:
        return self.path / self.EXPORT

    @property
    def cache(self) -> Path:
        return self.path / self.CACHE

    def resume_checkpoint(self, resume: bool = True) -> str | None:
        """``last.ckpt`` for Lightning's ``ckpt_path`` when ``resume`` and it exists, else None (a fresh start)."""
        return str(self.last) if resume and self.last.is_file() else None

    @classmethod
    def exported(cls, path: str | Path, weights_file: str) -> Path | None:
        """The ``export/`` folder of the run at ``path`` when it holds ``weights_file``; None when
        ``path`` is not a run folder; a one-line :class:`CTInputError` for a run that has not exported."""
        run = cls(path)
        if (run.export / weights_file).is_file():
            return run.export
        if cls.is_run(path):
            missing = f"{cls.EXPORT}/{weights_file}"
            problem = f"is a run folder without {missing} (the run has not finished or was not exported)"
            raise CTInputError(path, problem, f"let the run finish, or give one of its {cls.CHECKPOINTS}/*.ckpt")
        return None

    @classmethod
    def is_run(cls, path: str | Path) -> bool:
        """Whether ``path`` is a training run's folder: it holds a checkpoints/ folder or a saved config."""
        path = Path(path)
        if not path.is_dir():
            return False
        return (path / cls.CHECKPOINTS).is_dir() or any(
            (path / name).is_file() for name in (cls.CONFIG, *cls.LEGACY_CONFIGS)
        )


# --------------------------------------------------------------------------- the trainer


def seed_run(config: RunConfig) -> RunFolder:
    """Start (or continue) ``config``'s run: create its folder, save the resolved config (rank 0
    only) and seed every random generator with ``config.seed``."""
    lightning = optional_import("lightning", "train")
    check_accelerator(config.accelerator)  # what the run asks for exists here, before any work
    require_output_dir(config.out, "run folder")
    folder = config.folder()
    folder.path.mkdir(parents=True, exist_ok=True)
    if rank_and_world_size()[0] == 0:
        save_config(config, folder.config)
    lightning.seed_everything(config.seed, workers=True, verbose=False)
    return folder


def build_trainer(
    config: RunConfig,
    callbacks=(),
    progress_bar: bool = True,
    val_every_n_epochs: int = 0,
    monitor: str | None = None,
    monitor_mode: str = "min",
):
    """The Lightning Trainer of ``config``'s run folder (:class:`RunFolder`).

    It writes ``metrics.csv``, ``tensorboard/`` (when a TensorBoard writer is installed),
    ``checkpoints/epoch=E-step=S.ckpt`` every ``checkpoint_every_n_epochs`` epochs and ``last.ckpt``,
    from which a run resumes. ``steps_per_epoch > 0`` bounds an epoch's batches. With
    ``val_every_n_epochs > 0`` it validates at that cadence and, given a logged ``monitor`` metric,
    keeps ``best.ckpt`` by it (``monitor_mode`` "max" or "min"); otherwise it never validates.
    ``callbacks`` come after the checkpoint and learning-rate callbacks.
    """
    lightning = optional_import("lightning", "train")
    pl_callbacks = optional_import("lightning.pytorch.callbacks", "train")
    pl_loggers = optional_import("lightning.pytorch.loggers", "train")

    folder = config.folder()
    sync_batchnorm = config.sync_batchnorm
    if sync_batchnorm and (config.accelerator == "cpu" or not torch.cuda.is_available()):
        # torch's SyncBatchNorm runs on GPUs only; CPU processes keep per-process statistics
        # (which only matters, and is only said, when there is more than one process).
        if config.devices * config.num_nodes > 1:
            warnings.warn(
                "sync_batchnorm needs GPUs: on CPU each process keeps its own BatchNorm statistics", stacklevel=2
            )
        sync_batchnorm = False
    periodic = pl_callbacks.ModelCheckpoint(
        dirpath=folder.checkpoints,
        filename=RunFolder.PERIODIC,
        every_n_epochs=config.checkpoint_every_n_epochs,
        save_top_k=-1,
        save_last=True,
    )
    periodic.CHECKPOINT_NAME_LAST = Path(RunFolder.LAST).stem
    run_callbacks = [periodic, pl_callbacks.LearningRateMonitor(logging_interval="epoch")]
    validate = val_every_n_epochs > 0
    if validate and monitor:
        best = pl_callbacks.ModelCheckpoint(
            dirpath=folder.checkpoints,
            filename=Path(RunFolder.BEST).stem,
            monitor=monitor,
            mode=monitor_mode,
            save_top_k=1,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        )
        run_callbacks.append(best)
    loggers = [pl_loggers.CSVLogger(save_dir=str(folder.path), name="", version="")]
    try:
        loggers.append(pl_loggers.TensorBoardLogger(save_dir=str(folder.path), name=RunFolder.TENSORBOARD, version=""))
    except ModuleNotFoundError:  # no TensorBoard writer installed: metrics.csv still records everything
        warnings.warn(
            f"no TensorBoard writer installed (pip install 'ctfm[train]'): metrics go to {RunFolder.METRICS} only",
            stacklevel=2,
        )
    # A resumed run writes into its own, non-empty folder.
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*validation_step.*but have no `val_dataloader`.*")
    return lightning.Trainer(
        default_root_dir=str(folder.path),
        max_epochs=config.max_epochs,
        max_steps=config.max_steps,
        limit_train_batches=config.steps_per_epoch if config.steps_per_epoch > 0 else 1.0,
        check_val_every_n_epoch=val_every_n_epochs if validate else 1,
        limit_val_batches=1.0 if validate else 0,
        num_sanity_val_steps=0,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=config.precision,
        sync_batchnorm=sync_batchnorm,
        use_distributed_sampler=False,  # EpochIndexSampler splits training samples across ranks itself
        logger=loggers,
        callbacks=[*run_callbacks, *callbacks],
        log_every_n_steps=1,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        deterministic=False,
    )


class EpochIndexSampler(Sampler):
    """Yields (epoch, index) for index = rank, rank + world, ... < samples_per_epoch.

    Lightning calls ``set_epoch`` before each epoch (as for a DistributedSampler); the rank and
    world size are read when iteration starts, after DDP has been set up.
    """

    def __init__(self, samples_per_epoch: int):
        self.samples_per_epoch = samples_per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        rank, world = rank_and_world_size(environment=False)
        return iter((self.epoch, i) for i in range(rank, self.samples_per_epoch, world))

    def __len__(self) -> int:
        rank, world = rank_and_world_size(environment=False)
        return len(range(rank, self.samples_per_epoch, world))
