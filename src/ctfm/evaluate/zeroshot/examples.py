"""Two quick zero-shot examples for the demo (seconds on a CPU, any labelled pair of scans):
organ-crop retrieval from one scan to the other, and semantic search of organ centroids.

They are the protocols of :mod:`ctfm.evaluate.zeroshot.retrieval` and :mod:`ctfm.evaluate.zeroshot.semantic_search`
made small: crops of 8x32x32 voxels at 3x1x1 mm, and search windows of 32^3 voxels at 2 mm
(the same 64 mm field of view as CT-FM's 64^3 at 1 mm) with overlap 0.25.
"""

from __future__ import annotations

import os
from pathlib import Path

from ctfm.embedding.runner import weights_sha256_of
from ctfm.evaluate.reports.report import Report
from ctfm.evaluate.zeroshot.inputs import write_evaluation_outputs
from ctfm.evaluate.zeroshot.retrieval import common_labels, crop_retrieval, labelled_volume, organ_crops
from ctfm.evaluate.zeroshot.semantic_search import search_spec, semantic_search_cases, summarise_label

DEMO_CROP = (8, 32, 32)
DEMO_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "aorta", "vertebrae", "lung_left", "lung_right")


def demo_search_spec():

    return search_spec().with_(
        name="ct-fm-search-2mm-demo",
        spacing_mm=(2.0, 2.0, 2.0),
        description="demo: semantic search at 2 mm, 32^3 windows (64 mm)",
    )


def demo_examples(scans: list[dict], out, encoder, per_organ: int = 5, device: str = "cpu", say=print) -> dict:
    """Run both examples on ``scans`` ([{"image", "labels"}, ...], the first two used) and write
    ``out/retrieval/`` and ``out/semantic-search/`` (results.json + report.html each)."""

    out = Path(out)
    a, b = (labelled_volume(s["image"], s["labels"]) for s in scans[:2])
    organs = [o for o in common_labels([a, b], DEMO_CROP, min_centres=20) if any(o.startswith(d) for d in DEMO_ORGANS)]
    crops_a, tags_a = organ_crops(*a[:3], organs, per_organ, 0, DEMO_CROP)
    crops_b, tags_b = organ_crops(*b[:3], organs, per_organ, 1, DEMO_CROP)
    retrieval = crop_retrieval(encoder.eval(), crops_a, tags_a, crops_b, tags_b, ks=(1, 5), device=device)
    provenance = {
        "weights_sha256": weights_sha256_of(encoder),
        "scans": [os.path.abspath(s["image"]) for s in scans[:2]],
    }
    report = Report(
        "Demo: organ-crop retrieval",
        f"{len(tags_a)} crops of {len(organs)} organs per scan; cosine; relevance = same organ",
    )
    report.table(
        [
            {"direction": d, **{k: v["mean"] for k, v in r.items() if isinstance(v, dict)}, "chance": r["chance"]}
            for d, r in retrieval.items()
        ],
        digits=3,
    )
    paths = write_evaluation_outputs(
        out / "retrieval",
        {"evaluation": "retrieval", "protocol": "organ crops", "organs": organs, "results": retrieval},
        provenance,
        report,
    )
    p = retrieval["A->B"]
    say(
        f"      retrieval: {len(tags_a)} organ crops of {Path(scans[0]['image']).name} query those of "
        f"{Path(scans[1]['image']).name}: P@1 {p['P@1']['mean']:.2f}, P@5 {p['P@5']['mean']:.2f} (chance "
        f"{p['chance']:.2f}) -> {paths['report']}"
    )

    run = semantic_search_cases(
        scans[:2],
        organs,
        [(0, 1)],
        encoder,
        ("weighted",),
        store=out / "semantic-search" / "store",
        overlap=0.25,
        device=device,
        spec=demo_search_spec(),
    )
    summary = summarise_label([c["weighted"] for c in run["cases"]])
    report = Report(
        "Demo: semantic search of organ centroids",
        f"each organ's centroid in {Path(scans[0]['image']).name} searched in {Path(scans[1]['image']).name}; 32^3 "
        "windows at 2 mm",
    )
    report.table(
        [
            {
                "organ": c["label"],
                "error mm": c["weighted"]["error_mm"],
                "inside the organ": c["weighted"]["inside_label"],
                "score": c["weighted"]["score"],
            }
            for c in run["cases"]
        ],
        digits=1,
    )
    paths_search = write_evaluation_outputs(
        out / "semantic-search",
        {"evaluation": "semantic-search", "summary": summary, "per_case": run["cases"]},
        provenance,
        report,
    )
    say(
        f"      semantic search: {summary['pairs']} organ centroids, error {summary['error_mm_mean']:.0f} mm mean / "
        f"{summary['error_mm_median']:.0f} mm median, {summary['inside_label_rate']:.0%} inside the organ -> "
        f"{paths_search['report']}"
    )
    return {
        "retrieval": retrieval,
        "search": summary,
        "organs": organs,
        "reports": [paths["report"], paths_search["report"]],
    }
