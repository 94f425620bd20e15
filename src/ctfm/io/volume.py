"""Volume files (NIfTI, NRRD, MHA/MHD) to a voxel array and a RAS affine."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctfm.errors import CTInputError, one_line

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES

# DICOM and ITK speak LPS; NIfTI, MONAI and this package speak RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def volume_format(path: Path) -> str | None:
    """``"nifti"``, ``"nrrd"`` or ``"mha"`` from the file name, ``None`` if it is no volume file."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith((".mha", ".mhd")):
        return "mha"
    return None


def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Read a volume file.

    Returns ``(array, affine, format)``: the voxel array in file order (x, y, z[, ...]) as stored
    values with any scale slope applied, and the 4x4 voxel-to-world affine in RAS millimetres.
    """
    fmt = volume_format(path)
    if fmt == "nifti":
        return (*_read_nifti(path), fmt)
    if fmt in ("nrrd", "mha"):
        return (*_read_itk(path), fmt)
    raise CTInputError(path, "not a CT volume file", "give a .nii/.nii.gz, .nrrd, .mha/.mhd file or a DICOM folder")


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        # dataobj applies scl_slope/scl_inter; this mirrors MONAI's NibabelReader.
        array = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise CTInputError(path, f"unreadable NIfTI ({one_line(exc)})", "check that the file is complete; re-export or re-download it") from None
    return array, np.asarray(img.affine, dtype=np.float64)


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:
        raise CTInputError(path, f"unreadable image file ({one_line(exc)})", "check that the file is complete; re-export or re-download it") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise CTInputError(path, f"image has {img.GetNumberOfComponentsPerPixel()} components per voxel", "a CT has one value per voxel; export a scalar volume")
    dim = img.GetDimension()
    # SimpleITK arrays are (z, y, x); reverse to the (x, y, z) order of the affine.
    array = sitk.GetArrayViewFromImage(img).transpose(tuple(range(dim))[::-1]).copy()
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    affine_lps = np.eye(4)
    k = min(dim, 3)
    affine_lps[:k, :k] = (direction * spacing)[:k, :k]
    affine_lps[:k, 3] = origin[:k]
    return array, LPS_TO_RAS @ affine_lps


