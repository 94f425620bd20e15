"""The `ctfm` command as a user runs it (in process through `ctfm.cli.main`, with its exit code and output)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import data_path
from ctfm.cli import main
from ctfm.io import load_ct
from ctfm.preprocess import get_preset, preprocess
from dicom_factory import axial_positions, write_series


@pytest.mark.slow
def test_demo_writes_its_outputs(tmp_path, run_cli):
    result = run_cli("demo", "--out", tmp_path / "demo", "--seed", 2, "--cohort", 3)
    assert result.returncode == 0, result.stderr
    assert "not real data" in result.stdout
    # The cohort: a random ct-fm weights folder, a store with three scans, a neighbour for each.
    assert (
        "cannot be downloaded here" in result.stdout
        and "hf-hub:project-lighter/ct_fm_feature_extractor" in result.stdout
    )
    neighbours = [line for line in result.stdout.splitlines() if "->" in line and "cosine" in line]
    assert len(neighbours) == 3
    import pyarrow.parquet as pq

    scans = pq.read_table(tmp_path / "demo" / "store" / "scans.parquet")
    assert scans.num_rows == 3 and len(scans.column("embedding")[0]) == 512
    figure = tmp_path / "demo" / "preprocessing.png"
    assert figure.stat().st_size > 10_000 and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "demo" / "phantom_seed2_ct-fm-ssl.nii.gz"
    img = nib.load(str(out))
    assert min(img.shape) >= 32 and img.shape[1] >= 128 and nib.aff2axcodes(img.affine) == ("S", "P", "L")
    assert str(figure) in result.stdout


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("scan", ["head_tilt_dicom/dicom", "abdomen_dicom/dicom"])
def test_info_json_schema_on_real_dicom(scan, run_cli):
    path = data_path(scan)
    result = run_cli("info", path, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"path", "format", "shape", "spacing_mm", "orientation", "hu", "record", "checks", "usable"}
    assert report["format"] == "dicom" and report["usable"] is True
    assert set(report["hu"]) == {"min", "p1", "p50", "p99", "max"}
    assert (
        report["hu"]["min"] <= report["hu"]["p1"] <= report["hu"]["p50"] <= report["hu"]["p99"] <= report["hu"]["max"]
    )
    names = {c["name"]: c["status"] for c in report["checks"]}
    assert set(names) == {
        "3d",
        "finite",
        "not_constant",
        "spacing",
        "geometry",
        "hu_range",
        "modality",
        "tilt",
        "uniform_spacing",
        "slices",
    }
    for key in (
        "study_uid",
        "series_uid",
        "sop_uids",
        "kernel",
        "slice_thickness_mm",
        "manufacturer",
        "body_part",
        "contrast",
        "gantry_tilt_deg",
        "spacing_source",
    ):
        assert key in report["record"]
    assert "derived from ImagePositionPatient" in report["record"]["spacing_source"]
    if "tilt" in scan:
        assert names["tilt"] == "warn" and names["uniform_spacing"] == "warn"
        assert report["record"]["gantry_tilt_deg"] == pytest.approx(18.5, abs=0.05)
    else:
        assert all(s == "ok" for s in names.values())
        assert report["record"]["contrast"] == "APPLIED" and report["record"]["body_part"] == "PARTIALBODY"


@pytest.mark.slow
@pytest.mark.realdata
def test_info_text_on_nrrd(run_cli):
    result = run_cli("info", data_path("lung_tumour_nrrd/lung1_image.nrrd"))
    assert result.returncode == 0, result.stderr
    assert "format       nrrd" in result.stdout and "usable       yes" in result.stdout


@pytest.mark.slow
@pytest.mark.realdata
def test_preprocess_writes_the_preset_result_with_its_affine(tmp_path, run_cli):
    source = data_path("sarcoma_ct/STS_025/CT_image.nii.gz")
    out = tmp_path / "sub" / "out.nii.gz"
    result = run_cli(
        "preprocess", source, "--preset", "ct-fm-patches", "-o", out, "--save-spec", tmp_path / "spec.json"
    )
    assert result.returncode == 0, result.stderr
    expected = preprocess(load_ct(source)[0], get_preset("ct-fm-patches"))
    written = nib.load(str(out))
    np.testing.assert_allclose(written.get_fdata()[None], expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(written.affine, np.asarray(expected.affine), atol=1e-4)
    spec_json = json.loads((tmp_path / "spec.json").read_text())
    assert spec_json["name"] == "ct-fm-patches" and spec_json["spacing_mm"] == [3.0, 1.0, 1.0]


def test_preprocess_with_a_spec_file_and_series_choice(tmp_path, capsys):
    write_series(tmp_path / "dicom" / "a", axial_positions(6), series_uid="1.2.3.1")
    write_series(tmp_path / "dicom" / "b", axial_positions(8), series_uid="1.2.3.2")
    spec = get_preset("ct-fm-patches").with_(name="mine", spacing_mm=(2.0, 1.0, 1.0))
    spec.save(tmp_path / "mine.json")
    out = tmp_path / "out.nii.gz"
    code = main(
        [
            "preprocess",
            str(tmp_path / "dicom"),
            "--spec",
            str(tmp_path / "mine.json"),
            "--series",
            "1.2.3.2",
            "-o",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert nib.load(str(out)).shape[0] == 8  # the 8-slice series, 2 mm apart, kept at 2 mm along S


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    assert main(["preprocess", "x.nii.gz", "--preset", "nope", "-o", str(tmp_path / "o.nii.gz")]) == 2
    assert capsys.readouterr().err.startswith("error: unknown preprocessing preset 'nope'")
    (tmp_path / "bad.json").write_text('{"name": "x", "spacing": [1, 1, 1]}')
    assert main(["preprocess", "x.nii.gz", "--spec", str(tmp_path / "bad.json"), "-o", str(tmp_path / "o.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {tmp_path / 'bad.json'}: invalid PreprocessSpec") and len(err.strip().splitlines()) == 1
    )
    assert main(["preprocess", "x.nii.gz", "-o", str(tmp_path / "o.png")]) == 2
    assert "output must be a NIfTI file" in capsys.readouterr().err


def test_os_errors_and_wrong_model_for_weights_are_one_line_errors(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    source = tmp_path / "scan.nii.gz"
    nib.save(
        nib.Nifti1Image(np.full((16, 16, 8), -1000, np.int16) + np.arange(8, dtype=np.int16) * 100, np.eye(4)),
        str(source),
    )
    assert main(["preprocess", str(source), "-o", str(blocker / "sub" / "out.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert (
        main(
            ["models", "init", "ct-fm-segresnet", "--seed", "0", "--out", str(tmp_path / "seg"), "--init-filters", "4"]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["embed", str(source), "--weights", str(tmp_path / "seg"), "--out", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "does not take" in err and "--model ct-fm-segresnet" in err


def test_preset_list_and_synth(tmp_path, capsys):
    assert main(["preprocess", "--list"]) == 0
    listing = capsys.readouterr().out
    for name in ("ct-fm-ssl", "ct-fm-patches", "ct-fm-1mm-320", "head-ct"):
        assert name in listing
    assert main(["synth", "--out", str(tmp_path), "--n", "2", "--seed", "5"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.nii.gz")) == [
        "phantom_seed5.nii.gz",
        "phantom_seed5_labels.nii.gz",
        "phantom_seed6.nii.gz",
        "phantom_seed6_labels.nii.gz",
    ]
