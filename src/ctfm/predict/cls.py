"""Classification prediction: one row per input scan with the probability of each label.

    >>> summary = predict_cls(["scans/"], model="runs/head-ct", out="preds.csv")   # doctest: +SKIP

Inputs are what ``ctfm embed`` takes (files, folders searched for volumes and DICOM series,
manifests with a ``path`` column). Each scan goes through the PreprocessSpec saved with the model
(the one preprocessing definition), then the classifier; probabilities are sigmoid per output
(binary, multi-label) or softmax (multi-class). A scan that cannot be read is recorded in the
``error`` column and the rest go on. The CSV is written atomically, with a JSON sidecar
(``preds.csv.json``) of provenance: model folder, weights sha256, spec hash, version, inputs.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field

import numpy as np

from ctfm.errors import UserError, one_line
from ctfm.evaluate.reports.report import provenance
from ctfm.finetune.cls import preprocess_input
from ctfm.io.sources import discover_inputs
from ctfm.models.classifier import classifier_folder, classifier_sha256, load_classifier
from ctfm.preprocess import PreprocessSpec
from ctfm.runtime import Result, check_device, progress_bar, require_output_file, write_text_atomic


@dataclass
class ClsPredictSummary(Result):
    """What :func:`predict_cls` returns: rows written, failed inputs ``(input, message)``, the CSV
    path, and the provenance recorded in ``out``.json."""

    rows: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    out: str = ""
    provenance: dict = field(default_factory=dict)

    def summary(self) -> str:
        return f"predicted {self.rows - len(self.failed)} scan(s), {len(self.failed)} failed; wrote {self.out}"


def predict_cls(
    inputs, model, out, device: str | None = None, batch_size: int = 4, progress: bool = False
) -> ClsPredictSummary:
    """Probabilities for every input scan -> ``out`` (CSV) and ``out``.json (provenance)."""
    import torch

    out = require_output_file(out, (".csv",), "predictions CSV (-o)")
    device = check_device(device)
    sources = discover_inputs(list(inputs))
    folder = classifier_folder(model)
    net, meta = load_classifier(folder)
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    net = net.to(device)
    task, labels = meta["task"], list(meta["labels"])

    summary = ClsPredictSummary(out=str(out))
    rows: list[list] = []
    bar = progress_bar(len(sources), progress)
    for source in sources:
        try:
            array = preprocess_input(source.path, spec, source.series_uid)
            with torch.inference_mode():
                logits = net(torch.from_numpy(array)[None].to(device))
                probs = (
                    (torch.softmax(logits, 1) if task == "multiclass" else torch.sigmoid(logits))[0]
                    .float()
                    .cpu()
                    .numpy()
                )
            predicted = (
                labels[int(np.argmax(probs))]
                if task == "multiclass"
                else ";".join(label for label, p in zip(labels, probs) if p >= 0.5)
            )
            rows.append(
                [source.path, source.series_uid or "", source.scan_id, *[f"{p:.6g}" for p in probs], predicted, ""]
            )
        except UserError as exc:
            summary.failed.append((str(source), one_line(exc)))
            rows.append([source.path, source.series_uid or "", source.scan_id, *[""] * len(labels), "", one_line(exc)])
        bar.update(1)
    bar.close()
    names = labels if task in ("multiclass", "multilabel") else [labels[0] if labels else "probability"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "series_uid", "scan_id", *[f"p_{n}" for n in names], "predicted", "error"])
    writer.writerows(rows)
    write_text_atomic(out, buffer.getvalue())
    fields = provenance(
        model=str(folder),
        task=task,
        labels=labels,
        weights_sha256=classifier_sha256(meta),
        encoder_sha256=meta["encoder_sha256"],
        head_sha256=meta["head_sha256"],
        preset=spec.name,
        preset_hash=spec.content_hash(),
        inputs=[str(s) for s in sources],
        failed=len(summary.failed),
    )
    write_text_atomic(str(out) + ".json", json.dumps(fields, indent=2) + "\n")
    summary.rows = len(rows)
    summary.provenance = fields
    return summary
