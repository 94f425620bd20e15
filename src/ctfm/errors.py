"""User-facing errors: one line naming the file, the problem and the way out.

Only :class:`UserError` and its subclasses are *bad input*: the CLI prints them as
``error: <message>`` and exits 2, and batch jobs record them and go on. Anything else that escapes
a verb is a bug in ctfm: the CLI says so in one line (exit 1) and ``--debug`` shows the traceback.
"""

from __future__ import annotations

import os


class UserError(Exception):
    """Base of every error the user can fix (bad input file, bad option, missing extra)."""


class CTInputError(UserError, ValueError):
    """Bad input that the user can fix.

    Renders as ``<path>: <problem> (<fix>)``; the CLI prints it as ``error: ...`` and exits 2,
    batch jobs record it and go on.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str, fix: str):
        self.path = os.fspath(path) if path is not None else None
        self.problem = problem
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        return f"{where}{self.problem} ({self.fix})"


class OptionError(UserError, ValueError):
    """An option, config or argument value that cannot be used; the message names the value,
    the rule and the accepted values. A ``ValueError`` too, so Python callers may catch either."""


class MissingDependencyError(UserError, ImportError):
    """An optional dependency is not installed; the message names the pip command."""


def one_line(exc: BaseException, limit: int = 160, with_type: bool = False) -> str:
    """An exception's message on one line (whitespace collapsed, at most ``limit`` characters),
    or its type name when it has none: for the middle of an ``error: ...`` line.

    ``with_type`` prefixes the type name (``OSError: disk full``), for errors that are not the
    user's (a crash recorded by a batch job, a failed download).
    """
    text = " ".join(str(exc).split())[:limit]
    name = type(exc).__name__
    if not text:
        return name
    return f"{name}: {text}" if with_type else text


# extra name -> what `pip install 'ctfm[EXTRA]'` adds; the one place that maps a feature to its extra.
EXTRAS = {
    "train": "pretraining, fine-tuning and multi-device embedding (lightning, tensorboardX)",
    "search": "the vector index (faiss-cpu)",
    "app": "the browser app (fastapi, uvicorn, python-multipart, pillow, matplotlib)",
    "dicom-seg": "DICOM SEG labels in and out (highdicom)",
    "eval": "evaluations, probes and figures (scikit-learn, matplotlib, umap-learn, openpyxl)",
    "idc": "Imaging Data Commons cohorts (idc-index)",
    "pacs": "PACS sources, senders and the listening node (dicomweb-client, pynetdicom)",
}


def optional_import(module: str, extra: str, feature: str | None = None):
    """Import ``module`` (a dependency of the optional ``extra``), or raise
    :class:`MissingDependencyError` naming the pip command that installs it.

    The one way ctfm imports a dependency that is not part of the core install, e.g.
    ``faiss = optional_import("faiss", "search")`` at the top of a module that needs it.
    """
    import importlib

    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module.split(".")[0]
        what = feature or EXTRAS[extra]
        raise MissingDependencyError(
            f"{what} needs the optional package {missing}, which is not installed (pip install 'ctfm[{extra}]')"
        ) from None
