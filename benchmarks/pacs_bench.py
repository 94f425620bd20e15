"""PACS sources, sends and the listening node against a local Orthanc, on the real STS_019 CT series.

Measures, in one process on one machine:

- retrieval: the series from Orthanc into an empty series cache, DICOMweb (WADO-RS) and DIMSE
  (C-GET), MB/s of instance files written;
- embedding: ``ctfm.embed`` of the series from disk against the same series from Orthanc (cold
  cache: retrieval included; warm cache), whole mode, full-size CT-FM architecture with random
  weights (seed 0; ``--init-filters`` narrows it), fp32, each the median of ``--repeats`` runs;
- the node: ``ctfm listen --embed`` receiving ``--node-series`` copies of the series (new UIDs) from
  dcmtk's storescu, series per minute from the first instance sent to the last series logged
  (``--idle`` 1 s included per series).

    python benchmarks/pacs_bench.py [--data ../shared/data] [--repeats 3] [--node-series 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import ctfm  # noqa: E402
from ctfm.io.pacs import PacsOptions, fetch_series, use_options  # noqa: E402
from ctfm.io.sources import discover_inputs  # noqa: E402
from pacs_server import PASSWORD, USER, Orthanc, free_port  # noqa: E402

SERIES = "sarcoma_ct/STS_019/dicom/image"


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.dcm")) / 1e6


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def copies(files, out: Path, n: int) -> list[list[Path]]:
    import pydicom

    series = []
    for k in range(n):
        folder = out / f"copy{k}"
        folder.mkdir(parents=True)
        uid = pydicom.uid.generate_uid()
        paths = []
        for path in files:
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            paths.append(folder / path.name)
            ds.save_as(paths[-1])
        series.append(paths)
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--node-series", type=int, default=3)
    parser.add_argument(
        "--init-filters", type=int, default=32, help="encoder width (32: CT-FM's; smaller for a loaded machine)"
    )
    args = parser.parse_args()
    disk = Path(args.data) / SERIES
    files = sorted(disk.glob("*.dcm"))
    work = Path(tempfile.mkdtemp(prefix="ctfm-pacs-bench-"))
    weights = work / "weights"
    subprocess.run(
        [sys.executable, "-m", "ctfm", "models", "init", "ct-fm", "--seed", "0", "--out", str(weights)]
        + ["--init-filters", str(args.init_filters)],
        check=True,
    )
    encoder = ctfm.create_model("ct-fm", weights=str(weights))
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {load}; encoder init_filters {args.init_filters}"
    )
    pacs = Orthanc(work / "orthanc").start()
    try:
        pacs.upload(files)
        # retrieval
        for scheme in ("dicomweb", "dimse"):
            rates = []
            for r in range(args.repeats):
                options = PacsOptions(user=USER, password=PASSWORD, cache_dir=work / f"cache-{scheme}-{r}")
                with use_options(options):
                    (source,) = discover_inputs([getattr(pacs, scheme)])
                    seconds, folder = timed(lambda s=source, o=options: fetch_series(s.path, o))
                rates.append((seconds, folder_mb(folder)))
            s = statistics.median(t for t, _ in rates)
            mb = rates[0][1]
            print(f"retrieval {scheme}: {mb:.2f} MB, 47 instances, median {s:.3f} s, {mb / s:.1f} MB/s")
        # embedding: disk vs PACS
        ctfm.embed([str(disk)], encoder=encoder, model="ct-fm")  # warm-up
        disk_s = statistics.median(
            timed(lambda: ctfm.embed([str(disk)], encoder=encoder, model="ct-fm"))[0] for _ in range(args.repeats)
        )
        cold, warm = [], []
        for r in range(args.repeats):
            options = PacsOptions(user=USER, password=PASSWORD, cache_dir=work / f"embed-cache-{r}")
            with use_options(options):
                cold.append(timed(lambda: ctfm.embed([pacs.dicomweb], encoder=encoder, model="ct-fm"))[0])
                warm.append(timed(lambda: ctfm.embed([pacs.dicomweb], encoder=encoder, model="ct-fm"))[0])
        cold_s, warm_s = statistics.median(cold), statistics.median(warm)
        print(
            f"embed whole: disk {disk_s:.2f} s; PACS cold cache {cold_s:.2f} s ({100 * (cold_s / disk_s - 1):+.1f} %); "
            f"PACS warm cache {warm_s:.2f} s ({100 * (warm_s / disk_s - 1):+.1f} %)"
        )
        # the node
        port, spool = free_port(), work / "spool"
        node = subprocess.Popen(
            [sys.executable, "-m", "ctfm", "listen", "--port", str(port), "--spool", str(spool), "--embed",
             str(work / "node-store"), "--weights", str(weights), "--idle", "1", "--max-series", str(args.node_series)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        while "listening as" not in node.stdout.readline():
            pass
        series = copies(files, work / "copies", args.node_series)
        t0 = time.perf_counter()
        for paths in series:
            subprocess.run(["storescu", "-aec", "CTFM", "127.0.0.1", str(port), *map(str, paths)], check=True)
        out, _ = node.communicate(timeout=3600)
        total = time.perf_counter() - t0
        print(f"load after: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
        print(out.strip().splitlines()[-1])
        print(
            f"node: {args.node_series} series x 47 instances in {total:.1f} s, {60 * args.node_series / total:.2f} series/min"
        )
    finally:
        pacs.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
