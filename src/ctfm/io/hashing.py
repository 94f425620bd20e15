"""Hashes: of a file's bytes (:func:`file_sha256`, the one file hash), and of loaded scans' content
(the same voxels on the same grid give the same hash in any format)."""

from __future__ import annotations

import hashlib
import os

import numpy as np


def content_hash(image) -> str:
    """sha256 (hex) of a loaded scan's voxels (float32, C order) and its affine (float64).

    ``image`` is the [1, X, Y, Z] MetaTensor of :func:`ctfm.io.load_ct`: a NIfTI export and the
    DICOM series it came from hash alike when their voxels and RAS affine agree.
    """
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32).tobytes())
    h.update(np.asarray(image.affine, dtype=np.float64).tobytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (symlinks followed, read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
