"""The main job, end to end, on a synthetic torso phantom (or your own scan with --input).

Steps: make a labelled synthetic CT (ctfm.synth), load and check it as any CT, preprocess it with
a CT-FM preset, write a PNG of three orthogonal slices before and after; then embed a small
synthetic cohort with a seeded, randomly initialised CT-FM encoder into an embedding store and
print each scan's nearest neighbour; finally two zero-shot examples between two labelled phantoms
(organ-crop retrieval and semantic search of organ centroids; --no-examples skips them).

The published CT-FM weights cannot be downloaded on an offline machine; with network access:
  ctfm models download project-lighter/ct_fm_feature_extractor
  ctfm embed SCANS... --weights hf-hub:project-lighter/ct_fm_feature_extractor --out store

Examples:
  ctfm demo
  ctfm demo --out demo_out --seed 3 --preset ct-fm-1mm-320
  ctfm demo --input scan.nii.gz --cohort 0
"""

from __future__ import annotations

from pathlib import Path

from ctfm.cli import nonnegative_int


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="ctfm-demo", help="output folder (default ./ctfm-demo)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--preset", default="ct-fm-ssl", help="preprocessing preset (default ct-fm-ssl)")
    parser.add_argument("--input", metavar="PATH", help="use this CT instead of a synthetic phantom")
    parser.add_argument(
        "--cohort", type=nonnegative_int, default=4, help="synthetic scans to embed and search (default 4; 0 skips)"
    )
    parser.add_argument(
        "--mode",
        default="patches",
        choices=["patches", "whole"],
        help="embedding mode for the cohort (default patches: fast on a CPU)",
    )
    parser.add_argument(
        "--no-examples",
        dest="examples",
        action="store_false",
        help="skip the zero-shot examples (organ-crop retrieval and semantic search between two phantoms)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["fp32", "bf16", "auto"],
        help="encoder precision for the cohort (default auto: bf16 where the CPU/GPU has native bf16, else fp32)",
    )


