"""The app's JSON API and its refusals: real servers (uvicorn on 127.0.0.1, a free port) over a store
of phantoms, asked over HTTP with httpx."""

from __future__ import annotations

import gzip
import io
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("ctfm.search", reason="the app searches with ctfm.search (region search)")

from app_fixtures import InProcessServer, copy_store  # noqa: E402
from PIL import Image  # noqa: E402

import ctfm  # noqa: E402
from ctfm.app import build_app  # noqa: E402
from ctfm.app.uploads import unsafe_member  # noqa: E402
from ctfm.synth import make_phantom, write_phantom  # noqa: E402

SRC = str(Path(ctfm.__file__).resolve().parents[1])  # the ctfm the tests import, for subprocesses


@pytest.fixture(scope="module")
def built(app_store):
    return app_store


@pytest.fixture(scope="module")
def client(built):
    with InProcessServer(built["store"], weights=str(built["weights"]), device="cpu") as server, server.client() as c:
        yield c


def _world(entry, voxel):
    return (np.asarray(entry["display"]["affine"]) @ np.append(np.asarray(voxel, dtype=float), 1.0))[:3].tolist()


def _png(response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def _error(response, status: int, *words: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"]
    for word in words:
        assert word in body["error"], body["error"]
    return body["error"]


# ---- scans and slices ------------------------------------------------------------------------
@pytest.mark.slow
def test_info_and_scan_list_carry_provenance_and_the_random_weights_message(client, built):
    info = client.get("/api/info").json()
    assert info["scans"] == 3 and info["patches"] >= 3 and info["run"]["mode"] == "patches"
    assert info["run"]["vector_dim"] == 64 and info["run"]["preset"] == "ct-fm-patches"
    assert info["weights"]["random"] is True and "random initialisation" in info["weights"]["message"]
    scans = client.get("/api/scans").json()["scans"]
    assert sorted(s["name"] for s in scans) == ["p0.nii.gz", "p1.nii.gz", "p2.nii.gz"]
    for s in scans:
        assert s["shape"] == [48, 40, 30] and s["spacing_mm"] == [3.0, 3.0, 3.0]
        assert (
            s["provenance"]["weights_sha256"] == info["run"]["weights_sha256"]
            and len(s["provenance"]["content_hash"]) == 64
        )
        assert "source_path" not in s  # scans are addressed by id, never by path
    detail = client.get(f"/api/scans/{scans[0]['id']}").json()
    g = detail["display"]
    assert g["shape"] == [48, 40, 30]
    np.testing.assert_allclose(np.asarray(g["affine"]) @ np.asarray(g["inverse_affine"]), np.eye(4), atol=1e-9)
    _error(client.get("/api/scans/0123456789abcdef"), 404, "0123456789abcdef", "GET /api/scans")


def test_slices_are_windowed_pngs_in_radiological_orientation(client, built):
    scan = client.get("/api/scans").json()["scans"][0]
    sid = scan["id"]
    axial = _png(client.get(f"/api/scans/{sid}/slice", params={"axis": "axial", "index": 15, "window": "soft"}))
    assert axial.size == (48, 40) and axial.mode == "L"  # columns x, rows y
    assert _png(client.get(f"/api/scans/{sid}/slice", params={"axis": "coronal", "index": 20})).size == (48, 30)
    assert _png(client.get(f"/api/scans/{sid}/slice", params={"axis": "sagittal", "index": 24})).size == (40, 30)
    # The pixels are the scan's HU through the window, patient's right on the left, anterior up.
    volume = client.state.volumes.get(sid).hu
    expected = np.clip((volume[::-1, ::-1, 15].T.astype(np.float32) - (40 - 200)) / 400, 0, 1) * 255
    np.testing.assert_allclose(np.asarray(axial, dtype=np.float32), expected, atol=1.0)
    lung = np.asarray(
        _png(client.get(f"/api/scans/{sid}/slice", params={"axis": "axial", "index": 15, "window": "lung"}))
    )
    assert not np.array_equal(lung, np.asarray(axial))
    thumb = _png(client.get(f"/api/scans/{sid}/slice", params={"axis": "axial", "index": 15, "size": 96}))
    assert max(thumb.size) == 96 and thumb.size == (96, 80)


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"axis": "oblique", "index": 1}, 422, ("axis",)),
        ({"axis": "axial", "index": 30}, 400, ("index 30", "0..29")),
        ({"axis": "axial", "index": -1}, 400, ("index -1",)),
        ({"axis": "axial", "index": "x"}, 422, ("index",)),
        ({"axis": "axial"}, 422, ("index", "required")),
        ({"axis": "axial", "index": 1, "window": "liver"}, 422, ("window",)),
        ({"axis": "axial", "index": 1, "size": 4}, 422, ("size",)),
    ],
)
def test_bad_slice_requests_are_refused(client, params, status, words):
    sid = client.get("/api/scans").json()["scans"][0]["id"]
    _error(client.get(f"/api/scans/{sid}/slice", params=params), status, *words)


