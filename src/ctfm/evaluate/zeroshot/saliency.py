"""Occlusion saliency of an embedding, as CT-FM computes it for LUNG1 scans.

The scan is preprocessed at 3 mm isotropic (SPL, crop to HU > 0, [-1024, 2048] -> [0, 1]); MONAI's
``OcclusionSensitivity`` slides a 10-voxel Gaussian occluder with overlap 0.25 over it; at each
position the saliency is ``1 - cosine(embedding of the scan, embedding of the occluded scan)``
(512-d, the stride-16 map averaged). The map is written on the input scan's own grid as NIfTI
(linear interpolation through the two affines) and shown as overlays on slices. With a label map
(a tumour, an organ) the report also says how much of the saliency falls inside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctfm.errors import OptionError
from ctfm.evaluate.reports.figures import overlay_figure
from ctfm.evaluate.reports.report import Report
from ctfm.evaluate.zeroshot.inputs import ZeroShotResult, load_eval_encoder, write_evaluation_outputs
from ctfm.io import load_labels, save_nifti
from ctfm.io.hashing import content_hash
from ctfm.preprocess import get_preset, load_usable_ct, preprocess
from ctfm.runtime import require_output_dir

MASK_SIZE, OVERLAP = 10, 0.25
SALIENCY_SPACING_MM = (3.0, 3.0, 3.0)
PAPER_NOTE = "CT-FM shows occlusion saliency maps of 10 LUNG1 scans (qualitative: saliency concentrates on anatomy and on the tumour); no number is published"


@dataclass
class SaliencyResult(ZeroShotResult):
    """What the occlusion saliency evaluation returns: the keys of its results.json,
    the paths of results.json and report.html (``result["results"]``, ``result["report"]``), and ``provenance``."""


def saliency_spec():
    """The preprocessing of CT-FM's saliency script: ct-fm-patches at 3 mm isotropic."""

    return get_preset("ct-fm-patches").with_(
        name="ct-fm-saliency-3mm",
        spacing_mm=SALIENCY_SPACING_MM,
        patch_size_mm=None,
        description="CT-FM saliency: SPL, 3 mm isotropic, crop to HU > 0, [-1024, 2048] -> [0, 1]",
    )


