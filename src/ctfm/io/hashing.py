"""Content hashes of loaded scans: the same voxels on the same grid give the same hash in any format."""

from __future__ import annotations

import hashlib

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
