"""`ctfm evaluate seg`: per-class Dice, HD95 and normalised surface distance of label maps.

Examples:
  ctfm evaluate seg --pred preds/ --truth labels/ --labels totalseg-v2 --out eval/
  ctfm evaluate seg --pred preds/ --truth labels/ --compare baseline_preds/ --json

Files or folders matched by name (file name without extension). Two binary masks need nothing
else: a value nothing names is the class label_<value> (label_1). Classes are matched by name;
a class only the prediction holds is a false_positive row, one only the truth holds a missed
row. Empty masks: both empty -> not counted; one empty -> Dice 0, NSD 0, HD95 undefined. Macro = mean over classes of the class
means; 95 % bootstrap intervals over cases; --compare runs a paired Wilcoxon test on per-case Dice.
--out writes results.json (with provenance), metrics.csv and overlay.png (worst and best case).
Exit 1 when some case had no usable prediction (listed in the results), 2 for bad input.
"""

from __future__ import annotations

import argparse

from ctfm.cli import positive_float, positive_int


def add_seg(sub) -> None:
    p = sub.add_parser(
        "seg",
        help="score segmentations: Dice, HD95, NSD per class with CIs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pred", required=True, help="predicted label map, or a folder of them")
    p.add_argument("--truth", required=True, help="reference label map, or a folder of them (matched by name)")
    p.add_argument(
        "--labels",
        help="class map: totalseg-v2, a JSON file or liver,spleen (default: the predictions' <name>.labels.json, the "
        "names stored in the files, else label_<value>)",
    )
    p.add_argument("--compare", metavar="PATH", help="a second prediction set: paired Wilcoxon of per-case Dice")
    p.add_argument("--out", metavar="DIR", help="write results.json, metrics.csv and overlay.png here")
    p.add_argument(
        "--nsd-tolerance",
        type=positive_float,
        metavar="MM",
        help="surface tolerance of the NSD in mm (default 2, DEFAULT_NSD_TOLERANCE_MM)",
    )
    p.add_argument("--resamples", type=positive_int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def run_seg(args) -> int:
    import json
    import math

    import ctfm

    tolerance = {} if args.nsd_tolerance is None else {"nsd_tolerance_mm": args.nsd_tolerance}
    results = ctfm.evaluate_seg(
        args.pred,
        args.truth,
        labels=args.labels,
        compare=args.compare,
        out=args.out,
        n_resamples=args.resamples,
        **tolerance,
    )
    if args.json:
        print(json.dumps({k: v for k, v in results.to_json().items() if k != "per_case"}, indent=2))
    else:
        summary = results["summary"]
        print(f"{summary['cases']} case(s) scored, {len(results['failures'])} failed")
        nsd_header = f"NSD@{results['rules']['nsd_tolerance_mm']:g}mm"
        print(f"{'class':<32} {'Dice':>22} {'HD95 mm':>10} {nsd_header:>10}  cases")
        for name, entry in summary["per_class"].items():
            dice, hd, nsd = entry.get("dice"), entry.get("hd95"), entry.get("nsd")
            dice_text = "n/a" if not dice else f"{dice['estimate']:.3f} [{dice['low']:.3f}, {dice['high']:.3f}]"
            defined = hd and hd["estimate"] is not None and not math.isnan(hd["estimate"])
            hd_text = format(hd["estimate"], ".1f") if defined else "n/a"
            nsd_text = format(nsd["estimate"], ".3f") if nsd else "n/a"
            counts = ", ".join(f"{n} {status}" for status, n in sorted(entry.get("status_counts", {}).items()))
            print(f"{name:<32} {dice_text:>22} {hd_text:>10} {nsd_text:>10}  {counts}")
        macro = summary["macro"].get("dice")
        if macro:
            macro_text = f"{macro['estimate']:.3f} [{macro['low']:.3f}, {macro['high']:.3f}]"
            print(f"{'macro':<32} {macro_text:>22}")
        if "compare" in results:
            w = results["compare"]["wilcoxon"]["macro_per_case"]
            print(
                f"compare: macro Dice per case {w['mean_a']:.3f} vs {w['mean_b']:.3f}, Wilcoxon p = {w['p_value']:.3g} "
                f"(n = {w['n']})"
            )
        for failure in results["failures"]:
            print(f"failed: {failure['case']}: {failure['error']}")
        if args.out:
            print(f"wrote {args.out}/results.json, metrics.csv, overlay.png")
    return 1 if results["failures"] else 0
