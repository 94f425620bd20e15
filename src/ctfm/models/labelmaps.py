"""Class maps: label value -> name, with 0 the background.

A segmentation model's label names travel with its weights (``labels`` in ctfm.json, written by
:func:`ctfm.models.segmentation.save_segmentation_model`). Built-in maps are named here;
:func:`resolve_labels` turns what a user writes (``totalseg-v2``, a JSON file, ``liver,spleen``)
into one map.

``totalseg-v2`` is TotalSegmentator v2's ``total`` task: 117 classes plus background, the
118-channel output of CT-FM's whole-body model (heart = 51, vertebrae_S1 = 26, liver = 5).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ctfm.errors import CTInputError, OptionError

BACKGROUND = "background"

_TOTALSEG_V2_NAMES = (
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "liver",
    "stomach",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "esophagus",
    "trachea",
    "thyroid_gland",
    "small_bowel",
    "duodenum",
    "colon",
    "urinary_bladder",
    "prostate",
    "kidney_cyst_left",
    "kidney_cyst_right",
    "sacrum",
    "vertebrae_S1",
    "vertebrae_L5",
    "vertebrae_L4",
    "vertebrae_L3",
    "vertebrae_L2",
    "vertebrae_L1",
    *(f"vertebrae_T{i}" for i in range(12, 0, -1)),
    *(f"vertebrae_C{i}" for i in range(7, 0, -1)),
    "heart",
    "aorta",
    "pulmonary_vein",
    "brachiocephalic_trunk",
    "subclavian_artery_right",
    "subclavian_artery_left",
    "common_carotid_artery_right",
    "common_carotid_artery_left",
    "brachiocephalic_vein_left",
    "brachiocephalic_vein_right",
    "atrial_appendage_left",
    "superior_vena_cava",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
    "iliac_artery_left",
    "iliac_artery_right",
    "iliac_vena_left",
    "iliac_vena_right",
    "humerus_left",
    "humerus_right",
    "scapula_left",
    "scapula_right",
    "clavicula_left",
    "clavicula_right",
    "femur_left",
    "femur_right",
    "hip_left",
    "hip_right",
    "spinal_cord",
    "gluteus_maximus_left",
    "gluteus_maximus_right",
    "gluteus_medius_left",
    "gluteus_medius_right",
    "gluteus_minimus_left",
    "gluteus_minimus_right",
    "autochthon_left",
    "autochthon_right",
    "iliopsoas_left",
    "iliopsoas_right",
    "brain",
    "skull",
    *(f"rib_left_{i}" for i in range(1, 13)),
    *(f"rib_right_{i}" for i in range(1, 13)),
    "sternum",
    "costal_cartilages",
)

BUILTIN_LABELS: dict[str, dict[int, str]] = {
    "totalseg-v2": {0: BACKGROUND, **{i + 1: name for i, name in enumerate(_TOTALSEG_V2_NAMES)}},
}


def list_label_maps() -> list[str]:
    return sorted(BUILTIN_LABELS)


def check_labels(labels: dict, where: str | os.PathLike | None = None, channels: bool = True) -> dict[int, str]:
    """Validate a class map -> ``{int: str}`` sorted by value.

    ``channels`` (a model's map, one name per output channel): values 0..N-1 without gaps, N >= 2.
    Otherwise (the values of label files, e.g. vertebrae 26..33): any values >= 0, at least one
    above 0, 0 = background added when missing. Names unique and non-empty either way.
    """
    try:
        out = {int(k): str(v) for k, v in dict(labels).items()}
    except (TypeError, ValueError):
        raise CTInputError(
            where, "class map keys must be integer label values", 'write {"0": "background", "1": "liver", ...}'
        ) from None
    if not channels:
        if any(v < 0 for v in out) or not any(v > 0 for v in out):
            raise CTInputError(
                where,
                f"class map values must be label values >= 0 with at least one above 0, got {_span(sorted(out))}",
                'write {"1": "tumour", ...} (0 is background)',
            )
        out.setdefault(0, BACKGROUND)
    values = sorted(out)
    if channels and (values != list(range(len(values))) or len(values) < 2):
        raise CTInputError(
            where,
            f"class map values must be 0..N-1 without gaps and N >= 2, got {_span(values)}",
            "number the classes 0 (background), 1, 2, ... in channel order",
        )
    names = [out[v].strip() for v in values]
    if any(not n for n in names) or len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise CTInputError(
            where,
            f"class names must be unique and non-empty (duplicates: {', '.join(duplicates) or 'an empty name'})",
            "give every label value its own name",
        )
    return {v: out[v].strip() for v in values}


def _span(values: list[int]) -> str:
    if not values:
        return "none"
    return f"{len(values)} values from {values[0]} to {values[-1]}"


def resolve_labels(spec, channels: bool = True) -> dict[int, str]:
    """A class map from a dict, a built-in name (``totalseg-v2``), a JSON file (``{"0": "background", ...}``
    or a list of names in channel order) or a comma list of class names for values 1..N
    (``liver,spleen``; 0 is background). ``channels=False``: the values of label files, gaps
    allowed (``{"26": "vertebrae_S1", ...}``; see :func:`check_labels`)."""
    if isinstance(spec, dict):
        return check_labels(spec, channels=channels)
    if isinstance(spec, (list, tuple)):
        return check_labels(dict(enumerate(spec)), channels=channels)
    text = os.fspath(spec)
    if text in BUILTIN_LABELS:
        return dict(BUILTIN_LABELS[text])
    path = Path(text).expanduser()
    if path.is_file():
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CTInputError(
                path, f"is not a readable JSON class map ({exc})", 'write {"0": "background", "1": "liver", ...}'
            ) from None
        if isinstance(content, dict) and isinstance(content.get("labels"), (dict, list)):
            content = content["labels"]  # a ctfm.json or <name>.labels.json
        if isinstance(content, list):
            content = dict(enumerate(content))
        if not isinstance(content, dict):
            raise CTInputError(
                path,
                f"holds a JSON {type(content).__name__}, not a class map",
                'write {"0": "background", "1": "liver", ...}',
            )
        return check_labels(content, path, channels=channels)
    if text.endswith(".json"):
        raise CTInputError(
            path, "no such class map file", f"check the path, or use a built-in map: {', '.join(list_label_maps())}"
        )
    names = [n.strip() for n in text.split(",") if n.strip()]
    if "," not in text and len(names) == 1 and "/" in text:
        raise CTInputError(text, "no such class map file", "check the path")
    if not names:
        raise OptionError(
            f"labels {text!r}: give a built-in map ({', '.join(list_label_maps())}), a JSON file or class names like "
            "liver,spleen"
        )
    if names[0] == BACKGROUND:
        names = names[1:]
    return check_labels({0: BACKGROUND, **{i + 1: n for i, n in enumerate(names)}}, text)


def default_labels(n_channels: int) -> dict[int, str]:
    """Names for a model whose weights name no classes: ``background, class_1, ...``."""
    return {0: BACKGROUND, **{i: f"class_{i}" for i in range(1, n_channels)}}


def labels_to_json(labels: dict[int, str]) -> dict[str, str]:
    """``{int: name}`` -> the JSON form ``{"0": "background", ...}`` (keys in value order)."""
    return {str(k): labels[k] for k in sorted(labels)}


def select_classes(labels: dict[int, str], names) -> list[int]:
    """Label values of the class ``names`` (a comma string or a list), in the order given."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    by_name = {v: k for k, v in labels.items()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        sample = ", ".join(list(by_name)[1:6])
        raise OptionError(
            f"--classes: unknown class name(s) {', '.join(unknown)}; the model's classes are {sample}, ... (see its "
            "labels.json)"
        )
    return [by_name[n] for n in names]


__all__ = [
    "BACKGROUND",
    "BUILTIN_LABELS",
    "check_labels",
    "default_labels",
    "labels_to_json",
    "list_label_maps",
    "resolve_labels",
    "select_classes",
]
