"""Classification networks: the CT-FM encoder as a trunk, a pooled MLP head, and their folder.

``CTClassifier``: x [B, C, D, H, W] -> trunk (CTEncoder) -> last map [B, F, d, h, w] ->
AdaptiveAvgPool3d(1) -> Flatten -> Linear(F, hidden) -> ReLU -> Linear(hidden, n_outputs) ->
logits [B, n_outputs] (CT-FM's head-CT triage model: F = 512, hidden = 256, one output).
``head_hidden=0`` gives a single Linear(F, n_outputs).

A saved classifier is a folder::

    encoder/            the trunk as a ctfm weights folder (``ctfm embed --weights FOLDER/encoder`` works)
    head.safetensors    the head's tensors
    classifier.json     task, label names, head shape, input layout, PreprocessSpec, sha256s, provenance
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ctfm.errors import CTInputError
from ctfm.io.hashing import file_sha256
from ctfm.models import create_model, save_pretrained
from ctfm.models.networks import CTEncoder
from ctfm.models.weights import load_state_into
from ctfm.runs import RunFolder
from ctfm.runtime import atomic_path

CLASSIFIER_JSON = "classifier.json"
HEAD_NAME = "head.safetensors"
ENCODER_DIR = "encoder"
FORMAT = 1


class CTClassifier(nn.Module):
    """CT-FM trunk + pooled MLP head (see the module docstring); ``forward`` returns logits [B, n_outputs]."""

    def __init__(
        self,
        n_outputs: int = 1,
        head_hidden: int = 256,
        in_channels: int = 1,
        init_filters: int = 32,
        blocks_down=(1, 2, 2, 4, 4),
    ):
        super().__init__()
        self.trunk = CTEncoder(
            spatial_dims=3, in_channels=in_channels, init_filters=init_filters, blocks_down=tuple(blocks_down)
        )
        features = self.trunk.embedding_dim
        layers: list[nn.Module] = [nn.AdaptiveAvgPool3d(1), nn.Flatten()]
        layers += (
            [nn.Linear(features, head_hidden), nn.ReLU(), nn.Linear(head_hidden, n_outputs)]
            if head_hidden
            else [nn.Linear(features, n_outputs)]
        )
        self.head = nn.Sequential(*layers)
        self.arch = {
            "n_outputs": int(n_outputs),
            "head_hidden": int(head_hidden),
            "in_channels": int(in_channels),
            "init_filters": int(init_filters),
            "blocks_down": [int(b) for b in blocks_down],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)[-1])


def load_trunk_weights(model: CTClassifier, source) -> str:
    """Load a CT-FM encoder (folder, hf-hub:, .safetensors, .ckpt) into the trunk -> its sha256.

    A 1-channel encoder goes into a C-channel trunk by spreading its first convolution over the
    channels (weights repeated and divided by C), so that equal channels give the 1-channel output.
    """

    arch = model.arch
    encoder = create_model(
        "ct-fm", weights=str(source), init_filters=arch["init_filters"], blocks_down=tuple(arch["blocks_down"])
    )
    state = encoder.state_dict()
    channels = arch["in_channels"]
    if channels != 1:
        weight = state["conv_init.weight"]
        state["conv_init.weight"] = weight.repeat(1, channels, 1, 1, 1) / channels
    model.trunk.load_state_dict(state, strict=True)
    info = getattr(encoder, "weights_info", None)
    return info.sha256 if info is not None else ""


def save_classifier(
    model: CTClassifier,
    folder,
    task: str,
    labels: list[str],
    spec,
    layout: str,
    provenance: dict | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` as a classifier folder (module docstring), all or nothing -> the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise CTInputError(folder, "already exists", "choose a new folder")
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_pretrained(
            model.trunk,
            tmp / ENCODER_DIR,
            name="ct-fm",
            provenance=provenance or {"source": "ctfm finetune cls"},
            preprocess=spec,
        )
        head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        save_file(head, str(tmp / HEAD_NAME))
        meta = {
            "ctfm_format": FORMAT,
            "kind": "classifier",
            "task": task,
            "labels": list(labels),
            "arch": model.arch,
            "input_layout": layout,
            "preprocess": spec.to_dict(),
            "encoder_sha256": file_sha256(tmp / ENCODER_DIR / "model.safetensors"),
            "head_sha256": file_sha256(tmp / HEAD_NAME),
            "provenance": provenance or {},
        }
        (tmp / CLASSIFIER_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def classifier_folder(source) -> Path:
    """The classifier folder of ``source``: the folder itself, or RUN/export of a fine-tuning run."""
    path = Path(source)
    for candidate in (path, RunFolder(path).export):
        if (candidate / CLASSIFIER_JSON).is_file():
            return candidate
    export = f"{RunFolder.EXPORT}/"
    problem = f"not a classifier (no {CLASSIFIER_JSON} here or in {export})"
    raise CTInputError(path, problem, f"give the run folder of `ctfm finetune cls` or its {export} folder")


def load_classifier(source) -> tuple[CTClassifier, dict]:
    """(model in eval mode, classifier.json) of a classifier folder or fine-tuning run; strict loading."""
    from safetensors.torch import load_file

    folder = classifier_folder(source)
    meta = json.loads((folder / CLASSIFIER_JSON).read_text(encoding="utf-8"))
    model = CTClassifier(**meta["arch"])
    load_state_into(model.trunk, folder / ENCODER_DIR)
    model.head.load_state_dict(load_file(str(folder / HEAD_NAME)), strict=True)
    model.eval()
    return model, meta


def classifier_sha256(meta: dict) -> str:
    """One sha256 naming both parts of a classifier (encoder and head)."""
    import hashlib

    return hashlib.sha256(f"{meta['encoder_sha256']}:{meta['head_sha256']}".encode()).hexdigest()


__all__ = [
    "CTClassifier",
    "classifier_folder",
    "classifier_sha256",
    "load_classifier",
    "load_trunk_weights",
    "save_classifier",
]
