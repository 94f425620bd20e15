"""Segmentation prediction: label maps on the grid of each input, in bounded memory.

>>> from ctfm.predict.seg import predict_seg
>>> summary = predict_seg(["scan.nii.gz", "dicom_tree/"], model="RUN_OR_WEIGHTS", out="preds")  # doctest: +SKIP

Per input: load (``ctfm.io.load_ct``) -> the weights' own preprocessing without padding
(:func:`inference_spec`, built by ``ctfm.preprocess``) -> streamed Gaussian sliding window
(:mod:`ctfm.predict.aggregation`) -> back onto the input grid (:class:`GridInverter`) ->
``<name>.nii.gz`` + ``<name>.labels.json`` [+ ``<name>.dcm`` DICOM SEG] [+ statistics].

Back onto the input grid: orientation and foreground crop are index operations and are undone
exactly. Where the preprocessing resamples (a spacing), the class *probabilities* (softmax of
the averaged logits) are interpolated linearly onto the input voxels and the argmax taken there.
Nearest-neighbour on the label map would move every boundary by up to half a network voxel and
give staircases; interpolating logits would weight neighbours by their arbitrary logit offsets
(softmax is shift-invariant per voxel, linear interpolation is not); probabilities mix the
neighbouring predicted distributions, which is what a finer voxel between them should see. The
input voxels outside the cropped field of view are background. Without resampling the result is
exactly MONAI's ``sliding_window_inference`` + argmax, placed voxel by voxel.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctfm.errors import OptionError, UserError, one_line, optional_import
from ctfm.io import load_ct
from ctfm.io.pacs import is_pacs_url
from ctfm.io.sources import local_source, resolve_sources
from ctfm.models.labelmaps import select_classes
from ctfm.models.segmentation import LoadedSegmentation, load_segmentation_model
from ctfm.predict import senders, writers
from ctfm.predict.aggregation import WindowSettings, streamed_sliding_window
from ctfm.preprocess.bounded import preprocess_large
from ctfm.preprocess.validate import load_usable_ct
from ctfm.runtime import Result, progress_bar

LABELS_SUFFIX = ".labels.json"
FAILURES_NAME = "failures.json"


def inference_spec(spec):
    """The training spec as prediction uses it: same orientation, spacing, crop and window, no
    padding or cropping to a patch size (the sliding window covers the whole field of view)."""
    if spec.size_policy == "none":
        return spec
    return spec.with_(
        name=f"{spec.name}+predict",
        size_policy="none",
        description=f"{spec.name} without the size policy (sliding-window prediction)",
    )


def output_name(source) -> str:
    """``<name>``: the file name without its extension, or the SeriesInstanceUID of a DICOM series
    (derived from its content when blank, as the DICOM SEG references it: deterministic)."""
    path = Path(source.path)
    uid = writers.source_series_uid(source)
    if uid:
        return uid
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


class GridInverter:
    """Writes network-grid logits, as they stream out, onto the input grid as labels.

    ``input_affine`` / ``input_shape``: the grid of the loaded input ([X, Y, Z], RAS);
    ``net_affine`` / ``net_shape``: the grid the network saw ([D, H, W]). The map from input
    indices to network indices must be a scaled axis permutation (orientation, spacing, crop:
    always the case for PreprocessSpec chains). ``push(first_row, logits [N, n, H, W])`` in
    row order; ``labels`` is the [X, Y, Z] result.
    """

    def __init__(self, input_affine, input_shape, net_affine, net_shape, n_classes: int):
        m = np.linalg.inv(np.asarray(net_affine, dtype=np.float64)) @ np.asarray(input_affine, dtype=np.float64)
        self.shape = tuple(int(s) for s in input_shape)
        self.net_shape = tuple(int(s) for s in net_shape)
        tol = 1e-6 * np.abs(m[:3, :3]).max()
        self.axis = []  # network axis k <- input axis self.axis[k]
        for k in range(3):
            nonzero = np.flatnonzero(np.abs(m[k, :3]) > tol)
            if len(nonzero) != 1:
                raise RuntimeError(
                    f"network grid is not an axis permutation of the input grid (row {k} of the index map: {m[k, :3]})"
                )
            self.axis.append(int(nonzero[0]))
        if sorted(self.axis) != [0, 1, 2]:
            raise RuntimeError(f"network axes {self.axis} do not permute the input axes")
        # network coordinate of input index j along the matching axis: t = scale * j + offset
        self.coords = [m[k, self.axis[k]] * np.arange(self.shape[self.axis[k]]) + m[k, 3] for k in range(3)]
        self.exact = all(np.allclose(c, np.round(c), atol=1e-4) for c in self.coords)
        self.n_classes = n_classes
        self.labels = np.zeros(self.shape, dtype=np.uint8 if n_classes <= 256 else np.uint16)
        self.interp = [self._weights(c, n) for c, n in zip(self.coords, self.net_shape)]
        self._prev: tuple[int, torch.Tensor] | None = None  # last row seen, for interpolation across pushes
        self._done = np.zeros(self.shape[self.axis[0]], dtype=bool)
        self._done[~self.interp[0][3]] = True  # outside the field of view: background

    @staticmethod
    def _weights(t: np.ndarray, n: int):
        """(lower index, upper index, upper weight, inside) per input index; exact points weight 0."""
        inside = (t >= -0.5) & (t <= n - 0.5)
        t = np.clip(t, 0, n - 1)
        rounded = np.round(t)
        t = np.where(np.abs(t - rounded) < 1e-4, rounded, t)
        lo = np.floor(t).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        w = (t - lo).astype(np.float32)
        return lo, hi, w, inside

    def push(self, first: int, logits: torch.Tensor) -> None:
        n = logits.shape[1]
        probs = logits if self.exact else torch.softmax(logits.float(), dim=0)
        rows = {first + i: probs[:, i] for i in range(n)}
        if self._prev is not None:
            rows.setdefault(self._prev[0], self._prev[1])
        lo, hi, w, _ = self.interp[0]
        ready = np.flatnonzero(~self._done & (hi < first + n) & (lo >= min(rows)))
        for j in ready:
            plane = rows[int(lo[j])] if w[j] == 0 else rows[int(lo[j])] * (1 - w[j]) + rows[int(hi[j])] * w[j]
            self._write(int(j), plane)
            self._done[j] = True
        self._prev = (first + n - 1, probs[:, n - 1].clone())

    def _inplane(self, plane: torch.Tensor, k: int) -> torch.Tensor:
        """Interpolate network axis k (1 or 2) of ``plane`` [N, H, W] at the input indices."""
        lo, hi, w, _ = self.interp[k]
        dim = k  # plane dims: 0 classes, 1 = network axis 1, 2 = network axis 2
        a = plane.index_select(dim, torch.from_numpy(lo))
        if not np.any(w):
            return a
        b = plane.index_select(dim, torch.from_numpy(hi))
        shape = [1, 1, 1]
        shape[dim] = -1
        wt = torch.from_numpy(w).view(shape)
        return a + (b - a) * wt

    def _write(self, j: int, plane: torch.Tensor) -> None:
        plane = self._inplane(self._inplane(plane, 1), 2)  # [N, n_a1, n_a2]
        labels = plane.argmax(0).numpy().astype(self.labels.dtype)
        inside = np.outer(self.interp[1][3], self.interp[2][3])
        labels[~inside] = 0
        a0, a1, a2 = self.axis
        if a1 > a2:
            labels = labels.T
        index = [slice(None)] * 3
        index[a0] = j
        self.labels[tuple(index)] = labels


@dataclass
class SegPredictSummary(Result):
    """What :func:`predict_seg` returns: inputs predicted, skipped (already done) and failed
    ``(input, message)``, seconds, the label maps written and the output folder."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)
    out: str = ""
    sent: int = 0  # results sent with ``send`` (SEG + measurement report each)

    def summary(self) -> str:
        sent = f", sent {self.sent}" if self.sent else ""
        return (
            f"predicted {self.done} input(s), skipped {self.skipped} already done{sent}, {len(self.failed)} failed; "
            f"{self.seconds:.1f} s; outputs in {self.out}"
        )


