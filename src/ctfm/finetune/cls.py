"""Classification fine-tuning: the CT-FM encoder as a trunk with a pooled MLP head.

``head-ct`` is CT-FM's head-CT triage recipe (docs/probes.md): the ``head-ct`` preprocessing
(SPL, crop on raw HU, 5x2x2 mm, pad (minimum) + centre crop to 48x128x128, windows blood [0, 80],
subdural [-125, 175], stroke [28, 36], bone [-900, 2100] concatenated along the first spatial axis
-> one channel [1, 192, 128, 128]; ``window_layout: channels`` gives [4, 48, 128, 128] instead);
trunk -> average pool -> Linear(512, 256) -> ReLU -> Linear(256, 1); BCE with logits; AdamW lr 1e-4,
weight decay 1e-5; warm-up cosine (no warm-up, multiplier 0.1, to 1e-6) over 40 epochs, stepped per
epoch; validation every epoch, ``best.ckpt`` by validation AUROC; batch 16 per GPU, 4 GPUs, DDP,
16-mixed; RandAffine (p 0.2, rotation 0.26 rad, scale 0.2) on the training inputs. Without a split
column the cases (or patients) are sorted, shuffled with Python's ``random.seed(seed)`` and cut
0.8 / 0.1 / 0.1; ``percentage`` keeps the first ``int(percentage / 100 * n)`` of train and of
validation (100 / 10 / 5 / 2 in the paper); test is always whole.

Heads: ``binary`` (one 0/1 column, BCE), ``multilabel`` (several 0/1 columns, one output each,
BCE), ``multiclass`` (one column of class names, softmax cross-entropy).
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ctfm.errors import CTInputError, OptionError
from ctfm.evaluate.metrics.classification import encode_target
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
from ctfm.io.tables import read_table
from ctfm.models.classifier import save_classifier
from ctfm.preprocess import get_preset, load_usable_ct, preprocess
from ctfm.runs import resolve_config
from ctfm.runtime import atomic_path

RESERVED_COLUMNS = {"path", "split", "series_uid", "patient", "patient_id", "error", "scan_id"}
LAYOUTS = ("stack", "channels")


@dataclass
class ClsConfig(FinetuneConfig):
    """Every value a classification fine-tuning run depends on (run keys: :class:`~ctfm.finetune.run.FinetuneConfig`).

    ``percentage`` keeps the first ``int(percentage / 100 * n)`` of the training and of the
    validation cases, as the reference's head-CT runs did; ``freeze`` prefixes name the
    classifier's parameters (``trunk`` for the encoder, ``head``).
    """

    kind: ClassVar[str] = "classification fine-tuning"

    out: str = "runs/finetune-cls"
    data: str = ""  # manifest (CSV/Parquet): path, label column(s)[, split][, series_uid]
    labels: list = field(
        default_factory=list
    )  # label columns (default: every column but path/split/series_uid/patient...)
    task: str = "auto"  # auto | binary | multilabel | multiclass
    split_column: str = "split"  # train / val / test per row; absent: the reference split
    group_column: str = ""  # patient column the reference split keeps together (default: each path alone)
    split_ratios: list = field(default_factory=lambda: [0.8, 0.1, 0.1])
    preset: str = "head-ct"  # the PreprocessSpec preset of the inputs
    spacing_mm: list = field(default_factory=list)  # override the preset's spacing (orientation order)
    patch_voxels: list = field(default_factory=list)  # override the preset's size (voxels, orientation order)
    window_layout: str = (
        "stack"  # stack: windows along the first spatial axis (1 channel); channels: one channel per window
    )
    head_hidden: int = 256  # 0: a single Linear head
    affine_p: float = 0.2
    rotate_range: float = 0.26
    scale_range: float = 0.2

    def check(self) -> None:
        super().check()
        if self.task not in ("auto", "binary", "multilabel", "multiclass"):
            raise OptionError(f"task {self.task!r}: expected auto, binary, multilabel or multiclass")
        if self.window_layout not in LAYOUTS:
            raise OptionError(f"window_layout {self.window_layout!r}: expected stack or channels")
        if len(self.split_ratios) != 3 or abs(sum(self.split_ratios) - 1) > 1e-6 or min(self.split_ratios) < 0:
            raise OptionError(
                f"split_ratios {self.split_ratios}: expected three shares (train, val, test) summing to 1"
            )
        if not 0.0 <= float(self.affine_p) <= 1.0:
            raise OptionError(f"affine_p {self.affine_p}: expected a probability in [0, 1]")
        if not isinstance(self.head_hidden, int) or self.head_hidden < 0:
            raise OptionError(f"head_hidden {self.head_hidden!r}: expected a whole number >= 0")


HEAD_CT = {
    "preset": "head-ct",
    "max_epochs": 40,
    "lr": 1e-4,
    "weight_decay": 1e-5,
    "warmup_epochs": 0,
    "end_lr": 1e-6,
    "warmup_multiplier": 0.1,
    "batch_size": 16,
    "devices": 4,
    "strategy": "ddp",
    "precision": "16-mixed",
    "sync_batchnorm": True,
    "val_every_n_epochs": 1,
    "checkpoint_every_n_epochs": 10,
    "head_hidden": 256,
}
CLS_PRESETS: dict[str, dict[str, Any]] = {
    "head-ct": HEAD_CT,
    # A laptop CPU in seconds: narrow trunk, coarse voxels, two epochs of two steps, one process.
    "tiny": {
        **HEAD_CT,
        "spacing_mm": [10.0, 8.0, 8.0],
        "patch_voxels": [16, 32, 32],
        "model_kwargs": {"init_filters": 4},
        "head_hidden": 16,
        "batch_size": 2,
        "num_workers": 0,
        "max_epochs": 2,
        "steps_per_epoch": 2,
        "checkpoint_every_n_epochs": 1,
        "lr": 1e-3,
        "precision": "32-true",
        "accelerator": "cpu",
        "devices": 1,
        "strategy": "auto",
        "sync_batchnorm": False,
    },
}


def resolve_cls_config(preset: str | None = None, file=None, overrides: dict | None = None) -> ClsConfig:
    return resolve_config(ClsConfig, CLS_PRESETS, preset, file, overrides)


def input_spec(config: ClsConfig):
    """The PreprocessSpec of the inputs: the preset, with the config's spacing, size and window layout."""

    spec = get_preset(config.preset)
    changes: dict[str, Any] = {}
    if config.spacing_mm:
        changes["spacing_mm"] = tuple(float(v) for v in config.spacing_mm)
    if config.patch_voxels or config.spacing_mm:
        voxels = [int(v) for v in config.patch_voxels] if config.patch_voxels else list(spec.patch_size_voxels)
        spacing = changes.get("spacing_mm", spec.spacing_mm)
        changes["patch_size_mm"] = tuple(float(v) * float(s) for v, s in zip(voxels, spacing))
    if config.window_layout == "channels" and len(spec.windows) > 1:
        changes["window_concat_axis"] = 0
    if changes:
        spec = spec.with_(name=f"{spec.name}-custom", **changes)
    return spec


