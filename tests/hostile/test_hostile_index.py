"""Hostile cases of the FAISS index beside a store: manifests that reach outside the store, and
damaged manifests, FAISS and ids files met by every verb. One test per case.

A manifest may name only files of its own index inside STORE/index/: anything else is refused
in one line, and the file it names is neither opened nor deleted by any verb. A damaged index is
one line naming the file and pointing to `ctfm index check`; search falls back to exact search
with a one-line warning and gives the exact results; `ctfm index build` replaces it.
"""

from __future__ import annotations

import json
import os

import pytest
from hostile_stores import copy_store, embed_argv, index_files, tree_digest

VERBS = (
    "store_info",
    "store_check",
    "embed",
    "search",
    "compact",
    "index_build",
    "index_status",
    "index_check",
    "index_update",
)


def _scan_id(store) -> str:
    from ctfm.store import open_store

    return open_store(store).scans().column("scan_id")[0].as_py()


def _argv(verb: str, store, hostile) -> list:
    if verb == "embed":
        return embed_argv(hostile, store)
    if verb == "search":
        return ["search", store, "--scan", _scan_id(store), "-k", "3", "--json"]
    if verb == "compact":
        return ["store", "compact", store]
    if verb == "store_repair":
        return ["store", "check", "--repair", store]
    group, name = verb.split("_", 1)
    return [group, name, store]


# ---- manifests that reach outside the store -----------------------------------------------
def _escape(kind: str, store, victim):
    """Point the manifest's faiss_file at ``victim`` (a file outside the store) the ``kind`` way."""
    files = index_files(store)
    manifest = json.loads(files["manifest"].read_text())
    prefix = files["manifest"].name.removesuffix(".json")
    if kind == "absolute":
        manifest["faiss_file"] = str(victim)
    elif kind == "dotdot":
        manifest["faiss_file"] = os.path.relpath(victim, files["manifest"].parent)
    elif kind == "dotdot_with_prefix":  # starts like the index's own files, then climbs out
        manifest["faiss_file"] = f"{prefix}.x/../../../{victim.name}"
    elif kind == "symlink":  # a plain name of the index's own shape, a link out of the store
        link = files["manifest"].parent / f"{prefix}.0123456789ab.faiss"
        link.symlink_to(victim)
        manifest["faiss_file"] = link.name
    elif kind == "ids_absolute":
        manifest["ids_file"] = str(victim)
    elif kind == "manifest_symlink":  # the manifest itself a link to a file outside
        files["manifest"].unlink()
        files["manifest"].symlink_to(victim)
        return
    elif kind == "index_dir_symlink":  # STORE/index/ itself a link out of the store
        outside = victim.parent / "elsewhere"
        os.replace(files["manifest"].parent, outside)
        files["manifest"].parent.symlink_to(outside)
        return
    files["manifest"].write_text(json.dumps(manifest))


ESCAPES = (
    "absolute",
    "dotdot",
    "dotdot_with_prefix",
    "symlink",
    "ids_absolute",
    "manifest_symlink",
    "index_dir_symlink",
)


@pytest.mark.parametrize("kind", ESCAPES)
def test_a_manifest_naming_a_file_outside_the_store_is_refused_and_the_file_survives(
    kind, hostile_store, tmp_path, run_cli
):
    store = copy_store(hostile_store, tmp_path)
    victim = tmp_path / "victim.faiss"
    victim.write_bytes(b"the user's own file")
    _escape(kind, store, victim)
    outside = sorted(p.name for p in tmp_path.iterdir() if p.name != "store")
    verbs = ("index_status", "index_check", "search", "index_update", "index_build", "store_check", "store_repair")
    for verb in verbs:
        result = run_cli(*_argv(verb, store, hostile_store))
        assert "internal error" not in result.stderr and "Traceback" not in result.stderr, (verb, result.stderr)
        assert victim.read_bytes() == b"the user's own file", f"{verb} touched the file outside the store"
        if verb in ("index_status", "index_check"):
            lines = [line for line in result.stdout.splitlines() if "DAMAGED" in line]
            assert len(lines) == 1 and "refused" in lines[0], (verb, result.stdout)
        if verb == "search":
            warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
            assert len(warnings) == 1 and "searching the store exactly instead" in warnings[0], result.stderr
        if verb in ("index_build", "index_update"):
            if kind == "index_dir_symlink":  # nothing is written through a link out of the store
                assert result.returncode == 2 and result.stderr.startswith("error: ") and "outside" in result.stderr
                assert len(result.stderr.strip().splitlines()) == 1
            else:
                assert result.returncode == 0, result.stderr
    # nothing was added outside the store either (the index/ link's target is the only thing there)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "store") == outside
    if kind != "index_dir_symlink":
        assert run_cli("index", "check", store).returncode == 0  # the build replaced the hostile manifest
    assert victim.read_bytes() == b"the user's own file"


