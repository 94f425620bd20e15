"""Segmentation fine-tuning: SegResNetDS with the CT-FM encoder (CT-FM's TotalSegmentator recipe).

``ct-fm-totalseg`` (docs/finetune.md): SPL orientation, no resampling, HU [-1024, 2048] -> [0, 1],
foreground crop (HU > -1024, margin 10), pad to the patch; training crops of 96x160x160 voxels
centred on a foreground class chosen uniformly (never on background), RandAffine (p 0.2,
rotation 0.26 rad, scale 0.2), Gaussian smoothing (p 0.2, sigma 0.5-1), intensity scale (0.3,
p 0.5) and shift (0.1, p 0.5), Gaussian noise (std 0.1, p 0.2); deep-supervision Dice + CE;
AdamW 2e-4 (wd 1e-5), warm-up cosine (3 epochs, to 2e-6); 300 epochs; validation every 5 epochs
on 192x240x240 crops with a Gaussian sliding window (overlap 0.625), per-class Dice;
``best.ckpt`` by macro Dice; batch 2 per GPU, 4 GPUs, DDP, sync BN, 16-mixed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ctfm.errors import OptionError
from ctfm.finetune.data import few_shot, load_case, open_seg_data
from ctfm.finetune.run import (
    FinetuneConfig,
    FinetuneTask,
    epoch_order,
    rank_share,
    run_finetune,
    run_provenance,
    sample_random_state,
    training_loader,
)
from ctfm.finetune.seg_module import SegmentationFinetuner
from ctfm.models.segmentation import save_segmentation_model
from ctfm.preprocess import ForegroundCrop, PreprocessSpec, build_paired_transforms
from ctfm.preprocess.validate import require_size
from ctfm.runs import resolve_config
from ctfm.runtime import atomic_path


@dataclass
class SegConfig(FinetuneConfig):
    """Every value a segmentation fine-tuning run depends on (run keys: :class:`~ctfm.finetune.run.FinetuneConfig`).

    ``percentage`` takes the first share of the training cases (validation stays whole), as
    CT-FM's few-shot runs did; ``freeze`` prefixes name SegResNetDS parameters (``encoder``, ``up_layers``).
    """

    kind: ClassVar[str] = "segmentation fine-tuning"

    out: str = "runs/finetune-seg"
    data: str = ""  # a manifest (image, label[, split]), a TotalSegmentator v2 folder (meta.csv) or an MSD task folder (dataset.json)
    class_map: Any = None  # label value -> name of the files: a built-in name (totalseg-v2), a JSON file or a mapping; default from the data
    classes: list = field(default_factory=list)  # names to train on, in channel order (default: every class of the map)
    split_column: str = "split"  # TotalSegmentator meta.csv column holding train / val / test
    val_fold: int = 4  # MSD entries with this "fold" validate
    val_fraction: float = 0.0  # carve a seeded validation share out of the training cases when the data has none
    init_weights: str = ""  # a whole SegResNetDS (weights folder / fine-tuning run) to start from instead
    # The preprocessing of the training volumes (one PreprocessSpec; docs/finetune.md).
    orientation: str = "SPL"
    spacing_mm: list = field(default_factory=list)  # empty: no resampling (CT-FM's TotalSegmentator run)
    foreground_margin: int = 10
    patch_size: list = field(default_factory=lambda: [96, 160, 160])  # training crop, voxels (orientation order)
    val_patch_size: list = field(default_factory=lambda: [192, 240, 240])  # validation crop; empty: the whole volume
    # Augmentations.
    affine_p: float = 0.2
    rotate_range: float = 0.26  # radians, each axis
    scale_range: float = 0.2
    smooth_p: float = 0.2
    smooth_sigma: list = field(default_factory=lambda: [0.5, 1.0])
    intensity_scale: float = 0.3
    intensity_scale_p: float = 0.5
    intensity_shift: float = 0.1
    intensity_shift_p: float = 0.5
    noise_std: float = 0.1
    noise_p: float = 0.2
    # Loss and validation inference.
    deep_supervision_weights: str = "exp"  # MONAI DeepSupervisionLoss weight_mode: same, exp, two
    sw_batch_size: int = 2
    sw_overlap: float = 0.625

    def check(self) -> None:
        super().check()
        for key in ("patch_size",):
            value = getattr(self, key)
            if len(value) != 3 or not all(isinstance(v, int) and v > 0 for v in value):
                raise OptionError(f"{key} {value}: expected three positive voxel counts")
        if self.val_patch_size and (
            len(self.val_patch_size) != 3 or not all(isinstance(v, int) and v > 0 for v in self.val_patch_size)
        ):
            raise OptionError(
                f"val_patch_size {self.val_patch_size}: expected three positive voxel counts, or [] for whole volumes"
            )
        if self.spacing_mm and (
            len(self.spacing_mm) != 3 or not all(isinstance(v, (int, float)) and v > 0 for v in self.spacing_mm)
        ):
            raise OptionError(
                f"spacing_mm {self.spacing_mm}: expected three positive numbers (mm, orientation order), or [] for none"
            )
        for key in ("affine_p", "smooth_p", "intensity_scale_p", "intensity_shift_p", "noise_p"):
            if not 0.0 <= float(getattr(self, key)) <= 1.0:
                raise OptionError(f"{key} {getattr(self, key)}: expected a probability in [0, 1]")
        if not 0 <= self.sw_overlap < 1:
            raise OptionError(f"sw_overlap {self.sw_overlap}: expected a fraction in [0, 1)")
        if self.deep_supervision_weights not in ("same", "exp", "two"):
            raise OptionError(f"deep_supervision_weights {self.deep_supervision_weights!r}: expected same, exp or two")
        if self.encoder_weights and self.init_weights:
            raise OptionError(
                "give encoder_weights (a CT-FM encoder) or init_weights (a whole segmentation model), not both"
            )


SEG_PRESETS: dict[str, dict[str, Any]] = {
    # CT-FM's TotalSegmentator v2 run (docs/finetune.md): VISTA3D split in meta.csv's vista_split column.
    "ct-fm-totalseg": {"split_column": "vista_split"},
    # MSD tumour tasks the way CT-FM ran Auto3DSeg's segresnet: SPL, the CT-FM encoder, fold 4 validates.
    # Auto3DSeg's own defaults: 1x1x1 mm (median spacing in its analysis), patch from the data; here the
    # patch of the TotalSegmentator recipe at 1x1x1 mm, lr 2e-4, validation every 5 epochs.
    "ct-fm-msd": {
        "spacing_mm": [1.0, 1.0, 1.0],
        "val_fold": 4,
        "val_fraction": 0.0,
        "max_epochs": 300,
        "batch_size": 2,
    },
    # A laptop CPU in minutes: a narrow network, small crops, a few steps, one process, float32.
    "tiny": {
        "model_kwargs": {"init_filters": 4},
        "patch_size": [32, 32, 32],
        "val_patch_size": [],
        "spacing_mm": [4.0, 4.0, 4.0],
        "batch_size": 2,
        "num_workers": 0,
        "max_epochs": 3,
        "steps_per_epoch": 4,
        "warmup_epochs": 0,
        "val_every_n_epochs": 1,
        "checkpoint_every_n_epochs": 1,
        "val_fraction": 0.34,
        "lr": 2e-3,
        "precision": "32-true",
        "accelerator": "cpu",
        "devices": 1,
        "strategy": "auto",
        "sync_batchnorm": False,
        "sw_batch_size": 1,
        "sw_overlap": 0.25,
    },
}


def resolve_seg_config(preset: str | None = None, file=None, overrides: dict | None = None) -> SegConfig:
    return resolve_config(SegConfig, SEG_PRESETS, preset, file, overrides)


def training_spec(config: SegConfig):
    """The PreprocessSpec of the training volumes (patch padding included)."""

    spacing = tuple(float(v) for v in config.spacing_mm) if config.spacing_mm else None
    # With spacing None the spec counts patch millimetres as voxels (1 mm per voxel).
    patch_mm = tuple(float(p) * (s if spacing else 1.0) for p, s in zip(config.patch_size, spacing or (1.0, 1.0, 1.0)))
    return PreprocessSpec(
        name="ct-fm-seg" if spacing is None else f"ct-fm-seg-{'x'.join(f'{v:g}' for v in spacing)}mm",
        description="CT-FM segmentation fine-tuning volume: SPL, HU [-1024, 2048] -> [0, 1], foreground (HU > -1024) "
        "crop + margin, pad to the patch",
        orientation=config.orientation,
        spacing_mm=spacing,
        foreground_crop=ForegroundCrop(threshold_hu=-1024.0, margin_voxels=int(config.foreground_margin)),
        size_policy="pad",
        patch_size_mm=patch_mm,
        patch_multiple=1,
        pad_value_hu=-1024.0,
    )


# --------------------------------------------------------------------------- data


class PreprocessedCases:
    """Cases through the spec's deterministic chain, cached as .npz (image float32 [1, D, H, W] in
    [0, 1], label int16 [1, D, H, W] of training channels); loaded without pickles."""

    def __init__(self, cases, data, spec, cache_dir: Path):
        self.cases, self.data, self.spec, self.cache_dir = list(cases), data, spec, Path(cache_dir)
        self._memory: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def key(self, i: int) -> str:
        case = self.cases[i]
        stamp = [
            case.image,
            case.label,
            _mtime(case.image),
            _mtime(case.label),
            self.spec.content_hash(),
            sorted(self.data.value_map.items()),
            sorted(self.data.source_labels.items()),
        ]
        return hashlib.sha256(json.dumps(stamp, default=str).encode()).hexdigest()[:24]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self._memory:
            return self._memory[i]
        path = self.cache_dir / f"{self.cases[i].name}-{self.key(i)}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as stored:
                item = (stored["image"], stored["label"])
        else:
            item = self._preprocess(i)

            with atomic_path(path, suffix=".npz") as tmp:
                np.savez(tmp, image=item[0], label=item[1])
        if len(self._memory) < 64:
            self._memory[i] = item
        return item

    def prepare(self) -> None:
        """Preprocess (and cache) every case now, so that bad inputs stop the run before training."""
        for i in range(len(self.cases)):
            if not (self.cache_dir / f"{self.cases[i].name}-{self.key(i)}.npz").is_file():
                item = self._preprocess(i)

                with atomic_path(self.cache_dir / f"{self.cases[i].name}-{self.key(i)}.npz", suffix=".npz") as tmp:
                    np.savez(tmp, image=item[0], label=item[1])

    def _preprocess(self, i: int) -> tuple[np.ndarray, np.ndarray]:

        image, label = load_case(self.cases[i], self.data)
        require_size(image, self.spec, self.cases[i].image)  # bounded before the resampling allocates
        out = build_paired_transforms(self.spec)({"image": image.float(), "label": label.float()})
        return np.ascontiguousarray(out["image"].numpy(), dtype=np.float32), np.ascontiguousarray(
            np.rint(out["label"].numpy()), dtype=np.int16
        )


def _mtime(path) -> float:
    try:
        return Path(path).stat().st_mtime if path else 0.0
    except OSError:
        return 0.0


def training_augmentations(config: SegConfig, n_classes: int):
    """MONAI dictionary transforms after preprocessing: class-balanced crop, then the recipe's augmentations."""
    from monai.transforms import (
        Compose,
        RandAffined,
        RandCropByLabelClassesd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    sigma = tuple(float(v) for v in config.smooth_sigma)
    rotate = float(config.rotate_range)
    return Compose(
        [
            # ratios [0, 1, ..., 1]: a foreground class drawn uniformly as the crop centre, never background.
            RandCropByLabelClassesd(
                keys=("image", "label"),
                label_key="label",
                spatial_size=list(config.patch_size),
                ratios=[0] + [1] * (n_classes - 1),
                num_classes=n_classes,
                num_samples=1,
                warn=False,
            ),
            RandAffined(
                keys=("image", "label"),
                prob=config.affine_p,
                rotate_range=(rotate, rotate, rotate),
                scale_range=(config.scale_range,) * 3,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandGaussianSmoothd(keys="image", prob=config.smooth_p, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma),
            RandScaleIntensityd(keys="image", factors=config.intensity_scale, prob=config.intensity_scale_p),
            RandShiftIntensityd(keys="image", offsets=config.intensity_shift, prob=config.intensity_shift_p),
            RandGaussianNoised(keys="image", std=config.noise_std, prob=config.noise_p),
        ]
    )


class SegTrainDataset:
    """(epoch, index) -> {"image": [1, *patch] float32, "label": [1, *patch] int64}; random state from (seed, epoch, index)."""

    def __init__(self, cases: PreprocessedCases, config: SegConfig, n_classes: int):
        self.cases, self.config, self.n_classes = cases, config, n_classes
        self.augment = training_augmentations(config, n_classes)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, key):
        import torch
        from monai.transforms import RandSpatialCropd

        epoch, index = key
        case = int(epoch_order(self.config.seed, epoch, len(self.cases))[index % len(self.cases)])
        image, label = self.cases[case]
        item = {"image": torch.from_numpy(image), "label": torch.from_numpy(label.astype(np.float32))}
        self.augment.set_random_state(state=sample_random_state(self.config.seed, epoch, index))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not label.any():  # no foreground to centre on: a random crop
                crop = RandSpatialCropd(
                    keys=("image", "label"), roi_size=list(self.config.patch_size), random_size=False
                )
                crop.set_random_state(state=sample_random_state(self.config.seed, epoch, index, stream=1))
                item = _rest(self.augment, crop(item))
            else:
                item = self.augment(item)
        if isinstance(item, list):
            item = item[0]
        return {"image": _plain(item["image"]).float(), "label": _plain(item["label"]).round().long()}


def _rest(compose, item):
    for transform in compose.transforms[1:]:
        item = transform(item)
    return item


def _plain(tensor):
    from monai.data import MetaTensor

    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


class SegValDataset:
    """i -> {"image", "label"} of a validation case: a fixed crop of ``val_patch_size`` (seeded per case), or the whole volume."""

    def __init__(self, cases: PreprocessedCases, config: SegConfig):
        self.cases, self.config = cases, config

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int):
        import torch
        from monai.transforms import RandSpatialCropd, SpatialPadd

        image, label = self.cases[i]
        item = {"image": torch.from_numpy(image), "label": torch.from_numpy(label.astype(np.float32))}
        if self.config.val_patch_size:
            crop = RandSpatialCropd(
                keys=("image", "label"), roi_size=list(self.config.val_patch_size), random_size=False
            )
            crop.set_random_state(state=sample_random_state(self.config.seed, -1, i))
            item = SpatialPadd(keys=("image", "label"), spatial_size=list(self.config.val_patch_size), value=0)(
                crop(item)
            )
        return {"image": _plain(item["image"]).float(), "label": _plain(item["label"]).round().long()}