def input_channels(spec) -> int:
    return len(spec.windows) if len(spec.windows) > 1 and spec.window_concat_axis == 0 else 1


# --------------------------------------------------------------------------- labels and splits


@dataclass
class ClsCase:
    path: str
    series_uid: str | None
    target: np.ndarray  # binary/multilabel: [n_outputs] float 0/1; multiclass: [1] class index
    split: str
    group: str


def _encode_labels(rows: list[dict], columns: list[str], task: str, source) -> tuple[str, list[str], list[np.ndarray]]:
    """(task, output names, one target per row)."""

    if task == "auto":
        task = "multilabel" if len(columns) > 1 else "auto"
    if task == "multiclass" and len(columns) != 1:
        raise OptionError(f"task multiclass takes one label column, got {columns}")
    encoded = [
        encode_target(
            c,
            [str(r.get(c, "") if r.get(c) is not None else "") for r in rows],
            "binary" if task == "multilabel" else task,
            source,
        )
        for c in columns
    ]
    if any((t.y < 0).any() for t in encoded):
        missing = next(t for t in encoded if (t.y < 0).any())
        raise CTInputError(
            source,
            f"column {missing.name!r} has {int((missing.y < 0).sum())} empty labels",
            "label every case, or leave those rows out of the manifest",
        )
    if task == "auto":
        task = encoded[0].task
    if task in ("binary", "multilabel"):
        targets = [np.array([float(t.y[i]) for t in encoded], dtype=np.float32) for i in range(len(rows))]
        return task, columns, targets
    return task, encoded[0].classes, [np.array([encoded[0].y[i]], dtype=np.int64) for i in range(len(rows))]


def reference_split(units: list[str], ratios, seed: int) -> dict[str, str]:
    """unit -> train/val/test: sorted, shuffled with ``random.seed(seed)``, cut by ``ratios``."""
    ordered = sorted(set(units))
    random.seed(seed)
    random.shuffle(ordered)
    n = len(ordered)
    n_train, n_val = int(ratios[0] * n), int(ratios[1] * n)
    return {u: "train" if i < n_train else "val" if i < n_train + n_val else "test" for i, u in enumerate(ordered)}