def test_paths_are_never_taken_from_requests(client):
    _error(client.get("/api/scans/..%2F..%2Fetc%2Fpasswd/slice", params={"axis": "axial", "index": 0}), 404)
    _error(client.get("/static/..%2F..%2Fstate.py"), 404)
    _error(client.get("/static/index.html"), 404)  # only the page's own assets are served
    _error(client.get("/api/nothing"), 404, "/api/nothing")
    _error(client.delete("/api/scans"), 405)


# ---- search and heatmaps ---------------------------------------------------------------------
def _window_point(client, sid):
    """A stored window centre of scan ``sid`` (the stored query window is exactly that window)."""
    vectors = client.state.vectors
    return vectors.centers_mm[np.flatnonzero(vectors.scan_id == sid)[0]].tolist()


def test_search_finds_the_store_and_a_scans_own_region(client):
    scans = client.get("/api/scans").json()["scans"]
    sid = scans[0]["id"]
    point = _window_point(client, sid)
    result = client.post("/api/search", json={"scan_id": sid, "point_mm": point, "k": 10}).json()
    assert result["ms"] >= 0 and len(result["hits"]) == 2  # every other scan once
    assert {h["scan_id"] for h in result["hits"]} == {s["id"] for s in scans[1:]}
    scores = [h["score"] for h in result["hits"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    for hit in result["hits"]:  # each hit lies inside its own scan
        assert client.state.volumes.get(hit["scan_id"]).contains(hit["point_mm"])
    assert len(client.post("/api/search", json={"scan_id": sid, "point_mm": point, "k": 1}).json()["hits"]) == 1
    own = client.post("/api/search", json={"scan_id": sid, "point_mm": point, "k": 5, "target": sid}).json()["hits"]
    assert len(own) == 1 and own[0]["scan_id"] == sid
    assert own[0]["window_score"] > 0.9999  # the query window is one of the scan's own windows
    assert np.linalg.norm(np.subtract(own[0]["point_mm"], point)) < 24.0  # within a window stride


def test_centred_query_embeds_the_window_at_the_click(client):
    sid = client.get("/api/scans").json()["scans"][0]["id"]
    point = _window_point(client, sid)
    hits = client.post(
        "/api/search", json={"scan_id": sid, "point_mm": point, "k": 3, "target": sid, "query": "centred"}
    ).json()["hits"]
    assert (
        hits[0]["query"] == "centred" and hits[0]["window_score"] > 0.999
    )  # centred on a stored window's centre: the same window


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"point_mm": [0, 0, 0]}, 422, ("scan_id", "required")),
        ({"scan_id": "SID"}, 422, ("point_mm", "required")),
        ({"scan_id": "SID", "point_mm": [1, 2]}, 422, ("point_mm",)),
        ({"scan_id": "SID", "point_mm": ["a", 2, 3]}, 422, ("point_mm",)),
        ({"scan_id": "SID", "point_mm": [900, 0, 0]}, 400, ("outside scan",)),
        ({"scan_id": "nope", "point_mm": [0, 0, 0]}, 404, ("nope",)),
        ({"scan_id": "SID", "point_mm": [0, 0, 0], "target": "zz"}, 404, ("zz",)),
        ({"scan_id": "SID", "point_mm": [0, 0, 0], "k": 0}, 422, ("k",)),
        ({"scan_id": "SID", "point_mm": [0, 0, 0], "k": 1000}, 422, ("k",)),
        ({"scan_id": "SID", "point_mm": [0, 0, 0], "query": "magic"}, 422, ("query",)),
        ({"scan_id": "SID", "point_mm": [0, 0, 0], "path": "/etc/passwd"}, 422, ("path", "not permitted")),
    ],
)
def test_bad_searches_are_refused(client, body, status, words):
    sid = client.get("/api/scans").json()["scans"][0]["id"]
    body = {k: (sid if v == "SID" else v) for k, v in body.items()}
    _error(client.post("/api/search", json=body), status, *words)


