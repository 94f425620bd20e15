"""``predict seg --send``: the DICOM SEG and its TID 1500 measurement report go back into the study
on a real Orthanc (STOW-RS and C-STORE), pass dciodvfy, carry the statistics' numbers, and a
second send duplicates nothing."""

from __future__ import annotations

import json
import shutil
import subprocess

import pydicom
import pytest
import torch
import torch.nn as nn

from conftest import data_path
from ctfm.errors import CTInputError, OptionError
from ctfm.io.pacs import PacsOptions, use_options
from ctfm.models.segmentation import LoadedSegmentation
from ctfm.predict.seg import predict_seg
from ctfm.preprocess import PreprocessSpec
from pacs_server import PASSWORD, USER, Orthanc, free_port

pytestmark = pytest.mark.slow
SERIES = "sarcoma_ct/STS_019/dicom/image"
SETTINGS = {"roi_size": [16, 32, 32], "overlap": 0.25, "mode": "gaussian", "sigma_scale": 0.125, "sw_batch_size": 2}


class ThresholdNet(nn.Module):
    """Class 1 where the windowed input is above its middle: bone and bright tissue."""

    def forward(self, x):
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 20


def threshold_model() -> LoadedSegmentation:
    spec = PreprocessSpec(name="test", orientation="SPL", spacing_mm=None)
    info = {"model": "threshold", "weights": {}, "weights_sha256": "sha-of-test-weights"}
    info.update(preprocess_hash=spec.content_hash(), inference=SETTINGS)
    return LoadedSegmentation(ThresholdNet(), {0: "background", 1: "bright"}, spec, info)


def dciodvfy_errors(path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    files = sorted(data_path(SERIES).glob("*.dcm"))
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        server.upload(files)
        yield server
    finally:
        server.stop()


def options(tmp_path) -> PacsOptions:
    return PacsOptions(user=USER, password=PASSWORD, cache_dir=tmp_path / "cache", backoff_s=0.05)


def test_results_go_back_into_the_study_once(pacs, tmp_path):
    out = tmp_path / "out"
    with use_options(options(tmp_path)):
        summary = predict_seg(
            [pacs.dicomweb], threshold_model(), out, output_format="dicom-seg", send=pacs.dicomweb, progress=False
        )
    assert summary.failed == [] and summary.done == 1 and summary.sent == 1
    assert pacs.count_instances() == 47 + 2
    (seg_path,) = [p for p in out.glob("*.dcm") if not p.name.endswith(".sr.dcm")]
    sr_path = seg_path.with_name(seg_path.name.replace(".dcm", ".sr.dcm"))
    for path in (seg_path, sr_path):
        assert dciodvfy_errors(path) == [], path
    seg, sr = pydicom.dcmread(seg_path), pydicom.dcmread(sr_path)
    source = pydicom.dcmread(sorted(data_path(SERIES).glob("*.dcm"))[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == source.StudyInstanceUID
    assert source.SOPInstanceUID not in (seg.SOPInstanceUID, sr.SOPInstanceUID)
    referenced = {item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence}
    assert referenced == {source.SeriesInstanceUID}
    # the report's numbers are the statistics' numbers
    stats = json.loads(next(out.glob("*.statistics.json")).read_text())["classes"]
    values = {}

    def walk(items):
        for item in items:
            if item.ValueType == "NUM":
                values[item.ConceptNameCodeSequence[0].CodeMeaning] = float(item.MeasuredValueSequence[0].NumericValue)
            walk(getattr(item, "ContentSequence", []))

    walk(sr.ContentSequence)
    bright = next(row for row in stats if row["name"] == "bright")
    assert bright["voxels"] > 0
    assert values["Volume"] == pytest.approx(bright["volume_ml"], rel=1e-6)
    assert values["Mean"] == pytest.approx(bright["mean_hu"], rel=1e-6)
    assert values["Standard Deviation"] == pytest.approx(bright["sd_hu"], rel=1e-6)
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence

    # a re-send (the prediction is done, so it is sent again as it is) and a C-STORE of the
    # same result add nothing: same UIDs
    with use_options(options(tmp_path)):
        again = predict_seg(
            [pacs.dicomweb], threshold_model(), out, output_format="dicom-seg", send=pacs.dicomweb, progress=False
        )
        assert again.skipped == 1 and again.sent == 1 and again.failed == []
        third = predict_seg(
            [pacs.dicomweb], threshold_model(), out, output_format="dicom-seg", send=pacs.dimse, progress=False
        )
        assert third.sent == 1 and third.failed == []
    assert pacs.count_instances() == 47 + 2
    assert pydicom.dcmread(seg_path).SOPInstanceUID == seg.SOPInstanceUID
    assert pydicom.dcmread(sr_path).SOPInstanceUID == sr.SOPInstanceUID


def test_a_bad_destination_is_refused_before_any_work(pacs, tmp_path):
    out = tmp_path / "out"
    dead = f"dicomweb:http://127.0.0.1:{free_port()}/dicom-web"
    with use_options(PacsOptions(cache_dir=tmp_path / "cache", retries=0)):
        with pytest.raises(CTInputError, match=dead):
            predict_seg([pacs.dicomweb], threshold_model(), out, output_format="dicom-seg", send=dead)
        with pytest.raises(OptionError, match="--format dicom-seg"):
            predict_seg([pacs.dicomweb], threshold_model(), out, send=pacs.dicomweb)
        with pytest.raises(CTInputError, match="not a study or series"):
            predict_seg(
                [pacs.dicomweb], threshold_model(), out, output_format="dicom-seg", send=pacs.dicomweb + "/studies/1.2"
            )
    with use_options(PacsOptions(user=USER, password="wrong", cache_dir=tmp_path / "cache")):
        with pytest.raises(CTInputError, match="HTTP 401"):
            predict_seg([pacs.dicomweb], threshold_model(), out, output_format="dicom-seg", send=pacs.dicomweb)
    assert not out.exists()
