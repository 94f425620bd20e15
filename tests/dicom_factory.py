"""Write tiny DICOM CT series for tests: any slice positions, orientation, modality, values."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_series(
    folder: Path,
    positions: list[tuple[float, float, float]],
    values: Callable[[np.ndarray], np.ndarray] | np.ndarray | None = None,
    rows: int = 12,
    cols: int = 10,
    pixel_spacing: tuple[float, float] = (1.5, 1.0),  # (between rows, between columns) as in DICOM
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    modality: str = "CT",
    series_uid: str | None = None,
    description: str = "test series",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    slope: float = 1.0,
    intercept: float = -1024.0,
    prefix: str = "slice",
) -> list[Path]:
    """Write one file per position. ``values(world_points) -> HU`` gives each pixel its HU from its
    LPS world position (points of shape (rows, cols, 3)); default is a ramp along the columns."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    frame_uid = generate_uid()
    row_dir = np.asarray(orientation[:3], dtype=float)
    col_dir = np.asarray(orientation[3:], dtype=float)
    paths = []
    for index, position in enumerate(positions):
        pos = np.asarray(position, dtype=float)
        i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        world = pos + j[..., None] * pixel_spacing[1] * row_dir + i[..., None] * pixel_spacing[0] * col_dir
        if values is None:
            hu = -1000.0 + 100.0 * j + 10.0 * i
        elif callable(values):
            hu = values(world)
        else:
            hu = np.asarray(values)[index]
        stored = np.round((np.asarray(hu, dtype=float) - intercept) / slope).astype(np.int16)

        meta = FileMetaDataset()
        sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.SeriesDescription = description
        ds.ImageType = list(image_type)
        ds.Manufacturer = "TEST"
        ds.ConvolutionKernel = "B30f"
        ds.SliceThickness = 2.0
        ds.BodyPartExamined = "CHEST"
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = stored.tobytes()
        path = folder / f"{prefix}{index:03d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def axial_positions(n: int, gap: float = 2.0, start=(-5.0, -8.0, 10.0)) -> list[tuple[float, float, float]]:
    return [(start[0], start[1], start[2] + k * gap) for k in range(n)]