def test_malformed_search_bodies_are_refused(client):
    _error(client.post("/api/search", content=b"not json", headers={"content-type": "application/json"}), 422, "JSON")
    _error(client.post("/api/search", content=b"[1, 2]", headers={"content-type": "application/json"}), 422)


def test_heatmap_overlay_and_volume(client):
    sid = client.get("/api/scans").json()["scans"][0]["id"]
    point = _window_point(client, sid)
    q = {"query_scan": sid, "x": point[0], "y": point[1], "z": point[2]}
    overlay = _png(client.get(f"/api/scans/{sid}/heatmap", params={**q, "axis": "axial", "index": 15}))
    assert overlay.mode == "RGBA" and overlay.size == (48, 40)
    response = client.get(f"/api/scans/{sid}/heatmap", params=q)
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    import nibabel as nib

    image = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    volume = np.asarray(image.dataobj)
    assert volume.shape == (48, 40, 30) and np.isclose(volume.max(), 1.0) and np.isclose(volume.min(), 0.0)
    np.testing.assert_allclose(image.affine, client.state.volumes.get(sid).affine, atol=1e-5)
    # The similarity to a scan's own window is highest around that window.
    hottest = np.argwhere(volume >= volume.max() - 1e-6).mean(0)
    hottest_mm = (image.affine @ np.append(hottest, 1.0))[:3]
    assert np.linalg.norm(hottest_mm - np.asarray(point)) < 40.0


def test_bad_heatmap_requests_are_refused(client):
    sid = client.get("/api/scans").json()["scans"][0]["id"]
    point = _window_point(client, sid)
    q = {"query_scan": sid, "x": point[0], "y": point[1], "z": point[2]}
    _error(client.get(f"/api/scans/{sid}/heatmap", params={**q, "axis": "axial"}), 422, "axis and index")
    _error(client.get(f"/api/scans/{sid}/heatmap", params={"query_scan": sid, "x": 0}), 422, "required")
    _error(client.get(f"/api/scans/{sid}/heatmap", params={**q, "query_scan": "nope"}), 404, "nope")
    _error(client.get("/api/scans/nope/heatmap", params=q), 404, "nope")
    _error(client.get(f"/api/scans/{sid}/heatmap", params={**q, "x": 5000}), 400, "outside")
    _error(client.get(f"/api/scans/{sid}/heatmap", params={**q, "axis": "axial", "index": 99}), 400, "index 99")


# ---- the page, the API page, no network ---------------------------------------------------------
def test_page_and_api_page_load_nothing_from_the_network(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    spec = client.get("/openapi.json").json()
    assert {"/api/scans", "/api/scans/{scan_id}/slice", "/api/scans/{scan_id}/heatmap", "/api/search"} <= set(
        spec["paths"]
    )
    assert {"get", "post"} <= set(spec["paths"]["/api/scans"])
    for text in (
        page.text,
        docs.text,
        client.get("/static/app.js").text,
        client.get("/static/api.js").text,
        client.get("/static/app.css").text,
    ):
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), "a page asset points outside the server"
        assert not re.search(r"(fetch|import)\(\s*[\"'`]https?://", text)
        assert "@import" not in text


# ---- uploads ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def upload_client(built, tmp_path_factory):
    store = copy_store(built, tmp_path_factory.mktemp("upload") / "store")
    with (
        InProcessServer(store, weights=str(built["weights"]), device="cpu", max_upload_mb=2) as server,
        server.client() as c,
    ):
        yield c


def _uploads(client) -> list[str]:
    root = client.state.uploads.root
    return sorted(os.listdir(root)) if root.exists() else []


def _phantom_bytes(tmp_path, seed=7, shape=(40, 32, 24)) -> bytes:
    path, _ = write_phantom(
        make_phantom(seed, shape=shape, spacing_mm=(3.0, 3.0, 3.0)), tmp_path / f"up{seed}", stem="scan"
    )
    return path.read_bytes()


