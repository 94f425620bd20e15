"""Segmentation models: ``ct-fm-segresnet`` (MONAI SegResNetDS, CT-FM encoder) from any weights source.

>>> seg = load_segmentation_model("hf-hub:project-lighter/whole_body_segmentation")   # doctest: +SKIP
>>> model, labels, spec, info = seg                      # labels[51] == "heart"       # doctest: +SKIP

Sources (all loaded strictly, every key and shape checked):

- a SegResNetDS weights folder (config.json with ``out_channels`` + model.safetensors, MONAI key
  names), local or ``hf-hub:``; its ctfm.json (if any) names the classes (``labels``), the
  preprocessing (``preprocess``) and the sliding-window settings (``inference``);
- CT-FM *encoder* weights (a folder without ``out_channels``, a CT-FM/Lightning ``.ckpt``, a
  ``.safetensors`` of encoder keys): loaded into ``encoder.*``; the decoder is new, drawn from
  ``seed``, with as many channels as the class map has classes;
- a full SegResNetDS checkpoint file (``up_layers.*`` present): channels read from its head;
- a fine-tuning run folder: its ``export/`` weights folder (what ``ctfm finetune seg`` exports).

Label names travel with the weights: :func:`save_segmentation_model` writes them into ctfm.json
as ``"labels": {"0": "background", "1": ...}``. A folder without names gets the given
``labels``; a 118-channel one without names is TotalSegmentator v2 (the published whole-body
model); anything else is named ``class_1, class_2, ...``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch.nn as nn

from ctfm.errors import CTInputError, OptionError
from ctfm.io.hashing import file_sha256
from ctfm.models import weights as _weights
from ctfm.models.factory import create_model, init_model, load_weights, resolve_weights, save_pretrained
from ctfm.models.labelmaps import BUILTIN_LABELS, check_labels, default_labels, labels_to_json, resolve_labels
from ctfm.models.preprocessing import training_spec_of
from ctfm.models.weights import CONFIG_NAME, SIDECAR_NAME, WEIGHTS_NAME
from ctfm.runs import RunFolder

SEG_MODEL = "ct-fm-segresnet"
TOTALSEG_CHANNELS = 118

# Sliding-window settings of CT-FM's TotalSegmentator recipe (SPL voxels).
DEFAULT_INFERENCE = {
    "roi_size": [96, 160, 160],
    "overlap": 0.625,
    "mode": "gaussian",
    "sigma_scale": 0.125,
    "sw_batch_size": 2,
}


class LoadedSegmentation(NamedTuple):
    """What :func:`load_segmentation_model` returns.

    ``model``: CTSegResNet in eval mode, ``forward(x [B, 1, D, H, W]) -> logits [B, N, D, H, W]``;
    ``labels``: ``{0: "background", 1: name, ...}`` with N entries; ``spec``: the PreprocessSpec
    of the weights; ``info``: JSON-ready provenance plus ``inference`` (sliding-window settings).
    """

    model: nn.Module
    labels: dict[int, str]
    spec: object
    info: dict


def resolve_segmentation_source(source: str | os.PathLike) -> str | os.PathLike:
    """A run folder (no model.safetensors, an ``export/`` weights folder inside) -> that folder."""
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith(_weights.HUB_PREFIX):
        path = Path(source).expanduser()
        if path.is_dir() and not (path / WEIGHTS_NAME).is_file():
            export = RunFolder.exported(path, WEIGHTS_NAME)
            if export is not None:
                return export
    return source


def _peek_state(path: Path, kind: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a weights file, renamed for SegResNetDS (no tensors kept)."""
    if kind in ("folder", "hf-hub", "safetensors"):
        from safetensors import safe_open

        file = path / WEIGHTS_NAME if kind in ("folder", "hf-hub") else path
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:
            raise CTInputError(
                file,
                f"is not a readable safetensors file ({type(exc).__name__})",
                "download or write the file again; it may be truncated",
            ) from None
    else:
        state, _ = _weights.read_torch(path)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    import torch

    kept = [
        k
        for k in shapes
        if not _weights.strip_prefixes(k, _weights.WRAPPER_PREFIXES).startswith(_weights.IGNORED_PREFIXES)
    ]
    renamed, _ = _weights.convert_state_dict({k: torch.empty(0) for k in kept}, "segresnet")
    return {new: shapes[old] for new, old in zip(renamed, kept)}  # convert_state_dict keeps the order


def _head_channels(shapes: dict[str, tuple[int, ...]]) -> int | None:
    heads = sorted(k for k in shapes if k.startswith("up_layers.") and k.endswith(".head.weight"))
    return int(shapes[heads[-1]][0]) if heads else None


