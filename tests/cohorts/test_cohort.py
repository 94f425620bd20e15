"""Cohort manifests: CT-FM's IDC series filters, the IDC query and download, local scans."""

from __future__ import annotations

import socket
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import data_path
from ctfm.cli import main
from ctfm.cohorts import idc
from ctfm.cohorts.idc import PAPER_FILTERS, apply_paper_filters, download_idc, series_folder
from ctfm.errors import CTInputError, MissingDependencyError
from ctfm.io.sources import resolve_sources


# ---- the paper's filters on a synthetic index --------------------------------------------------
def _series(uid, modality="CT", n=120, thickness=2.5, image_type=("ORIGINAL", "PRIMARY", "AXIAL"), unique=True):
    return {
        "SeriesInstanceUID": uid,
        "StudyInstanceUID": f"study-{uid}",
        "PatientID": f"patient-{uid}",
        "collection_id": "nlst" if uid < "h" else "lidc_idri",
        "Modality": modality,
        "instanceCount": n,
        "series_size_MB": 10.0,
        "SliceThickness": thickness,
        "ImageType": list(image_type) if image_type is not None else None,
        "unique_slice_positions": unique,
    }


SYNTHETIC = [
    _series("a_ok"),
    _series("b_mr", modality="MR"),
    _series("c_seg", modality="SEG", n=1),
    _series("d_50_instances", n=50),  # "more than 50": 50 is out
    _series("e_51_instances", n=51),
    _series("f_thin", thickness=0.625),
    _series("g_thick", thickness=7.5),
    _series("h_1mm", thickness=1.0),  # both ends of [1, 5] are in
    _series("i_5mm", thickness=5.0),
    _series("j_no_thickness", thickness=None),  # NULL fails the comparison, as in SQL
    _series("k_localizer", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
    _series("l_no_image_type", image_type=None),  # nothing says localizer: kept
    _series("m_duplicate_positions", unique=False),
    _series("n_unknown_positions", unique=None),
]
KEPT = {"a_ok", "e_51_instances", "h_1mm", "i_5mm", "l_no_image_type"}


def test_paper_filters_on_a_synthetic_index():
    table = pa.Table.from_pylist(SYNTHETIC)
    kept, applied, skipped = apply_paper_filters(table)
    assert isinstance(kept, pa.Table)
    assert set(kept.column("SeriesInstanceUID").to_pylist()) == KEPT
    assert skipped == {}
    assert list(applied) == list(PAPER_FILTERS)  # every filter ran, in the paper's order
    assert applied == {"modality": 2, "instances": 1, "slice_thickness": 3, "localizer": 1, "unique_positions": 2}
    assert sum(applied.values()) == len(SYNTHETIC) - len(KEPT)


def test_paper_filters_report_what_the_bundled_index_cannot_filter():
    # the columns of idc-index's bundled `index`: no thickness, ImageType or positions
    rows = [
        {k: v for k, v in r.items() if k not in ("SliceThickness", "ImageType", "unique_slice_positions")}
        for r in SYNTHETIC
    ]
    kept, applied, skipped = apply_paper_filters(pa.Table.from_pylist(rows))
    assert applied == {"modality": 2, "instances": 1}
    assert set(skipped) == {"slice_thickness", "localizer", "unique_positions"}
    assert "SliceThickness" in skipped["slice_thickness"] and "ImageType" in skipped["localizer"]
    assert "unique_slice_positions" in skipped["unique_positions"]
    assert kept.num_rows == len(SYNTHETIC) - 3


def test_paper_filters_other_column_shapes():
    # per-instance min/max thickness, ImageType as a DICOM backslash string, distinct position counts
    rows = [
        {
            "Modality": "CT",
            "instanceCount": 100,
            "SliceThickness_min": 1.0,
            "SliceThickness_max": 5.0,
            "ImageType": "ORIGINAL\\PRIMARY\\AXIAL",
            "n_distinct_positions": 100,
            "SeriesInstanceUID": "ok",
        },
        {
            "Modality": "CT",
            "instanceCount": 100,
            "SliceThickness_min": 0.5,
            "SliceThickness_max": 2.0,
            "ImageType": "ORIGINAL\\PRIMARY\\AXIAL",
            "n_distinct_positions": 100,
            "SeriesInstanceUID": "min_too_thin",
        },
        {
            "Modality": "CT",
            "instanceCount": 100,
            "SliceThickness_min": 2.0,
            "SliceThickness_max": 6.0,
            "ImageType": "ORIGINAL\\PRIMARY\\AXIAL",
            "n_distinct_positions": 100,
            "SeriesInstanceUID": "max_too_thick",
        },
        {
            "Modality": "CT",
            "instanceCount": 100,
            "SliceThickness_min": 2.0,
            "SliceThickness_max": 2.0,
            "ImageType": "ORIGINAL\\PRIMARY\\localizer",
            "n_distinct_positions": 100,
            "SeriesInstanceUID": "localizer",
        },
        {
            "Modality": "CT",
            "instanceCount": 100,
            "SliceThickness_min": 2.0,
            "SliceThickness_max": 2.0,
            "ImageType": "ORIGINAL\\PRIMARY\\AXIAL",
            "n_distinct_positions": 50,
            "SeriesInstanceUID": "two_per_position",
        },
    ]
    kept, applied, skipped = apply_paper_filters(pa.Table.from_pylist(rows))
    assert kept.column("SeriesInstanceUID").to_pylist() == ["ok"]
    assert skipped == {} and applied == {
        "modality": 0,
        "instances": 0,
        "slice_thickness": 2,
        "localizer": 1,
        "unique_positions": 1,
    }


def test_paper_filters_accept_a_pandas_frame():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(SYNTHETIC)
    frame["instanceCount"] = frame["instanceCount"].astype("Int64")  # idc-index's dtype
    kept, applied, skipped = apply_paper_filters(frame)
    assert isinstance(kept, pd.DataFrame)
    assert set(kept["SeriesInstanceUID"]) == KEPT and skipped == {}


# ---- select_idc_cohort with a stand-in client (no idc-index needed) ----------------------------
class FakeIDCClient:
    """Stands in for idc_index.IDCClient: its `index`, `indices_overview` and `fetch_index`."""

    idc_version = "v99"

    def __init__(self, installed=(), fetch_error=None):
        pd = pytest.importorskip("pandas")
        rows = [
            {k: v for k, v in r.items() if k not in ("SliceThickness", "ImageType", "unique_slice_positions")}
            for r in SYNTHETIC
        ]
        self.index = pd.DataFrame(rows)
        self.indices_overview = {
            name: {"installed": name in installed} for name in ("ct_index", "volume_geometry_index")
        }
        self.ct_index = None
        self.volume_geometry_index = None
        self.fetch_error = fetch_error
        self.fetched = []

    def fetch_index(self, name):
        pd = pytest.importorskip("pandas")
        self.fetched.append(name)
        if self.fetch_error is not None and not self.indices_overview[name]["installed"]:
            raise self.fetch_error
        if name == "ct_index":
            self.ct_index = pd.DataFrame(
                [
                    {
                        "SeriesInstanceUID": r["SeriesInstanceUID"],
                        "SliceThickness": r["SliceThickness"],
                        "ImageType": r["ImageType"],
                        "KVP": 120.0,
                    }
                    for r in SYNTHETIC
                ]
            )
        else:
            self.volume_geometry_index = pd.DataFrame(
                [
                    {"SeriesInstanceUID": r["SeriesInstanceUID"], "unique_slice_positions": r["unique_slice_positions"]}
                    for r in SYNTHETIC
                ]
            )


def test_select_idc_cohort_uses_locally_installed_indices():
    client = FakeIDCClient(installed=("ct_index", "volume_geometry_index"))
    result = idc.select_idc_cohort(client=client)
    assert set(result.table.column("SeriesInstanceUID").to_pylist()) == KEPT
    assert result.skipped == {} and set(result.notes) == {"slice_thickness", "localizer", "unique_positions"}
    assert "ANY_VALUE" in result.notes["slice_thickness"]
    names = result.table.column_names
    for column in (
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "PatientID",
        "collection_id",
        "Modality",
        "instanceCount",
        "SliceThickness",
        "series_size_MB",
        "path",
        "series_uid",
    ):
        assert column in names
    assert result.table.column("path").null_count == result.n_series
    assert (result.n_series, result.n_patients, result.n_collections, result.size_mb) == (5, 5, 2, 50.0)


def test_select_idc_cohort_without_the_extra_indices_names_what_was_not_applied():
    client = FakeIDCClient(installed=())
    result = idc.select_idc_cohort(client=client, collections=["nlst"], limit=1)
    assert client.fetched == []  # nothing is downloaded unless asked
    assert set(result.applied) == {"modality", "instances"}
    assert set(result.skipped) == {"slice_thickness", "localizer", "unique_positions"}
    assert all("not bundled" in why and "--fetch-indices" in why for why in result.skipped.values())
    assert result.skipped["unique_positions"].startswith("needs idc-index's volume_geometry_index")
    assert (result.candidates, result.passed, result.n_series) == (7, 4, 1)  # d_50, b_mr, c_seg removed
    assert result.table.column("SeriesInstanceUID").to_pylist() == ["a_ok"]  # sorted before --limit


def test_select_idc_cohort_errors_are_one_line():
    with pytest.raises(CTInputError, match="unknown IDC collection.*close matches: nlst"):
        idc.select_idc_cohort(client=FakeIDCClient(), collections=["nslt"])
    # simulated: the extra index cannot be downloaded (what `requests` raises offline)
    with pytest.raises(CTInputError, match="could not fetch the IDC ct_index.*ConnectionError"):
        idc.select_idc_cohort(
            client=FakeIDCClient(fetch_error=ConnectionError("Failed to resolve github.com")), fetch_indices=True
        )


def test_missing_idc_index_names_the_pip_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "idc_index", None)  # simulated: the package is not installed
    with pytest.raises(MissingDependencyError, match=r"pip install .ctfm\[idc\]."):
        idc.idc_client()
    assert main(["cohort", "idc", "--out", str(tmp_path / "c.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "pip install 'ctfm[idc]'" in err and len(err.splitlines()) == 1


class _NetworkTouched(Exception):
    pass


def _forbid_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise _NetworkTouched(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.slow
def test_real_idc_index_query_offline(monkeypatch, capsys, tmp_path):
    idc_index = pytest.importorskip("idc_index", reason="idc-index is not installed (pip install idc-index)")
    _forbid_network(monkeypatch)
    try:
        client = idc_index.IDCClient()
    except _NetworkTouched as exc:
        pytest.skip(f"idc-index {idc_index.__version__} touches the network when its client starts: {exc}")
    monkeypatch.setattr(idc, "idc_client", lambda: client)
    out = tmp_path / "cohort.parquet"
    assert (
        main(["cohort", "idc", "--out", str(out), "--limit", "5"]) == 0
    )  # would raise _NetworkTouched on any connection
    printed = capsys.readouterr().out
    table = pq.read_table(out)
    assert table.num_rows == 5
    for column in (
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "PatientID",
        "collection_id",
        "Modality",
        "instanceCount",
        "series_size_MB",
        "path",
    ):
        assert column in table.column_names
    assert set(table.column("Modality").to_pylist()) == {"CT"}
    assert min(table.column("instanceCount").to_pylist()) > 50
    assert table.column("path").null_count == 5
    assert "5 series" in printed and "patients" in printed and "collections" in printed and "MB" in printed
    assert "applied: Modality = 'CT'" in printed and "applied: more than 50 instances" in printed
    installed = {k for k, v in client.indices_overview.items() if v.get("installed")}
    if "ct_index" not in installed:
        assert "NOT applied: slice thickness" in printed and "NOT applied: no LOCALIZER" in printed
    if "volume_geometry_index" not in installed:
        assert "NOT applied: unique slice positions" in printed


# ---- download (the transfer itself is always simulated here) -----------------------------------
def _idc_manifest(path: Path, n: int = 2) -> Path:
    rows = [
        {
            "SeriesInstanceUID": f"1.2.3.{i}",
            "StudyInstanceUID": "1.2.3",
            "PatientID": f"P{i}",
            "collection_id": "demo_collection",
            "Modality": "CT",
            "instanceCount": 3,
            "series_size_MB": 1.5,
            "series_uid": f"1.2.3.{i}",
            "path": None,
        }
        for i in range(n)
    ]
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                (k, pa.int64() if k == "instanceCount" else pa.float64() if k == "series_size_MB" else pa.string())
                for k in rows[0]
            ]
        ),
    )
    pq.write_table(table, path)
    return path


# What idc-index 0.13 logs when s5cmd cannot reach the bucket (captured from a real offline run);
# download_from_selection returns normally after it.
OFFLINE_LOG = [
    "Download process failed with the following errors:\nERROR session: fetching region failed: RequestError: send "
    'request failed\n\nERROR "cp s3://idc-open-data/357b6269/* DOWNLOAD_DIR/CT_1.2": RequestError: send request failed '
    'caused by: Get "https://s3.amazonaws.com/idc-open-data?list-type=2": dial tcp: lookup s3.amazonaws.com on '
    "RESOLVER:53: no such host",
    "Download process return non-zero exit code: 1",
]


def test_download_offline_is_one_clear_error(tmp_path):
    manifest = _idc_manifest(tmp_path / "cohort.parquet")
    before = pq.read_table(manifest)

    def offline(series_uids, out_dir):  # simulated: writes nothing, returns the logged errors
        return OFFLINE_LOG

    with pytest.raises(CTInputError) as info:
        download_idc(manifest, tmp_path / "dl", downloader=offline)
    message = str(info.value)
    assert "none of 2 series could be downloaded" in message and "no such host" in message and "network" in message
    assert "\n" not in message
    assert pq.read_table(manifest).equals(before)  # nothing recorded

    def raising(series_uids, out_dir):  # simulated: the client raises (e.g. requests' ConnectionError)
        raise ConnectionError("Max retries exceeded with url: /idc-open-data")

    with pytest.raises(CTInputError, match="ConnectionError: Max retries exceeded"):
        download_idc(manifest, tmp_path / "dl", downloader=raising)


def test_default_downloader_fails_fast_without_dns(monkeypatch, tmp_path):
    monkeypatch.setattr(idc, "idc_client", lambda: object())  # simulated client: never used

    def no_dns(*args, **kwargs):  # simulated: the resolver fails as it does offline
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    manifest = _idc_manifest(tmp_path / "cohort.parquet", n=1)
    with pytest.raises(CTInputError, match="cannot resolve s3.amazonaws.com"):
        download_idc(manifest, tmp_path / "dl", progress=False)


def test_download_records_paths_and_resumes(tmp_path, capsys, monkeypatch):
    manifest = _idc_manifest(tmp_path / "cohort.parquet", n=3)
    out_dir = tmp_path / "dl"
    rows = pq.read_table(manifest).to_pylist()
    asked = []

    def partly(series_uids, out_dir_):  # simulated transfer: series 0 complete, series 1 cut short, series 2 absent
        asked.append(list(series_uids))
        for row, n_files in zip(rows, (3, 1, 0)):
            folder = series_folder(out_dir_, row)
            for k in range(n_files):
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{k}.dcm").write_bytes(b"x")
        return []

    summary = download_idc(manifest, out_dir, downloader=partly)
    assert asked == [["1.2.3.0", "1.2.3.1", "1.2.3.2"]]
    assert summary.downloaded == 1 and summary.already == 0
    assert dict(summary.missing) == {"1.2.3.1": "incomplete: 1 of 3 files", "1.2.3.2": "nothing downloaded"}
    paths = pq.read_table(manifest).column("path").to_pylist()
    assert paths[0] == str(series_folder(out_dir.absolute(), rows[0])) and paths[1:] == [None, None]
    assert (out_dir / "demo_collection" / "P0" / "1.2.3" / "CT_1.2.3.0").is_dir()

    # the resumed run asks only for what is missing; the CLI exits 1 while series are missing
    def finish_one(series_uids, out_dir_, progress=True):  # simulated: series 1 completes, series 2 still absent
        asked.append(list(series_uids))
        for k in range(3):
            (series_folder(out_dir_, rows[1]) / f"{k}.dcm").write_bytes(b"x")
        return []

    monkeypatch.setattr(idc, "idc_download", finish_one)
    assert main(["cohort", "download", str(manifest), str(out_dir), "--no-progress"]) == 1
    assert asked[-1] == ["1.2.3.1", "1.2.3.2"]
    captured = capsys.readouterr()
    assert (
        "downloaded 1 series, 1 already had a path, 1 missing" in captured.out
        and "error: series 1.2.3.2: nothing downloaded" in captured.err
    )
    # a run that gets nothing at all is an error (exit 2), and says how to resume
    monkeypatch.setattr(idc, "idc_download", lambda uids, d, progress=True: [])
    assert main(["cohort", "download", str(manifest), str(out_dir), "--no-progress"]) == 2
    assert "none of 1 series could be downloaded" in capsys.readouterr().err

    # a manifest with paths feeds the cache directly: rows without a path are counted, not guessed
    resolved = resolve_sources(manifest)
    assert [s.series_uid for s in resolved.sources] == ["1.2.3.0", "1.2.3.1"] and resolved.not_downloaded == 1


def test_download_refuses_a_manifest_that_is_not_an_idc_cohort(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.nii.gz"]}), path)
    with pytest.raises(CTInputError, match="not an IDC cohort manifest"):
        download_idc(path, tmp_path / "dl", downloader=lambda u, d: [])


# ---- scanning the real data ------------------------------------------------------------------
CT_SCANS = [
    "abdomen_3mm/example_ct.nii.gz",
    "abdomen_3mm/example_ct_sm.nii.gz",
    "abdomen_dicom/dicom",
    "head_tilt_dicom/dicom",
    "liver_3slice_dicomseg/dicom",
    "lung_tumour_nrrd/lung1_image.nrrd",
    "sarcoma_ct/STS_019/CT_image.nii.gz",
    "sarcoma_ct/STS_019/dicom/image",
    "sarcoma_ct/STS_025/CT_image.nii.gz",
    "whole_scans_1p5mm/lumbar_pelvis.nii.gz",
    "whole_scans_1p5mm/neck_a.nii.gz",
]
LABEL_FILES = [
    "abdomen_3mm/example_seg.nii.gz",
    "abdomen_3mm/vertebrae.nii.gz",
    "abdomen_dicom/seg.nii.gz",
    "liver_3slice_dicomseg/heart_seg.nrrd",
    "liver_3slice_dicomseg/liver_seg.nrrd",
    "liver_3slice_dicomseg/liver_spine_seg.nrrd",
    "liver_3slice_dicomseg/spine_seg.nrrd",
    "lung_tumour_nrrd/lung1_label.nrrd",
    "sarcoma_ct/STS_019/CT_mask.nii.gz",
    "sarcoma_ct/STS_025/CT_mask.nii.gz",
]


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    root = data_path("README.md").parent
    out = tmp_path_factory.mktemp("scan") / "scans.parquet"
    assert main(["cohort", "scan", str(root), "--out", str(out), "--no-progress"]) == 0
    return root, out, {Path(r["path"]).relative_to(root).as_posix(): r for r in pq.read_table(out).to_pylist()}


@pytest.mark.slow
@pytest.mark.realdata
def test_scan_lists_every_real_scan_and_records_label_files_as_errors(scanned):
    from ctfm.embedding.runner import discover_inputs

    root, out, rows = scanned
    assert set(rows) == {Path(s.path).relative_to(root).as_posix() for s in discover_inputs([root])}
    assert set(rows) == set(CT_SCANS) | set(LABEL_FILES)
    for name in CT_SCANS:
        assert rows[name]["error"] is None, rows[name]["error"]
        assert (
            rows[name]["content_hash"]
            and rows[name]["disk_bytes"] > 0
            and rows[name]["n_voxels"] == int(np.prod(rows[name]["shape"]))
        )
    for name in LABEL_FILES:
        assert rows[name]["error"] and "not HU" in rows[name]["error"] and rows[name]["shape"] is None


@pytest.mark.realdata
def test_scan_rows_match_the_loader(scanned):
    from ctfm.io import load_ct

    root, out, rows = scanned
    for name in ("abdomen_dicom/dicom", "head_tilt_dicom/dicom", "lung_tumour_nrrd/lung1_image.nrrd"):
        row = rows[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image, record = load_ct(row["path"], row["series_uid"])
        assert row["shape"] == list(image.shape[1:]) and np.allclose(row["spacing_mm"], record.spacing_mm)
        assert (row["SeriesInstanceUID"], row["StudyInstanceUID"], row["Modality"], row["SliceThickness"]) == (
            record.series_uid,
            record.study_uid,
            record.modality,
            record.slice_thickness_mm,
        )
    assert rows["abdomen_dicom/dicom"]["Modality"] == "CT" and rows["abdomen_dicom/dicom"]["n_slices"] == 20
    assert rows["abdomen_dicom/dicom"]["SliceThickness"] == 3.0
    assert rows["head_tilt_dicom/dicom"]["warnings"] and "resampled" in rows["head_tilt_dicom/dicom"]["warnings"]
    assert (
        rows["lung_tumour_nrrd/lung1_image.nrrd"]["format"] == "nrrd"
        and rows["lung_tumour_nrrd/lung1_image.nrrd"]["n_slices"] == 48
    )
    # the manifest feeds the cache: rows with an error are left out and counted
    resolved = resolve_sources(out)
    assert len(resolved.sources) == len(CT_SCANS) and resolved.unreadable == len(LABEL_FILES)