# --------------------------------------------------------------------------- the task


class SegmentationTask(FinetuneTask):
    name = "seg"
    monitor = "val/macro_dice"
    monitor_mode = "max"

    initial_weight_keys = ("encoder_weights", "init_weights")

    def __init__(self):
        self._data = None

    @property
    def module_class(self):

        return SegmentationFinetuner

    def data(self, config: SegConfig):
        if self._data is None:
            data = open_seg_data(
                config.data, config.class_map, config.split_column, config.val_fold, config.val_fraction, config.seed
            ).select(config.classes)
            train = few_shot(data.split("train"), config.percentage)
            if not train:
                raise OptionError(
                    f"{config.data}: no training cases (splits found: {sorted({c.split for c in data.cases})})"
                )
            self._data = (data, train, data.split("val"))
        return self._data

    def build_dataloaders(self, config: SegConfig):
        from torch.utils.data import DataLoader

        data, train, val = self.data(config)
        spec = training_spec(config)
        cache = config.cache_dir()
        train_cases = PreprocessedCases(train, data, spec, cache)
        train_cases.prepare()
        PreprocessedCases(val, data, spec, cache).prepare()
        loader = training_loader(config, SegTrainDataset(train_cases, config, len(data.classes)), len(train))
        val_loader = None
        if val and config.val_every_n_epochs > 0:
            val_set = SegValDataset(PreprocessedCases(rank_share(val), data, spec, cache), config)
            val_loader = DataLoader(val_set, batch_size=1, num_workers=min(config.num_workers, 2))
        return loader, val_loader

    def build_module(self, config: SegConfig):

        data, _, _ = self.data(config)
        return SegmentationFinetuner(
            class_names=[data.classes[i] for i in sorted(data.classes)],
            model_kwargs=config.model_kwargs,
            encoder_weights=config.encoder_weights or None,
            init_weights=config.init_weights or None,
            seed=config.seed,
            freeze=list(config.freeze),
            freeze_until_epoch=config.freeze_until_epoch,
            optimizer=config.optimizer(),
            roi_size=list(config.patch_size),
            sw_batch_size=config.sw_batch_size,
            sw_overlap=config.sw_overlap,
            deep_supervision_weights=config.deep_supervision_weights,
        )

    def export(self, module, folder: Path, config: SegConfig, provenance: dict) -> Path:

        data, train, val = self.data(config)
        provenance = {**provenance, **run_provenance(config, train, val), "data_kind": data.kind}
        inference = {
            "roi_size": list(config.patch_size),
            "overlap": config.sw_overlap,
            "mode": "gaussian",
            "sw_batch_size": config.sw_batch_size,
        }
        return save_segmentation_model(
            module.model,
            folder,
            labels=dict(data.classes),
            spec=training_spec(config),
            provenance=provenance,
            inference=inference,
            overwrite=True,
        )


def finetune_seg(config: SegConfig, resume: bool = True, extra_callbacks=(), progress_bar: bool = True) -> Path:
    """Fine-tune a segmentation model with ``config``; returns the exported weights folder."""
    return run_finetune(
        config, SegmentationTask(), resume=resume, extra_callbacks=extra_callbacks, progress_bar=progress_bar
    )
