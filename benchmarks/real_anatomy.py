"""Large test scans built from real anatomy, for benchmarks that need sizes ../shared/data lacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def resample_real_scan(source: Path, shape, spacing, out: Path) -> Path:
    """Resample a real scan linearly to ``shape`` voxels of ``spacing`` mm (same field of view if
    shape x spacing matches the source's extent) and save it as NIfTI int16 at ``out``."""
    import nibabel as nib
    from scipy.ndimage import zoom

    img = nib.load(str(source))
    array = np.asarray(img.dataobj).astype(np.float32)
    resampled = zoom(array, [s / o for s, o in zip(shape, array.shape)], order=1).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = img.affine[:3, 3]
    nib.save(nib.Nifti1Image(resampled, affine), str(out))
    return out