def _precision_context(precision: str, device: str):
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)
    raise OptionError(f"--precision {precision!r}: choose fp32 or bf16")


def network_input(image, loaded, device: str = "cpu") -> tuple[torch.Tensor, np.ndarray, tuple, np.ndarray]:
    """``(x [1, C, D, H, W], input affine, input shape, network affine)`` of a loaded CT."""

    net = preprocess_large(image, inference_spec(loaded.spec))  # the spec's chain, in bounded memory where it allows
    net_affine = np.asarray(net.affine, dtype=np.float64)
    x = net.as_tensor()[None].float().to(device)
    return x, np.asarray(image.affine, dtype=np.float64), tuple(image.shape[1:]), net_affine


def predict_volume(
    image, loaded, settings: WindowSettings | None = None, precision: str = "fp32", device: str = "cpu", progress=None
) -> np.ndarray:
    """Labels [X, Y, Z] on the grid of ``image`` ([1, X, Y, Z] HU MetaTensor from load_ct)."""
    return predict_prepared(*network_input(image, loaded, device), loaded, settings, precision, device, progress)


def predict_prepared(
    x,
    input_affine,
    input_shape,
    net_affine,
    loaded,
    settings=None,
    precision: str = "fp32",
    device: str = "cpu",
    progress=None,
) -> np.ndarray:
    """:func:`predict_volume` from :func:`network_input`'s result (the HU volume may be freed first)."""
    model, labels, spec, info = loaded
    settings = settings or WindowSettings.from_dict(info["inference"])
    inverter = GridInverter(input_affine, input_shape, net_affine, x.shape[2:], len(labels))
    model = model.to(device).eval()
    for first, logits in streamed_sliding_window(
        x, model, settings, autocast=_precision_context(precision, device), progress=progress
    ):
        inverter.push(first, logits.cpu())
    return inverter.labels


