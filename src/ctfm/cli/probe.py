"""Fit probes on a store's frozen embeddings for labels in a CSV, with honest metrics.

Examples:
  ctfm probe store/ --labels labels.csv --target abnormal --key series_uid --out probe_out
  ctfm probe store/ --labels labels.csv --target abnormal --group-column patient_id --cv 5
  ctfm probe store/ --labels findings.csv --target f1,f2,f3 --task multilabel --split-column split
  ctfm probe ctfm_store/ other_store/ --labels labels.csv --target abnormal --shots 1,2,5,10,20,all
  ctfm probe store/ --labels labels.xlsx --target abnormal --where mode=whole --run 3f2a

Labels join the store's scan rows by --key; unmatched rows on either side are counted and
reported. Each target gets its own probe: logistic regression on standardised features with C
chosen from 13 values (1e-6..1e6) by inner cross-validation on the training folds only, kNN
(cosine, k chosen the same way) or a small MLP. --group-column keeps every group (patient) in one
fold. Metrics (AUROC, AP, balanced accuracy, F1, sensitivity, specificity at the chosen threshold
and at 0.5) carry 95% bootstrap CIs over test cases (over groups with --group-column). Several
stores are probed on the same cases and folds and compared with the first (DeLong, paired
bootstrap). OUT gets results.json (with provenance), predictions.csv, ROC/PR PNGs, report.html.
"""

from __future__ import annotations

import json

from ctfm.cli import nonnegative_int, positive_int


def add_arguments(parser) -> None:
    parser.add_argument(
        "stores",
        nargs="+",
        metavar="STORE",
        help="embedding store folder(s) (`ctfm embed --out`); several are compared with the first",
    )
    parser.add_argument(
        "--labels", required=True, metavar="SHEET", help="label sheet with a header row (CSV, TSV, Parquet or XLSX)"
    )
    parser.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="COLUMN",
        help="label column (repeat, or comma-separate, for several)",
    )
    parser.add_argument(
        "--key",
        default="scan_id",
        choices=["scan_id", "series_uid", "source_path"],
        help="column joining labels to scan rows (default scan_id)",
    )
    parser.add_argument(
        "--task",
        default="auto",
        choices=["auto", "binary", "multiclass", "multilabel"],
        help="auto: binary for 0/1 columns, multi-class otherwise",
    )
    parser.add_argument("--method", default="logistic", choices=["logistic", "knn", "mlp"])
    split = parser.add_mutually_exclusive_group()
    split.add_argument(
        "--cv", type=positive_int, default=5, metavar="K", help="outer cross-validation folds (default 5)"
    )
    split.add_argument(
        "--split-column", metavar="COL", help="column with train/val/test per row: fit on train+val, score test"
    )
    parser.add_argument(
        "--group-column", metavar="COL", help="group (patient) column: a group never sits on both sides of a split"
    )
    parser.add_argument(
        "--inner-cv",
        type=positive_int,
        default=3,
        metavar="K",
        help="inner folds choosing the hyperparameter (default 3)",
    )
    from ctfm.cli.selection import add_run_selection

    add_run_selection(
        parser,
        run_help="the run to probe when a store holds several: its digest or a unique prefix (`ctfm store info` lists "
        "them)",
    )
    parser.add_argument(
        "--shots", metavar="LIST", help="few-shot curve: labelled cases per class, e.g. 1,2,5,10,20,all"
    )
    parser.add_argument("--repeats", type=positive_int, default=10, help="few-shot draws per point (default 10)")
    parser.add_argument(
        "--resamples", type=positive_int, default=1000, help="bootstrap resamples for the CIs (default 1000)"
    )
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--jobs", type=positive_int, default=1, help="targets fitted in parallel (processes)")
    parser.add_argument("--out", metavar="DIR", help="write results.json, predictions.csv, PNGs and report.html here")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")


def run(args) -> int:
    import ctfm
    from ctfm.cli.selection import run_selection
    from ctfm.errors import optional_import
    from ctfm.evaluate.probes.probe import parse_shots

    optional_import("sklearn", "eval", "ctfm probe")  # before any work
    targets = [t.strip() for item in args.target for t in item.split(",") if t.strip()]
    run, where = run_selection(args)
    result = ctfm.probe(
        args.stores,
        args.labels,
        targets,
        key=args.key,
        task=args.task,
        method=args.method,
        cv=args.cv,
        split_column=args.split_column,
        group_column=args.group_column,
        run=run,
        where=where,
        inner_cv=args.inner_cv,
        shots=parse_shots(args.shots) if args.shots else None,
        repeats=args.repeats,
        n_resamples=args.resamples,
        seed=args.seed,
        jobs=args.jobs,
        out=args.out,
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    for join in result["join"]:
        print(
            f"{join['store']}: {join['matched']} labelled scan(s) joined by {join['key']}; "
            f"{join['scans_without_label']} scan(s) without a label, {join['labels_without_scan']} label row(s) without "
            "a scan" + (f", {join['not_in_every_store']} not in every store" if join.get("not_in_every_store") else "")
        )
    for entry in result["targets"]:
        print(
            f"target {entry['target']} ({entry['task']}, {entry['n_labelled']} labelled, {entry['n_missing']} missing, "
            f"{entry['folds']} fold(s)):"
        )
        names = (
            ("auroc", "average_precision", "balanced_accuracy", "f1", "sensitivity", "specificity")
            if entry["task"] == "binary"
            else ("auroc_ovr", "balanced_accuracy", "f1_macro", "accuracy")
        )
        for store in entry["stores"]:
            text = ", ".join(f"{n} {_ci(store['metrics'][n])}" for n in names)
            print(f"  {store['store']}: {text}")
            if "few_shot" in store:
                fs = store["few_shot"]
                print(
                    f"    few-shot {fs['metric']}: "
                    + ", ".join(f"{p['shots']}: {p['mean']:.3f}±{p['sd']:.3f}" for p in fs["points"].values())
                )
        for comparison in entry["comparisons"]:
            first = comparison.get("delong_auroc") or next(iter(comparison["paired_bootstrap"].values()))
            print(
                f"  {comparison['a']} - {comparison['b']}: {first['difference']:+.3f} [{first['low']:+.3f}, "
                f"{first['high']:+.3f}], p={first['p_value']:.3g} ({first['method']})"
            )
    if args.out:
        print(f"wrote {args.out}/results.json, predictions.csv, report.html ({result['seconds']:.1f} s)")
    return 0


def _ci(m: dict) -> str:
    value = m.get("estimate")
    if value is None or value != value:
        return "n/a"
    return f"{value:.3f} [{m['low']:.3f}, {m['high']:.3f}]"
