"""Index at archive scale: N 512-d vectors, per-query latency and recall@10 against exact search.

Builds ctfm's indexes (``ctfm.store.index``: the same constructors, training and search path
as ``ctfm index build`` / ``VectorIndex.search``) over synthetic vectors and measures, per
setting: build time, index memory (peak RSS of the process), single-query latency (one query
at a time, as a user's search runs) and recall@10 against the exact (flat) answer.

The vectors: a mixture of ``--clusters`` Gaussian clusters in a 64-d latent space, mapped to
512-d by a fixed random linear map, plus isotropic noise, after a ReLU (as pooled CT-FM vectors
are non-negative), L2-normalised (cosine). Queries are fresh draws from the same distribution,
not stored vectors. Real embeddings are more structured than uniform noise and less than this
in places; the table says what was run.

    python benchmarks/index_scale.py --json out.json                  # 1,000,000 vectors: flat + the automatic choice
    python benchmarks/index_scale.py --n 100000 --json out.json       # smaller
    python benchmarks/index_scale.py --kinds flat,ivf,hnsw --hnsw-n 200000 --json out.json   # hand-set kinds

``--json`` writes a list, one entry per setting: ``kind``, ``n``, ``build_s``,
``ms_single_1t``, ``recall_at_10``, ``rss_gib`` (and the setting; ``"auto": true`` for the
automatic choice, built by ``ctfm.store.index.build_faiss``, the code of ``ctfm index build``,
with its build-time recall on held-out vectors as ``recall_at_build``), plus ``nproc``,
``load`` (1-minute load average before and after) and the settings of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import numpy as np


def rss_gib() -> float:
    """Peak resident memory of this process so far (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synthetic(n: int, dim: int, clusters: int, seed: int, rng_basis, separation: float = 1.0) -> np.ndarray:
    """[n, dim] float32 unit vectors (see the module docstring), in 100k blocks to bound memory.
    ``separation``: spread of the cluster centres relative to the clusters' own spread (1:
    overlapping clusters, hard for IVF; 3: well separated)."""
    latent_dim = 64
    centres = rng_basis.normal(size=(clusters, latent_dim)).astype(np.float32) * separation
    basis = rng_basis.normal(size=(latent_dim, dim)).astype(np.float32) / np.sqrt(latent_dim)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        which = rng.integers(0, clusters, hi - lo)
        z = centres[which] + rng.standard_normal((hi - lo, latent_dim), dtype=np.float32)
        x = z @ basis + 0.3 * rng.standard_normal((hi - lo, dim), dtype=np.float32)
        np.maximum(x, 0, out=x)
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
        out[lo:hi] = x
    return out


def latency(index, queries: np.ndarray, k: int, threads=(1, 2), **kw) -> tuple[dict, np.ndarray]:
    """ms per query: one query at a time with each thread count (``single_<t>t``), and the
    whole batch at once with the most threads (``batch``); and the rows found [Q, k]."""
    import faiss

    out = {}
    rows = np.empty((len(queries), k), dtype=np.int64)
    for t in threads:
        faiss.omp_set_num_threads(t)
        index.search(queries[:1], k, **kw)  # warm-up
        start = time.perf_counter()
        for i in range(len(queries)):
            _, r = index.search(queries[i : i + 1], k, **kw)
            rows[i] = r[0]
        out[f"ms_single_{t}t"] = round((time.perf_counter() - start) * 1000 / len(queries), 2)
    start = time.perf_counter()
    index.search(queries, k, **kw)
    out["ms_batch"] = round((time.perf_counter() - start) * 1000 / len(queries), 3)
    return out, rows


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def as_vector_index(faiss_index, params):
    from ctfm.store.index import VectorIndex

    manifest = {"level": "scan", "key": {}, "params": params.to_dict(), "covered": []}
    return VectorIndex(faiss_index, manifest, ids={})


def write_store(root, vectors: np.ndarray) -> None:
    """A compacted store of one whole-scan run, one scan row per vector (``s<i>``), written as
    one Parquet file (rows of an earlier call keep their write ids: a grown store)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctfm.store.schema import schemas

    n, dim = vectors.shape
    (root / "parts").mkdir(parents=True, exist_ok=True)
    schema = schemas()["scans"]
    columns = {
        "scan_id": pa.array([f"s{i:08d}" for i in range(n)]),
        "mode": pa.array(["whole"] * n),
        "model": pa.array(["ct-fm"] * n),
        "weights_sha256": pa.array(["w" * 64] * n),
        "preset_hash": pa.array(["p" * 64] * n),
        "pool": pa.array(["avg"] * n),
        "precision": pa.array(["fp32"] * n),
        "overlap": pa.array(np.zeros(n, np.float32)),
        "write_id": pa.array([f"{i:032x}" for i in range(n)]),
        "embedding": pa.ListArray.from_arrays(
            pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), vectors.ravel()
        ),
    }
    table = pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema)
    pq.write_table(table, root / "scans.parquet", row_group_size=65_536)


def timed_cli(*argv) -> tuple[float, float]:
    """``python -m ctfm ARGV`` in a child: (wall seconds, the child's peak RSS in GiB)."""
    import subprocess
    import sys

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ctfm", *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def store_update(args) -> list[dict]:
    """End to end through the CLI: ``ctfm index build`` (automatic choice) over a store of
    ``--n`` vectors, then ``--update`` more scans and ``ctfm index update``: both timed."""
    import tempfile
    from pathlib import Path

    data = synthetic(args.n + args.update, args.dim, args.clusters, 0, np.random.default_rng(1234), args.separation)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        write_store(root, data[: args.n])
        build_s, build_rss = timed_cli("index", "build", str(root))
        manifest = json.loads(next((root / "index").glob("scan-*.json")).read_text())
        write_store(root, data)
        update_s, update_rss = timed_cli("index", "update", str(root))
        updated = json.loads(next((root / "index").glob("scan-*.json")).read_text())
    return [
        {
            "kind": manifest["params"]["kind"],
            "auto": manifest["auto"],
            "n": args.n,
            "cli_build_s": round(build_s, 1),
            "build_seconds_manifest": manifest["build_seconds"],
            "recall_at_build": manifest["recall_at_10"],
            "index_bytes": manifest["index_bytes"],
            "update_rows": args.update,
            "cli_update_s": round(update_s, 1),
            "update_seconds_manifest": updated["update_seconds"],
            "update_over_build": round(update_s / build_s, 4),
            "children_peak_rss_gib": round(max(build_rss, update_rss), 2),
        }
    ]


def main() -> None:
    import faiss

    from ctfm.store.index import AUTO, IndexParams, build_faiss, new_faiss_index, train_and_add

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument(
        "--separation",
        type=float,
        default=1.0,
        help="cluster centre spread / cluster spread (1: overlapping, 3: separated)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", default="8,16,32,64")
    parser.add_argument(
        "--kinds",
        default="flat,auto",
        help="which indexes to build: flat, auto, ivf, hnsw (flat is always the ground truth)",
    )
    parser.add_argument("--ivf-codec", default="flat", help="ivf list codec: flat, sq8, pq<M>")
    parser.add_argument(
        "--refine", default="0", help="ivf: re-ranking factors to try (search-time; >0 keeps the full vectors)"
    )
    parser.add_argument(
        "--hnsw-n", type=int, default=100_000, help="vectors for the HNSW run (its build is the slow one; 0 skips it)"
    )
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--ef-search", default="32,64,128")
    parser.add_argument(
        "--update", type=int, default=10_000, help="auto: then add this many fresh vectors (no retraining), timed"
    )
    parser.add_argument("--out", "--json", dest="out", default=None, help="write the results as a JSON list here")
    parser.add_argument(
        "--store-update",
        action="store_true",
        help="instead: end to end through the CLI, `ctfm index build` on a store of --n vectors, then "
        "`ctfm index update` after --update more scans",
    )
    args = parser.parse_args()
    if args.store_update:
        load_before = os.getloadavg()[0]
        runs = store_update(args)
        settings = {"nproc": os.cpu_count(), "load": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
        runs = [{**r, **{f"run_{k}": v for k, v in settings.items()}} for r in runs]
        print(runs, flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(runs, fh, indent=1)
        return

    faiss.omp_set_num_threads(args.threads)  # builds use all of them; latency() sweeps 1..threads
    k = 10
    rng_basis = np.random.default_rng(1234)
    t0 = time.perf_counter()
    data = synthetic(args.n, args.dim, args.clusters, seed=0, rng_basis=rng_basis, separation=args.separation)
    queries = synthetic(
        args.queries, args.dim, args.clusters, seed=1, rng_basis=np.random.default_rng(1234), separation=args.separation
    )
    print(f"data: {args.n} x {args.dim} in {time.perf_counter() - t0:.1f} s, rss {rss_gib():.2f} GiB", flush=True)
    load_before = os.getloadavg()[0]
    results = {
        "nproc": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "clusters": args.clusters,
        "separation": args.separation,
        "faiss": faiss.__version__,
        "runs": [],
    }

    flat_params = IndexParams(kind="flat", metric="cosine")
    t0 = time.perf_counter()
    flat = new_faiss_index(args.dim, flat_params, args.n)
    train_and_add(flat, data, flat_params)
    flat_build = time.perf_counter() - t0
    exact = as_vector_index(flat, flat_params)
    _, truth = exact.search(queries, k)  # batched exact answer
    kinds = set(args.kinds.split(","))
    if "flat" in kinds:
        ms, _ = latency(exact, queries[:5], k, threads=(1,))
        results["runs"].append(
            {
                "kind": "flat",
                "n": args.n,
                "build_s": round(flat_build, 1),
                **ms,
                "recall_at_10": 1.0,
                "rss_gib": round(rss_gib(), 2),
            }
        )
        print(results["runs"][-1], flush=True)
    del flat, exact

    if "auto" in kinds:
        faiss.omp_set_num_threads(args.threads)
        t0 = time.perf_counter()
        index, params, order, facts = build_faiss(data, IndexParams(kind=AUTO, metric="cosine"))
        auto_build = time.perf_counter() - t0
        wrapped = as_vector_index(index, params)
        ms, found = latency(wrapped, queries, k)
        results["runs"].append(
            {
                "kind": params.kind,
                "auto": True,
                "n": args.n,
                **{key: v for key, v in params.to_dict().items() if key not in ("kind", "metric", "seed")},
                "build_s": round(auto_build, 1),
                "build_s_without_recall": round(facts["build_seconds"], 1),
                **ms,
                "recall_at_10": round(recall_at(order[np.maximum(found, 0)], truth), 4),
                "recall_at_build": facts["recall_at_10"],
                "index_mib": round(faiss.serialize_index(index).nbytes / 2**20, 1),
                "rss_gib": round(rss_gib(), 2),
            }
        )
        if args.update:
            extra = synthetic(
                args.update,
                args.dim,
                args.clusters,
                seed=2,
                rng_basis=np.random.default_rng(1234),
                separation=args.separation,
            )
            faiss.omp_set_num_threads(args.threads)
            t0 = time.perf_counter()
            train_and_add(index, extra, params, prepared=False)  # what ctfm index update does to the index
            results["runs"][-1]["update_rows"] = args.update
            results["runs"][-1]["update_add_s"] = round(time.perf_counter() - t0, 2)
        print(results["runs"][-1], flush=True)
        del index, wrapped

    if "ivf" in kinds:
        faiss.omp_set_num_threads(args.threads)
        refines = [int(v) for v in args.refine.split(",")]
        ivf_params = IndexParams(
            kind="ivf", metric="cosine", nlist=args.nlist, codec=args.ivf_codec, refine=max(refines)
        )
        t0 = time.perf_counter()
        ivf = new_faiss_index(args.dim, ivf_params, args.n)
        train_and_add(ivf, data, ivf_params)
        ivf_build = time.perf_counter() - t0
        wrapped = as_vector_index(ivf, ivf_params)
        for refine in refines:
            for nprobe in [int(v) for v in args.nprobe.split(",")]:
                ms, found = latency(wrapped, queries, k, nprobe=nprobe, **({"refine": refine} if refine else {}))
                results["runs"].append(
                    {
                        "kind": "ivf",
                        "codec": args.ivf_codec,
                        "refine": refine,
                        "n": args.n,
                        "nlist": args.nlist,
                        "nprobe": nprobe,
                        "train_size": 64 * args.nlist,
                        "build_s": round(ivf_build, 1),
                        **ms,
                        "recall_at_10": round(recall_at(found, truth), 4),
                        "rss_gib": round(rss_gib(), 2),
                    }
                )
                print(results["runs"][-1], flush=True)
        del ivf, wrapped

    if args.hnsw_n and "hnsw" in kinds:
        n = min(args.hnsw_n, args.n)
        sub = data[:n]
        sub_truth = truth
        if n < args.n:
            sub_flat = new_faiss_index(args.dim, flat_params, n)
            train_and_add(sub_flat, sub, flat_params)
            _, sub_truth = as_vector_index(sub_flat, flat_params).search(queries, k)
            del sub_flat
        hnsw_params = IndexParams(kind="hnsw", metric="cosine", m=args.hnsw_m)
        t0 = time.perf_counter()
        faiss.omp_set_num_threads(args.threads)
        hnsw = new_faiss_index(args.dim, hnsw_params, n)
        train_and_add(hnsw, sub, hnsw_params)
        hnsw_build = time.perf_counter() - t0
        wrapped = as_vector_index(hnsw, hnsw_params)
        for ef in [int(v) for v in args.ef_search.split(",")]:
            ms, found = latency(wrapped, queries, k, ef_search=ef)
            results["runs"].append(
                {
                    "kind": "hnsw",
                    "n": n,
                    "m": args.hnsw_m,
                    "ef_construction": hnsw_params.ef_construction,
                    "ef_search": ef,
                    "build_s": round(hnsw_build, 1),
                    **ms,
                    "recall_at_10": round(recall_at(found, sub_truth), 4),
                    "rss_gib": round(rss_gib(), 2),
                }
            )
            print(results["runs"][-1], flush=True)
    results["load"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print({k: v for k, v in results.items() if k != "runs"}, flush=True)
    if args.out:
        settings = {k: v for k, v in results.items() if k != "runs"}
        with open(args.out, "w") as fh:
            json.dump(
                [{**run, **{f"run_{k}": v for k, v in settings.items()}} for run in results["runs"]], fh, indent=1
            )


if __name__ == "__main__":
    main()
