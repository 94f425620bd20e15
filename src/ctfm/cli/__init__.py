"""The ``ctfm`` command: thin verbs, each in its own module, imported only when used.

Every verb raises :class:`ctfm.errors.CTInputError` for bad input; ``main`` prints it as one
line, ``error: <path>: <problem> (<fix>)``, and exits 2 without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# verb -> (module, one-line help). Modules define ``add_arguments(parser)`` and ``run(args) -> int``.
VERBS = {
    "cohort": ("ctfm.cli.cohort", "select IDC cohorts, scan local archives, cache preprocessed volumes"),
    "demo": ("ctfm.cli.demo", "run the main job on a synthetic scan (or --input PATH) and write a figure"),
    "embed": ("ctfm.cli.embed", "embed CT scans (files, folders, DICOM trees, manifests) into a store"),
    "info": ("ctfm.cli.info", "describe a CT (file or DICOM folder) and check that it is usable"),
    "models": ("ctfm.cli.models", "list, download, convert and initialise model weights"),
    "pretrain": ("ctfm.cli.pretrain", "pretrain a CT encoder with intra-sample contrastive learning"),
    "preprocess": ("ctfm.cli.preprocess", "preprocess a CT with a named preset or a spec file"),
    "synth": ("ctfm.cli.synth", "write labelled synthetic torso phantoms"),
}

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctfm", description="Foundation models for computed tomography.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, help_text) in VERBS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(verb, help=help_text, description=(mod.__doc__ or help_text).strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from ctfm.errors import CTInputError, MissingDependencyError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from ctfm import __version__

        print(__version__)
        return EXIT_OK
    if not getattr(args, "verb", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    warnings.showwarning = _print_warning
    try:
        return int(args._module.run(args) or 0)
    except (CTInputError, MissingDependencyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as exc:  # bad option values (unknown preset, malformed spec, ...)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # unwritable output, full disk, missing config file, ...
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{exc.strerror or exc} (check the path, its permissions and free space)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
