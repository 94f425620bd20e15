"""Segmentation training data: manifests, TotalSegmentator v2 folders, MSD task folders.

Every source becomes a list of :class:`SegCase` (image, label, split) and a class map
(label value -> name, 0 = background). :func:`load_case` reads the image with the project's CT
loader and the labels with its label loader onto the image grid, refusing a label map made on
another grid (a different shape, spacing or origin; a flipped axis order is the same grid) and
label values outside the class map, each with a one-line error.

Sources::

    manifest.csv / .parquet   columns image, label[, split]  (split: train / val / test; default train)
    TotalSegmentator v2       <folder>/meta.csv (image_id + a split column), <folder>/<id>/ct.nii.gz,
                              <folder>/<id>/segmentations/<class>.nii.gz combined through the class map
    MSD task                  <folder>/dataset.json ("training": [{"image", "label"}], "labels",
                              "testing"); optional per-entry "fold" (VISTA3D-style 5-fold lists)
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctfm.errors import CTInputError, OptionError, one_line
from ctfm.io import load_labels
from ctfm.io.labels import (
    UnnamedLabelsWarning,
    check_label_values,
    label_names,
    label_values,
    name_values,
    require_same_grid,
)
from ctfm.io.tables import is_table, read_table
from ctfm.models.labelmaps import resolve_labels
from ctfm.preprocess.validate import load_usable_ct

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
TOTALSEG_SEGMENTATIONS = "segmentations"  # per-subject folder of one binary mask per class


@dataclass(frozen=True)
class SegCase:
    """One labelled scan. ``label`` is a label-map file, or (TotalSegmentator) a folder of binary masks."""

    name: str
    image: str
    label: str | None
    split: str = "train"


@dataclass
class SegData:
    """Cases and the class map of a data source.

    ``source_labels``: label value in the files -> name (0 = background), all values the files
    may hold. ``classes``: training channel -> name (0 = background), the classes trained on.
    ``value_map``: file label value -> training channel (values of untrained classes -> 0).
    """

    cases: list[SegCase]
    source_labels: dict[int, str]
    classes: dict[int, str] = field(default_factory=dict)
    value_map: dict[int, int] = field(default_factory=dict)
    kind: str = "manifest"
    where: str = ""

    def split(self, name: str) -> list[SegCase]:
        return [case for case in self.cases if case.split == name]

    def select(self, names: list[str] | None) -> "SegData":
        """Train on ``names`` (all classes when empty): channels 1..K in the order given."""
        by_name = {name: value for value, name in self.source_labels.items() if value != 0}
        names = list(names or [self.source_labels[v] for v in sorted(by_name.values())])
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise OptionError(
                f"classes {unknown} are not in the class map of {self.where} ({len(by_name)} classes, e.g. "
                f"{', '.join(list(by_name)[:5])})"
            )
        if len(set(names)) != len(names):
            raise OptionError(f"classes {names}: each class once")
        classes = {0: "background", **{i + 1: n for i, n in enumerate(names)}}
        value_map = {value: 0 for value in self.source_labels}
        value_map.update({by_name[n]: i + 1 for i, n in enumerate(names)})
        return SegData(self.cases, self.source_labels, classes, value_map, self.kind, self.where)


# --------------------------------------------------------------------------- sources


def open_seg_data(
    data: str | os.PathLike,
    class_map=None,
    split_column: str = "split",
    val_fold: int = 4,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> SegData:
    """A manifest file, a TotalSegmentator folder (meta.csv) or an MSD folder (dataset.json) -> SegData.

    ``class_map``: a map (dict, ``totalseg-v2``, JSON file); default: the MSD ``labels``, the
    built-in TotalSegmentator v2 map for TotalSegmentator folders, else the names stored with the
    label files, else ``label_<value>`` for every non-zero value found in them (with a notice). ``val_fraction`` carves a seeded validation split out of the training cases
    when the source has none.
    """
    path = Path(data)
    if not str(data):
        raise OptionError(
            "data is empty: give a manifest (CSV/Parquet with image, label[, split]), a TotalSegmentator folder or an "
            "MSD task folder (--set data=PATH)"
        )
    if path.is_dir() and (path / "meta.csv").is_file():
        cases, kind = totalseg_cases(path, split_column), "totalseg"
        labels = _class_map(class_map if class_map is not None else "totalseg-v2", path)
    elif path.is_dir() and (path / "dataset.json").is_file():
        cases, msd_labels = msd_cases(path, val_fold)
        kind = "msd"
        labels = _class_map(class_map, path) if class_map is not None else msd_labels
    elif path.is_file() and is_table(path):
        cases, kind = manifest_cases(path), "manifest"
        labels = _class_map(class_map, path) if class_map is not None else _names_from_labels(cases, path)
    elif path.exists():
        raise CTInputError(
            path,
            "is neither a manifest (.csv/.tsv/.parquet/.xlsx) nor a folder with meta.csv (TotalSegmentator) or "
            "dataset.json (MSD)",
            "give one of those",
        )
    else:
        raise CTInputError(path, "no such file or folder", "check the data path")
    if not cases:
        raise CTInputError(path, "lists no cases", "add image/label pairs")
    if val_fraction and not any(case.split == "val" for case in cases):
        cases = _carve_validation(cases, val_fraction, seed)
    return SegData(cases, labels, kind=kind, where=str(path))


def manifest_cases(path: Path) -> list[SegCase]:
    """Rows of a CSV/Parquet manifest with columns ``image``, ``label`` and optionally ``split``, ``name``.

    Relative paths are taken from the manifest's folder.
    """
    rows = read_table(path).to_pylist()
    if not rows:
        return []
    missing = [c for c in ("image", "label") if c not in rows[0]]
    if missing:
        raise CTInputError(
            path,
            f"manifest lacks column(s) {missing} (has {sorted(rows[0])})",
            "give columns image, label and optionally split",
        )
    cases = []
    for number, row in enumerate(rows, start=2):
        image, label = str(row.get("image") or "").strip(), str(row.get("label") or "").strip()
        if not image:
            raise CTInputError(path, f"row {number}: empty image", "fill in the image path")
        split = _split_name(row.get("split") or "train", path, number)
        if not label and split != "test":
            raise CTInputError(
                path,
                f"row {number}: empty label for a {split} case",
                "fill in the label path, or mark the row split=test",
            )
        name = str(row.get("name") or "").strip() or _stem(image)
        cases.append(
            SegCase(
                name,
                str(_relative_to(path.parent, image)),
                str(_relative_to(path.parent, label)) if label else None,
                split,
            )
        )
    _unique_names(cases, path)
    return cases


def totalseg_cases(folder: Path, split_column: str = "split") -> list[SegCase]:
    """Subjects of a TotalSegmentator v2 folder; splits from ``meta.csv`` column ``split_column``.

    TotalSegmentator's own meta.csv is ``;``-separated with ``image_id`` and ``split`` (train /
    val / test); CT-FM's recipe uses the VISTA3D split in a ``vista_split`` column.
    """
    rows = read_table(folder / "meta.csv").to_pylist()
    if not rows:
        return []
    if "image_id" not in rows[0]:
        raise CTInputError(
            folder / "meta.csv", f"lacks column image_id (has {sorted(rows[0])})", "give TotalSegmentator's meta.csv"
        )
    if split_column not in rows[0]:
        raise CTInputError(
            folder / "meta.csv",
            f"lacks split column {split_column!r} (has {sorted(rows[0])})",
            f"add it, or choose another with --set split_column={'split' if 'split' in rows[0] else 'NAME'}",
        )
    cases = []
    for number, row in enumerate(rows, start=2):
        subject = str(row["image_id"]).strip()
        if not subject:
            continue
        cases.append(
            SegCase(
                subject,
                str(folder / subject / "ct.nii.gz"),
                str(folder / subject / TOTALSEG_SEGMENTATIONS),
                _split_name(row[split_column], folder / "meta.csv", number),
            )
        )
    return cases


def msd_cases(folder: Path, val_fold: int = 4) -> tuple[list[SegCase], dict[int, str]]:
    """Cases and class map of a Medical Segmentation Decathlon task folder (``dataset.json``).

    Training entries with a ``fold`` go to val when ``fold == val_fold`` (CT-FM's VISTA3D split:
    folds 0-3 train, fold 4 val); ``testing`` entries (images only) are the test split.
    """
    path = folder / "dataset.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        training, testing = meta.get("training", []), meta.get("testing", [])
        labels = {int(k): str(v) for k, v in meta.get("labels", {}).items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise CTInputError(
            path,
            f"not an MSD dataset.json ({one_line(exc)})",
            'it holds "training": [{"image": ..., "label": ...}] and "labels"',
        ) from None
    if not labels:
        raise CTInputError(path, 'has no "labels" class map', 'add "labels": {"0": "background", "1": ...}')
    labels[0] = "background"
    cases = []
    for entry in training:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise CTInputError(
                path,
                f"training entry {entry!r} lacks image/label",
                'each entry is {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}',
            )
        split = "val" if "fold" in entry and int(entry["fold"]) == val_fold else "train"
        cases.append(
            SegCase(
                _stem(entry["image"]),
                str(_relative_to(folder, entry["image"])),
                str(_relative_to(folder, entry["label"])),
                split,
            )
        )
    for entry in testing:
        image = entry["image"] if isinstance(entry, dict) else entry
        cases.append(
            SegCase(
                _stem(image),
                str(_relative_to(folder, image)),
                str(_relative_to(folder, entry["label"])) if isinstance(entry, dict) and entry.get("label") else None,
                "test",
            )
        )
    _unique_names(cases, path)
    return cases, dict(sorted(labels.items()))


def few_shot(cases: list[SegCase], percentage: float) -> list[SegCase]:
    """The first ``round(len * percentage / 100)`` cases (at least one), as CT-FM's few-shot runs take them."""
    if not 0 < percentage <= 100:
        raise OptionError(f"percentage {percentage}: expected a share of the training cases in (0, 100]")
    if percentage == 100:
        return list(cases)
    return list(cases[: max(1, round(len(cases) * percentage / 100))])


