"""The shared batch helpers: all-or-nothing writes, rank and world size, one-line exceptions."""

from __future__ import annotations

import pytest

from ctfm.errors import one_line
from ctfm.runtime import PARTIAL_SUFFIX, atomic_path, rank_and_world_size, write_text_atomic

LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "JSM_NAMESPACE_RANK",
    "JSM_NAMESPACE_SIZE",
)


def test_atomic_path_writes_files_and_folders_all_or_nothing(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    write_text_atomic(target, "one")
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "one" and sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(tmp_path / "never.txt"):
            pass
    assert not (tmp_path / "never.txt").exists()

    folder = tmp_path / "folder"
    for generation in ("old", "new"):
        with atomic_path(folder) as tmp:
            assert tmp.name.startswith(".folder.") and tmp.name.endswith(PARTIAL_SUFFIX)
            tmp.mkdir()
            (tmp / "f").write_text(generation)
    assert (folder / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "sub"]  # nothing left aside
    with atomic_path(tmp_path / "x.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")  # writers that pick the format by extension
        tmp.write_bytes(b"")


def test_rank_and_world_size_from_the_launcher(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert rank_and_world_size() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert rank_and_world_size() == (3, 8)
    monkeypatch.setenv("RANK", "5")  # torchrun's variables win over SLURM's
    monkeypatch.setenv("WORLD_SIZE", "6")
    assert rank_and_world_size() == (5, 6)
    assert rank_and_world_size(environment=False) == (0, 1)  # no process group: nothing to talk to
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert rank_and_world_size()[0] == 6
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert rank_and_world_size()[0] != 0  # every process but the first is nonzero


def test_one_line():
    assert one_line(ValueError("bad\n  value\tthere")) == "bad value there"
    assert one_line(OSError("x" * 500), 10) == "x" * 10
    assert one_line(KeyError()) == "KeyError"
    assert one_line(OSError("disk\nfull"), with_type=True) == "OSError: disk full"
    assert one_line(RuntimeError(""), with_type=True) == "RuntimeError"


def test_results_are_typed_with_json_and_a_one_line_summary():
    from dataclasses import dataclass

    import numpy as np

    from ctfm.runtime import DocumentResult, Result

    @dataclass
    class Counted(Result):
        done: int = 0
        score: float = float("nan")

        def summary(self) -> str:
            return f"{self.done} done"

    counted = Counted(np.int64(3), np.float32(0.5))
    assert counted.to_json() == {"done": 3, "score": 0.5} and counted.summary() == "3 done"
    assert Counted(1).to_json() == {"done": 1, "score": None}  # JSON has no NaN
    document = DocumentResult({"summary": {"n": np.arange(2)}}, {"version": "x"})
    assert document["summary"]["n"].tolist() == [0, 1] and "summary" in document and "provenance" not in document
    assert document.to_json() == {"provenance": {"version": "x"}, "summary": {"n": [0, 1]}}
    assert "\n" not in document.summary()