def read_cls_manifest(config: ClsConfig) -> tuple[str, list[str], list[ClsCase]]:
    """(task, output names, cases) of the manifest; splits from its column or the reference split."""

    if not config.data:
        raise OptionError("data: give the manifest (--set data=cases.csv with a path column and label columns)")
    table = read_table(config.data)
    rows = table.to_pylist()
    if not rows:
        raise CTInputError(config.data, "the manifest has no rows", "list one case per row")
    header = list(rows[0])
    if "path" not in header:
        raise CTInputError(
            config.data, f"no 'path' column (columns: {', '.join(header)})", "name the image column 'path'"
        )
    columns = list(config.labels) or [
        c for c in header if c not in RESERVED_COLUMNS and c != config.split_column and c != config.group_column
    ]
    missing = [c for c in columns if c not in header]
    if missing or not columns:
        raise CTInputError(
            config.data,
            f"no label column {missing or ''} (columns: {', '.join(header)})",
            "name the label columns with --set 'labels=[\"abnormal\"]'",
        )
    task, names, targets = _encode_labels(rows, columns, config.task, config.data)
    base = Path(config.data).parent
    groups = [str(r.get(config.group_column) or "") if config.group_column else str(r["path"]) for r in rows]
    has_split = config.split_column in header and all(r.get(config.split_column) for r in rows)
    splits = [str(r[config.split_column]).strip().lower() for r in rows] if has_split else None
    if splits is None:
        assignment = reference_split(groups, config.split_ratios, config.seed)
        splits = [assignment[g] for g in groups]
    splits = ["val" if s in ("val", "valid", "validation") else s for s in splits]
    bad = sorted(set(splits) - {"train", "val", "test"})
    if bad:
        raise CTInputError(
            config.data, f"split values {bad} are not train/val/test", "use train, val or test in the split column"
        )
    cases = []
    for r, target, split, group in zip(rows, targets, splits, groups):
        path = str(r["path"])
        path = path if Path(path).is_absolute() else str(base / path) if (base / path).exists() else path
        cases.append(ClsCase(path, r.get("series_uid") or None, target, split, group))
    return task, names, cases


def few_shot_cases(cases: list[ClsCase], percentage: float) -> list[ClsCase]:
    """The first ``int(percentage / 100 * n)`` cases (at least one), in the split's order."""
    if percentage >= 100 or not cases:
        return cases
    return cases[: max(1, int(percentage / 100 * len(cases)))]


# --------------------------------------------------------------------------- data


class PreprocessedInputs:
    """Cases through the spec's chain, cached as .npz (float32 [C, D, H, W]); loaded without pickles."""

    def __init__(self, cases: list[ClsCase], spec, cache_dir: Path):
        self.cases, self.spec, self.cache_dir = cases, spec, Path(cache_dir)
        self._memory: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> np.ndarray:
        if i in self._memory:
            return self._memory[i]
        case = self.cases[i]
        stamp = [case.path, case.series_uid, _mtime(case.path), self.spec.content_hash()]
        path = self.cache_dir / f"{hashlib.sha256(json.dumps(stamp, default=str).encode()).hexdigest()[:24]}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as stored:
                array = stored["image"]
        else:
            array = preprocess_input(case.path, self.spec, case.series_uid)

            with atomic_path(path, suffix=".npz") as tmp:
                np.savez(tmp, image=array)
        if len(self._memory) < 256:
            self._memory[i] = array
        return array

    def prepare(self) -> None:
        """Read, check and cache every case now, so that a bad scan stops the run before training
        (its :class:`CTInputError` names the case)."""
        for i in range(len(self.cases)):
            self[i]


def preprocess_input(path: str, spec, series_uid: str | None = None) -> np.ndarray:
    """One scan -> float32 [C, D, H, W] through ``spec`` (the one preprocessing definition)."""

    image, _ = load_usable_ct(path, series_uid=series_uid, spec=spec)
    out = preprocess(image, spec)
    return np.ascontiguousarray(np.asarray(out.detach().cpu() if hasattr(out, "detach") else out), dtype=np.float32)


def _mtime(path) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


def augment_blocks(image, spec, transform):
    """Apply one random spatial ``transform`` to each window block of a stacked input alike.

    A stacked input [1, W*D, H, W'] is cut into its W windows along the first spatial axis, each
    block gets the same draw (as if the scan had been transformed before windowing), and the blocks
    are stacked again; a channel-layout or single-window input is transformed as it is.
    """
    import torch

    n = len(spec.windows)
    if n <= 1 or spec.window_concat_axis != 1:
        return transform(image)
    blocks = torch.chunk(image, n, dim=1)
    transform.randomize(None)
    out = [transform(b, randomize=False) for b in blocks]
    return torch.cat([o.as_tensor() if hasattr(o, "as_tensor") else o for o in out], dim=1)