def _carve_validation(cases: list[SegCase], fraction: float, seed: int) -> list[SegCase]:
    if not 0 < fraction < 1:
        raise OptionError(f"val_fraction {fraction}: expected a share in (0, 1)")
    train = [i for i, case in enumerate(cases) if case.split == "train"]
    if len(train) < 2:
        return cases
    n_val = max(1, round(len(train) * fraction))
    chosen = set(np.random.default_rng(seed).choice(train, size=n_val, replace=False).tolist())
    return [SegCase(c.name, c.image, c.label, "val") if i in chosen else c for i, c in enumerate(cases)]


# --------------------------------------------------------------------------- reading one case


def load_case(case: SegCase, data: SegData):
    """(image MetaTensor [1, X, Y, Z] HU, labels MetaTensor [1, X, Y, Z] int16 of training channels).

    Raises:
        CTInputError: the label map lies on another grid than the image, or holds values outside
            the class map; a TotalSegmentator mask is missing.
    """

    image, _ = load_usable_ct(case.image)
    if case.label is None:
        raise CTInputError(case.image, "has no label map", "give a label for training and validation cases")
    label_path = Path(case.label)
    if label_path.is_dir():
        values = _combine_masks(label_path, image, data)
    else:
        require_same_grid(label_path, image)
        values = load_labels(label_path, image).labels.numpy()[0]
        check_label_values(values, data.source_labels, label_path)
    mapped = map_values(values, data.value_map or {v: v for v in data.source_labels})
    import torch
    from monai.data import MetaTensor

    return image, MetaTensor(
        torch.from_numpy(mapped)[None], affine=image.affine, meta={"filename_or_obj": str(label_path)}
    )


