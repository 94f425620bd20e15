"""Concept maps: dense encoder features -> PCA -> colours on the scan.

As CT-FM's meta-concept analysis: the stride-16 feature volume of each scan (``embed_dense``), the
feature voxels of all given scans together z-scored per channel, PCA, the first three components
min-max scaled to [0, 1] as RGB and laid over slices of the preprocessed scan. One PCA for all
scans, so that a colour means the same feature direction in each. ``zoom`` > 1 resamples the
scan finer before the encoder (CT-FM upsamples its patches 8x4x4), which gives a finer feature
grid at a higher cost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctfm.embedding.modes import EmbedOptions, embed_dense
from ctfm.errors import CTInputError, OptionError, optional_import
from ctfm.evaluate.reports.figures import overlay_figure
from ctfm.evaluate.reports.report import Report
from ctfm.evaluate.zeroshot.inputs import ZeroShotResult, load_eval_encoder, write_evaluation_outputs
from ctfm.evaluate.zeroshot.saliency import onto_grid
from ctfm.io.hashing import content_hash
from ctfm.models.preprocessing import preprocessing_for
from ctfm.preprocess import load_usable_ct, preprocess
from ctfm.runtime import atomic_path

BODY_HU = -500.0  # feature voxels whose centre is denser than this take part in the PCA
PAPER_NOTE = "CT-FM shows PCA colour maps of dense features on two TotalSegmentator scans (qualitative: organs and tissue classes take distinct colours); no number is published"


@dataclass
class ConceptsResult(ZeroShotResult):
    """What the concept maps evaluation returns: the keys of its results.json,
    the paths of results.json and report.html (``result["results"]``, ``result["report"]``), and ``provenance``."""


def concepts_spec(spec, zoom: float = 1.0):
    """``spec`` with its spacing divided by ``zoom`` (a finer grid for a finer feature map)."""
    if zoom <= 0:
        raise OptionError(f"zoom {zoom}: expected a positive factor")
    if zoom == 1.0:
        return spec
    return spec.with_(
        name=f"{spec.name}-zoom{zoom:g}", spacing_mm=tuple(s / zoom for s in spec.spacing_mm), patch_size_mm=None
    )


def pca_colours(
    features: list[np.ndarray], masks: list[np.ndarray], n_components: int = 3, seed: int = 42
) -> tuple[list[np.ndarray], np.ndarray]:
    """``features`` [C, d, h, w] per scan, ``masks`` [d, h, w] bool -> (RGB [d, h, w, 3] in [0, 1]
    per scan, zero outside the mask; explained variance ratios)."""
    PCA = optional_import("sklearn.decomposition", "eval").PCA

    rows = np.concatenate([f.reshape(f.shape[0], -1).T[m.reshape(-1)] for f, m in zip(features, masks)])
    if len(rows) <= n_components:
        raise OptionError(
            f"only {len(rows)} feature voxels inside the body; concept maps need more than {n_components} (use a larger "
            "scan or --zoom)"
        )
    mean, std = rows.mean(axis=0), rows.std(axis=0)
    std[std == 0] = 1.0
    pca = PCA(n_components=n_components, random_state=seed).fit((rows - mean) / std)
    projected = pca.transform((rows - mean) / std)
    lo, hi = projected.min(axis=0), projected.max(axis=0)
    scale = np.where(hi > lo, hi - lo, 1.0)
    colours, start = [], 0
    for m in masks:
        count = int(m.sum())
        rgb = np.zeros((*m.shape, n_components), np.float32)
        rgb[m] = (projected[start : start + count] - lo) / scale
        colours.append(rgb)
        start += count
    return colours, pca.explained_variance_ratio_


def run_concepts(
    scans: list,
    out,
    weights: str | None = None,
    model: str = "ct-fm",
    seed: int = 0,
    zoom: float = 1.0,
    device: str = "cpu",
    encoder=None,
    weights_fields: dict | None = None,
) -> ConceptsResult:
    """Concept maps of ``scans``: one PCA over all; a figure and a NIfTI of the colours per scan."""
    import nibabel as nib

    if not scans:
        raise OptionError("give at least one scan")
    for scan in scans:
        if not Path(scan).exists():
            raise CTInputError(scan, "no such file or folder", "give the path of a CT scan")
    if encoder is None:
        encoder, weights_fields = load_eval_encoder(weights, model, seed, device)
    spec = concepts_spec(preprocessing_for(encoder, model, "dense"), zoom)
    window = spec.windows[0]
    body_level = (BODY_HU - window.low_hu) / (window.high_hu - window.low_hu)
    dense, prepared_images, masks, hashes = [], [], [], []
    for scan in scans:
        image, _ = load_usable_ct(scan, spec=spec)
        hashes.append(content_hash(image))
        features = embed_dense(encoder, image, EmbedOptions(mode="dense", spec=spec, device=device))
        prepared = preprocess(image, spec)
        volume = np.asarray(prepared[0], np.float32)
        # The image value at each feature voxel's centre (nearest input voxel): the body mask.
        centres = np.linalg.solve(
            np.asarray(prepared.affine, np.float64),
            np.c_[features.voxel_centers_mm().reshape(-1, 3), np.ones(features.features[0].size)].T,
        )[:3].T
        idx = np.clip(np.round(centres).astype(int), 0, np.asarray(volume.shape) - 1)
        mask = (volume[idx[:, 0], idx[:, 1], idx[:, 2]] > body_level).reshape(features.features.shape[1:])
        dense.append(features)
        prepared_images.append((volume, np.asarray(prepared.affine, np.float64)))
        masks.append(mask)
    colours, explained = pca_colours([d.features for d in dense], masks)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    figures, maps, per_scan = [], [], []
    for scan, features, (volume, affine), rgb in zip(scans, dense, prepared_images, colours):
        stem = Path(scan).name.split(".")[0]
        fine = np.stack([onto_grid(rgb[..., c], features.affine, affine, volume.shape) for c in range(3)], axis=-1)
        fine = np.clip(fine, 0, 1)
        figures.append(
            overlay_figure(
                volume,
                fine,
                affine,
                out / f"concepts_{stem}.png",
                f"{Path(scan).name}: first three principal components of the dense features as RGB",
                base_range=(0.0, 0.5),
                alpha=0.6,
            )
        )
        nifti = out / f"concepts_{stem}.nii.gz"
        img = nib.Nifti1Image(rgb.astype(np.float32), features.affine)
        with atomic_path(nifti, suffix=".nii.gz") as tmp:
            nib.save(img, str(tmp))
        maps.append(nifti.name)
        per_scan.append(
            {
                "scan": Path(scan).name,
                "feature_grid": list(features.features.shape[1:]),
                "body_feature_voxels": int(masks[len(per_scan)].sum()),
            }
        )
    report = Report(
        "Concept maps (dense features, PCA)",
        f"{len(scans)} scan(s), {spec.name} preprocessing, stride-16 features, one PCA over all scans",
    )
    report.heading("Principal components").table(
        [
            {"component": f"PC{i + 1} (colour {'RGB'[i]})", "explained variance ratio": float(v)}
            for i, v in enumerate(explained)
        ],
        digits=4,
    )
    report.table(per_scan, caption="scans")
    for figure in figures:
        report.figure(figure, figure.stem)
    report.paragraph(f"Paper: {PAPER_NOTE}.")
    results = {
        "evaluation": "concepts",
        "explained_variance_ratio": explained,
        "scans": per_scan,
        "zoom": zoom,
        "maps": maps,
        "paper": PAPER_NOTE,
        "figures": [f.name for f in figures],
    }
    prov = {
        **(weights_fields or {}),
        "scans": [os.path.abspath(s) for s in scans],
        "scan_content_hashes": hashes,
        "preset": spec.name,
        "preset_hash": spec.content_hash(),
    }
    return write_evaluation_outputs(out, results, prov, report, ConceptsResult)