def _dicom_zip(tmp_path, members=None) -> bytes:
    from dicom_factory import write_series

    phantom = make_phantom(8, shape=(40, 32, 24), spacing_mm=(3.0, 3.0, 3.0))
    values = np.stack([phantom.image[:, :, k].T for k in range(24)])  # rows y, columns x
    files = write_series(
        tmp_path / "series",
        [(0.0, 0.0, 3.0 * k) for k in range(24)],
        values=values,
        rows=32,
        cols=40,
        pixel_spacing=(3.0, 3.0),
        description="uploaded series",
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, f in enumerate(files):
            archive.write(f, (members or "series/{i:03d}.dcm").format(i=i))
    return buffer.getvalue()


def test_upload_nifti_and_zipped_dicom_are_embedded_into_the_store(upload_client, tmp_path):
    c = upload_client
    before = len(c.get("/api/scans").json()["scans"])
    response = c.post("/api/scans", files={"file": ("my scan.nii.gz", _phantom_bytes(tmp_path), "application/gzip")})
    assert response.status_code == 201, response.text
    entry = response.json()
    assert entry["uploaded"] is True and entry["n_patches"] >= 1 and entry["shape"] == [40, 32, 24]
    stored = _uploads(c)
    assert len(stored) == 1 and re.fullmatch(r"[0-9a-f]{32}\.nii\.gz", stored[0])  # a generated name, not the client's
    ids = {s["id"] for s in c.get("/api/scans").json()["scans"]}
    assert len(ids) == before + 1 and entry["id"] in ids
    assert entry["provenance"]["weights_sha256"] == c.get("/api/info").json()["run"]["weights_sha256"]
    # The new scan is searchable at once, from and to.
    point = _window_point(c, entry["id"])
    hits = c.post("/api/search", json={"scan_id": entry["id"], "point_mm": point, "k": 10}).json()["hits"]
    assert len(hits) == before
    response = c.post("/api/scans", files={"file": ("series.zip", _dicom_zip(tmp_path), "application/zip")})
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "dicom" and response.json()["shape"] == [40, 32, 24]
    assert len(c.get("/api/scans").json()["scans"]) == before + 2
    folder = [n for n in _uploads(c) if not n.endswith(".nii.gz")]
    assert len(folder) == 1 and sorted(os.listdir(c.state.uploads.root / folder[0]))[0] == "00000.dcm"


def _zip_with(name: str, data: bytes = b"x", symlink: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = 0o120777 << 16
        archive.writestr(info, data)
    return buffer.getvalue()


# Explicit ids: the payloads hold gzip/zip timestamps, and ids made from them would differ between
# pytest-xdist workers (which must collect identical test names).
BAD_UPLOADS = [
    ("notes.txt", b"hello, not a scan", 415, ("unknown type",)),
    ("scan.nii.gz", gzip.compress(b"just text inside gzip" * 50), 415, ("gzip", "not a NIfTI")),
    ("slice.dcm", b"\0" * 128 + b"DICM" + b"\0" * 200, 415, ("DICOM file", ".zip")),
    ("empty.nii", b"", 400, ("empty",)),
    ("evil.zip", _zip_with("../../outside.dcm"), 400, ("..",)),
    ("evil.zip", _zip_with("/etc/cron.d/evil"), 400, ("absolute",)),
    ("evil.zip", _zip_with("C:\\windows\\evil.dcm"), 400, ("absolute",)),
    ("evil.zip", _zip_with("series/link", b"/etc/passwd", symlink=True), 400, ("symbolic link",)),
    ("broken.zip", b"PK\x03\x04" + b"\0" * 100, 400, ("damaged zip",)),
    ("notct.zip", _zip_with("series/readme.txt", b"no dicom here"), 400, ("not a usable CT",)),
]


@pytest.mark.parametrize(
    ("name", "payload", "status", "words"), BAD_UPLOADS, ids=[f"{i}-{case[0]}" for i, case in enumerate(BAD_UPLOADS)]
)
def test_bad_uploads_are_refused_and_leave_nothing(upload_client, name, payload, status, words):
    before = len(upload_client.get("/api/scans").json()["scans"])
    kept = _uploads(upload_client)
    _error(
        upload_client.post("/api/scans", files={"file": (name, payload, "application/octet-stream")}), status, *words
    )
    assert _uploads(upload_client) == kept
    assert len(upload_client.get("/api/scans").json()["scans"]) == before


def test_an_unusable_nifti_is_refused(upload_client, tmp_path):
    import nibabel as nib

    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), dtype=np.float32), np.eye(4)), flat)  # constant: not a CT
    kept = _uploads(upload_client)
    error = _error(
        upload_client.post("/api/scans", files={"file": ("flat.nii.gz", flat.read_bytes(), "application/gzip")}),
        400,
        "not a usable CT",
    )
    assert str(upload_client.state.uploads.root) not in error  # the server's own paths stay private
    assert _uploads(upload_client) == kept


