"""Preprocess a CT exactly as a CT-FM preset (or a spec file) says, and write it as NIfTI.

Examples:
  ctfm preprocess scan.nii.gz --preset ct-fm-ssl -o scan_ssl.nii.gz
  ctfm preprocess dicom_folder --preset ct-fm-1mm-320 -o out.nii.gz
  ctfm preprocess scan.nrrd --spec my_spec.json -o out.nii.gz
  ctfm preprocess --list

Presets: ct-fm-ssl, ct-fm-patches, ct-fm-1mm-320, head-ct (see README).
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("path", nargs="?", help="a NIfTI/NRRD/MHA file or a DICOM series folder")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--preset", default=None, help="named preset (default ct-fm-ssl)")
    group.add_argument("--spec", metavar="JSON", help="a PreprocessSpec JSON file")
    parser.add_argument("-o", "--out", metavar="OUT.nii.gz", help="output NIfTI path")
    parser.add_argument("--series", metavar="UID", help="SeriesInstanceUID when a folder holds several CT series")
    parser.add_argument("--save-spec", metavar="JSON", help="also write the spec that was applied")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")


def resolve_spec(preset: str | None, spec_path: str | None):
    from ctfm.errors import CTInputError
    from ctfm.preprocess import PreprocessSpec, get_preset

    if spec_path:
        try:
            return PreprocessSpec.load(spec_path)
        except FileNotFoundError:
            raise CTInputError(spec_path, "no such spec file", "check the path") from None
        except (ValueError, TypeError) as exc:
            raise CTInputError(
                spec_path, f"invalid PreprocessSpec ({exc})", "compare with `ctfm preprocess --list` and the README"
            ) from None
    return get_preset(preset or "ct-fm-ssl")


def run(args) -> int:
    from ctfm.errors import CTInputError

    if args.list:
        from ctfm.preprocess import PRESETS

        for name, spec in sorted(PRESETS.items()):
            size = spec.patch_size_voxels
            print(f"{name:<15} {spec.description}" + (f"; patch {list(size)} voxels" if size else ""))
        return 0
    if not args.path or not args.out:
        raise CTInputError(
            None,
            "preprocess needs PATH and -o OUT.nii.gz",
            "e.g. ctfm preprocess scan.nii.gz --preset ct-fm-ssl -o out.nii.gz",
        )
    out = Path(args.out)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise CTInputError(out, "output must be a NIfTI file", "name it OUT.nii.gz")
    spec = resolve_spec(args.preset, args.spec)

    import ctfm
    from ctfm.io import save_nifti
    from ctfm.preprocess import check_ct, require_usable

    image, record = ctfm.load_ct(args.path, series_uid=args.series)
    require_usable(check_ct(image, record), args.path)
    result = ctfm.preprocess(image, spec)
    save_nifti(result, out)
    if args.save_spec:
        spec.save(args.save_spec)
    shape = "x".join(str(s) for s in result.shape[1:])
    print(
        f"wrote {out} ({spec.name}: {shape} voxels, {spec.orientation}, spacing "
        f"{list(spec.spacing_mm) if spec.spacing_mm else 'as acquired'} mm)"
    )
    return 0
