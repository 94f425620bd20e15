"""The main job, end to end, on a synthetic torso phantom (or your own scan with --input).

Steps: make a labelled synthetic CT (ctfm.synth), load and check it as any CT, preprocess it with
a CT-FM preset, and write a PNG of three orthogonal slices before and after.

Examples:
  ctfm demo
  ctfm demo --out demo_out --seed 3 --preset ct-fm-1mm-320
  ctfm demo --input scan.nii.gz
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="ctfm-demo", help="output folder (default ./ctfm-demo)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--preset", default="ct-fm-ssl", help="preprocessing preset (default ct-fm-ssl)")
    parser.add_argument("--input", metavar="PATH", help="use this CT instead of a synthetic phantom")


def run(args) -> int:
    from ctfm.evaluate.figures import orthogonal_slices_figure
    from ctfm.io import load_ct, save_nifti
    from ctfm.preprocess import check_ct, get_preset, preprocess, require_usable

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = get_preset(args.preset)

    if args.input:
        source = Path(args.input)
        print(f"1/4 input: {source}")
    else:
        from ctfm.synth import make_phantom, write_phantom

        phantom = make_phantom(seed=args.seed)
        source, labels_path = write_phantom(phantom, out, stem=f"phantom_seed{args.seed}")
        print(f"1/4 synthetic torso phantom (seed {args.seed}, not real data): {source} + {labels_path.name}")

    image, record = load_ct(source)
    checks = check_ct(image, record)
    worst = "error" if any(c.status == "error" for c in checks) else "warn" if any(c.status == "warn" for c in checks) else "ok"
    print(f"2/4 loaded {record.format} {'x'.join(map(str, record.shape))} voxels at {' x '.join(f'{s:.3g}' for s in record.spacing_mm)} mm; checks: {worst}")
    for c in checks:
        if c.status != "ok":
            print(f"      {c.status}: {c.name}: {c.message}")
    require_usable(checks, source)

    result = preprocess(image, spec)
    preprocessed_path = save_nifti(result, out / f"{Path(source).name.split('.')[0]}_{spec.name}.nii.gz")
    print(f"3/4 preprocessed with {spec.name}: {'x'.join(map(str, result.shape[1:]))} voxels ({spec.orientation}) -> {preprocessed_path}")

    figure = orthogonal_slices_figure(
        [("before (HU)", image, (-1000.0, 1000.0)), (f"after {spec.name} ([0,1])", result, (0.0, 1.0))],
        out / "preprocessing.png",
        title=f"{Path(source).name}: before and after {spec.name}",
    )
    print(f"4/4 figure: {figure}")
    print(f"done: outputs in {out}/")
    return 0