class EmbeddingChange(nn.Module):
    """x [B, 1, D, H, W] -> [B, 1]: 1 - cosine(encoder.embed(x), reference [512])."""

    def __init__(self, encoder, reference: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("reference", reference.reshape(1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vectors = self.encoder.embed(x)
        return (1.0 - torch.nn.functional.cosine_similarity(vectors, self.reference.to(vectors.dtype), dim=1))[:, None]


def occlusion_saliency(
    encoder, volume: torch.Tensor, mask_size: int = MASK_SIZE, overlap: float = OVERLAP, n_batch: int = 12
) -> np.ndarray:
    """volume [1, 1, D, H, W] in [0, 1] -> saliency [D, H, W] (1 - cosine to the unoccluded embedding)."""
    from monai.visualize import OcclusionSensitivity

    if not 0 <= overlap < 1:
        raise OptionError(f"overlap {overlap}: expected a fraction in [0, 1)")
    if mask_size < 1 or any(s < mask_size for s in volume.shape[2:]):
        raise OptionError(
            f"mask size {mask_size}: must be >= 1 and fit in the preprocessed volume {tuple(volume.shape[2:])}"
        )
    encoder = encoder.eval()
    import warnings

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)  # inside MONAI
        reference = encoder.embed(volume)[0]
        change = EmbeddingChange(encoder, reference).eval()
        occlusion = OcclusionSensitivity(
            nn_module=change, mask_size=mask_size, n_batch=n_batch, overlap=overlap, activate=False, verbose=False
        )
        sensitivity, _ = occlusion(volume)
    return np.asarray(sensitivity[0, 0].detach().cpu().numpy(), dtype=np.float32)


def onto_grid(
    values: np.ndarray, values_affine: np.ndarray, grid_affine: np.ndarray, grid_shape, order: int = 1
) -> np.ndarray:
    """Resample ``values`` (on ``values_affine``) onto another voxel grid of the same world (mm)."""
    from scipy.ndimage import affine_transform

    to_values = np.linalg.solve(np.asarray(values_affine, np.float64), np.asarray(grid_affine, np.float64))
    return affine_transform(
        values.astype(np.float32),
        to_values[:3, :3],
        offset=to_values[:3, 3],
        output_shape=tuple(int(s) for s in grid_shape),
        order=order,
        mode="constant",
        cval=0.0,
    )


def saliency_figure(image: np.ndarray, saliency: np.ndarray, affine: np.ndarray, path, title: str = "") -> Path:
    """Slices through the saliency peak (map smoothed by one voxel and min-max scaled for display)
    over the preprocessed scan, radiological convention; ``affine`` of the shared grid."""
    from scipy.ndimage import gaussian_filter

    shown = gaussian_filter(saliency, 1.0)
    peak = np.unravel_index(int(np.argmax(shown)), shown.shape)
    lo, hi = float(shown.min()), float(shown.max())
    norm = (shown - lo) / (hi - lo) if hi > lo else np.zeros_like(shown)
    return overlay_figure(image, norm, affine, path, title, centre_voxel=peak, base_range=(0.0, 0.5))


def require_inside_and_outside(labels: np.ndarray) -> np.ndarray:
    """``labels > 0``, refused unless it holds voxels both inside and outside the label."""
    inside = labels > 0
    if not inside.any() or inside.all():
        raise OptionError("the label map must have voxels both inside and outside the label on the saliency grid")
    return inside


def check_saliency_options(mask_size: int, overlap: float, n_batch: int) -> None:
    """Refuse occlusion settings that cannot run (one-line :class:`OptionError`), before any work."""
    if not isinstance(mask_size, int) or isinstance(mask_size, bool) or mask_size < 1:
        raise OptionError(f"--mask-size {mask_size!r}: expected a whole number of voxels >= 1")
    if not isinstance(n_batch, int) or isinstance(n_batch, bool) or n_batch < 1:
        raise OptionError(f"--batch {n_batch!r}: expected a whole number of occluded copies per pass >= 1")
    if not (isinstance(overlap, (int, float)) and 0 <= overlap < 1):
        raise OptionError(f"--overlap {overlap!r}: expected a fraction in [0, 1)")


def saliency_in_label(saliency: np.ndarray, labels: np.ndarray) -> dict:
    """How much saliency falls inside ``labels > 0`` (same grid): mean inside / outside, their
    ratio, and the fraction of the top-1 % voxels inside."""
    inside = require_inside_and_outside(labels)
    top = saliency >= np.quantile(saliency, 0.99)
    mean_in, mean_out = float(saliency[inside].mean()), float(saliency[~inside].mean())
    return {
        "mean_inside": mean_in,
        "mean_outside": mean_out,
        "ratio": mean_in / mean_out if mean_out > 0 else None,
        "top1pct_inside_fraction": float(inside[top].mean()),
        "label_fraction_of_volume": float(inside.mean()),
    }


def run_saliency(
    scan,
    out,
    weights: str | None = None,
    model: str = "ct-fm",
    seed: int = 0,
    labels=None,
    mask_size: int = MASK_SIZE,
    overlap: float = OVERLAP,
    n_batch: int = 12,
    device: str = "cpu",
    encoder=None,
    weights_fields: dict | None = None,
) -> SaliencyResult:
    """Saliency of one scan: ``saliency.nii.gz`` on the input grid, overlays, results.json, report.html."""
    from monai.data import MetaTensor

    check_saliency_options(mask_size, overlap, n_batch)
    out = require_output_dir(out, "saliency output folder")
    spec = saliency_spec()
    image, record = load_usable_ct(scan, spec=spec)
    prepared = preprocess(image, spec)
    prepared_affine = np.asarray(prepared.affine, np.float64)
    image_affine = np.asarray(image.affine, np.float64)
    on_prepared = None
    if labels is not None:  # refused before the occlusion runs and before anything is written
        label_map = load_labels(labels, image)
        on_prepared = onto_grid(
            np.asarray(label_map.labels[0], np.float32), image_affine, prepared_affine, prepared.shape[1:], order=0
        )
        require_inside_and_outside(on_prepared)
    if encoder is None:
        encoder, weights_fields = load_eval_encoder(weights, model, seed, device)
    volume = prepared.as_tensor()[None].to(device)
    saliency = occlusion_saliency(encoder, volume, mask_size, overlap, n_batch)
    on_input = onto_grid(saliency, prepared_affine, image_affine, image.shape[1:])
    out.mkdir(parents=True, exist_ok=True)
    nifti = save_nifti(
        MetaTensor(torch.from_numpy(on_input)[None], affine=torch.from_numpy(image_affine)), out / "saliency.nii.gz"
    )
    figure = saliency_figure(
        np.asarray(prepared[0]),
        saliency,
        prepared_affine,
        out / "saliency_overlay.png",
        f"{Path(scan).name}: 1 - cosine under occlusion (mask {mask_size}, overlap {overlap})",
    )
    summary = {
        "min": float(saliency.min()),
        "max": float(saliency.max()),
        "mean": float(saliency.mean()),
        "preprocessed_shape": list(saliency.shape),
        "input_shape": [int(s) for s in image.shape[1:]],
    }
    report = Report(
        "Saliency (occlusion)",
        f"{Path(scan).name}: mask {mask_size} voxels at 3 mm, overlap {overlap}, saliency = 1 - cosine of the embeddings",
    )
    report.heading("Map").table(
        [{"figure": k, "value": v} for k, v in summary.items() if not isinstance(v, list)], digits=5
    ).figure(
        figure, "slices through the saliency peak (map smoothed by 1 voxel for display; the NIfTI holds the raw map)"
    )
    results = {
        "evaluation": "saliency",
        "scan": os.path.abspath(scan),
        "mask_size": mask_size,
        "overlap": overlap,
        "spacing_mm": list(SALIENCY_SPACING_MM),
        "map": summary,
        "nifti": nifti.name,
        "paper": PAPER_NOTE,
        "figures": [figure.name],
    }
    if on_prepared is not None:
        results["in_label"] = saliency_in_label(saliency, on_prepared)
        report.heading(f"Inside the label ({Path(labels).name})").table(
            [{"figure": k, "value": v} for k, v in results["in_label"].items()], digits=4
        )
    report.paragraph(f"Paper: {PAPER_NOTE}.")
    prov = {
        **(weights_fields or {}),
        "scan": os.path.abspath(scan),
        "scan_content_hash": content_hash(image),
        "preset": spec.name,
        "preset_hash": spec.content_hash(),
        "labels": os.path.abspath(labels) if labels else None,
    }
    result = write_evaluation_outputs(out, results, prov, report, SaliencyResult)
    result.data["nifti_path"] = os.fspath(nifti)
    return result
