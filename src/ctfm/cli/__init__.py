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
import contextlib
import errno
import importlib
import math
import re
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
    "listen": (
        "ctfm.cli.listen",
        "run a DICOM node: receive series by C-STORE, embed / predict each, send results back",
    ),
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
    errno.EFBIG,  # a file over the file-size limit (ulimit -f) or the filesystem's: full disk's cousin
    errno.EROFS,
    errno.EDQUOT,
    errno.ENAMETOOLONG,
}


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose refusals are one line, ``error: ctfm VERB: <message> (see ctfm VERB --help)``,
    exit 2, like every other bad input; ``--help`` is argparse's own. Sub-verbs' parsers are this
    class too (``add_subparsers`` makes parsers of the parent's class)."""

    def error(self, message: str):
        text = " ".join(str(message).split())
        # a type= refusal reads like every other bad value: "--overlap 1.5: expected a fraction in [0, 1)"
        text = re.sub(r"^argument ([^:]+): '([^']*)': ", lambda m: f"{m[1].split('/')[-1]} {m[2]}: ", text)
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {text} (see {self.prog} --help)\n")


# ---- argparse type= validators: each option's rule, defined once --------------------------------
def _number(text: str, kind, rule: str, accept) -> float | int:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected {rule}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected {rule}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts: k, batch, workers, nlist)."""
    return _number(text, int, "a whole number >= 1", lambda v: v >= 1)


def nonnegative_int(text: str) -> int:
    """A whole number >= 0."""
    return _number(text, int, "a whole number >= 0", lambda v: v >= 0)


def finite_float(text: str) -> float:
    """A finite number (no nan, no inf)."""
    return _number(text, float, "a finite number", math.isfinite)


def positive_float(text: str) -> float:
    """A finite number > 0 (sizes, perplexity, zoom)."""
    return _number(text, float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (budgets where 0 turns a feature off)."""
    return _number(text, float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)


def fraction(text: str) -> float:
    """A number in [0, 1) (overlaps)."""
    return _number(text, float, "a fraction in [0, 1)", lambda v: math.isfinite(v) and 0 <= v < 1)


def port(text: str) -> int:
    """A TCP port, 0 (pick a free one) to 65535."""
    return _number(text, int, "a port number 0-65535", lambda v: 0 <= v <= 65535)


def device(text: str) -> str:
    """A device that exists on this machine (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    from ctfm.errors import OptionError
    from ctfm.runtime import check_device

    try:
        return check_device(text, option="")
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None


def accelerator(text: str) -> str:
    """A Lightning accelerator this machine has (``auto``, ``cpu``, ``gpu``, ...)."""
    from ctfm.errors import OptionError
    from ctfm.runtime import check_accelerator

    try:
        return check_accelerator(text, option="")
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None


def encoding(text: str) -> str:
    """A text encoding Python knows (``cp1252``, ``latin-1``, ``utf-16``, ...), for ``--encoding``."""
    from ctfm.errors import OptionError
    from ctfm.io.tables import check_encoding

    try:
        return check_encoding(text)
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--encoding ").strip()) from None


# Commands that read sheets (manifests, label sheets, annotations): they take --encoding.
TABLE_COMMANDS = {
    "cohort": None,  # every sub-command
    "embed": None,
    "evaluate": ("retrieval", "semantic-search", "clustering", "stability"),
    "finetune": None,
    "predict": None,
    "pretrain": None,
    "probe": None,
}


def _add_encoding(parser, names) -> None:
    """``--encoding`` on ``parser``, or on its sub-commands ``names`` (None: all), recursively."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        parser.add_argument(
            "--encoding",
            type=encoding,
            default=None,
            metavar="NAME",
            help="text encoding of CSV/TSV sheets, e.g. cp1252 or latin-1 (default: UTF-8 with or without BOM, "
            "else cp1252 or Latin-1 with a notice)",
        )
        return
    for name, sub in subs[0].choices.items():
        if names is None or name in names:
            _add_encoding(sub, None)


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
    parser = Parser(prog="ctfm", description="Foundation models for computed tomography.")
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
        if verb in TABLE_COMMANDS:
            _add_encoding(p, TABLE_COMMANDS[verb])
        p.set_defaults(_module=mod)
    return parser


def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from ctfm.errors import UserError, one_line

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a one-line refusal (2): a code, also for in-process callers
        return exc.code if isinstance(exc.code, int) else EXIT_OK
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
        # PACS addresses among the inputs use the verb's PACS options
        with _table_encoding(getattr(args, "encoding", None)), pacs_session(args):
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


def _table_encoding(name: str | None):
    """The context in which a command reads its sheets with ``--encoding`` (nothing to do without it)."""
    if not name:
        return contextlib.nullcontext()
    from ctfm.io.tables import using_encoding

    return using_encoding(name)


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
