"""In the browser: a point clicked in a scan and searched in that same scan is marked where it
was clicked (the app's search is ctfm.search's, the stored window's offset carried to the hit)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser tests drive Chromium with Playwright (pip install playwright)"
)

from app_browser import InProcessServer, chromium_path, launch  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _cursor(page, viewer: str, scan_id: str) -> list[int]:
    """The viewer's cursor (display voxel) as its three views have drawn it."""
    index = {}
    for axis in ("sagittal", "coronal", "axial"):
        canvas = f"#{viewer} .view[data-axis='{axis}'] canvas"
        page.wait_for_selector(f"{canvas}[data-drawn^='{scan_id}:']", timeout=30_000)
        index[axis] = int(page.get_attribute(canvas, "data-drawn").rsplit(":", 1)[1])
    return [index["sagittal"], index["coronal"], index["axial"]]


def test_a_click_searched_in_its_own_scan_is_marked_at_the_clicked_spot(app_store):
    chromium_path()
    with InProcessServer(app_store["store"]) as server, playwright_api.sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 980})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            item = page.locator("#scan-list li").first
            item.click()
            scan_id = item.get_attribute("data-scan-id")
            page.wait_for_selector(f"#query-viewer .view[data-axis='axial'] canvas[data-drawn^='{scan_id}:']")
            page.select_option("#target", scan_id)
            # Off the middle (where a window centre may lie): a third across, two thirds down.
            canvas = page.locator("#query-viewer .view[data-axis='axial'] canvas")
            box = canvas.bounding_box()
            page.mouse.click(box["x"] + box["width"] * 0.36, box["y"] + box["height"] * 0.62)
            page.wait_for_selector("#hit-list .hit", timeout=30_000)
            hits = page.locator("#hit-list .hit")
            assert hits.count() == 1 and hits.first.get_attribute("data-scan-id") == scan_id
            clicked = _cursor(page, "query-viewer", scan_id)
            hits.first.click()
            page.wait_for_selector(f"#match-viewer[data-hit='{scan_id}']", timeout=30_000)
            marked = _cursor(page, "match-viewer", scan_id)
            assert marked == clicked, (marked, clicked, page.inner_text("#hit-list"))
            assert page.inner_text("#match-viewer .point") == page.inner_text("#query-viewer .point")
            assert not errors, errors
        finally:
            browser.close()
