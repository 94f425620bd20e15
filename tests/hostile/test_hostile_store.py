"""Hostile cases of the embedding store: damaged Parquet files met by every verb, the repair that
quarantines them and lets `ctfm embed` restore the lost rows exactly, a run killed mid-write, and
writers meeting a full disk. One test per case; real faults only (bytes really truncated or
overwritten, a process really killed, writes really refused by the kernel).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile_stores import (
    copy_store,
    embed_argv,
    empty,
    foreign_table,
    garbage,
    index_files,
    pending_scan_id,
    rows_of,
    run_limited,
    store_file,
    tree_digest,
    truncate,
)

import ctfm
from ctfm.cli import main

# damage kind -> (file, how); the file's table is what a verb must read to meet the damage
STORE_DAMAGE = {
    "scans_truncated": ("scans", truncate),
    "scans_foreign_table": ("scans", foreign_table),
    "patches_zero_bytes": ("patches", empty),
    "failures_truncated": ("failures", truncate),
    "scans_part_garbage": ("scans_part", garbage),
    "patches_part_garbage": ("patches_part", garbage),
}
# verb -> the tables it reads (so the damage it meets); `store check` reports instead of failing
READS = {
    "store_info": {"scans", "patches", "failures"},
    "store_check": {"scans", "patches", "failures"},
    "embed": {"scans", "patches", "failures"},  # what is done (scans + windows), then the compaction
    "search": {"scans"},  # scan search: the scan vectors only
    "compact": {"scans", "patches", "failures"},
    "index_build": {"scans"},
    "index_status": {"scans", "patches"},  # the runs of both levels
    "index_check": {"scans", "patches"},
    "index_update": {"scans"},
}


def _argv(verb: str, store, hostile) -> list:
    if verb == "embed":
        return embed_argv(hostile, store)
    if verb == "search":
        return ["search", store, "--scan", Path(hostile["scans"][0]).as_posix(), "-k", "2"]
    if verb == "compact":
        return ["store", "compact", store]
    group, name = verb.split("_", 1)
    return [group, name, store]


@pytest.mark.parametrize("verb", [pytest.param(v, marks=pytest.mark.slow) if v == "embed" else v for v in READS])
@pytest.mark.parametrize("damage", STORE_DAMAGE)
def test_every_verb_meeting_a_damaged_store_file_says_one_line(damage, verb, hostile_store, tmp_path, run_cli):
    store = copy_store(hostile_store, tmp_path)
    which, how = STORE_DAMAGE[damage]
    path = store_file(store, which)
    how(path)
    before = tree_digest(store)
    result = run_cli(*_argv(verb, store, hostile_store))
    text = result.stdout + result.stderr
    assert "internal error" not in text and "Traceback" not in text, text
    if which.removesuffix("_part") not in READS[verb]:  # a verb that never reads the file works
        assert result.returncode == 0, text
        return
    if verb == "store_check":
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("problem: unreadable_file")]
        assert result.returncode == 1 and path.name in line and "ctfm store check --repair" in line
        assert "INCONSISTENT" in result.stdout
        return
    assert result.returncode == 2, text
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: damaged store file"), result.stderr
    assert f"ctfm store check {store}" in lines[0] and "--repair" in lines[0]
    assert tree_digest(store) == before, "a refused command changed the store"


# ---- repair: quarantine, then `ctfm embed` restores exactly the clean rows ----------------
def _damage_for_repair(kind: str, store) -> Path:
    if kind in ("scans", "patches", "failures", "scans_part", "patches_part"):
        path = store_file(store, kind)
        (truncate if kind in ("scans", "failures") else empty if kind == "patches" else garbage)(path)
        return path
    path = index_files(store)[kind.removeprefix("index_")]
    truncate(path)
    return path


REPAIR_KINDS = (
    "scans",
    "patches",
    "failures",
    "scans_part",
    "patches_part",
    "index_manifest",
    "index_faiss",
    "index_ids",
)


@pytest.mark.slow
@pytest.mark.parametrize("kind", REPAIR_KINDS)
def test_repair_quarantines_the_damaged_file_and_embed_restores_the_clean_rows(kind, hostile_store, tmp_path, run_cli):
    clean = rows_of(hostile_store["store"])
    store = copy_store(hostile_store, tmp_path)
    damaged = _damage_for_repair(kind, store)
    damaged_bytes = damaged.read_bytes()
    repaired = run_cli("store", "check", "--repair", "--json", store)
    assert "internal error" not in repaired.stderr, repaired.stderr
    report = json.loads(repaired.stdout)["repair"]
    moved = {m["file"]: m for m in report["moved"]}
    relative = str(damaged.relative_to(store))
    assert relative in moved and not damaged.exists()
    kept = store / moved[relative]["moved_to"]
    assert kept.read_bytes() == damaged_bytes  # moved, not rewritten
    note = json.loads((Path(report["quarantine"]) / "note.json").read_text())
    assert {m["file"] for m in note["moved"]} == set(moved) and moved[relative]["reason"]
    if kind == "patches":  # the windows of every scan but the one with a pending part were lost
        lost = {key[0] for key in clean["scans"]} - {pending_scan_id(hostile_store["store"])}
        assert {r["scan_id"] for r in report["recompute"]} == lost and len(lost) == 1
    # the advice: re-run `ctfm embed` on the same sources (the broken input fails again, as it did)
    result = run_cli(*embed_argv(hostile_store, store, broken=True))
    assert result.returncode == 1 and "internal error" not in result.stderr, result.stderr
    assert rows_of(store) == clean  # same keys, same vectors bit for bit, same windows, same failures
    check = run_cli("store", "check", store)
    assert check.returncode == 0, check.stdout + check.stderr
    # an index over re-embedded rows is stale (new write ids), never damaged; update brings it back
    assert "DAMAGED" not in run_cli("index", "status", store).stdout
    assert run_cli("index", "update", store).returncode == 0
    assert run_cli("index", "check", store).returncode == 0


@pytest.mark.slow
def test_deleting_a_damaged_patches_file_and_re_embedding_restores_every_window(hostile_store, tmp_path, run_cli):
    """The old advice (delete it, re-run embed) lost every window for good: the re-run skipped the
    scans. A scan missing windows is not done, so the re-run computes it again."""
    clean = rows_of(hostile_store["store"])
    store = copy_store(hostile_store, tmp_path)
    (store / "patches.parquet").unlink()
    short = ctfm.open_store(store).incomplete_scans().column("scan_id").to_pylist()
    assert set(short) == {key[0] for key in clean["scans"]} - {pending_scan_id(store)} and len(short) == 1
    assert run_cli(*embed_argv(hostile_store, store, broken=True)).returncode == 1
    assert rows_of(store) == clean


@pytest.mark.slow
def test_an_embed_killed_mid_run_leaves_a_readable_store_that_resume_completes(hostile_store, tmp_path, run_cli):
    """SIGKILL once the first scan's parts land: no damaged file, the finished scan kept; the
    re-run computes only the rest, and the store equals a clean run's; then a part of the killed
    run damaged by hand is quarantined and recomputed the same way."""
    clean = rows_of(hostile_store["store"])
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(Path(ctfm.__file__).parents[1]), "OMP_NUM_THREADS": str(_threads())}
    argv = [sys.executable, "-m", "ctfm", *map(str, embed_argv(hostile_store, store, broken=True))]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list((store / "parts").glob("*.scans.parquet")) and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    killed = tmp_path / "killed"
    shutil.copytree(store, killed)
    check = run_cli("store", "check", store)
    assert check.returncode == 0, check.stdout + check.stderr  # nothing half written under a final name
    assert len(ctfm.open_store(store).scans()) >= 1
    assert run_cli(*embed_argv(hostile_store, store, broken=True)).returncode == 1
    assert rows_of(store) == clean
    # the killed run's part, damaged: repaired, then recomputed
    part = sorted((killed / "parts").glob("*.scans.parquet"))[0]
    garbage(part)
    repaired = run_cli("store", "check", "--repair", "--json", killed)
    report = json.loads(repaired.stdout)["repair"]
    lost = part.name.removesuffix(".scans.parquet").rsplit("-", 3)[0]
    assert {"scan_id": lost, "source_path": None} in report["recompute"]  # its only row went with the part
    assert {m["file"] for m in report["moved"]} >= {f"parts/{part.name}"}
    assert run_cli(*embed_argv(hostile_store, killed, broken=True)).returncode == 1
    assert rows_of(killed) == clean


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ---- full disk: writers leave the old file and no temporary --------------------------------
def _temporaries(store: Path) -> list[str]:
    return [str(p.relative_to(store)) for p in store.rglob(".*") if p.name != ".lock"]


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["patches", "scans"])
def test_compaction_on_a_full_disk_keeps_the_old_files_and_every_part(failing, hostile_store, tmp_path):
    store = copy_store(hostile_store, tmp_path)
    sizes = {kind: (store / f"{kind}.parquet").stat().st_size for kind in ("patches", "scans")}
    assert sizes["patches"] < sizes["scans"]  # written in this order: a limit between fails the second
    limit = sizes["patches"] // 2 if failing == "patches" else (sizes["patches"] + sizes["scans"]) // 2
    rows, parts = rows_of(store), sorted(p.name for p in (store / "parts").iterdir())
    before = tree_digest(store)
    result = run_limited(limit, "sys.exit(main(['store', 'compact', sys.argv[2]]))", store)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {store / (failing + '.parquet')}: could not be written")
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (store / "parts").iterdir()) == parts and not _temporaries(store)
    if failing == "patches":
        assert tree_digest(store) == before
    assert rows_of(store) == rows  # readers see the same store
    assert main(["store", "compact", str(store)]) == 0 and rows_of(store) == rows  # and it compacts later


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["patches", "scans"])
def test_a_part_write_on_a_full_disk_leaves_no_part_and_no_temporary(failing, hostile_store, tmp_path):
    store = copy_store(hostile_store, tmp_path)
    (patch_part,) = (store / "parts").glob("*.patches.parquet")
    (scan_part,) = (store / "parts").glob("*.scans.parquet")
    assert patch_part.stat().st_size < scan_part.stat().st_size
    small, large = patch_part.stat().st_size, scan_part.stat().st_size
    limit = small // 2 if failing == "patches" else (small + large) // 2
    body = """
