"""Small stores for the app's tests: synthetic phantoms embedded with a narrow random CT-FM."""

from __future__ import annotations

import shutil
from pathlib import Path

PHANTOM_SHAPE = (48, 40, 30)  # voxels at 3 mm: 144 x 120 x 90 mm, a few windows per scan
PHANTOM_SPACING = (3.0, 3.0, 3.0)
OVERLAP = 0.5


def build_store(root: Path, tiny_weights: Path, n_scans: int = 3) -> dict:
    """Phantoms ``p0..`` under ``root/scans``, a copy of the random tiny weights folder (init_filters 4,
    64-d vectors) at ``root/weights`` (every path the server knows lies under ``root``) and a
    patches-mode store ``root/store``; returns their paths."""
    import ctfm
    from ctfm.synth import make_phantom, write_phantom

    weights = Path(shutil.copytree(tiny_weights, root / "weights"))
    scans = [
        write_phantom(
            make_phantom(seed, shape=PHANTOM_SHAPE, spacing_mm=PHANTOM_SPACING), root / "scans", stem=f"p{seed}"
        )[0]
        for seed in range(n_scans)
    ]
    store = root / "store"
    run = ctfm.embed(
        [str(p) for p in scans],
        weights=str(weights),
        mode="patches",
        overlap=OVERLAP,
        out=str(store),
        device="cpu",
        return_records=False,
    )
    assert run.totals.done == n_scans and not run.totals.failed, run.totals.failed
    return {"root": root, "scans": scans, "weights": weights, "store": store}


def copy_store(built: dict, target: Path) -> Path:
    """A private copy of a built store, without what a server wrote there (for tests that add scans)."""
    shutil.copytree(built["store"], target, ignore=shutil.ignore_patterns("app-cache", "app-uploads"))
    return target