class ClsTrainDataset:
    """(epoch, index) -> {"image": [C, D, H, W], "target": [n_outputs] float or [] long}; random state from (seed, epoch, index)."""

    def __init__(self, inputs: PreprocessedInputs, config: ClsConfig, spec, task: str):
        from monai.transforms import RandAffine

        self.inputs, self.config, self.spec, self.task = inputs, config, spec, task
        r = float(config.rotate_range)
        self.affine = RandAffine(
            prob=config.affine_p,
            rotate_range=(r, r, r),
            scale_range=(config.scale_range,) * 3,
            mode="bilinear",
            padding_mode="zeros",
        )

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, key):
        import torch

        epoch, index = key
        case = int(epoch_order(self.config.seed, epoch, len(self.inputs))[index % len(self.inputs)])
        image = torch.from_numpy(self.inputs[case])
        self.affine.set_random_state(state=sample_random_state(self.config.seed, epoch, index))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = augment_blocks(image, self.spec, self.affine)
        image = image.as_tensor() if hasattr(image, "as_tensor") else image
        return {"image": image.float(), "target": _target(self.inputs.cases[case].target, self.task)}


class ClsEvalDataset:
    def __init__(self, inputs: PreprocessedInputs, task: str):
        self.inputs, self.task = inputs, task

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int):
        import torch

        return {
            "image": torch.from_numpy(self.inputs[i]).float(),
            "target": _target(self.inputs.cases[i].target, self.task),
        }


def _target(target: np.ndarray, task: str):
    import torch

    return torch.tensor(int(target[0])) if task == "multiclass" else torch.from_numpy(target.astype(np.float32))


# --------------------------------------------------------------------------- the task


class ClassificationTask(FinetuneTask):
    name = "cls"
    monitor = "val/auroc"
    monitor_mode = "max"

    def __init__(self):
        self._data = None

    @property
    def module_class(self):

        from ctfm.finetune.cls_module import ClassificationFinetuner  # Lightning: only when a run trains

        return ClassificationFinetuner

    def data(self, config: ClsConfig):
        if self._data is None:
            task, names, cases = read_cls_manifest(config)
            train = few_shot_cases([c for c in cases if c.split == "train"], config.percentage)
            val = few_shot_cases([c for c in cases if c.split == "val"], config.percentage)
            if not train:
                raise CTInputError(
                    config.data, "no training cases", "mark rows train in the split column, or add cases"
                )
            self._data = (task, names, train, val)
        return self._data

    def build_dataloaders(self, config: ClsConfig):
        from torch.utils.data import DataLoader

        task, _, train, val = self.data(config)
        spec = input_spec(config)
        cache = config.cache_dir()
        train_inputs = PreprocessedInputs(train, spec, cache)
        train_inputs.prepare()
        loader = training_loader(config, ClsTrainDataset(train_inputs, config, spec, task), len(train))
        val_loader = None
        if val and config.val_every_n_epochs > 0:
            val_inputs = PreprocessedInputs(rank_share(val), spec, cache)
            val_inputs.prepare()
            val_set = ClsEvalDataset(val_inputs, task)
            val_loader = DataLoader(val_set, batch_size=config.batch_size, num_workers=min(config.num_workers, 2))
        return loader, val_loader

    def build_module(self, config: ClsConfig):

        task, names, _, _ = self.data(config)
        from ctfm.finetune.cls_module import ClassificationFinetuner  # Lightning: only when a run trains

        return ClassificationFinetuner(
            task=task,
            label_names=list(names),
            in_channels=input_channels(input_spec(config)),
            model_kwargs=dict(config.model_kwargs),
            head_hidden=config.head_hidden,
            encoder_weights=config.encoder_weights or None,
            seed=config.seed,
            freeze=list(config.freeze),
            freeze_until_epoch=config.freeze_until_epoch,
            optimizer=config.optimizer(),
        )

    def export(self, module, folder: Path, config: ClsConfig, provenance: dict) -> Path:

        task, names, train, val = self.data(config)
        provenance = {**provenance, **run_provenance(config, train, val)}
        return save_classifier(
            module.model,
            folder,
            task=task,
            labels=list(names),
            spec=input_spec(config),
            layout=config.window_layout,
            provenance=provenance,
        )


def finetune_cls(config: ClsConfig, resume: bool = True, extra_callbacks=(), progress_bar: bool = True) -> Path:
    """Fine-tune a classifier with ``config``; returns the exported classifier folder."""
    return run_finetune(
        config, ClassificationTask(), resume=resume, extra_callbacks=extra_callbacks, progress_bar=progress_bar
    )
