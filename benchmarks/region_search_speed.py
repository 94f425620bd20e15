"""Region search over a store of S scans with W windows each: time to open, time per query.

What the browser app does per click when the query scan is in the store: a SearchSession opened
once (vectors read into memory), then ``search_point`` with the stored window at the point,
matched against every window of every scan, each hit refined (weighted centre). The store is
synthetic (random 512-d window vectors on a real window grid, CT-FM's preset and geometry), so
no model runs; the scan search through a flat FAISS index is timed alongside.

    python benchmarks/region_search_speed.py                 # 100 scans x 400 windows
    python benchmarks/region_search_speed.py --scans 1000
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np


def build_store(root, scans: int, grid: tuple[int, int, int], dim: int, seed: int = 0):
    """A compacted store (scans.parquet + patches.parquet in the store's schema), written in
    one go from numpy: the same files ``ctfm embed`` leaves after compaction."""
    import uuid
    from pathlib import Path

    import pyarrow as pa

    from ctfm.preprocess import get_preset
    from ctfm.runtime import write_parquet_atomic
    from ctfm.store import EmbeddingStore
    from ctfm.store.schema import conform, schemas

    spec = get_preset("ct-fm-patches")
    rng = np.random.default_rng(seed)
    key = {
        "mode": "patches",
        "model": "ct-fm",
        "weights_sha256": "0" * 64,
        "preset_hash": spec.content_hash(),
        "pool": "mean",
        "precision": "fp32",
        "overlap": 0.625,
    }
    stride = np.array([9, 48, 48])
    starts = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), -1).reshape(-1, 3) * stride
    centres = (starts + (np.array([24, 128, 128]) - 1) / 2.0)[:, ::-1] * np.array([1.0, 1.0, 3.0])  # L, P, S mm
    w = len(starts)
    vectors = np.abs(rng.normal(size=(scans * w, dim))).astype(np.float32)
    scan_ids = [f"{s:016x}" for s in range(scans)]
    write_ids = [uuid.uuid4().hex for _ in range(scans)]

    def lists(matrix, kind):
        return pa.ListArray.from_arrays(
            pa.array(np.arange(0, matrix.size + 1, matrix.shape[1], dtype=np.int32)), pa.array(matrix.ravel(), kind)
        )

    n = scans * w
    patch_cols = {k: pa.array([v] * n) for k, v in key.items()}
    patch_cols.update(
        scan_id=pa.array(np.repeat(scan_ids, w)),
        write_id=pa.array(np.repeat(write_ids, w)),
        patch_index=pa.array(np.tile(np.arange(w), scans), pa.int32()),
        center_mm=lists(np.tile(centres, (scans, 1)), pa.float64()),
        start_voxel=lists(np.tile(starts, (scans, 1)).astype(np.int32), pa.int32()),
        embedding=lists(vectors, pa.float32()),
    )
    scan_cols = {k: pa.array([v] * scans) for k, v in key.items()}
    scan_cols.update(
        scan_id=pa.array(scan_ids),
        write_id=pa.array(write_ids),
        source_path=pa.array([f"/archive/scan{s}.nii.gz" for s in range(scans)]),
        n_patches=pa.array([w] * scans, pa.int32()),
        preset=pa.array([spec.name] * scans),
        preprocess_spec=pa.array([spec.to_json(indent=None)] * scans),
        embedding=lists(vectors.reshape(scans, w, dim).mean(1), pa.float32()),
    )
    Path(root).mkdir(parents=True)
    write_parquet_atomic(conform(pa.table(patch_cols), schemas()["patches"]), Path(root) / "patches.parquet")
    write_parquet_atomic(conform(pa.table(scan_cols), schemas()["scans"]), Path(root) / "scans.parquet")
    return EmbeddingStore(root), centres


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=100)
    parser.add_argument(
        "--grid",
        default="10,6,7",
        help="windows per axis (S,P,L): 10x6x7 = 420, a 300x400x450 mm scan at overlap 0.625",
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    import faiss

    from ctfm.search import SearchSession
    from ctfm.store.index import build_index

    faiss.omp_set_num_threads(2)
    grid = tuple(int(v) for v in args.grid.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store, centres = build_store(f"{tmp}/store", args.scans, grid, args.dim)
        print(f"store: {args.scans} scans x {len(centres)} windows written in {time.perf_counter() - t0:.1f} s")
        build_index(store, "scan")
        t0 = time.perf_counter()
        session = SearchSession(store.root).preload()
        opened = time.perf_counter() - t0
        rng = np.random.default_rng(1)
        ids = list(session.patch_vectors.scans)
        times = []
        for _ in range(args.queries):
            scan = ids[rng.integers(len(ids))]
            point = centres[rng.integers(len(centres))] + rng.uniform(-5, 5, 3)
            t0 = time.perf_counter()
            hits = session.search_point(scan, point, k=10)
            times.append(time.perf_counter() - t0)
        scan_times = []
        for q in range(args.queries):
            t0 = time.perf_counter()
            session.search_scans(ids[q % len(ids)], k=10)
            scan_times.append(time.perf_counter() - t0)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(
            f"open + preload: {opened:.2f} s; region query (stored window, {args.scans * len(centres)} windows, k=10, "
            f"weighted): median {np.median(times) * 1000:.1f} ms, max {np.max(times) * 1000:.1f} ms; scan query (flat "
            f"index): median {np.median(scan_times) * 1000:.2f} ms; peak RSS {rss:.2f} GiB; {len(hits)} hits"
        )


if __name__ == "__main__":
    main()