def test_a_manifest_naming_another_index_file_is_refused(hostile_store, tmp_path, run_cli):
    """A manifest naming the files of another index of the same store (which `index build` would
    delete as superseded) is refused too: a manifest names only its own files."""
    store = copy_store(hostile_store, tmp_path)
    assert run_cli("index", "build", store, "--level", "patch").returncode == 0
    by_level = {json.loads(p.read_text())["level"]: p for p in (store / "index").glob("*.json")}
    scan = json.loads(by_level["scan"].read_text())
    patch = json.loads(by_level["patch"].read_text())
    scan["faiss_file"] = patch["faiss_file"]
    by_level["scan"].write_text(json.dumps(scan))
    other = store / "index" / patch["faiss_file"]
    before = other.read_bytes()
    status = run_cli("index", "status", store)
    assert status.returncode == 0 and "is not a file of this index" in status.stdout
    assert run_cli("index", "build", store).returncode == 0
    assert other.read_bytes() == before
    assert run_cli("index", "check", store).returncode == 0  # both indexes sound


# ---- damaged index files × verbs ----------------------------------------------------------
def _damage(kind: str, store) -> str | None:
    """Damage the index the ``kind`` way; the name of the file the messages must name (None:
    nothing damaged to name)."""
    from hostile_stores import empty, garbage, truncate

    files = index_files(store)
    if kind == "manifest_not_json":
        truncate(files["manifest"])
        return files["manifest"].name
    if kind == "manifest_not_a_manifest":
        files["manifest"].write_text(json.dumps({"format": 1, "level": "scan"}))
        return files["manifest"].name
    if kind == "manifest_missing":  # the build's files without their manifest: no index, nothing damaged
        files["manifest"].unlink()
        return None
    if kind == "faiss_truncated":
        truncate(files["faiss"])
        return files["faiss"].name
    if kind == "faiss_zero_bytes":
        empty(files["faiss"])
        return files["faiss"].name
    if kind == "faiss_garbage":
        garbage(files["faiss"])
        return files["faiss"].name
    if kind == "faiss_missing":  # the manifest names a file that is not there
        files["faiss"].unlink()
        return files["faiss"].name
    if kind == "ids_truncated":
        truncate(files["ids"])
        return files["ids"].name
    if kind == "ids_missing":
        files["ids"].unlink()
        return files["ids"].name
    raise AssertionError(kind)


INDEX_DAMAGE = (
    "manifest_not_json",
    "manifest_not_a_manifest",
    "manifest_missing",
    "faiss_truncated",
    "faiss_zero_bytes",
    "faiss_garbage",
    "faiss_missing",
    "ids_truncated",
    "ids_missing",
)


@pytest.mark.parametrize("verb", [pytest.param(v, marks=pytest.mark.slow) if v == "embed" else v for v in VERBS])
@pytest.mark.parametrize("damage", INDEX_DAMAGE)
def test_every_verb_meeting_a_damaged_index_says_one_line(damage, verb, hostile_store, tmp_path, run_cli):
    store = copy_store(hostile_store, tmp_path)
    exact = run_cli("search", store, "--scan", _scan_id(store), "-k", "3", "--json", "--exact")
    named = _damage(damage, store)
    result = run_cli(*_argv(verb, store, hostile_store))
    text = result.stdout + result.stderr
    assert "internal error" not in text and "Traceback" not in text, text
    if verb in ("store_info", "embed", "compact"):  # these never open the index
        assert result.returncode == 0, text
        return
    if named is None:  # no manifest: no index; nothing is damaged
        assert result.returncode == 0 and "DAMAGED" not in text, text
        if verb == "search":
            assert json.loads(result.stdout) == json.loads(exact.stdout)
        return
    if verb == "store_check":
        lines = [line for line in result.stderr.splitlines() if line.startswith("problem: damaged_index")]
        assert result.returncode == 1 and len(lines) == 1 and named in lines[0] and "ctfm index build" in lines[0]
        return
    if verb in ("index_status", "index_check"):
        lines = [line for line in result.stdout.splitlines() if "DAMAGED" in line]
        assert len(lines) == 1 and named in lines[0] and "ctfm index check" in lines[0], text
        assert result.returncode == (1 if verb == "index_check" else 0)
        return
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    if verb == "index_build" and not damage.startswith("manifest"):
        # a build reads only the manifest (to delete the files it supersedes), never the old FAISS or ids files
        assert result.returncode == 0 and not warnings, text
        assert run_cli("index", "check", store).returncode == 0
        return
    assert result.returncode == 0 and len(warnings) == 1 and named in warnings[0], text
    assert "ctfm index check" in warnings[0]
    if verb == "search":  # the fallback: exact search over the store's vectors, the same hits
        assert "searching the store exactly instead" in warnings[0]
        assert json.loads(result.stdout) == json.loads(exact.stdout)
    else:  # build and update replace the damaged index with a sound one
        assert run_cli("index", "check", store).returncode == 0


