"""Hostile requests to `ctfm serve`, one test per case: other sites (DNS rebinding, cross-site forms and
fetches), no token off loopback, decompression bombs, oversized bodies, a search that would hold
the server, leaks of paths and tracebacks, bad options.

Every case talks to a real server (uvicorn on 127.0.0.1 at a free port; a `ctfm serve` process
where its console or its memory is the point) with forged headers over http.client or raw sockets.
Every answer is checked for CORS headers: the app sends none, ever.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("ctfm.search", reason="the app searches with ctfm.search (region search)")

from app_fixtures import InProcessServer, Server, build_store, copy_store  # noqa: E402

EVIL = "evil.example"
TOKEN = "hostile-test-token-0123456789abcdef"


# ---- helpers ---------------------------------------------------------------------------------
class Reply:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    @property
    def error(self) -> str:
        body = self.json()
        assert set(body) == {"error"}, body
        return body["error"]


def ask(port: int, method: str, path: str, headers: dict | None = None, body: bytes | None = None) -> Reply:
    """One request with exactly these headers (Host defaults to the server's own address)."""
    headers = {"Host": f"127.0.0.1:{port}", **(headers or {})}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None and "Content-Length" not in headers:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()
    cors = [k for k in reply.headers if k.startswith("access-control-")]
    assert not cors, f"{method} {path} answered with CORS headers {cors}"
    return reply


def refused(reply: Reply, status: int, *words: str) -> str:
    assert reply.status == status, (reply.status, reply.body[:300])
    message = reply.error
    assert "\n" not in message and "Traceback" not in message and len(message) <= 700, message
    for word in words:
        assert word in message, message
    return message


def multipart(filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "ctfmhostileboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def upload(port: int, filename: str, data: bytes, headers: dict | None = None) -> Reply:
    body, kind = multipart(filename, data)
    return ask(port, "POST", "/api/scans", {"Content-Type": kind, **(headers or {})}, body)


def search_body(scan_id: str, point, **extra) -> bytes:
    return json.dumps({"scan_id": scan_id, "point_mm": point, "k": 3, **extra}).encode()


def vm_kib(pid: int, field: str) -> int:
    """A field of /proc/PID/status in KiB (VmRSS: resident now; VmHWM: the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def nifti_bomb(shape=(1024, 1024, 1024), data_bytes: int = 4096) -> bytes:
    """A gzip of a NIfTI header claiming ``shape`` int16 voxels, followed by a little data only."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_zooms((1.0, 1.0, 1.0))
    raw = header.binaryblock + b"\0" * 4 + b"\0" * data_bytes  # 348 + extension flag, then data
    return gzip.compress(raw)


def fingerprint(store: Path) -> list[str]:
    """What an upload would change: the store's files and the uploads folder."""
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and "app-cache" not in p.parts)


# ---- servers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(app_store, tmp_path_factory):
    """``ctfm serve`` (a process: its memory and console are observed) over a private copy of the store."""
    store = copy_store(app_store, tmp_path_factory.mktemp("hostile") / "store")
    server = Server(store, "--weights", str(app_store["weights"]))
    try:
        server.store = store
        server.scans = json.loads(ask(server.port, "GET", "/api/scans").body)["scans"]
        yield server
    finally:
        server.console = server.stop()


@pytest.fixture(scope="module")
def point(served):
    """A point inside the first scan (its centre), and that scan's id."""
    sid = served.scans[0]["id"]
    detail = json.loads(ask(served.port, "GET", f"/api/scans/{sid}").body)["display"]
    centre = (np.asarray(detail["shape"]) - 1) / 2.0
    return sid, (np.asarray(detail["affine"]) @ np.append(centre, 1.0))[:3].round(1).tolist()


# ---- other origins ----------------------------------------------------------------------------
def test_dns_rebinding_host_is_refused(served, point):
    sid, where = point
    evil = {"Host": f"{EVIL}:{served.port}"}
    for method, path, body in [
        ("GET", "/api/scans", None),
        ("GET", f"/api/scans/{sid}/slice?axis=axial&index=3", None),
        ("POST", "/api/search", search_body(sid, where)),
        ("GET", "/", None),
        ("GET", "/openapi.json", None),
    ]:
        headers = {**evil, "Content-Type": "application/json"} if body else evil
        refused(ask(served.port, method, path, headers, body), 403, "Host", "not this server's")


def test_host_at_another_port_or_malformed_is_refused(served):
    refused(ask(served.port, "GET", "/api/scans", {"Host": "localhost:1"}), 403, "Host")
    refused(ask(served.port, "GET", "/api/scans", {"Host": f"127.0.0.1.{EVIL}:{served.port}"}), 403, "Host")
    refused(ask(served.port, "GET", "/api/scans", {"Host": "user@127.0.0.1"}), 400, "Host")


def test_repeated_host_or_origin_headers_are_refused(served):
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    try:
        conn.putrequest("POST", "/api/search", skip_host=True, skip_accept_encoding=True)
        for name, value in [
            ("Host", f"127.0.0.1:{served.port}"),
            ("Origin", f"http://{EVIL}"),
            ("Origin", f"http://127.0.0.1:{served.port}"),  # the last one is the server's own
            ("Content-Type", "application/json"),
            ("Content-Length", "2"),
        ]:
            conn.putheader(name, value)
        conn.endheaders(b"{}")
        response = conn.getresponse()
        assert response.status == 400 and b"repeats its origin header" in response.read()
    finally:
        conn.close()


def test_local_names_at_the_bound_port_are_served(served):
    for host in (f"127.0.0.1:{served.port}", f"localhost:{served.port}", f"[::1]:{served.port}"):
        reply = ask(served.port, "GET", "/api/scans", {"Host": host})
        assert reply.status == 200 and len(reply.json()["scans"]) == 3, host


def test_cross_site_upload_writes_nothing(served, app_store):
    before = fingerprint(served.store)
    data = Path(app_store["scans"][0]).read_bytes()  # a good scan: only the origin is wrong
    for headers in (
        {"Origin": f"http://{EVIL}"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Referer": f"http://{EVIL}/upload.html"},
        {"Origin": f"http://127.0.0.1:{served.port + 1}"},  # another local app is another site
    ):
        refused(upload(served.port, "scan.nii.gz", data, headers), 403, "cross-site")
    assert fingerprint(served.store) == before
    assert len(json.loads(ask(served.port, "GET", "/api/scans").body)["scans"]) == 3


def test_cross_site_search_and_heatmap_are_refused(served, point):
    sid, where = point
    for headers in ({"Origin": f"http://{EVIL}"}, {"Sec-Fetch-Site": "same-site"}, {"Referer": f"https://{EVIL}/"}):
        refused(
            ask(
                served.port,
                "POST",
                "/api/search",
                {"Content-Type": "application/json", **headers},
                search_body(sid, where),
            ),
            403,
            "cross-site",
        )
        x, y, z = where
        heatmap = f"/api/scans/{sid}/heatmap?query_scan={sid}&x={x}&y={y}&z={z}&axis=axial&index=3"
        refused(ask(served.port, "GET", heatmap, headers), 403, "cross-site")  # an <img> of another site


def test_the_apps_own_page_is_served(served, point):
    sid, where = point
    own = {"Origin": f"http://127.0.0.1:{served.port}", "Sec-Fetch-Site": "same-origin"}
    reply = ask(
        served.port, "POST", "/api/search", {"Content-Type": "application/json", **own}, search_body(sid, where)
    )
    assert reply.status == 200 and reply.json()["hits"], reply.body[:300]
    page = ask(served.port, "GET", "/", {"Sec-Fetch-Site": "cross-site"})  # a link from elsewhere opens the page
    assert page.status == 200 and b"<html" in page.body.lower()
    assert (
        page.headers["x-frame-options"] == "DENY"
        and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    )


def test_no_cors_headers_even_on_preflight(served):
    for origin in (f"http://{EVIL}", f"http://127.0.0.1:{served.port}"):
        for path in ("/api/search", "/api/scans"):
            reply = ask(
                served.port,
                "OPTIONS",
                path,
                {
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type",
                },
            )
            assert reply.status in (403, 405), reply.status  # ask() asserts there is no Access-Control-Allow-*
    assert ask(served.port, "GET", "/api/info", {"Origin": f"http://127.0.0.1:{served.port}"}).status == 200


# ---- the token, off loopback ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokened(app_store):
    """The app with the policy of a server bound to all interfaces (a token), listening on 127.0.0.1."""
    with InProcessServer(app_store["store"], host="0.0.0.0", token=TOKEN, device="cpu") as server:
        yield server


def test_off_loopback_every_api_call_needs_the_token(tokened):
    port = tokened.port
    refused(ask(port, "GET", "/api/scans"), 403, "token")
    refused(ask(port, "GET", "/api/scans", {"Authorization": "token " + TOKEN[:-1] + "x"}), 403, "token")
    refused(
        ask(port, "GET", "/api/scans", {"Authorization": "token " + TOKEN + "\u00e9".encode().decode("latin-1")}), 403
    )
    refused(ask(port, "GET", f"/api/scans?token={TOKEN}"), 403, "token")  # never in an API address (logs, history)
    refused(ask(port, "GET", "/openapi.json"), 403, "token")
    refused(ask(port, "GET", "/api/scans", {"Cookie": f"ctfm-token-{port + 1}={TOKEN}"}), 403)  # another server's
    for good in ({"Authorization": f"token {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}"}):
        assert ask(port, "GET", "/api/scans", good).status == 200
    assert ask(port, "GET", "/").status == 200  # the page's own files hold no data
    assert ask(port, "GET", "/static/app.js").status == 200


def test_the_page_trades_the_token_in_its_address_for_a_strict_cookie(tokened):
    port = tokened.port
    refused(ask(port, "GET", "/?token=wrong-token-0123456789"), 403, "token")
    reply = ask(port, "GET", f"/?token={TOKEN}")
    assert reply.status == 303 and reply.headers["location"] == "/"  # the token leaves the address bar
    cookie = reply.headers["set-cookie"]
    assert cookie.startswith(f"ctfm-token-{port}={TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    jar = cookie.split(";")[0]
    assert ask(port, "GET", "/api/scans", {"Cookie": f"other=1; {jar}"}).status == 200
    # The cookie does not stand in for the Origin check.
    refused(
        ask(
            port,
            "POST",
            "/api/search",
            {"Cookie": jar, "Origin": f"http://{EVIL}", "Content-Type": "application/json"},
            b"{}",
        ),
        403,
        "cross-site",
    )


@pytest.mark.slow
def test_a_server_on_all_interfaces_never_logs_its_token(app_store, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server = Server(app_store["store"], "--host", "0.0.0.0", "--token-file", str(token_file))
    try:
        assert TOKEN not in server.banner and "token of" in server.banner  # read from the file: not printed
        refused(ask(server.port, "GET", "/api/scans", {"Authorization": "token nottheone-0123456789"}), 403)
        refused(ask(server.port, "GET", "/api/scans", {"Host": f"{EVIL}:{server.port}"}), 403)
        good = {"Authorization": f"token {TOKEN}"}
        assert ask(server.port, "GET", "/api/scans", good).status == 200
        refused(ask(server.port, "GET", "/api/scans/nope", good), 404)
        assert ask(server.port, "GET", f"/?token={TOKEN}").status == 303
    finally:
        console = server.stop()
    assert "refused" in console  # the refusals were logged, one line each, without the token
    assert TOKEN not in console and "Traceback" not in console
    generated = Server(app_store["store"], "--host", "0.0.0.0")
    try:
        assert generated.token and len(generated.token) >= 40  # secrets.token_urlsafe(32), in the printed address
        assert ask(generated.port, "GET", "/api/scans", {"Authorization": f"token {generated.token}"}).status == 200
        refused(ask(generated.port, "GET", "/api/scans"), 403, "token")
    finally:
        assert generated.token not in generated.stop()


# ---- sizes ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_nifti_decompression_bomb_is_refused_from_its_header(served):
    bomb = nifti_bomb((1024, 1024, 1024))
    assert len(bomb) < 16 * 1024  # a few KiB that claim 2 GiB of voxels
    before = fingerprint(served.store)
    rss, peak = vm_kib(served.pid, "VmRSS"), vm_kib(served.pid, "VmHWM")
    message = refused(upload(served.port, "bomb.nii.gz", bomb), 413, "1,073,741,824 voxels", "--max-voxels")
    rss_after, peak_after = vm_kib(served.pid, "VmRSS"), vm_kib(served.pid, "VmHWM")
    print(
        f"\nbomb: RSS {rss / 1024:.1f} -> {rss_after / 1024:.1f} MiB, peak {peak / 1024:.1f} -> {peak_after / 1024:.1f} MiB"
    )
    assert rss_after - rss < 64 * 1024 and peak_after - peak < 64 * 1024, (rss, rss_after, peak, peak_after)
    assert "bomb.nii.gz" in message and fingerprint(served.store) == before


@pytest.mark.slow
def test_a_nifti_that_holds_less_than_its_header_says_is_refused(served):
    rss = vm_kib(served.pid, "VmRSS")
    refused(upload(served.port, "short.nii.gz", nifti_bomb((256, 256, 256))), 400, "truncated")  # 32 MiB claimed
    refused(upload(served.port, "short.nii", gzip.decompress(nifti_bomb((256, 256, 256)))), 400, "truncated")
    assert vm_kib(served.pid, "VmRSS") - rss < 64 * 1024


@pytest.mark.slow
def test_a_zipped_dicom_bomb_is_refused_from_its_headers(served, tmp_path):
    import pydicom

    from dicom_factory import write_series

    files = write_series(tmp_path / "series", [(0.0, 0.0, 3.0 * k) for k in range(3)])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for i, path in enumerate(files):
            ds = pydicom.dcmread(path)
            ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000  # the pixel data stays 240 bytes
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
            archive.writestr(f"series/{i}.dcm", out.getvalue())
    rss = vm_kib(served.pid, "VmRSS")
    refused(upload(served.port, "bomb.zip", buffer.getvalue()), 413, "DICOM headers", "--max-voxels")
    assert vm_kib(served.pid, "VmRSS") - rss < 64 * 1024


@pytest.mark.slow
def test_a_zip_of_many_empty_files_is_refused_before_its_directory_is_read(served):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(25_000):  # 25,000 directory entries: parsed, each costs the server memory
            archive.writestr(f"{i}", b"")
    assert len(buffer.getvalue()) < 3 * 2**20
    before = fingerprint(served.store)
    refused(upload(served.port, "many.zip", buffer.getvalue()), 413, "25,000 files", "20,000")
    assert fingerprint(served.store) == before


def test_a_huge_json_body_is_refused_by_its_length(served):
    with socket.create_connection(("127.0.0.1", served.port), timeout=20) as sock:
        sock.sendall(
            f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {100 * 2**20}\r\n\r\n".encode()
            + b'{"scan_id": "'
            + b"a" * 65536
        )
        answer = sock.recv(65536).decode("latin-1")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert "limit of 64 KiB" in answer and "aaaaaaaaaa" not in answer


def test_a_chunked_body_is_counted_as_it_arrives(served):
    with socket.create_connection(("127.0.0.1", served.port), timeout=20) as sock:
        sock.sendall(
            f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = b"a" * 32768
        try:
            for _ in range(8):  # 256 KiB, past the 64 KiB limit
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: what it said is read below
        answer = sock.recv(65536).decode("latin-1")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]


def test_long_inputs_are_echoed_200_characters_at_most(served):
    long_id = "x" * 50_000
    message = refused(
        ask(served.port, "POST", "/api/search", {"Content-Type": "application/json"}, search_body(long_id, [0, 0, 0])),
        404,
        "(50000 characters)",
    )
    assert message.count("x") <= 210
    message = refused(ask(served.port, "GET", "/api/scans/" + "y" * 8000), 404, "(8000 characters)")
    assert message.count("y") <= 210
    extra = json.dumps({"scan_id": "a", "point_mm": [0, 0, 0], "z" * 30_000: 1}).encode()
    message = refused(ask(served.port, "POST", "/api/search", {"Content-Type": "application/json"}, extra), 422)
    assert message.count("z") <= 210
    named = refused(upload(served.port, "n" * 1000 + ".txt", b"hello"), 415)
    assert named.count("n") <= 230


# ---- time -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_server(app_store):
    with InProcessServer(app_store["store"], weights=str(app_store["weights"]), device="cpu", search_seconds=20) as s:
        yield s


def _centre_of(server, sid):
    vectors = server.state.vectors
    return vectors.centers_mm[np.flatnonzero(vectors.scan_id == sid)[0]].tolist()


@pytest.mark.slow
def test_a_long_search_does_not_block_short_requests(slow_server):
    port, state = slow_server.port, slow_server.state
    sid = state.order[0]
    where = _centre_of(slow_server, sid)
    state.volumes.get(state.order[1])  # the slice below is not a disk read
    fine: dict = {}

    def long_search():
        start = time.monotonic()
        reply = ask(
            port,
            "POST",
            "/api/search",
            {"Content-Type": "application/json"},
            search_body(sid, where, refine="fine", k=10),
        )
        fine.update(status=reply.status, seconds=time.monotonic() - start)

    thread = threading.Thread(target=long_search)
    thread.start()
    time.sleep(2.0)  # the fine refinement is running (it takes past its 20 s budget with this encoder)
    timings = []
    for path in ("/api/scans", f"/api/scans/{state.order[1]}/slice?axis=axial&index=10", "/api/info"):
        for _ in range(3):
            start = time.monotonic()
            assert ask(port, "GET", path).status == 200
            timings.append(time.monotonic() - start)
    start = time.monotonic()  # a search over the stored vectors does not wait for the encoder either
    quick = ask(
        port, "POST", "/api/search", {"Content-Type": "application/json"}, search_body(sid, where, refine="weighted")
    )
    timings.append(time.monotonic() - start)
    still_running = thread.is_alive()
    thread.join(timeout=120)
    print(
        f"\nduring a fine search ({fine}): short requests took at most {max(timings):.3f} s (median {np.median(timings):.3f} s)"
    )
    assert quick.status == 200 and still_running
    assert max(timings) < 2.5, timings


@pytest.mark.slow
def test_a_fine_refinement_keeps_to_its_time_budget(app_store):
    with InProcessServer(app_store["store"], weights=str(app_store["weights"]), device="cpu", search_seconds=1) as s:
        sid = s.state.order[0]
        start = time.monotonic()
        reply = ask(
            s.port,
            "POST",
            "/api/search",
            {"Content-Type": "application/json"},
            search_body(sid, _centre_of(s, sid), refine="fine"),
        )
        seconds = time.monotonic() - start
    refused(reply, 503, "time budget of 1 s", "--search-seconds")
    assert seconds < 10, seconds


# ---- leaks ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_moved_source_leaks_no_server_path(tiny_weights, tmp_path):
    built = build_store(tmp_path / "moved", tiny_weights, n_scans=2)
    moved = built["scans"][0]
    replies = []
    with InProcessServer(built["store"], weights=str(built["weights"]), device="cpu") as server:
        sid = next(s for s, row in server.state.rows.items() if row["source_path"] == str(moved))
        other = next(s for s in server.state.order if s != sid)
        x, y, z = where = _centre_of(server, sid)
        assert ask(server.port, "GET", f"/api/scans/{sid}").status == 200  # shown once: its display grid is kept
        shutil.move(moved, tmp_path / "elsewhere.nii.gz")
        replies += [  # the encoder's own reads of the source: a centred query, a heatmap over it
            ask(
                server.port,
                "POST",
                "/api/search",
                {"Content-Type": "application/json"},
                search_body(sid, where, query="centred"),
            ),
            ask(server.port, "GET", f"/api/scans/{sid}/heatmap?query_scan={other}&x={x}&y={y}&z={z}"),
        ]
    shutil.rmtree(built["store"] / "app-cache")
    with InProcessServer(built["store"], weights=str(built["weights"]), device="cpu") as server:
        replies += [  # a restarted server without the display grid: the viewer's reads
            ask(server.port, "GET", f"/api/scans/{sid}"),
            ask(server.port, "GET", f"/api/scans/{sid}/slice?axis=axial&index=3"),
        ]
    for reply in replies:
        message = refused(reply, 400, f"scan {sid}", "cannot be read")
        assert str(tmp_path) not in message and "moved/scans" not in message and ".nii" not in message, message


@pytest.mark.slow
@pytest.mark.parametrize("debug", [False, True], ids=["console", "debug"])
def test_an_internal_error_is_one_line_in_the_reply_and_on_the_console(app_store, tmp_path, debug):
    store = copy_store(app_store, tmp_path / "store")
    (store / "app-uploads").write_text("a file where the uploads folder goes")  # the server cannot write uploads
    server = Server(store, "--weights", str(app_store["weights"]), *(["--debug"] if debug else []))
    try:
        message = refused(
            upload(server.port, "scan.nii.gz", Path(app_store["scans"][0]).read_bytes()), 500, "internal error"
        )
    finally:
        console = server.stop()
    assert "FileExistsError" in message and str(tmp_path) not in message and "app-uploads" not in message
    errors = [line for line in console.splitlines() if line.startswith("ctfm serve: ERROR")]
    assert len(errors) == 1 and "FileExistsError" in errors[0], console
    assert ("Traceback (most recent call last)" in console) is debug, console


# ---- options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--max-upload-mb", "inf"], "--max-upload-mb inf"),
        (["--max-upload-mb", "nan"], "--max-upload-mb nan"),
        (["--max-upload-mb", "-5"], "--max-upload-mb -5"),
        (["--max-upload-mb", "0"], "--max-upload-mb 0"),
        (["--display-cache-gb", "inf"], "--display-cache-gb inf"),
        (["--display-cache-gb", "-1"], "--display-cache-gb -1"),
        (["--search-seconds", "0"], "--search-seconds 0"),
        (["--search-seconds", "inf"], "--search-seconds inf"),
        (["--max-voxels", "0"], "--max-voxels 0"),
        (["--host", ""], "--host ''"),
        (["--port", "-1"], "--port -1"),
        (["--token-file", "/nonexistent/token"], "--token-file"),
        (["--allow-host", "evil example"], "--allow-host"),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) else None,
)
def test_bad_serve_options_are_one_line_and_exit_2(run_cli, app_store, option, words):
    code, out, err = run_cli("serve", app_store["store"], *option)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (code, err)
    assert words in err and "Traceback" not in err


def test_a_short_token_file_is_refused(run_cli, app_store, tmp_path):
    (tmp_path / "token").write_text("tinysecret\n")
    code, _, err = run_cli("serve", app_store["store"], "--host", "0.0.0.0", "--token-file", tmp_path / "token")
    assert code == 2 and "at least 16 characters" in err and "tinysecret" not in err