def map_values(values: np.ndarray, value_map: dict[int, int]) -> np.ndarray:
    """Relabel file values to training channels through a lookup table -> int16 array."""
    top = max(max(value_map), int(values.max()) if values.size else 0)
    low = min(min(value_map), int(values.min()) if values.size else 0)
    table = np.zeros(top - low + 1, dtype=np.int16)
    for value, channel in value_map.items():
        table[value - low] = channel
    return table[values.astype(np.int64) - low]


def _combine_masks(folder: Path, image, data: SegData) -> np.ndarray:
    """One label map from ``<folder>/<class>.nii.gz`` binary masks: value = the class's value in the map.

    Only the trained classes are read (all when ``data.value_map`` is unset); a later class wins overlaps.
    """

    wanted = [v for v in sorted(data.source_labels) if v != 0 and (not data.value_map or data.value_map.get(v, 0) != 0)]
    combined = np.zeros(tuple(int(n) for n in image.shape[1:]), dtype=np.int16)
    for value in wanted:
        mask_path = folder / f"{data.source_labels[value]}.nii.gz"
        if not mask_path.is_file():
            raise CTInputError(
                mask_path,
                f"missing mask of class {data.source_labels[value]!r}",
                "give the complete TotalSegmentator subject folder, or train on fewer classes (--set classes=[...])",
            )
        require_same_grid(mask_path, image)
        mask = load_labels(mask_path, image).labels.numpy()[0]
        if mask.size and (mask.min() < 0 or mask.max() > 1):
            raise CTInputError(
                mask_path,
                f"a TotalSegmentator mask holds values {int(mask.min())}..{int(mask.max())}, expected 0/1",
                "give the binary mask of one class",
            )
        combined[mask > 0] = value
    return combined


