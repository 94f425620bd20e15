"""The app end to end in headless Chromium: load the page, choose a scan, click a point, read
the hits, select one and see its heatmap. The screenshot of that state is kept as an artefact."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ctfm.search", reason="the app searches with ctfm.search (region search)")
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser tests drive Chromium with Playwright (pip install playwright)"
)

from app_browser import CHANGED_PIXELS_JS, SNAPSHOT_JS, InProcessServer, artefact_dir, chromium_path, launch  # noqa: E402
from app_fixtures import copy_store  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_click_a_point_see_hits_and_the_heatmap(app_store, tmp_path):
    chromium_path()  # skip with the reason before starting anything
    store = copy_store(app_store, tmp_path / "store")  # the upload below adds a scan
    with (
        InProcessServer(store, weights=str(app_store["weights"]), device="cpu") as server,
        playwright_api.sync_playwright() as p,
    ):
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 980})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            assert "model ct-fm" in page.inner_text("#provenance") and "preset ct-fm-patches" in page.inner_text(
                "#provenance"
            )
            assert page.is_visible("#random-weights") and "random initialisation" in page.inner_text("#random-weights")
            items = page.locator("#scan-list li")
            assert items.count() == 3

            items.first.click()
            for axis in ("axial", "coronal", "sagittal"):
                page.wait_for_selector(f"#query-viewer .view[data-axis='{axis}'] canvas[data-drawn]", timeout=30_000)
            assert page.evaluate("window.ctfmTimings.firstSlice - window.ctfmTimings.scanChosen") > 0
            query_id = items.first.get_attribute("data-scan-id")

            page.click("#query-viewer .view[data-axis='axial'] canvas")  # the middle of the image
            page.wait_for_selector("#hit-list .hit", timeout=30_000)
            hits = page.locator("#hit-list .hit")
            assert hits.count() == 2  # the other two scans of the store
            ids = [hits.nth(i).get_attribute("data-scan-id") for i in range(2)]
            scores = [float(hits.nth(i).get_attribute("data-score")) for i in range(2)]
            assert query_id not in ids and len(set(ids)) == 2
            assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
            assert f"score {scores[0]:.3f}" in hits.first.inner_text()
            page.wait_for_selector("#hit-list .hit canvas[data-drawn='1']", timeout=30_000)
            assert "in" in page.inner_text("#search-time")

            hits.first.click()
            for axis in ("axial", "coronal", "sagittal"):
                page.wait_for_selector(
                    f"#match-viewer .view[data-axis='{axis}'] canvas[data-overlay='heatmap']", timeout=60_000
                )
            assert page.get_attribute("#match-viewer", "data-hit") == ids[0]
            assert ids[0] in page.get_attribute("#match-viewer .view[data-axis='axial'] canvas", "data-drawn")
            # The heatmap colours the match view: switching it off changes a large part of the image.
            axial = "#match-viewer .view[data-axis='axial'] canvas"
            page.evaluate(SNAPSHOT_JS, axial)
            page.uncheck("#show-heatmap")
            page.wait_for_selector(f"{axial}[data-overlay='none']", timeout=30_000)
            changed = page.evaluate(CHANGED_PIXELS_JS, axial)
            assert changed > 0.1, changed
            page.check("#show-heatmap")
            page.wait_for_selector(f"{axial}[data-overlay='heatmap']", timeout=30_000)

            shot = artefact_dir() / "app-search.png"
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
            assert shot.stat().st_size > 10_000

            # Switching the window redraws the slices; the scroll wheel moves through them.
            before = page.get_attribute("#match-viewer .view[data-axis='axial'] canvas", "data-drawn")
            page.hover("#match-viewer .view[data-axis='axial'] canvas")
            page.mouse.wheel(0, 100)
            page.wait_for_function(
                f"document.querySelector(\"#match-viewer .view[data-axis='axial'] canvas\").dataset.drawn !== '{before}'",
                timeout=30_000,
            )
            after_wheel = page.get_attribute("#match-viewer .view[data-axis='axial'] canvas", "data-drawn")
            page.keyboard.press("PageUp")
            page.wait_for_function(
                "document.querySelector(\"#match-viewer .view[data-axis='axial'] canvas\").dataset.drawn !== "
                f"'{after_wheel}'",
                timeout=30_000,
            )

            # The match becomes the query: a search from the crosshair in that scan.
            page.click("#search-from-match")
            page.wait_for_function(
                "document.querySelector('#hit-list .hit') && ![...document.querySelectorAll('#hit-list .hit')].some(h "
                f"=> h.dataset.scanId === '{ids[0]}')",
                timeout=30_000,
            )
            assert query_id in [
                page.locator("#hit-list .hit").nth(i).get_attribute("data-scan-id")
                for i in range(page.locator("#hit-list .hit").count())
            ]

            # Upload a NIfTI scan from the page: it is embedded, listed and chosen.
            from ctfm.synth import make_phantom, write_phantom

            upload, _ = write_phantom(
                make_phantom(11, shape=(40, 32, 24), spacing_mm=(3.0, 3.0, 3.0)), tmp_path / "up", stem="uploaded"
            )
            page.set_input_files("#upload-file", str(upload))
            page.click("#upload-button")
            try:
                page.wait_for_function("document.querySelectorAll('#scan-list li').length === 4", timeout=90_000)
            except playwright_api.TimeoutError:
                raise AssertionError(
                    f"upload not listed: {page.inner_text('#upload-status')} / {page.inner_text('#message')}"
                ) from None
            assert "added" in page.inner_text("#upload-status")
            page.wait_for_selector(
                "#scan-list li.active:has-text('40×32×24')", timeout=30_000
            )  # the new scan is chosen
            page.wait_for_selector("#query-viewer .view[data-axis='axial'] canvas[data-drawn]", timeout=30_000)
            assert not errors, errors
            assert all(u.startswith(server.url) for u in requests), [
                u for u in requests if not u.startswith(server.url)
            ]
        finally:
            browser.close()


def test_with_a_token_the_page_signs_in_once_and_searches(app_store):
    """A server that needs a token (as off loopback): the address with ?token= sets the cookie and leaves
    the address bar; the page's own requests (lists, slices, a search) then carry it."""
    chromium_path()
    token = "browser-test-token-0123456789abcdef"
    with (
        InProcessServer(app_store["store"], host="0.0.0.0", token=token, device="cpu") as server,
        playwright_api.sync_playwright() as p,
    ):
        browser = launch(p)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.url}/?token={token}")
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            assert page.url == f"{server.url}/" and token not in page.url
            assert page.locator("#scan-list li").count() == 3
            page.locator("#scan-list li").first.click()
            page.wait_for_selector("#query-viewer .view[data-axis='axial'] canvas[data-drawn]", timeout=30_000)
            page.click("#query-viewer .view[data-axis='axial'] canvas")
            page.wait_for_selector("#hit-list .hit", timeout=30_000)
            cookie = next(c for c in page.context.cookies() if c["name"] == f"ctfm-token-{server.port}")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert page.evaluate("document.cookie") == ""  # the page's scripts never see the token
            stranger = browser.new_context()  # a browser without the cookie gets nothing
            assert stranger.request.get(f"{server.url}/api/scans").status == 403
            stranger.close()
            assert not errors, errors
        finally:
            browser.close()
