"""Zero-shot evaluations with CT-FM's protocols (each writes results.json, PNG figures and one
self-contained report.html into --out, with the paper's figures beside ours), and segmentation
scores (`ctfm evaluate seg`).

Examples:
  ctfm evaluate retrieval --organmnist organmnist3d_64.npz --weights model_dir --out eval/organmnist
  ctfm evaluate retrieval store/ --annotations mir.csv --relevance cancer_flag,lesion_group --out eval/mir
  ctfm evaluate semantic-search labelled.csv --label heart --weights model_dir --out eval/search
  ctfm evaluate clustering store/ --labels labels.csv --out eval/clusters
  ctfm evaluate clustering --organmnist organmnist3d_64.npz --weights model_dir --out eval/clusters
  ctfm evaluate concepts scan1.nii.gz scan2.nii.gz --weights model_dir --out eval/concepts
  ctfm evaluate stability store/ --manifest rescans.csv --out eval/stability
  ctfm evaluate stability store/ --manifest rescans.csv --where mode=whole --run 3f2a --out eval/stability
  ctfm evaluate saliency scan.nii.gz --labels tumour.nii.gz --weights model_dir --out eval/saliency
  ctfm evaluate seg --pred predictions/ --truth labels/ --out eval/seg
"""

from __future__ import annotations

import json

from ctfm.cli import device, fraction, nonnegative_int, positive_float, positive_int


# ---- shared options -----------------------------------------------------------------------
def _out(p) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (results.json, figures, report.html)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")


def _weights(p) -> None:
    p.add_argument(
        "--weights",
        metavar="SOURCE",
        help="weights folder, hf-hub:ORG/NAME, .safetensors or .ckpt (default: random init, for testing)",
    )
    p.add_argument("--model", default="ct-fm", help="registry name of the encoder (default ct-fm)")
    p.add_argument(
        "--seed", type=nonnegative_int, default=0, help="seed of the random init when no weights are given (default 0)"
    )
    p.add_argument("--device", type=device, default=None, help="cpu, cuda, ... (default: CUDA when visible, else CPU)")


def _store_selection(p) -> None:
    from ctfm.cli.selection import add_run_selection

    add_run_selection(p)


def _selection(args) -> dict:
    from ctfm.cli.selection import run_selection

    run, where = run_selection(args)
    return {"run": run, "where": where}


def _device(args) -> str:
    from ctfm.embedding.runner import default_device

    return default_device(args.device)


def _emit(result, as_json: bool) -> int:
    """Print a zero-shot result: its JSON (without the long per-item lists) or its one-line summary."""
    if as_json:
        long_lists = ("per_query", "per_pair", "per_dimension_icc", "per_case")
        brief = {k: v for k, v in result.to_json().items() if k not in long_lists}
        print(json.dumps(brief, indent=2, allow_nan=False))
    else:
        print(result.summary())
    return 0


# ---- one function per subcommand ----------------------------------------------------------
def register_retrieval(sub) -> None:
    p = sub.add_parser(
        "retrieval", help="OrganMNIST3D (L2; AP/HR/F1 at 3, 5, 10) or 3D-MIR (min-pooled patches, cosine; P@k, mAP)"
    )
    p.add_argument(
        "store", nargs="?", metavar="STORE", help="3D-MIR: a store with patch embeddings of the annotated scans"
    )
    p.add_argument("--organmnist", metavar="NPZ", help="OrganMNIST3D protocol on MedMNIST's organmnist3d_64.npz")
    p.add_argument(
        "--queries",
        default="val+test",
        choices=["val+test", "test", "val"],
        help="OrganMNIST3D query splits (default val+test; gallery: train)",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        help="OrganMNIST3D: use at most this many gallery and query volumes (a quick look)",
    )
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument(
        "--annotations",
        metavar="SHEET",
        help="3D-MIR: CSV/Parquet/XLSX with scan, split (train/test), group and relevance columns",
    )
    p.add_argument(
        "--relevance",
        default="",
        metavar="COLS",
        help="3D-MIR: comma-separated attribute columns; a hit has the query's value",
    )
    p.add_argument("--scan-column", default="scan")
    p.add_argument("--split-column", default="split")
    p.add_argument(
        "--group-column",
        default="group",
        help="queries retrieve within their group (e.g. organ); absent column: one group",
    )
    _weights(p)
    _store_selection(p)
    _out(p)


