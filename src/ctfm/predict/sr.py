"""The measurement report sent back with a segmentation: a DICOM Comprehensive 3D SR, TID 1500.

One measurement group per predicted class (TID 1411), referencing its segment of the DICOM SEG
and the source series: the class volume in ml, and the mean and standard deviation of HU inside
it, the same numbers as ``<name>.statistics.json`` (``ctfm predict seg --statistics``).
UIDs are derived from the SEG (whose own UIDs are derived from the source series, the weights
and the prediction), the source series and the weights, so sending a result again duplicates
nothing.
"""

from __future__ import annotations

import io

from pydicom.uid import generate_uid

from ctfm.errors import optional_import
from ctfm.io.dicom import DERIVED_UID_ROOT

FEATURE = "DICOM SR measurement reports (--send)"
# (value, scheme, meaning): the codes a TID 1500 report of volumes and HU statistics uses
VOLUME = ("118565006", "SCT", "Volume")
MEAN = ("373098007", "SCT", "Mean")
STANDARD_DEVIATION = ("386136009", "SCT", "Standard Deviation")
MILLILITER = ("ml", "UCUM", "milliliter")
HOUNSFIELD = ("[hnsf'U]", "UCUM", "Hounsfield unit")
PROCEDURE = ("25045-6", "LN", "CT unspecified body region")
TISSUE = ("85756007", "SCT", "Tissue")


# the longest value DICOM allows per VR (PS3.5 6.2), for values copied from a source series
MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "ST": 1024, "LT": 10240, "UI": 64}


def fit_lengths(ds):
    """Cut the top-level string values of ``ds`` that are longer than their VR allows (a source
    series with a 17-character StudyID): copied into a SEG or SR, they would make it invalid."""
    for element in ds:
        limit = MAX_LENGTH.get(element.VR)
        if limit is None or element.VR == "UI" or element.value is None:
            continue
        if isinstance(element.value, str) and len(element.value) > limit:
            element.value = element.value[:limit]
    return ds


def derived_uid(kind: str, *sources: str) -> str:
    """A new UID for ``kind`` (``sr``, ``sr-series``, ...), the same for the same ``sources`` (the
    SEG it reports on, the source series, the weights): derived as the SEG's own UIDs are."""
    return generate_uid(DERIVED_UID_ROOT, [f"ctfm:sr:{kind}", *(str(s) for s in sources)])


def measurement_report(seg, source_datasets, rows: list[dict], weights_sha256: str, model: str) -> bytes:
    """The SR (bytes) of the class statistics ``rows`` (``class_statistics``) over the SEG ``seg``."""
    hd = optional_import("highdicom", "dicom-seg", FEATURE)

    def code(triple):
        return hd.sr.CodedConcept(*triple)

    series_uid = str(source_datasets[0].SeriesInstanceUID)
    numbers = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", model), name="ctfm", model_name=model[:64]
        ),
    )
    groups = []
    for row in rows:
        number = numbers.get(str(row["name"])[:64])
        if number is None or not row.get("voxels"):
            continue  # a class predicted nowhere has no segment to measure
        measurements = [hd.sr.Measurement(name=code(VOLUME), value=float(row["volume_ml"]), unit=code(MILLILITER))]
        for key, concept in (("mean_hu", MEAN), ("sd_hu", STANDARD_DEVIATION)):
            if row.get(key) is not None:
                measurements.append(hd.sr.Measurement(name=code(concept), value=float(row[key]), unit=code(HOUNSFIELD)))
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(f"tracking-{number}", seg.SOPInstanceUID), identifier=str(row["name"])[:64]
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
                ),
                finding_type=code(TISSUE),
                measurements=measurements,
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=code(PROCEDURE),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *source_datasets],
        content=report,
        series_instance_uid=derived_uid("series", series_uid, weights_sha256),
        series_number=901,
        sop_instance_uid=derived_uid("instance", seg.SOPInstanceUID, weights_sha256),
        instance_number=1,
        manufacturer="ctfm",
        series_description=f"ctfm {model} measurements"[:64],
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