def _class_map(spec, where) -> dict[int, str]:
    """The label values of the files -> names; gaps allowed (vertebrae 26..33)."""
    return dict(resolve_labels(spec, channels=False))


def _names_from_labels(cases: list[SegCase], manifest: Path) -> dict[int, str]:
    """The class map of a manifest's label files: the names they store (NIfTI label table, Slicer
    NRRD keys, JSON sidecar, SEG segment labels; the first file naming a value wins), else
    ``label_<value>`` for every non-zero value found across them, with a notice."""

    paths = list(dict.fromkeys(Path(case.label) for case in cases if case.label))
    if not paths:
        raise CTInputError(manifest, "no case has a label", "add label paths")
    names: dict[int, str] = {}
    for path in paths:
        for value, name in label_names(path).items():
            names.setdefault(int(value), name)
    if names:
        return {0: "background", **{k: v for k, v in sorted(names.items()) if k != 0}}
    # Nothing names a class (binary masks, nnU-Net exports): every value found in any case is one.
    values = set()
    for path in paths:
        values.update(int(v) for v in label_values(path))
    labels, unnamed = name_values(values)
    if not unnamed:
        raise CTInputError(
            manifest, f"the {len(paths)} label map(s) hold no labelled voxel", "give label maps with foreground"
        )
    shown = ", ".join(labels[v] for v in unnamed[:8]) + (", ..." if len(unnamed) > 8 else "")
    warnings.warn(
        UnnamedLabelsWarning(
            f"{manifest}: the label maps name no classes; training on {len(unnamed)} class(es) called {shown} "
            '(name them with --set class_map=FILE.json holding {"0": "background", "1": "tumour"})'
        ),
        stacklevel=2,
    )
    return labels


def _split_name(value, path, row: int) -> str:
    name = _SPLIT_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise CTInputError(path, f"row {row}: unknown split {value!r}", f"use one of {', '.join(SPLITS)}")
    return name


def _stem(path: str) -> str:
    name = Path(str(path)).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _relative_to(folder: Path, path: str) -> Path:
    path = Path(str(path)).expanduser()
    return path if path.is_absolute() else (folder / path)


def _unique_names(cases: list[SegCase], where) -> None:
    seen: dict[str, str] = {}
    for case in cases:
        if case.name in seen and seen[case.name] != case.image:
            raise CTInputError(
                where,
                f"two cases are both named {case.name!r} ({seen[case.name]}, {case.image})",
                "give each case its own file name or a name column",
            )
        seen[case.name] = case.image