def run_retrieval(args) -> int:
    import ctfm

    result = ctfm.evaluate_retrieval(
        args.store,
        out=args.out,
        organmnist=args.organmnist,
        annotations=args.annotations,
        relevance=[a.strip() for a in args.relevance.split(",") if a.strip()],
        weights=args.weights,
        model=args.model,
        seed=args.seed,
        queries=args.queries,
        device=_device(args),
        batch_size=args.batch_size,
        limit=args.limit,
        scan_column=args.scan_column,
        split_column=args.split_column,
        group_column=args.group_column,
        **_selection(args),
    )
    return _emit(result, args.json)


def register_semantic_search(sub) -> None:
    p = sub.add_parser(
        "semantic-search",
        help="label-centroid queries across labelled scans (64^3 at 1 mm, cosine): error in mm, inside-label rate",
    )
    p.add_argument(
        "pairs",
        metavar="SHEET",
        help="CSV/Parquet with columns image, labels (one row per labelled scan); the first row is the query unless "
        "--query",
    )
    p.add_argument(
        "--label",
        action="append",
        required=True,
        metavar="NAME_OR_VALUE",
        help="label to search for (name or value; repeat for several)",
    )
    p.add_argument(
        "--query",
        metavar="IMAGE",
        help="the query scan (default: the first row of the sheet); every other row is a target",
    )
    p.add_argument(
        "--all-pairs", action="store_true", help="every scan queries every other scan (default: one query against all)"
    )
    p.add_argument(
        "--overlap", type=fraction, default=0.625, help="window overlap in the target (default 0.625, as CT-FM)"
    )
    p.add_argument(
        "--refine",
        default="none,weighted",
        help="predicted points to report, comma-separated: none (best window centre, CT-FM), weighted, fine (default "
        "none,weighted)",
    )
    p.add_argument(
        "--spacing-mm",
        type=positive_float,
        default=1.0,
        help="isotropic spacing (default 1, CT-FM's protocol; coarser for a quick look)",
    )
    p.add_argument(
        "--window", type=positive_int, default=64, help="window size in voxels (default 64, CT-FM's protocol)"
    )
    p.add_argument("--batch-size", type=positive_int, default=4)
    _weights(p)
    _out(p)


def run_semantic_search(args) -> int:
    import ctfm

    result = ctfm.evaluate_semantic_search(
        args.pairs,
        args.out,
        labels=args.label,
        query=args.query,
        all_pairs=args.all_pairs,
        weights=args.weights,
        model=args.model,
        seed=args.seed,
        overlap=args.overlap,
        batch_size=args.batch_size,
        device=_device(args),
        refinements=tuple(r.strip() for r in args.refine.split(",") if r.strip()),
        spacing_mm=args.spacing_mm,
        window_voxels=args.window,
    )
    return _emit(result, args.json)


def register_clustering(sub) -> None:
    p = sub.add_parser(
        "clustering", help="t-SNE and UMAP figures; silhouette, kNN accuracy, ARI of k-means against labels"
    )
    p.add_argument("store", nargs="?", metavar="STORE", help="a store whose scans the labels sheet names")
    p.add_argument("--labels", metavar="SHEET", help="CSV/Parquet/XLSX with columns scan, label")
    p.add_argument("--scan-column", default="scan")
    p.add_argument("--label-column", default="label")
    p.add_argument("--organmnist", metavar="NPZ", help="instead: all OrganMNIST3D volumes, labelled by organ")
    p.add_argument("--limit", type=positive_int, help="OrganMNIST3D: at most this many volumes")
    p.add_argument("--k", type=positive_int, default=5, help="neighbours of the kNN accuracy (default 5)")
    p.add_argument(
        "--perplexity",
        type=positive_float,
        default=100.0,
        help="t-SNE perplexity (default 100, as CT-FM; capped below N/3)",
    )
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP figure")
    p.add_argument("--batch-size", type=positive_int, default=8)
    _weights(p)
    _store_selection(p)
    _out(p)