from ctfm.store import EmbeddingStore, StoreWriteError
s = EmbeddingStore(sys.argv[2])
row = s.scans().to_pylist()[0]
windows = [p for p in s.patches().to_pylist() if p["scan_id"] == row["scan_id"]]
own = ("patch_index", "center_mm", "start_voxel", "embedding")
try:
    s.add({k: v for k, v in row.items() if k != "write_id"}, [{k: p[k] for k in own} for p in windows])
except StoreWriteError as exc:
    print(exc)
    sys.exit(3)
"""
    before = tree_digest(store)
    result = run_limited(limit, body, store)
    assert result.returncode == 3, result.stdout + result.stderr
    assert f".{failing}.parquet: could not be written" in result.stdout
    assert tree_digest(store) == before and not _temporaries(store)  # the patch part did not stay behind


def _mount_tmpfs(folder: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]).returncode == 0


@pytest.mark.slow
def test_compaction_on_a_really_full_filesystem_keeps_the_old_files(hostile_store, tmp_path, run_cli):
    """A small tmpfs filled to the last byte (ENOSPC); skipped where tmpfs cannot be mounted (not root)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "2m"):
        pytest.skip("mounting a tmpfs needs root (the RLIMIT_FSIZE cases cover the same writers)")
    try:
        store = disk / "store"
        shutil.copytree(hostile_store["store"], store, symlinks=True)
        rows, before = rows_of(store), tree_digest(store)
        _fill(disk)
        result = run_cli("store", "compact", store)
        assert result.returncode == 2 and "could not be written (No space left on device)" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert tree_digest(store) == before and not _temporaries(store)
        assert rows_of(store) == rows
    finally:
        subprocess.run(["umount", str(disk)])


def _fill(disk: Path) -> None:
    """Write until the filesystem refuses (every page taken)."""
    with open(disk / "filler", "wb", buffering=0) as fh:  # unbuffered: the write itself fails
        try:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        except OSError:
            pass


def test_the_fault_injection_really_fails_writes(tmp_path):
    """The full-disk cases' own fault: a write past RLIMIT_FSIZE fails with EFBIG in the child."""
    body = """
f = open(sys.argv[2], "wb")
try:
    f.write(b"x" * 1000)
    f.close()
except OSError as exc:
    print(exc.errno)
"""
    result = run_limited(100, body, tmp_path / "f")
    assert result.stdout.strip() == str(errno.EFBIG), result.stdout + result.stderr
