"""PACS addresses as scan sources, against a real Orthanc (DICOMweb and DIMSE) holding the real
STS_019 CT series: discovery, retrieval into the cache, equality with the series read from disk,
filters, the cache (no second retrieval, LRU bound), incomplete series, unreachable servers,
rejected associations, refused credentials, a server stopped mid-retrieval, and the CLI."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

import ctfm
from conftest import data_path
from ctfm.errors import CTInputError, OptionError
from ctfm.io.pacs import PacsOptions, SeriesCache, fetch_series, parse_pacs_url, parse_query, use_options
from ctfm.io.sources import discover_inputs
from pacs_server import PASSWORD, USER, Orthanc, TLSProxy, free_port

SERIES = "sarcoma_ct/STS_019/dicom/image"


def series_files() -> list[Path]:
    return sorted(data_path(SERIES).glob("*.dcm"))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    files = series_files()
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        server.upload(files)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def local():
    return ctfm.load_ct(data_path(SERIES))


def options(tmp_path, **kw) -> PacsOptions:
    return PacsOptions(user=USER, password=PASSWORD, cache_dir=tmp_path / "cache", backoff_s=0.05, **kw)


# ---- addresses (no server) ------------------------------------------------------------------
def test_addresses_parse_and_print_back():
    text = "dicomweb:https://pacs.example.org:8443/dicom-web/studies/1.2.3/series/1.2.3.4"
    url = parse_pacs_url(text)
    assert (url.base, url.study_uid, url.series_uid) == ("https://pacs.example.org:8443/dicom-web", "1.2.3", "1.2.3.4")
    assert str(url) == text and url.endpoint == "dicomweb:https://pacs.example.org:8443/dicom-web"
    dimse = parse_pacs_url("dimse://PACS@10.0.0.5:104/1.2/1.2.5")
    assert (dimse.aet, dimse.host, dimse.port, dimse.study_uid, dimse.series_uid) == (
        "PACS",
        "10.0.0.5",
        104,
        "1.2",
        "1.2.5",
    )


@pytest.mark.parametrize(
    "text, words",
    [
        ("dicomweb:http://u:pw@host/dicom-web", "credentials"),
        ("dicomweb:ftp://host/x", "http:// or https://"),
        ("dicomweb:http://host/studies/1.2/series", "/series/UID"),
        ("dicomweb:http://host/studies/abc", "not a DICOM UID"),
        ("dimse://host:104", "not a DIMSE address"),
        ("dimse://A@host:70000", "not in 1..65535"),
    ],
)
def test_bad_addresses_are_refused_in_one_line(text, words):
    with pytest.raises(CTInputError) as info:
        parse_pacs_url(text)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert "pw" not in str(info.value)


def test_query_filters_take_standard_keywords_only():
    assert parse_query(["Modality=CT", "StudyDate=20240101-20241231"]) == {
        "Modality": "CT",
        "StudyDate": "20240101-20241231",
    }
    with pytest.raises(OptionError, match="not a DICOM keyword"):
        parse_query(["Modalty=CT"])
    with pytest.raises(OptionError, match="YYYYMMDD"):
        parse_query(["StudyDate=2024"])


def test_the_cache_evicts_the_least_recently_used_series(tmp_path):
    cache = SeriesCache(tmp_path, max_gb=2.5e-6)  # 2500 bytes: room for two 1000-byte series
    for i, uid in enumerate(["1.1", "1.2", "1.3"]):
        partial = cache.partial(uid)
        partial.mkdir(parents=True)
        (partial / "a.dcm").write_bytes(b"x" * 1000)
        cache.commit(uid, f"dicomweb:http://h/studies/1/series/{uid}", 1)
        time.sleep(0.05)
        if i == 1:
            cache.lookup("1.1")  # used again: 1.2 is now the oldest
    assert cache.lookup("1.2") is None
    assert cache.lookup("1.1") is not None and cache.lookup("1.3") is not None


# ---- against Orthanc ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["dicomweb", "dimse"])
def test_an_archive_expands_into_its_ct_series(pacs, tmp_path, local, scheme):
    with use_options(options(tmp_path)):
        sources = discover_inputs([getattr(pacs, scheme)])
    record = local[1]
    assert [s.series_uid for s in sources] == [record.series_uid]
    url = parse_pacs_url(sources[0].path)
    assert (url.study_uid, url.series_uid) == (record.study_uid, record.series_uid)


@pytest.mark.slow
@pytest.mark.parametrize("scheme, retrieve", [("dicomweb", "get"), ("dimse", "get"), ("dimse", "move")])
def test_a_series_loads_from_the_pacs_as_from_disk(pacs, tmp_path, local, scheme, retrieve):
    image, record = local
    address = str(parse_pacs_url(getattr(pacs, scheme)).series(record.study_uid, record.series_uid))
    with use_options(options(tmp_path, retrieve=retrieve, move_port=pacs.ctfm_port)):
        got, got_record = ctfm.load_ct(address)
    assert got_record.path == address
    assert np.array_equal(got.numpy(), image.numpy()) and np.allclose(got.affine, image.affine)
    assert sorted(got_record.sop_uids) == sorted(record.sop_uids) and len(record.sop_uids) == 47
    assert (tmp_path / "cache" / record.series_uid / "series.json").is_file()


@pytest.mark.slow
def test_a_cached_series_is_not_fetched_again(pacs, tmp_path, local):
    record = local[1]
    with use_options(options(tmp_path)):
        ctfm.load_ct(f"{pacs.dicomweb}/studies/{record.study_uid}/series/{record.series_uid}")
    dead = f"dicomweb:http://127.0.0.1:{free_port()}/dicom-web/studies/{record.study_uid}/series/{record.series_uid}"
    with use_options(options(tmp_path, retries=0)):  # nothing answers there: the cache must serve it
        image, again = ctfm.load_ct(dead)
    assert again.series_uid == record.series_uid and image.shape == local[0].shape


@pytest.mark.slow
def test_filters_narrow_the_query(pacs, tmp_path):
    with use_options(options(tmp_path, query={"StudyDate": "19000101-19000102"})):
        assert discover_inputs([pacs.dicomweb]) == []
    with use_options(options(tmp_path, query={"Modality": "MR"})):
        assert discover_inputs([pacs.dimse]) == []


@pytest.mark.slow
def test_an_incomplete_series_is_refused_and_kept_for_later(tmp_path, local):
    record = local[1]
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        server.upload(series_files())
        with use_options(options(tmp_path)):
            sources = discover_inputs([server.dicomweb])  # the query reports 47 instances
            for orthanc_id in server.series_instances(record.series_uid)[:3]:
                server.rest(f"/instances/{orthanc_id}", method="DELETE")
            with pytest.raises(CTInputError, match="incomplete series: 44 of 47 instances retrieved"):
                ctfm.load_ct(sources[0].path)
        assert not (tmp_path / "cache" / record.series_uid).exists()  # nothing complete in the cache
        assert len(list((tmp_path / "cache" / ".partial" / record.series_uid).glob("*.dcm"))) == 44
    finally:
        server.stop()


@pytest.mark.slow
def test_a_server_stopped_mid_retrieval_is_a_recorded_failure_then_resumes(tmp_path, local):
    record = local[1]
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        server.upload(series_files())
        address = f"{server.dicomweb}/studies/{record.study_uid}/series/{record.series_uid}"
        opts = options(tmp_path, retries=2)
        # two instances from an earlier, interrupted run: the rest travel one request each, so
        # stopping the server after the tenth leaves requests that meet a closed port
        partial = tmp_path / "cache" / ".partial" / record.series_uid
        partial.mkdir(parents=True)
        for path in series_files()[:2]:
            shutil.copy(path, partial / f"{pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID}.dcm")

        def stop_after_ten(n):
            if n == 10:  # instances on disk
                server.stop()

        with use_options(opts):
            start = time.monotonic()
            with pytest.raises(CTInputError, match="after 3 attempts") as info:
                fetch_series(address, opts, on_instance=stop_after_ten)
            assert time.monotonic() - start < 30  # bounded retries
        assert str(info.value).startswith(f"{server.dicomweb}: ") and PASSWORD not in str(info.value)
        kept = len(list(partial.glob("*.dcm")))
        assert kept == 10
        server.start()
        fetched = []
        folder = fetch_series(address, opts, on_instance=fetched.append)
        assert len(fetched) == 47 - kept  # only the missing instances travel
        assert len(list(folder.glob("*.dcm"))) == 47
    finally:
        server.stop()


@pytest.mark.slow
def test_an_unreachable_pacs_is_one_line_naming_it(tmp_path):
    port = free_port()
    for text in (f"dicomweb:http://127.0.0.1:{port}/dicom-web", f"dimse://PACS@127.0.0.1:{port}"):
        with use_options(options(tmp_path, retries=1)), pytest.raises(CTInputError) as info:
            discover_inputs([text])
        message = str(info.value)
        assert message.startswith(text + ": ") and "after 2 attempts" in message and "\n" not in message


@pytest.mark.slow
def test_wrong_credentials_and_wrong_ae_titles_are_refused(pacs, tmp_path):
    with (
        use_options(PacsOptions(user=USER, password="not-the-password", cache_dir=tmp_path)),
        pytest.raises(CTInputError, match=r"refused the credentials \(HTTP 401\)") as info,
    ):
        discover_inputs([pacs.dicomweb])
    assert "not-the-password" not in str(info.value)
    wrong_aet = pacs.dimse.replace("ORTHANC@", "NOTORTHANC@")
    with use_options(options(tmp_path)), pytest.raises(CTInputError, match="association rejected") as info:
        discover_inputs([wrong_aet])
    assert str(info.value).startswith(wrong_aet)


@pytest.mark.slow
def test_cli_embed_info_and_resume_from_the_pacs(pacs, tmp_path, run_cli, tiny_weights, local):
    record = local[1]
    password = tmp_path / "password.txt"
    password.write_text(PASSWORD + "\n")
    cache, store = tmp_path / "cache", tmp_path / "store"
    auth = ["--user", USER, "--password-file", str(password), "--cache-dir", str(cache)]
    code, out, err = run_cli("info", pacs.dicomweb, "--json", *auth)
    assert code == 0, err
    assert json.loads(out)["record"]["series_uid"] == record.series_uid
    code, out, err = run_cli("embed", pacs.dicomweb, "--weights", tiny_weights, "--out", store, "--no-progress", *auth)
    assert code == 0, err
    assert "embedded 1 scan(s)" in out
    rows = ctfm.open_store(store).select("scan").metadata.to_pylist()
    row = rows[0]
    assert row["source_path"] == f"{pacs.dicomweb}/studies/{record.study_uid}/series/{record.series_uid}"
    assert (row["study_uid"], row["series_uid"]) == (record.study_uid, record.series_uid)
    assert sorted(row["sop_uids"]) == sorted(record.sop_uids)
    # resumable: the series is in the store, so it is not fetched again (the cache stays empty)
    shutil.rmtree(cache)
    cache.mkdir()
    code, out, err = run_cli("embed", pacs.dicomweb, "--weights", tiny_weights, "--out", store, "--no-progress", *auth)
    assert code == 0 and "skipped 1 already in the store" in out, err
    assert list(cache.iterdir()) == []
    for text in (out, err, *(p.read_bytes().decode("latin-1") for p in store.rglob("*") if p.is_file())):
        assert PASSWORD not in text
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("nope\n")
    code, out, err = run_cli("info", pacs.dicomweb, "--user", USER, "--password-file", str(wrong))
    assert code == 2 and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "HTTP 401" in err and "nope" not in err


@pytest.mark.slow
def test_cli_cohort_scan_manifest_embed_and_search_by_address(pacs, tmp_path, run_cli, tiny_weights, local):
    record = local[1]
    address = f"{pacs.dicomweb}/studies/{record.study_uid}/series/{record.series_uid}"
    password = tmp_path / "password.txt"
    password.write_text(PASSWORD + "\n")
    auth = ["--user", USER, "--password-file", str(password), "--cache-dir", str(tmp_path / "cache")]
    manifest, store = tmp_path / "archive.parquet", tmp_path / "store"
    code, out, err = run_cli("cohort", "scan", pacs.dicomweb, "--out", manifest, "--no-progress", *auth)
    assert code == 0, err
    rows = ctfm.io.read_table(manifest).to_pylist()
    assert [(r["path"], r["error"], r["SeriesInstanceUID"]) for r in rows] == [(address, None, record.series_uid)]
    # the manifest of PACS addresses feeds embed; the series from disk goes into the same store
    code, out, err = run_cli(
        "embed", manifest, data_path(SERIES), "--weights", tiny_weights, "--out", store, "--no-progress", *auth
    )
    assert code == 0 and "embedded 2 scan(s)" in out, err
    code, out, err = run_cli("search", store, "--scan", address, "-k", "1", "--json", *auth)
    assert code == 0, err
    (hit,) = json.loads(out)
    assert hit["source_path"] == str(data_path(SERIES).resolve()) or hit["source_path"] == str(data_path(SERIES))
    assert hit["score"] == pytest.approx(1.0, abs=1e-5)  # the same voxels from disk and from the PACS


@pytest.mark.slow
def test_https_verifies_against_the_ca_file_and_never_downgrades(pacs, tmp_path, local):
    proxy = TLSProxy(tmp_path / "tls", pacs.http_port)
    try:
        with use_options(options(tmp_path, retries=0)), pytest.raises(CTInputError) as info:
            discover_inputs([proxy.dicomweb])  # a self-signed certificate the system does not trust
        assert str(info.value).startswith(proxy.dicomweb + ": ")
        assert "TLS certificate check failed" in str(info.value) and "--ca-file" in str(info.value)
        with use_options(options(tmp_path, ca_file=str(proxy.ca_file))):
            (source,) = discover_inputs([proxy.dicomweb])
            image, record = ctfm.load_ct(source.path)
        assert record.series_uid == local[1].series_uid and source.path.startswith("dicomweb:https://")
    finally:
        proxy.close()