def run(args) -> int:
    import ctfm
    from ctfm.errors import optional_import
    from ctfm.evaluate.reports.figures import orthogonal_slices_figure
    from ctfm.io import save_nifti
    from ctfm.preprocess import check_ct, get_preset, require_usable

    for module in ("matplotlib", "sklearn"):  # before any work: the figure and the examples need the eval extra
        optional_import(module, "eval", "ctfm demo (its figure and zero-shot examples)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = get_preset(args.preset)

    if args.input:
        source = Path(args.input)
        print(f"1/6 input: {source}")
    else:
        from ctfm.synth import make_phantom, write_phantom

        phantom = make_phantom(seed=args.seed)
        source, labels_path = write_phantom(phantom, out, stem=f"phantom_seed{args.seed}")
        print(f"1/6 synthetic torso phantom (seed {args.seed}, not real data): {source} + {labels_path.name}")

    image, record = ctfm.load_ct(source)
    checks = check_ct(image, record)
    worst = (
        "error"
        if any(c.status == "error" for c in checks)
        else "warn"
        if any(c.status == "warn" for c in checks)
        else "ok"
    )
    print(
        f"2/6 loaded {record.format} {'x'.join(map(str, record.shape))} voxels at "
        f"{' x '.join(f'{s:.3g}' for s in record.spacing_mm)} mm; checks: {worst}"
    )
    for c in checks:
        if c.status != "ok":
            print(f"      {c.status}: {c.name}: {c.message}")
    require_usable(checks, source)

    result = ctfm.preprocess(image, spec)
    preprocessed_path = save_nifti(result, out / f"{Path(source).name.split('.')[0]}_{spec.name}.nii.gz")
    print(
        f"3/6 preprocessed with {spec.name}: {'x'.join(map(str, result.shape[1:]))} voxels ({spec.orientation}) -> "
        f"{preprocessed_path}"
    )

    figure = orthogonal_slices_figure(
        [("before (HU)", image, (-1000.0, 1000.0)), (f"after {spec.name} ([0,1])", result, (0.0, 1.0))],
        out / "preprocessing.png",
        title=f"{Path(source).name}: before and after {spec.name}",
    )
    print(f"4/6 figure: {figure}")
    if args.cohort > 0:
        embed_cohort(out, args)
    if args.examples:
        zero_shot_examples(out, args)
    print(f"done: outputs in {out}/")
    return 0


# Small torsos (192 x 156 x 120 mm at 3 mm) keep the cohort quick on a CPU; anatomy still varies by seed.
COHORT_SHAPE, COHORT_SPACING_MM = (64, 52, 40), (3.0, 3.0, 3.0)


def embed_cohort(out: Path, args) -> None:
    """Embed a synthetic cohort with a seeded random ct-fm and print nearest neighbours."""
    import numpy as np

    import ctfm
    from ctfm.models import init_model, save_pretrained
    from ctfm.synth import make_phantom, write_phantom

    weights = out / "ct-fm-random-seed0"
    if not (weights / "model.safetensors").exists():
        save_pretrained(init_model("ct-fm", seed=0), weights, provenance={"source": "random-init", "seed": 0})
    print(
        f"5/6 weights: {weights} (ct-fm, random init, seed 0) -- the published CT-FM weights cannot be downloaded here;"
    )
    print(
        "      with network: ctfm models download project-lighter/ct_fm_feature_extractor, then --weights "
        "hf-hub:project-lighter/ct_fm_feature_extractor"
    )
    scans = []
    for seed in range(args.seed, args.seed + args.cohort):
        phantom = make_phantom(seed=seed, shape=COHORT_SHAPE, spacing_mm=COHORT_SPACING_MM)
        scans.append(write_phantom(phantom, out / "cohort", stem=f"torso_seed{seed}")[0])
    from ctfm.embedding.modes import resolve_precision
    from ctfm.embedding.runner import default_device

    precision = resolve_precision(args.precision, default_device())
    records = ctfm.embed(
        [str(p) for p in scans], weights=str(weights), mode=args.mode, precision=precision, out=out / "store"
    )
    names = [Path(r["source_path"]).name.split(".")[0] for r in records]
    vectors = np.stack([r["embedding"] for r in records])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    print(
        f"6/6 embedded {len(records)} synthetic scans ({args.mode}, {precision}) into {out / 'store'}; nearest "
        "neighbours by cosine:"
    )
    for i, name in enumerate(names):
        j = int(np.argmax(similarity[i]))
        print(f"      {name} -> {names[j]} (cosine {similarity[i, j]:.4f})")
    from ctfm.store import check_store, is_consistent, open_store

    store = open_store(out / "store")
    problems = check_store(store)
    print(
        f"      store check: {'consistent' if is_consistent(problems) else 'INCONSISTENT'} (preprocessing "
        f"{records.spec.name}, recorded with each row; `ctfm store info {out / 'store'}` lists its runs)"
    )


def zero_shot_examples(out: Path, args) -> None:
    """Organ-crop retrieval and semantic search of organ centroids between two labelled phantoms
    (ctfm.evaluate.zeroshot.examples), with a narrow random encoder so that it takes seconds."""
    from ctfm.evaluate.zeroshot.examples import demo_examples
    from ctfm.models import init_model
    from ctfm.synth import make_phantom, write_phantom

    scans = []
    for seed in (args.seed, args.seed + 1):
        image, labels = write_phantom(
            make_phantom(seed=seed, shape=COHORT_SHAPE, spacing_mm=COHORT_SPACING_MM),
            out / "cohort",
            stem=f"torso_seed{seed}",
        )
        scans.append({"image": str(image), "labels": str(labels)})
    print(
        "zero-shot examples (ctfm evaluate's protocols, small; random weights of a narrow ct-fm encoder, init_filters "
        "8, seed 0: the figures show the machinery, not CT-FM's quality):"
    )
    demo_examples(scans, out / "examples", init_model("ct-fm", seed=0, init_filters=8))