def predict_seg(
    inputs,
    model,
    out,
    labels=None,
    output_format: str = "nifti",
    classes=None,
    overlap: float | None = None,
    precision: str = "fp32",
    device: str | None = None,
    statistics: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    send: str | None = None,
) -> SegPredictSummary:
    """Predict every input (files, folders, DICOM trees, manifests) into ``out``; see the module docstring.

    Finished outputs are skipped (resumable); a failing input is recorded in ``out/failures.json``
    and the batch goes on. Before the model is loaded, the output folder and (for ``dicom-seg``)
    every input's headers are checked (:func:`ctfm.predict.writers.preflight`): an input no SEG
    can be built over is refused there, and a run with no input left raises. ``send``: a PACS
    address (``dicomweb:...`` for STOW-RS, ``dimse://...`` for C-STORE) that receives each DICOM
    SEG and its measurement report (docs/pacs.md); it is checked before the model is loaded too.
    """

    if output_format not in ("nifti", "dicom-seg"):
        raise OptionError(f"--format {output_format!r}: choose nifti or dicom-seg")
    if output_format == "dicom-seg":  # before any work: a missing writer is not a per-scan failure
        optional_import("highdicom", "dicom-seg", "--format dicom-seg")
    dest = None
    if send is not None:  # before any work: a wrong or unreachable destination is one line
        if output_format != "dicom-seg":
            raise OptionError("--send sends the DICOM SEG and its measurement report: add --format dicom-seg")
        dest = senders.parse_destination(send)
        senders.check_destination(dest)
        statistics = True  # the report's numbers
    out = Path(out)
    writers.check_output_folder(out)
    sources = resolve_sources(inputs).sources
    # Output pre-flight, before the model is loaded: an input whose output cannot be written is
    # refused here, not after its prediction (all refused: one line, nothing written). A PACS
    # series is checked when it is written, from its folder in the series cache.
    refused = writers.preflight([s for s in sources if not is_pacs_url(s.path)], output_format)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = model if isinstance(model, LoadedSegmentation) else load_segmentation_model(model, labels=labels)
    _precision_context(precision, device)
    keep = select_classes(loaded.labels, classes) if classes else None
    settings = WindowSettings.from_dict(
        {**loaded.info["inference"], **({"overlap": overlap} if overlap is not None else {})}
    )
    if not 0 <= settings.overlap < 1:
        raise OptionError(f"--overlap {settings.overlap}: must be in [0, 1)")
    factor = loaded.model.shape_factor() if hasattr(loaded.model, "shape_factor") else None
    if factor is not None and any(r % f for r, f in zip(settings.roi_size, factor)):
        raise OptionError(
            f"sliding-window roi_size {list(settings.roi_size)} must be divisible by {list(factor)} for this network; "
            "fix 'inference.roi_size' in the weights' ctfm.json"
        )
    out.mkdir(parents=True, exist_ok=True)
    summary = SegPredictSummary(out=str(out))
    start = time.perf_counter()
    bar = progress_bar(len(sources), progress)
    names = {int(k): v for k, v in loaded.labels.items() if keep is None or k == 0 or k in keep}
    failures = writers.read_failures(out / FAILURES_NAME)
    for source in sources:
        if source in refused:
            summary.failed.append((str(source), refused[source]))
            failures[str(source)] = refused[source]
            bar.update(1)
            continue
        name = output_name(source)
        targets = writers.output_paths(out, name, output_format, statistics)
        if not overwrite and all(p.exists() for p in targets):
            summary.skipped += 1
            if dest is not None:  # finished before: sent again (its UIDs make that a no-op at the PACS)
                _send(dest, out, name, source, summary, failures)
            bar.update(1)
            continue
        try:
            image, record = load_usable_ct(source.path, series_uid=source.series_uid, spec=inference_spec(loaded.spec))
            local = local_source(source)  # a PACS series: its folder in the series cache
            prepared = network_input(image, loaded, device)
            geometry = image[:, :1, :1, :1].clone()  # keeps the affine, frees the HU volume while predicting
            del image
            labels = predict_prepared(*prepared, loaded, settings, precision=precision, device=device)
            del prepared
            image = load_ct(source.path, series_uid=source.series_uid)[0] if statistics else geometry
            if keep is not None:
                labels = np.where(np.isin(labels, keep), labels, 0).astype(labels.dtype)
            provenance = writers.prediction_provenance(loaded, source, record, settings, precision)
            writers.write_prediction(
                out,
                name,
                labels,
                image,
                names,
                provenance,
                output_format=output_format,
                source=local,
                statistics=statistics,
            )
            if dest is not None and not _send(dest, out, name, source, summary, failures):
                bar.update(1)
                continue
            summary.done += 1
            summary.outputs.append(out / f"{name}.nii.gz")
            failures.pop(str(source), None)
        except UserError as exc:
            summary.failed.append((str(source), str(exc)))
            failures[str(source)] = str(exc)
        except (RuntimeError, OSError, ValueError) as exc:  # recorded, the batch goes on
            message = f"{source}: {one_line(exc, 300, with_type=True)}"
            summary.failed.append((str(source), message))
            failures[str(source)] = message
        bar.update(1)
    bar.close()
    writers.write_failures(out / FAILURES_NAME, failures)
    summary.seconds = time.perf_counter() - start
    return summary


def _send(dest, out: Path, name: str, source, summary, failures) -> bool:
    """Send one finished prediction (SEG + SR); a failure is recorded for its input."""
    try:
        rows = json.loads((out / f"{name}.statistics.json").read_text(encoding="utf-8"))
        senders.send_prediction(dest, out / f"{name}.dcm", rows["classes"], local_source(source), rows["provenance"])
    except UserError as exc:
        summary.failed.append((str(source), str(exc)))
        failures[str(source)] = str(exc)
        return False
    summary.sent += 1
    return True


__all__ = ["GridInverter", "SegPredictSummary", "inference_spec", "output_name", "predict_seg", "predict_volume"]
