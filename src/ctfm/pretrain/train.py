"""Run a pretraining job from a :class:`PretrainConfig`: cache, data, trainer, checkpoints, export.

The run folder (``config.out``, a :class:`ctfm.runs.RunFolder`) gets ``config.yaml``,
``metrics.csv`` (loss and learning rate per step / epoch), ``tensorboard/``, ``checkpoints/``
(every N epochs, and ``last.ckpt``) and ``export/``: the encoder in the published folder layout
(``ctfm embed --weights RUN/export``).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ctfm.errors import OptionError
from ctfm.models import save_pretrained
from ctfm.preprocess import get_preset
from ctfm.pretrain.cache import VolumeCache, build_cache
from ctfm.pretrain.config import PretrainConfig, training_spec
from ctfm.pretrain.data import ViewsDataset
from ctfm.pretrain.losses import loss_arguments
from ctfm.pretrain.module import ContrastivePretrainer
from ctfm.pretrain.views import MultiCropViews
from ctfm.runs import EpochIndexSampler, build_trainer, seed_run, upgrade_hyperparameters
from ctfm.runtime import rank_and_world_size, write_text_atomic


def launch_rank() -> int:
    """Global rank of this process (:func:`ctfm.runtime.rank_and_world_size`), 0 when alone.

    Known from the launcher's environment before DDP is set up, so that one process builds the
    cache and writes the config.
    """
    return rank_and_world_size()[0]


def _cache_for(config: PretrainConfig, wait_seconds: float = 24 * 3600):
    data = Path(config.data)
    if not config.data:
        raise OptionError(
            "config.data is empty: give a manifest, a folder of scans or a cache folder (--set data=PATH)"
        )
    spec = training_spec(config)
    if (data / "index.parquet").exists():
        cache = VolumeCache(data, spec=spec)
        if len(cache) == 0:
            raise OptionError(
                f"{data}: the cache holds no volumes preprocessed with {spec.name} "
                f"({'x'.join(f'{v:g}' for v in spec.spacing_mm)} mm); build one at that spacing, or set spacing_mm to "
                "the cache's"
            )
        return cache
    cache_dir = config.cache_dir()
    done = cache_dir / ".built"
    if launch_rank() == 0:
        done.unlink(missing_ok=True)
        summary = build_cache([str(data)], cache_dir, spec=spec, workers=config.cache_workers, progress=False)
        if summary.failed:
            warnings.warn(
                f"{len(summary.failed)} scan(s) could not be cached (see {cache_dir / 'failures.parquet'})",
                stacklevel=2,
            )
        write_text_atomic(done, "ok\n")
    else:  # other ranks wait for rank 0's cache instead of building it again
        deadline = time.monotonic() + wait_seconds
        while not done.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {launch_rank()}: no cache at {cache_dir} after {wait_seconds:.0f} s")
            time.sleep(2)
    return VolumeCache(cache_dir, spec=spec)


def loss_kwargs(config: PretrainConfig) -> dict:
    """The loss's keyword arguments: ``temperature`` for the losses that take one, then ``loss_kwargs``."""
    base = {"temperature": config.temperature} if "temperature" in loss_arguments(config.loss) else {}
    return {**base, **config.loss_kwargs}


def build_module(config: PretrainConfig) -> ContrastivePretrainer:
    """The run's LightningModule: the config's encoder, loss and optimiser."""
    return ContrastivePretrainer(
        model=config.model,
        model_kwargs=config.model_kwargs,
        loss=config.loss,
        loss_kwargs=loss_kwargs(config),
        optimizer=config.optimizer(),
    )


def build_loader(config: PretrainConfig, cache) -> DataLoader:
    """Views of the cached volumes, ``steps_per_epoch`` batches an epoch on every rank."""
    views = MultiCropViews(
        num_crops=config.num_crops,
        crop_size=config.crop_size,
        scale=config.crop_scale,
        flip_p=config.flip_p,
        histogram_p=config.histogram_shift_p,
        smooth_p=config.smooth_p,
    )
    dataset = ViewsDataset(cache, views, seed=config.seed)
    samples = config.steps_per_epoch * config.batch_size * max(1, config.devices) * config.num_nodes
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=EpochIndexSampler(samples),
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        pin_memory=False,
    )


def pretrain(config: PretrainConfig, resume: bool = True, extra_callbacks=(), progress_bar: bool = True) -> Path:
    """Train, resuming from ``<out>/checkpoints/last.ckpt`` when it exists; export the encoder.

    Returns the export folder.
    """
    folder = seed_run(config)
    cache = _cache_for(config)
    module = build_module(config)
    trainer = build_trainer(config, extra_callbacks, progress_bar=progress_bar)
    trainer.fit(module, train_dataloaders=build_loader(config, cache), ckpt_path=folder.resume_checkpoint(resume))
    export = folder.export
    if trainer.is_global_zero:
        export_encoder(module, export, config, step=trainer.global_step, epoch=trainer.current_epoch)
    return export


def export_encoder(
    module, folder: Path, config: PretrainConfig | None = None, step: int | None = None, epoch: int | None = None
) -> Path:
    """Write ``module.encoder`` in the published layout (config.json + model.safetensors + ctfm.json)."""
    provenance = {"source": "ctfm pretrain", "global_step": step, "epoch": epoch}
    if config is not None:
        provenance.update(loss=config.loss, num_crops=config.num_crops, seed=config.seed)
    # The sidecar records what the encoder was trained on (ct-fm-ssl volumes at the run's
    # spacing): every consumer derives its preprocessing from it.
    spec = training_spec(config) if config is not None else get_preset("ct-fm-ssl")
    return save_pretrained(
        module.encoder.cpu().eval(),
        folder,
        name=config.model if config else "ct-fm",
        provenance=provenance,
        overwrite=True,
        preprocess=spec,
    )


def export_checkpoint(checkpoint: str | Path, folder: str | Path) -> Path:
    """Export the encoder of a pretraining checkpoint (loaded with weights_only=True)."""
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    hyper = upgrade_hyperparameters(state["hyper_parameters"], ContrastivePretrainer)
    module = ContrastivePretrainer(**hyper)
    module.load_state_dict(state["state_dict"])
    config = PretrainConfig(model=hyper.get("model", "ct-fm"))
    return export_encoder(module, Path(folder), config, step=state.get("global_step"), epoch=state.get("epoch"))
