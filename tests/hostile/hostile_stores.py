"""The clean store the hostile cases damage, and the damage: real bytes on a real disk.

Damage is done to the files themselves (truncated, emptied, overwritten with garbage, replaced
by a table of another shape, deleted); nothing is mocked. ``tree_digest`` fingerprints every file
of a store so that a test can show a refused command wrote nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import ctfm
from ctfm.cli import main
from ctfm.store import SCAN_KEY, EmbeddingStore
from ctfm.synth import make_phantom, write_phantom

EMBED_OPTIONS = ("--mode", "patches", "--device", "cpu", "--no-progress")


def build_hostile_store(root: Path, weights: Path) -> dict:
    scans = [
        write_phantom(
            make_phantom(seed, shape=(40, 32, 24), spacing_mm=(3.0, 3.0, 3.0)), root / "scans", stem=f"p{seed}"
        )[0]
        for seed in range(2)
    ]
    broken = root / "scans" / "broken.nii.gz"
    broken.write_bytes(b"not a NIfTI file")
    store = root / "store"
    argv = ["embed", *map(str, scans), str(broken), "--weights", str(weights), "--out", str(store), *EMBED_OPTIONS]
    assert main(argv) == 1  # the broken input is recorded as a failure
    writer = EmbeddingStore(store)
    first = writer.scans().to_pylist()[0]
    patches = [p for p in writer.patches().to_pylist() if p["scan_id"] == first["scan_id"]]
    own = ("patch_index", "center_mm", "start_voxel", "embedding")
    writer.add({k: v for k, v in first.items() if k != "write_id"}, [{k: p[k] for k in own} for p in patches])
    assert main(["index", "build", str(store)]) == 0
    return {"store": store, "scans": scans, "broken": broken, "weights": weights}


def copy_store(hostile: dict, tmp_path: Path) -> Path:
    target = tmp_path / "store"
    shutil.copytree(hostile["store"], target, symlinks=True)
    return target


def embed_argv(hostile: dict, store: Path, broken: bool = False) -> list[str]:
    """``ctfm embed`` of the two phantoms (and of the unreadable input with ``broken``) into ``store``."""
    inputs = [*map(str, hostile["scans"]), *([str(hostile["broken"])] if broken else [])]
    return ["embed", *inputs, "--weights", str(hostile["weights"]), "--out", str(store), *EMBED_OPTIONS]


def pending_scan_id(store: Path) -> str:
    """The scan id of the store's pending part pair (its name starts with it)."""
    (part,) = (Path(store) / "parts").glob("*.scans.parquet")
    return part.name.split("-", 1)[0]


# ---- damage ---------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    """Keep the first half of the file (a write cut short)."""
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garbage(path: Path) -> None:
    """The same number of bytes, all random (a sector overwritten)."""
    size = max(path.stat().st_size, 64)
    path.write_bytes(np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes())


def foreign_table(path: Path) -> None:
    """A readable Parquet file of another shape (a vector column of text)."""
    pq.write_table(pa.table({"scan_id": ["x"], "embedding": ["not a vector"]}), path)


def store_file(store: Path, which: str) -> Path:
    """``scans``/``patches``/``failures`` (the main files) or ``scans_part``/``patches_part``."""
    if which.endswith("_part"):
        kind = which.removesuffix("_part")
        (path,) = sorted((store / "parts").glob(f"*.{kind}.parquet"))
        return path
    return store / f"{which}.parquet"


def index_files(store: Path) -> dict:
    """``manifest``, ``faiss``, ``ids`` of the store's one index."""
    folder = store / "index"
    (manifest,) = sorted(folder.glob("*.json"))
    (faiss,) = sorted(folder.glob("*.faiss"))
    (ids,) = sorted(folder.glob("*.ids.parquet"))
    return {"manifest": manifest, "faiss": faiss, "ids": ids}


def tree_digest(root: Path) -> dict:
    """``{relative path: sha256 or link target}`` of every file under ``root`` but the lock."""
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if name == ".lock":
                continue
            rel = str(path.relative_to(root))
            found[rel] = (
                f"-> {os.readlink(path)}" if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
            )
    return found


def rows_of(store: Path) -> dict:
    """What a store holds, write ids and times aside: scan vectors and windows by key (bytes, so
    that equality is bit for bit) and the failures by source and error."""
    s = EmbeddingStore(store)
    scans = {
        tuple(r[k] for k in SCAN_KEY): (
            r["source_path"],
            r["n_patches"],
            np.asarray(r["embedding"], np.float32).tobytes(),
        )
        for r in s.scans().to_pylist()
    }
    patches = {
        (*(r[k] for k in SCAN_KEY), r["patch_index"]): (
            tuple(r["center_mm"]),
            tuple(r["start_voxel"]),
            np.asarray(r["embedding"], np.float32).tobytes(),
        )
        for r in s.patches().to_pylist()
    }
    failures = sorted({(r["source_path"], r["error"]) for r in s.failures().to_pylist()})
    return {"scans": scans, "patches": patches, "failures": failures}


# ---- a full disk, for one process: RLIMIT_FSIZE ---------------------------------------------
LIMITED = """
import resource, signal, sys
from ctfm.cli import build_parser, main
import ctfm.store.index, faiss, pyarrow.parquet  # everything imported before the limit
build_parser()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
{body}
"""


def run_limited(limit: int, body: str, *args) -> subprocess.CompletedProcess:
    """``body`` (Python; ``sys.argv[2:]`` are ``args``) in a fresh interpreter whose files may grow
    to ``limit`` bytes (RLIMIT_FSIZE): every write past it really fails in the kernel."""
    env = {**os.environ, "PYTHONPATH": str(Path(ctfm.__file__).parents[1]), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", LIMITED.format(body=body), str(limit), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