def test_search_falls_back_to_exact_results_over_a_damaged_index(hostile_store, tmp_path):
    """In Python too: a session over a damaged index warns once and returns the exact hits."""
    from ctfm.search import SearchSession

    store = copy_store(hostile_store, tmp_path)
    query = _scan_id(store)
    exact = SearchSession(store, use_index=False).search_scans(query, k=3)
    indexed = SearchSession(store).search_scans(query, k=3)
    assert [h.scan_id for h in indexed] == [h.scan_id for h in exact]
    assert [h.score for h in indexed] == pytest.approx([h.score for h in exact], abs=1e-6)
    _damage("faiss_truncated", store)
    with pytest.warns(UserWarning, match="damaged scan-level index.*searching the store exactly instead"):
        fallback = SearchSession(store).search_scans(query, k=3)
    assert [(h.scan_id, h.score) for h in fallback] == [(h.scan_id, h.score) for h in exact]


def test_files_left_by_a_damaged_manifest_are_cleaned_by_the_rebuild(hostile_store, tmp_path, run_cli):
    store = copy_store(hostile_store, tmp_path)
    old = index_files(store)
    _damage("manifest_not_json", store)
    assert run_cli("index", "build", store).returncode == 0
    new = index_files(store)  # exactly one build's files again
    assert not old["faiss"].exists() and not old["ids"].exists() and new["faiss"] != old["faiss"]
    assert tree_digest(store / "index").keys() == {p.name for p in new.values()}


# ---- full disk and kills: the old index stays whole and in use -----------------------------
def _index_state(store):
    """The index's files (bytes) and what it answers."""
    from ctfm.store import open_store
    from ctfm.store.index import load_index

    index = load_index(open_store(store), "scan")
    queries = index.faiss_index.reconstruct_n(0, min(index.ntotal, 4))
    scores, rows = index.search(queries, min(index.ntotal, 4))
    return tree_digest(store / "index"), scores.tolist(), rows.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["faiss", "ids", "manifest"])
def test_index_build_on_a_full_disk_leaves_the_old_index_whole(failing, hostile_store, tmp_path):
    """RLIMIT_FSIZE between the build's file sizes makes exactly one of its writes fail (EFBIG):
    the FAISS file (which faiss.write_index used to truncate and report only on stderr), the ids
    or the manifest. The old index still loads and answers as before; nothing new is left."""
    from hostile_stores import run_limited

    store = copy_store(hostile_store, tmp_path)
    files = index_files(store)
    sizes = {what: files[what].stat().st_size for what in ("faiss", "ids", "manifest")}
    order = ["faiss", "ids", "manifest"]  # the order of the writes
    assert sorted(order, key=sizes.get) == order, sizes  # so that a limit between two fails one
    position = order.index(failing)
    limit = (sizes[order[position - 1]] + sizes[failing]) // 2 if position else sizes[failing] // 2
    before = _index_state(store)
    result = run_limited(limit, "sys.exit(main(['index', 'build', sys.argv[2]]))", store)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not be written (File too large)" in lines[0], result.stderr
    suffix = {"faiss": ".faiss", "ids": ".ids.parquet", "manifest": ".json"}[failing]
    assert lines[0].removeprefix("error: ").split(": ")[0].endswith(suffix)
    assert _index_state(store) == before  # same files, byte for byte, same answers
    assert not [p for p in (store / "index").iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.slow
def test_index_build_on_a_really_full_filesystem_leaves_the_old_index_whole(hostile_store, tmp_path, run_cli):
    """A small tmpfs filled to the last byte (ENOSPC); skipped where it cannot be mounted (not root)."""
    import shutil
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a tmpfs needs root (the RLIMIT_FSIZE cases cover the same writes)")
    try:
        store = disk / "store"
        shutil.copytree(hostile_store["store"], store, symlinks=True)
        before = _index_state(store)
        with open(disk / "filler", "wb", buffering=0) as fh:  # every page taken (unbuffered: the write fails)
            try:
                while True:
                    fh.write(b"\0" * 4096)
                    fh.flush()
            except OSError:
                pass
        result = run_cli("index", "build", store)
        assert result.returncode == 2 and "could not be written (No space left on device)" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert _index_state(store) == before
        assert not [p for p in (store / "index").iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.slow
def test_an_index_build_killed_mid_write_leaves_the_old_index_in_use(tmp_path):
    """SIGKILL while the FAISS file is being written (its temporary exists): the manifest still
    names the previous build, which loads and answers as before."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    import ctfm
    from ctfm.store import open_store
    from ctfm.store.index import build_index
    from ctfm.store.schema import schemas

    store = tmp_path / "store"
    (store / "parts").mkdir(parents=True)
    n, dim = 200_000, 64  # ~50 MB of vectors: the write takes long enough to be caught
    vectors = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    schema = schemas()["scans"]
    columns = {
        "scan_id": pa.array([f"s{i:07d}" for i in range(n)]),
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
    pq.write_table(table, store / "scans.parquet")
    build_index(open_store(store))
    before = _index_state(store)
    env = {**os.environ, "PYTHONPATH": str(Path(ctfm.__file__).parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-m", "ctfm", "index", "build", str(store)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not [p for p in os.listdir(store / "index") if p.endswith(".partial")]:
            assert process.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    digest, scores, rows = _index_state(store)
    assert (scores, rows) == before[1:]
    assert {k: v for k, v in digest.items() if not k.startswith(".")} == before[0]  # only a hidden temporary more