def test_oversized_uploads_are_refused(upload_client):
    kept = _uploads(upload_client)
    big = b"\0" * (3 * 2**20)  # the limit is 2 MiB
    _error(
        upload_client.post("/api/scans", files={"file": ("big.nii", big, "application/octet-stream")}),
        413,
        "limit of 2 MiB",
        "--max-upload-mb",
    )
    # A zip that unpacks past the limit (many times its own size) is refused as well.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("series/0.dcm", b"\0" * (20 * 2**20))
    assert len(buffer.getvalue()) < 2**20
    _error(
        upload_client.post("/api/scans", files={"file": ("bomb.zip", buffer.getvalue(), "application/zip")}),
        413,
        "unpacks to more than",
    )
    _error(upload_client.post("/api/scans", data={"nofile": "1"}), 422, "file")
    assert _uploads(upload_client) == kept


def test_unsafe_member_names():
    for bad in ("../a", "a/../../b", "/abs", "\\abs", "C:\\x", "C:x", "", "a\x00b"):
        assert unsafe_member(bad) is not None, bad
    for good in ("a.dcm", "series/a.dcm", "a..b.dcm", "./a.dcm"):
        assert unsafe_member(good) is None, good


# ---- the command ------------------------------------------------------------------------------
@pytest.mark.slow
def test_serve_binds_localhost_and_says_so(built):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ctfm",
            "serve",
            str(built["store"]),
            "--weights",
            str(built["weights"]),
            "--port",
            "0",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:(\d+)) \(bound to 127\.0\.0\.1, this machine only\)", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        import httpx

        scans = httpx.get(match.group(1) + "/api/scans", timeout=30).json()["scans"]
        assert len(scans) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    err = proc.stderr.read()
    assert "random initialisation" in err and "Traceback" not in err


