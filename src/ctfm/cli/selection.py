"""The flags of every verb that reads a store: ``--run DIGEST`` and ``--where COLUMN=VALUE``.

``add_run_selection(parser)`` adds both (and refuses the selection flags they replace);
``run_selection(args)`` returns ``(run, where)`` for :meth:`ctfm.store.EmbeddingStore.select`.
``--where`` is repeatable: the same column twice, or ``VALUE`` written ``a|b``, keeps rows with
any of the values; values are read as numbers where the column is numeric.
"""

from __future__ import annotations

import argparse

RUN_HELP = "the run to read when the store holds several: its digest or a unique prefix (`ctfm store info` lists them)"
WHERE_HELP = (
    "keep scan rows whose COLUMN equals VALUE (repeatable; VALUE may be a|b|c; numbers for numeric columns), "
    "e.g. --where mode=patches --where body_part=CHEST"
)
# Selection flags of earlier versions, replaced by --run/--where.
REMOVED_FLAGS = ("--select", "--mode", "--weights-sha256", "--pool", "--overlap")


class _RemovedFlag(argparse.Action):
    """Records a removed flag; :func:`run_selection` refuses it with a one-line error."""

    def __call__(self, parser, namespace, values, option_string=None):
        used = list(getattr(namespace, "_removed_flags", None) or [])
        used.append(f"{option_string} {values}" if values is not None else option_string)
        namespace._removed_flags = used


def add_run_selection(parser, removed: tuple[str, ...] = REMOVED_FLAGS, run_help: str = RUN_HELP) -> None:
    """Add ``--run`` and ``--where`` to ``parser``; the ``removed`` flags parse but are refused."""
    parser.add_argument("--run", metavar="DIGEST", help=run_help)
    parser.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE", help=WHERE_HELP)
    for flag in removed:
        parser.add_argument(
            flag, nargs="?", action=_RemovedFlag, dest="_removed_flags", default=None, help=argparse.SUPPRESS
        )


def refuse_removed_flags(args) -> None:
    """A one-line OptionError when a removed selection flag was given."""
    used = getattr(args, "_removed_flags", None)
    if used:
        from ctfm.errors import OptionError

        raise OptionError(
            f"{', '.join(used)}: this option was removed; choose the store's run with --run DIGEST (a unique "
            "prefix will do; `ctfm store info` lists the runs) and/or --where COLUMN=VALUE "
            "(e.g. --where mode=patches --where weights_sha256=...)"
        )


def parse_where(items) -> dict:
    """``["COLUMN=VALUE", ...]`` -> ``{column: [values]}`` (a repeated column or ``a|b`` adds values)."""
    from ctfm.errors import OptionError

    where: dict[str, list[str]] = {}
    for item in items or []:
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip():
            raise OptionError(f"--where {item!r}: expected COLUMN=VALUE, e.g. --where body_part=CHEST")
        where.setdefault(name.strip(), []).extend(v.strip() for v in value.split("|"))
    return where


def run_selection(args) -> tuple[str | None, dict | None]:
    """``(run, where)`` of a verb's arguments (removed selection flags refused)."""
    refuse_removed_flags(args)
    return getattr(args, "run", None), parse_where(getattr(args, "where", None)) or None
