"""The ``ctfm`` command: thin verbs, each in its own module, imported only when used.

Each verb parses its arguments and calls the public Python function. Errors the user can fix
(:class:`ctfm.errors.UserError`: bad input files, bad option values, a missing extra) print as
one line, ``error: <path>: <problem> (<fix>)``, exit 2, no traceback. The filesystem refusing a
path the user gave (permission denied, no space, no such folder) is reported the same way. Any
other exception is a bug in ctfm: one line saying so, exit 1; ``ctfm --debug VERB ...`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
import warnings

# verb -> (module, one-line help). Modules define ``add_arguments(parser)`` and ``run(args) -> int``.
VERBS = {
    "cohort": ("ctfm.cli.cohort", "select IDC cohorts, scan local archives, cache preprocessed volumes"),
    "demo": ("ctfm.cli.demo", "run the main job on a synthetic scan (or --input PATH) and write a figure"),
    "embed": ("ctfm.cli.embed", "embed CT scans (files, folders, DICOM trees, manifests) into a store"),
    "evaluate": (
        "ctfm.cli.evaluate",
        "zero-shot evaluations (retrieval, semantic search, clustering, concepts, stability, saliency) and "
        "segmentation scores",
    ),
    "finetune": ("ctfm.cli.finetune", "fine-tune a CT-FM model on labelled scans (segmentation, classification)"),
    "index": ("ctfm.cli.index", "build, update and inspect the FAISS index beside a store"),
    "info": ("ctfm.cli.info", "describe a CT (file or DICOM folder) and check that it is usable"),
    "models": ("ctfm.cli.models", "list, download, convert and initialise model weights"),
    "predict": (
        "ctfm.cli.predict",
        "predict with fine-tuned models: label maps on each input's grid (NIfTI, DICOM SEG), class probabilities",
    ),
    "pretrain": ("ctfm.cli.pretrain", "pretrain a CT encoder with intra-sample contrastive learning"),
    "preprocess": ("ctfm.cli.preprocess", "preprocess a CT with a named preset or a spec file"),
    "probe": ("ctfm.cli.probe", "fit probes (logistic, kNN, MLP) on a store's embeddings for labels, with CIs"),
    "search": ("ctfm.cli.search", "search a store for similar scans or for the region around a point"),
    "serve": ("ctfm.cli.serve", "serve the semantic-search app over a store in the browser"),
    "store": ("ctfm.cli.store", "summarise, check and compact an embedding store"),
    "synth": ("ctfm.cli.synth", "write labelled synthetic torso phantoms"),
}

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
# OS errors about a path the user gave: reported as bad input, not as a bug.
USER_OS_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENOSPC,
    errno.EROFS,
    errno.EDQUOT,
    errno.ENAMETOOLONG,
}


def add_subcommands(parser, verb: str, register=(), noun: str = "command"):
    """The one way a verb gets sub-verbs (``ctfm store info``, ``ctfm finetune seg``): returns the
    subparsers action; each function in ``register`` adds one sub-verb's parser to it (the module may
    add more itself). The verb's ``run`` is ``run_subcommand(args, {name: function})``."""
    sub = parser.add_subparsers(dest="_subcommand", metavar=noun.upper())
    for add in register:
        add(sub)
    parser.set_defaults(_subcommand_verb=verb, _subcommand_noun=noun, _subcommand_names=sub.choices)
    return sub


def run_subcommand(args, runs: dict) -> int:
    """Run the sub-verb ``args`` names with its function in ``runs``; without one, a one-line error
    naming the sub-verbs (``ctfm finetune needs a task: cls or seg (see ctfm finetune --help)``)."""
    name = getattr(args, "_subcommand", None)
    if name is None:
        from ctfm.errors import OptionError

        verb, noun = args._subcommand_verb, args._subcommand_noun
        names = " or ".join(sorted(args._subcommand_names))
        raise OptionError(f"ctfm {verb} needs a {noun}: {names} (see ctfm {verb} --help)")
    return int(runs[name](args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctfm", description="Foundation models for computed tomography.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an internal error")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, help_text) in VERBS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(
            verb,
            help=help_text,
            description=(mod.__doc__ or help_text).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from ctfm.errors import UserError, one_line

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
    from ctfm.cli.pacs_options import pacs_session

    try:
        with pacs_session(args):  # PACS addresses among the inputs use the verb's PACS options
            return int(args._module.run(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno in USER_OS_ERRNOS:  # unwritable output, full disk, missing config file, ...
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            print(
                f"error: {where}{exc.strerror or one_line(exc)} (check the path, its permissions and free space)",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        return _internal_error(exc, args.debug)
    except Exception as exc:  # anything else is ours to fix
        return _internal_error(exc, args.debug)


def _internal_error(exc: BaseException, debug: bool) -> int:
    from ctfm import __version__
    from ctfm.errors import one_line

    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    hint = "" if debug else "; re-run with ctfm --debug ... for the traceback"
    print(
        f"internal error (a bug in ctfm {__version__}, please report it): {type(exc).__name__}: "
        f"{one_line(exc, 300)}{hint}",
        file=sys.stderr,
    )
    return EXIT_FAILED


def entry() -> None:
    sys.exit(main())
