"""How fast the app answers, measured in the browser (headless Chromium through Playwright).

Builds a store of N synthetic phantoms with precomputed patch embeddings (``ctfm embed --mode
patches``, a narrow random CT-FM so that building it takes minutes, not hours), starts
``ctfm serve`` on it, and for each trial, in the page: chooses a scan not seen before (its
volume is read from disk: by default after the server has converted every scan for display,
which it does in the background at start; ``--cold`` measures at once), waits for the first slice; clicks a point, waits for the hit list
and then for its thumbnails; selects the first hit and waits for its heatmap views. The times
are the page's own ``performance.now()`` marks (``window.ctfmTimings``).

Targets: click to results <= 1 s, first slice <= 1 s after choosing a scan.

    python benchmarks/app_speed.py --n 100 --trials 10            # full size (store build: minutes)
    python benchmarks/app_speed.py --n 100 --store /tmp/s --keep  # keep the store for a re-run
    python benchmarks/app_speed.py --store /tmp/s --reuse         # measure an existing store
    python benchmarks/app_speed.py --store /tmp/s --reuse --real ../shared/data/abdomen_dicom/dicom
                                      # add real CTs to the store and time them too

Needs Debian's chromium and the playwright package (no browser download).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "app"))  # app_browser (server, browser)


def build(root: Path, n: int, init_filters: int) -> dict:
    import ctfm
    from ctfm.cli import main
    from ctfm.synth import make_phantom, write_phantom

    scans = [
        write_phantom(
            make_phantom(seed, shape=(48, 40, 30), spacing_mm=(3.0, 3.0, 3.0)), root / "scans", stem=f"p{seed:03d}"
        )[0]
        for seed in range(n)
    ]
    weights = root / "weights"
    if not weights.exists():
        assert (
            main(["models", "init", "ct-fm", "--seed", "0", "--out", str(weights), "--init-filters", str(init_filters)])
            == 0
        )
    start = time.perf_counter()
    run = ctfm.embed(
        [str(p) for p in scans],
        weights=str(weights),
        mode="patches",
        overlap=0.5,
        out=str(root / "store"),
        device="cpu",
        progress=True,
        return_records=False,
    )
    print(
        f"store: {run.totals.done} embedded, {run.totals.skipped} already there, {len(run.totals.failed)} failed, "
        f"{time.perf_counter() - start:.0f} s",
        flush=True,
    )
    return {"store": root / "store", "weights": weights}


def add_real(built: dict, paths: list[str]) -> list[str]:
    """Embed real CTs into the store the same way (same weights, overlap); their scan ids."""
    import ctfm

    run = ctfm.embed(
        paths,
        weights=str(built["weights"]),
        mode="patches",
        overlap=0.5,
        out=str(built["store"]),
        device="cpu",
        progress=True,
    )
    print(
        f"real scans: {run.totals.done} embedded, {run.totals.skipped} already there, {len(run.totals.failed)} failed",
        flush=True,
    )
    return [r["scan_id"] for r in run]


def measure(store: Path, weights: Path, trials: int, query: str, real_ids: list[str] = (), warm: bool = True) -> dict:
    from app_browser import Server, launch
    from playwright.sync_api import sync_playwright

    rows = []
    with Server(store, "--weights", str(weights), "--query", query) as server, sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1500, "height": 980})
        page.goto(server.url)
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        n_scans = page.locator("#scan-list li").count()
        if warm:  # let the server's background conversion of the scans for display finish first
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                cache = page.evaluate("fetch('/api/info').then(r => r.json()).then(i => i.display_cache)")
                if cache["converted"] >= cache["scans"]:
                    break
                time.sleep(1)
            print(f"display cache: {cache}", flush=True)
        step = max(1, n_scans // max(trials, 1))
        chosen = [f"#scan-list li[data-scan-id='{sid}']" for sid in real_ids]
        chosen += [None] * trials
        for t, selector in enumerate(chosen):
            item = page.locator(selector) if selector else page.locator("#scan-list li").nth((t * step + 1) % n_scans)
            item.scroll_into_view_if_needed()
            item.click()
            page.wait_for_function("window.ctfmTimings.firstSlice !== undefined", timeout=60_000)
            page.wait_for_selector("#query-viewer .view[data-axis='sagittal'] canvas[data-drawn]", timeout=60_000)
            page.evaluate("document.querySelectorAll('#hit-list .hit').forEach(e => e.remove())")
            page.click("#query-viewer .view[data-axis='axial'] canvas")
            page.wait_for_function("window.ctfmTimings.thumbnailsShown !== undefined", timeout=120_000)
            page.locator("#hit-list .hit").first.click()
            page.wait_for_function("window.ctfmTimings.hitShown !== undefined", timeout=120_000)
            page.wait_for_selector(
                "#match-viewer .view[data-axis='sagittal'] canvas[data-overlay='heatmap']", timeout=120_000
            )
            timing = page.evaluate("window.ctfmTimings")
            rows.append(
                {
                    "scan": "real" if selector else "phantom",
                    "shape": page.locator("#scan-list li.active .meta").inner_text().split(" ")[0],
                    "first_slice_ms": timing["firstSlice"] - timing["scanChosen"],
                    "click_to_hits_ms": timing["hitsShown"] - timing["clicked"],
                    "click_to_thumbnails_ms": timing["thumbnailsShown"] - timing["clicked"],
                    "hit_with_heatmap_ms": timing["hitShown"] - timing["thumbnailsShown"],
                    "hits": page.locator("#hit-list .hit").count(),
                }
            )
            print(
                json.dumps(
                    {"query": query, **{k: round(v, 1) if isinstance(v, float) else v for k, v in rows[-1].items()}}
                ),
                flush=True,
            )
        browser.close()
    summary = {"query": query, "scans": n_scans, "display_cache": "converted before" if warm else "as found"}
    for kind in ("phantom", "real"):
        picked = [r for r in rows if r["scan"] == kind]
        if not picked:
            continue
        part = summary.setdefault(kind, {"trials": len(picked)})
        for key in ("first_slice_ms", "click_to_hits_ms", "click_to_thumbnails_ms", "hit_with_heatmap_ms"):
            values = [r[key] for r in picked]
            part[key] = {"median": round(statistics.median(values), 1), "max": round(max(values), 1)}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="scans in the store (default 100)")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument(
        "--store", type=Path, help="folder for the phantoms, weights and store (default: a temporary folder)"
    )
    parser.add_argument("--reuse", action="store_true", help="measure the store already in --store")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--init-filters",
        type=int,
        default=4,
        help="width of the random CT-FM the store is embedded with (default 4: 64-d vectors)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="measure at once, without waiting for the server to convert the scans for display",
    )
    parser.add_argument(
        "--real", nargs="*", default=[], help="real CT files or DICOM folders to add to the store and time as well"
    )
    parser.add_argument("--query", nargs="+", default=["stored", "centred"], choices=["stored", "centred"])
    args = parser.parse_args()
    root = args.store or Path(tempfile.mkdtemp(prefix="ctfm-app-speed-"))
    try:
        built = (
            {"store": root / "store", "weights": root / "weights"}
            if args.reuse
            else build(root, args.n, args.init_filters)
        )
        real_ids = add_real(built, args.real) if args.real else []
        results = [
            measure(built["store"], built["weights"], args.trials, q, real_ids, warm=not args.cold) for q in args.query
        ]
        print(json.dumps(results, indent=2))
    finally:
        if args.store is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