def test_serve_refuses_bad_stores_and_weights(built, tmp_path, capsys):
    from ctfm.cli import main

    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such store folder" in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "other"
    assert main(["models", "init", "ct-fm", "--seed", "5", "--out", str(other), "--init-filters", "4"]) == 0
    capsys.readouterr()
    assert main(["serve", str(built["store"]), "--weights", str(other)]) == 2
    err = capsys.readouterr().err
    assert "are not the store's" in err and len(err.strip().splitlines()) == 1
    assert main(["serve", str(built["store"]), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert main(["serve", str(built["store"]), "--max-upload-mb", "0"]) == 2
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        capsys.readouterr()
        assert (
            main(
                [
                    "serve",
                    str(built["store"]),
                    "--weights",
                    str(built["weights"]),
                    "--port",
                    str(taken.getsockname()[1]),
                ]
            )
            == 2
        )
        assert "already in use" in capsys.readouterr().err
        assert (
            main(["serve", str(built["store"]), "--host", "192.0.2.77", "--port", "0"]) == 2
        )  # not an address of this machine
        assert "cannot bind" in capsys.readouterr().err
    finally:
        taken.close()


def test_display_grids_keep_world_points_whatever_the_stored_orientation():
    import torch
    from monai.data import MetaTensor

    from ctfm.app.volumes import to_display

    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, size=(6, 5, 4)).astype(np.float32)
    lps = np.array([[-2.0, 0, 0, 10], [0, -1.5, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]])  # L, P, S axes in RAS mm
    permuted = np.array([[0, 0, 2.0, 1], [1.5, 0, 0, 2], [0, -3.0, 0, 3], [0, 0, 0, 1]])  # axes swapped and flipped
    for affine in (np.diag([2.0, 1.5, 3.0, 1.0]), lps, permuted):
        display = to_display(MetaTensor(torch.from_numpy(hu)[None], affine=torch.as_tensor(affine)))
        assert np.all(np.diag(display.affine)[:3] > 0) and np.allclose(
            display.affine[:3, :3], np.diag(np.diag(display.affine[:3, :3]))
        )
        for ijk in [(0, 0, 0), (5, 4, 3), (2, 3, 1)]:
            world = affine @ np.append(ijk, 1.0)
            shown = display.voxel_of(world[:3])
            assert display.hu[tuple(shown)] == hu[ijk]  # the same voxel at the same world point
        np.testing.assert_array_equal(display.reorient(hu), display.hu)


def test_without_the_weights_the_app_searches_stored_windows_and_refuses_uploads(built):
    with (
        InProcessServer(built["store"], device="cpu") as server,  # the store's weights are a file: not rebuilt
        server.client() as c,
    ):
        state = server.state
        info = c.get("/api/info").json()
        assert info["search"] == {"query": "stored", "refine": "weighted", "can_embed": False}
        sid = c.get("/api/scans").json()["scans"][0]["id"]
        point = state.vectors.centers_mm[np.flatnonzero(state.vectors.scan_id == sid)[0]].tolist()
        assert len(c.post("/api/search", json={"scan_id": sid, "point_mm": point, "k": 5}).json()["hits"]) == 2
        _error(c.post("/api/search", json={"scan_id": sid, "point_mm": point, "query": "centred"}), 400, "weights")
        _error(
            c.post("/api/scans", files={"file": ("a.nii", b"x" * 400, "application/octet-stream")}), 400, "--weights"
        )


def test_random_weights_are_named():
    from ctfm.app.state import weights_are_random

    assert "random initialisation (seed 3)" in weights_are_random(
        "ab" * 32, {"provenance": {"source": "random-init", "seed": 3}}
    )
    assert "randomly initialised encoder" in weights_are_random("state:" + "0" * 64, {})
    assert weights_are_random("ab" * 32, {"provenance": {"source": "converted"}}) is None


def test_display_volumes_are_kept_in_the_servers_folder(built, tmp_path):
    store = copy_store(built, tmp_path / "store")
    _, state = build_app(store, weights=str(built["weights"]), device="cpu")
    sid = state.order[0]
    first = np.asarray(state.volumes.get(sid).hu).copy()
    folder = store / "app-cache"
    assert len(list(folder.glob("*.json"))) == 1 and len(list(folder.glob("*.npy"))) == 1
    state.warm_up().join(timeout=120)
    assert len(list(folder.glob("*.json"))) == 3
    _, again = build_app(store, weights=str(built["weights"]), device="cpu")  # a restart reads the memory map
    volume = again.volumes.get(sid)
    assert isinstance(volume.hu, np.memmap)
    np.testing.assert_array_equal(np.asarray(volume.hu), first)
    np.testing.assert_allclose(volume.affine, state.volumes.get(sid).affine)


def test_errors_name_scans_by_id_not_by_the_servers_paths(client, built):
    sid = client.get("/api/scans").json()["scans"][0]["id"]
    corner = _world(client.get(f"/api/scans/{sid}").json(), (0, 0, 0))  # air, outside the cropped windows
    error = _error(
        client.post("/api/search", json={"scan_id": sid, "point_mm": corner, "k": 3}),
        400,
        f"scan {sid}",
        "outside every stored window",
    )
    assert str(built["root"]) not in error and ".nii" not in error


def test_the_display_folder_keeps_to_its_budget(built, tmp_path):
    store = copy_store(built, tmp_path / "store")
    _, state = build_app(
        store, weights=str(built["weights"]), device="cpu", display_cache_gb=1.5 * 48 * 40 * 30 * 2 / 2**30
    )
    state.warm_up().join(timeout=120)
    assert len(list((store / "app-cache").glob("*.npy"))) == 1  # room for one scan, not two
    assert state.volumes.get(state.order[2]).shape == (48, 40, 30)  # the others still open, from their sources


def test_scan_sizes_are_checked_against_the_voxel_limit_and_the_free_memory():
    from ctfm.app.uploads import WORKING_BYTES_PER_VOXEL, UploadRefused, check_scan_size

    voxels = 512 * 512 * 300
    check_scan_size("a.nii", "its header", voxels, voxels * 2, max_voxels=voxels, available=2**40)  # fits
    with pytest.raises(UploadRefused) as refused:
        check_scan_size("a.nii", "its header", voxels + 1, voxels * 2, max_voxels=voxels, available=2**40)
    assert refused.value.status == 413 and "--max-voxels" in str(refused.value)
    need = voxels * (2 + WORKING_BYTES_PER_VOXEL)
    with pytest.raises(UploadRefused) as refused:
        check_scan_size("a.nii", "its header", voxels, voxels * 2, max_voxels=10**12, available=need - 1)
    assert refused.value.status == 413 and "GiB of memory" in str(refused.value)
    check_scan_size("a.nii", "its header", voxels, voxels * 2, max_voxels=10**12, available=need)
