"""User-facing errors: one line naming the file, the problem and the way out."""

from __future__ import annotations

import os


class CTInputError(ValueError):
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


class MissingDependencyError(ImportError):
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
