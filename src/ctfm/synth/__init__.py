"""Labelled synthetic torso CT phantoms: the default input of ``ctfm demo`` and a test fixture.

Phantoms are never evidence about real data; see ``ctfm.synth.phantom`` for the anatomy,
the RAS+ coordinate convention and the default grid.

Label ids (stable): 0 background, 1 fat, 2 muscle, 3 lung_left, 4 lung_right, 5 liver,
6 spleen, 7 kidney_left, 8 kidney_right, 9 aorta, 10 vertebrae, 11 ribs.
"""

from __future__ import annotations

from .phantom import (
    LABEL_COLORS,
    LABEL_IDS,
    LABEL_NAMES,
    Z_SPACINGS_MM,
    Phantom,
    make_cohort,
    make_phantom,
    read_label_table,
    write_phantom,
)

__all__ = [
    "LABEL_COLORS",
    "LABEL_IDS",
    "LABEL_NAMES",
    "Z_SPACINGS_MM",
    "Phantom",
    "make_cohort",
    "make_phantom",
    "read_label_table",
    "write_phantom",
]
