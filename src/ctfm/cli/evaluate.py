"""Evaluate results: `ctfm evaluate seg` (segmentation metrics).

Each subcommand lives in its own module and registers itself below.
"""

from __future__ import annotations


def _registrations():
    from ctfm.cli.evaluate_seg import add_seg

    return [add_seg]


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="evaluate_task", metavar="TASK")
    for add in _registrations():
        add(sub)


def run(args) -> int:
    if not getattr(args, "_evaluate_run", None):
        from ctfm.errors import OptionError

        raise OptionError("ctfm evaluate needs a task, e.g. seg (see ctfm evaluate --help)")
    return args._evaluate_run(args)