def load_segmentation_model(
    source: str | os.PathLike | None,
    labels=None,
    out_channels: int | None = None,
    seed: int = 0,
    **overrides,
) -> LoadedSegmentation:
    """Build ``ct-fm-segresnet`` from ``source`` (see the module docstring) -> (model, labels, spec, info).

    ``labels``: a class map (dict, ``totalseg-v2``, JSON file, ``liver,spleen``); required for
    encoder-only weights unless ``out_channels`` is given; checked against the weights' channels.
    ``source=None``: random weights from ``seed`` (for tests). ``overrides``: constructor kwargs
    (``init_filters=4`` for a tiny model).
    """
    given = resolve_labels(labels) if labels is not None else None
    if out_channels is not None and given is not None and out_channels != len(given):
        raise OptionError(
            f"--out-channels {out_channels} disagrees with the class map ({len(given)} classes including background); "
            "give one of them"
        )
    wanted = len(given) if given is not None else out_channels
    kind, labels_source = "random", "given"
    if source is None:
        if wanted is None:
            raise OptionError("a randomly initialised segmentation model needs labels or out_channels")
        model = init_model(SEG_MODEL, seed, out_channels=wanted, **overrides)
    else:
        source = resolve_segmentation_source(source)
        resolve_weights(source)  # refuses a registered model name with its hf-hub: spelling
        path, fmt = _weights.resolve_source(source)
        config = (
            _weights.read_json(path / CONFIG_NAME)
            if fmt in ("folder", "hf-hub") and (path / CONFIG_NAME).is_file()
            else None
        )
        if config is not None and "out_channels" in config:
            kind = "segmentation"
            model = create_model(SEG_MODEL, weights=source, **overrides)
        else:
            shapes = _peek_state(path, fmt)
            head = _head_channels(shapes)
            arch = {
                k: v
                for k, v in (config or {}).items()
                if k in ("init_filters", "blocks_down", "in_channels", "spatial_dims")
            }
            if "encoder.conv_init.weight" in shapes and "init_filters" not in arch:
                arch["init_filters"] = int(shapes["encoder.conv_init.weight"][0])
            if head is not None:
                kind = "segmentation"
                n = head
            else:
                kind = "encoder"
                if wanted is None:
                    raise CTInputError(
                        source,
                        "holds CT-FM encoder weights only: the number of classes of the new decoder is unknown",
                        "give the class map (--labels totalseg-v2, a JSON file, or liver,spleen) or --out-channels N",
                    )
                n = wanted
            model = init_model(SEG_MODEL, seed, out_channels=n, **{**arch, **overrides})
            load_weights(model, source)
    n_channels = int(model.out_channels)
    metadata = getattr(getattr(model, "weights_info", None), "metadata", None) or {}
    recorded = metadata.get("labels") if isinstance(metadata, dict) else None
    where = getattr(getattr(model, "weights_info", None), "path", None)
    if given is not None:
        names = given
    elif isinstance(recorded, (dict, list)):
        names = check_labels(
            dict(enumerate(recorded)) if isinstance(recorded, list) else recorded, Path(where or ".") / SIDECAR_NAME
        )
        labels_source = "weights"
    elif n_channels == TOTALSEG_CHANNELS:
        names, labels_source = dict(BUILTIN_LABELS["totalseg-v2"]), "default: 118 channels are TotalSegmentator v2"
    else:
        names, labels_source = default_labels(n_channels), "default: unnamed"
    if len(names) != n_channels:
        what = "the class map given" if labels_source == "given" else f"{SIDECAR_NAME} 'labels'"
        raise CTInputError(
            source if source is not None else "model",
            f"the weights have {n_channels} output channels but {what} has {len(names)} classes (background included)",
            f"give a class map with {n_channels} classes, or weights trained for {len(names)} classes",
        )
    spec, spec_source = training_spec_of(model, SEG_MODEL)
    recorded_inference = metadata.get("inference") if isinstance(metadata, dict) else None
    inference = {**DEFAULT_INFERENCE, **(recorded_inference if isinstance(recorded_inference, dict) else {})}
    weights_info = getattr(model, "weights_info", None)
    info = {
        "model": SEG_MODEL,
        "kind": kind,
        "weights": weights_info.to_dict() if weights_info is not None else {"source": "random-init", "seed": seed},
        "weights_sha256": weights_info.sha256 if weights_info is not None else None,
        "decoder_seed": seed if kind in ("encoder", "random") else None,
        "arch": _weights.arch_config(model),
        "labels_source": labels_source,
        "preprocess_source": spec_source,
        "preprocess_hash": spec.content_hash(),
        "inference": inference,
    }
    model.eval()
    return LoadedSegmentation(model, names, spec, info)


def save_segmentation_model(
    model: nn.Module,
    folder: str | os.PathLike,
    labels,
    spec=None,
    provenance: dict | None = None,
    inference: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a SegResNetDS as a weights folder whose ctfm.json names its classes -> the folder.

    ``labels``: a class map with one class per output channel (background included); ``spec``:
    the PreprocessSpec it was trained with (default: the registry's); ``inference``: sliding-window
    settings to record (merged over :data:`DEFAULT_INFERENCE`). Atomic and byte-stable.
    """
    names = resolve_labels(labels)
    if len(names) != int(model.out_channels):
        raise OptionError(
            f"the model has {model.out_channels} output channels but the class map has {len(names)} classes (background "
            "included)"
        )
    extra = {"labels": labels_to_json(names), "inference": {**DEFAULT_INFERENCE, **(inference or {})}}
    return save_pretrained(
        model, folder, name=SEG_MODEL, provenance=provenance, overwrite=overwrite, preprocess=spec, extra=extra
    )


def weights_sha256(folder: str | os.PathLike) -> str:
    return file_sha256(Path(folder) / WEIGHTS_NAME)


__all__ = [
    "DEFAULT_INFERENCE",
    "LoadedSegmentation",
    "SEG_MODEL",
    "load_segmentation_model",
    "resolve_segmentation_source",
    "save_segmentation_model",
]