def run_clustering(args) -> int:
    import ctfm

    result = ctfm.evaluate_clustering(
        args.store,
        out=args.out,
        labels=args.labels,
        organmnist=args.organmnist,
        scan_column=args.scan_column,
        label_column=args.label_column,
        weights=args.weights,
        model=args.model,
        seed=args.seed,
        device=_device(args),
        batch_size=args.batch_size,
        limit=args.limit,
        k=args.k,
        perplexity=args.perplexity,
        with_umap=not args.no_umap,
        **_selection(args),
    )
    return _emit(result, args.json)


def register_concepts(sub) -> None:
    p = sub.add_parser("concepts", help="dense features -> PCA -> colour overlays on slices (one PCA over all scans)")
    p.add_argument("scans", nargs="+", metavar="SCAN")
    p.add_argument(
        "--zoom",
        type=positive_float,
        default=1.0,
        help="resample the scan this much finer before the encoder (finer feature grid, slower; default 1)",
    )
    _weights(p)
    _out(p)


def run_concepts(args) -> int:
    import ctfm

    return _emit(
        ctfm.evaluate_concepts(args.scans, args.out, args.weights, args.model, args.seed, args.zoom, _device(args)),
        args.json,
    )


def register_stability(sub) -> None:
    p = sub.add_parser(
        "stability", help="test-retest pairs: pair vs non-pair cosine, per-dimension ICC, rank-1 re-identification"
    )
    p.add_argument("store", metavar="STORE", help="a store holding both scans of every pair")
    p.add_argument(
        "--manifest", required=True, metavar="SHEET", help="CSV/Parquet/XLSX with columns scan_a, scan_b[, subject]"
    )
    _store_selection(p)
    _out(p)


def run_stability(args) -> int:
    import ctfm

    return _emit(ctfm.evaluate_stability(args.store, args.manifest, args.out, **_selection(args)), args.json)


def register_saliency(sub) -> None:
    p = sub.add_parser(
        "saliency",
        help="occlusion saliency (mask 10, overlap 0.25, 1 - cosine) as NIfTI on the input grid + slice overlays",
    )
    p.add_argument("scan", metavar="SCAN")
    p.add_argument("--labels", metavar="PATH", help="a label map (tumour, organ): how much saliency falls inside it")
    p.add_argument(
        "--mask-size", type=positive_int, default=10, help="occluder size in voxels at 3 mm (default 10, as CT-FM)"
    )
    p.add_argument("--overlap", type=fraction, default=0.25, help="occluder overlap (default 0.25, as CT-FM)")
    p.add_argument("--batch", type=positive_int, default=12, help="occluded copies per forward pass (default 12)")
    _weights(p)
    _out(p)


def run_saliency(args) -> int:
    import ctfm

    result = ctfm.evaluate_saliency(
        args.scan,
        args.out,
        args.weights,
        args.model,
        args.seed,
        args.labels,
        args.mask_size,
        args.overlap,
        args.batch,
        _device(args),
    )
    return _emit(result, args.json)


def register_seg(sub) -> None:
    from ctfm.cli.evaluate_seg import add_seg

    add_seg(sub)


# Each entry adds one subcommand's parser; RUNS names the function that runs it.
SUBCOMMANDS = (
    register_retrieval,
    register_semantic_search,
    register_clustering,
    register_concepts,
    register_stability,
    register_saliency,
    register_seg,
)


def add_arguments(parser) -> None:
    from ctfm.cli import add_subcommands

    add_subcommands(parser, "evaluate", SUBCOMMANDS, noun="evaluation")


def run(args) -> int:
    from ctfm.cli import evaluate_seg, run_subcommand
    from ctfm.errors import optional_import

    for module in (
        "matplotlib",
        "sklearn",
    ):  # before any work: every evaluation writes figures, most score with sklearn
        optional_import(module, "eval", f"ctfm evaluate {args._subcommand}")
    if getattr(args, "out", None) is not None:  # every evaluation's folder: checked before any work
        from ctfm.runtime import require_output_dir

        require_output_dir(args.out, f"--out of ctfm evaluate {args._subcommand}")
    runs = {
        "retrieval": run_retrieval,
        "semantic-search": run_semantic_search,
        "clustering": run_clustering,
        "concepts": run_concepts,
        "stability": run_stability,
        "saliency": run_saliency,
        "seg": evaluate_seg.run_seg,
    }
    return run_subcommand(args, runs)
