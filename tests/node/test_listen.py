"""``ctfm listen`` as a process: dcmtk's storescu sends the real STS_019 series (and a non-CT
copy), the node embeds each complete series, logs one line per series, records failures and keeps
serving, refuses unknown callers, picks up an unfinished series after a restart, and sends a
prediction back to a real Orthanc."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

import ctfm
from conftest import data_path
from pacs_server import PASSWORD, USER, Orthanc, free_port

pytestmark = pytest.mark.slow
SERIES = "sarcoma_ct/STS_019/dicom/image"
SRC = Path(__file__).resolve().parents[2] / "src"


def require_storescu():
    if shutil.which("storescu") is None:
        pytest.skip("dcmtk's storescu is not installed (apt-get install dcmtk)")


def series_files() -> list[Path]:
    return sorted(data_path(SERIES).glob("*.dcm"))


class ListenProcess:
    def __init__(self, *argv, env=None):
        environ = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ctfm", "listen", *map(str, argv)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**environ, **(env or {})},
        )
        self.lines: list[str] = []

    def wait_for(self, text: str, timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                if self.process.poll() is not None:
                    raise AssertionError(f"listener exited {self.process.returncode}: {self.process.stderr.read()}")
                continue
            self.lines.append(line.rstrip("\n"))
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {timeout_s} s; got {self.lines}")

    def finish(self, timeout_s: float = 300) -> tuple[int, str, str]:
        out, err = self.process.communicate(timeout=timeout_s)
        self.lines += out.splitlines()
        return self.process.returncode, "\n".join(self.lines), err

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.finish(60)


def storescu(port: int, files, calling: str = "STORESCU") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-aet", calling, "-aec", "CTFM", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def non_ct_copy(folder: Path) -> list[Path]:
    """Five slices of the series as an MR series of its own (new UIDs)."""
    folder.mkdir()
    series_uid = pydicom.uid.generate_uid()
    out = []
    for i, path in enumerate(series_files()[:5]):
        ds = pydicom.dcmread(path)
        ds.Modality, ds.SeriesInstanceUID = "MR", series_uid
        ds.SOPClassUID = pydicom.uid.MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        out.append(folder / f"{i}.dcm")
        ds.save_as(out[-1])
    return out


def test_the_node_embeds_each_series_logs_it_and_keeps_serving(tmp_path, tiny_weights):
    require_storescu()
    port, spool, store = free_port(), tmp_path / "spool", tmp_path / "store"
    node = ListenProcess(
        "--port", port, "--spool", spool, "--embed", store, "--weights", tiny_weights,
        "--idle", 2, "--allow-aet", "STORESCU", "--max-series", 2,
    )  # fmt: skip
    try:
        node.wait_for(f"listening as CTFM on 127.0.0.1:{port}")
        refused = storescu(port, series_files()[:1], calling="STRANGER")
        assert refused.returncode != 0 and "Rejected" in refused.stdout + refused.stderr
        assert storescu(port, series_files()).returncode == 0
        node.wait_for("47 instances")
        assert storescu(port, non_ct_copy(tmp_path / "mr")).returncode == 0
        code, out, err = node.finish()
    finally:
        node.terminate()
    record = ctfm.load_ct(data_path(SERIES))[1]
    (ok,) = [line for line in out.splitlines() if line.startswith(f"series {record.series_uid}")]
    assert f"study {record.study_uid}" in ok and "embed" in ok and ok.endswith("; ok")
    (failed,) = [line for line in out.splitlines() if line.startswith("series ") and "failed:" in line]
    assert "modality MR, not CT" in failed and "5 instances" in failed
    assert code == 1 and "1 series done, 1 failed" in out, err
    rows = ctfm.open_store(store).select("scan").metadata.to_pylist()
    assert [(r["series_uid"], len(r["sop_uids"])) for r in rows] == [(record.series_uid, 47)]
    records = [json.loads(line) for line in (spool / "series.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in records] == ["ok", "failed"]


def test_a_series_received_before_a_stop_is_finished_after_the_restart(tmp_path, tiny_weights):
    require_storescu()
    port, spool, store = free_port(), tmp_path / "spool", tmp_path / "store"
    first = ListenProcess("--port", port, "--spool", spool, "--embed", store, "--weights", tiny_weights, "--idle", 600)
    try:
        first.wait_for("listening as")
        assert storescu(port, series_files()).returncode == 0
    finally:
        first.terminate()  # stopped long before the series went idle
    assert not (spool / "series.jsonl").exists()
    second = ListenProcess(
        "--port", port, "--spool", spool, "--embed", store, "--weights", tiny_weights, "--idle", 1, "--max-series", 1
    )
    try:
        second.wait_for("resuming series")
        code, out, err = second.finish()
    finally:
        second.terminate()
    assert code == 0 and "1 series done, 0 failed" in out, err
    assert len(ctfm.open_store(store).select("scan").metadata) == 1


def test_the_node_predicts_and_sends_back_to_the_pacs(tmp_path, run_cli):
    require_storescu()
    seg = tmp_path / "seg"
    assert (
        run_cli("models", "init", "ct-fm-segresnet", "--seed", "0", "--out", seg, "--init-filters", "4").returncode == 0
    )
    pacs = Orthanc(tmp_path / "orthanc").start()
    password = tmp_path / "pw.txt"
    password.write_text(PASSWORD + "\n")
    port, spool = free_port(), tmp_path / "spool"
    node = ListenProcess(
        "--port", port, "--spool", spool, "--predict", seg, "--send", pacs.dicomweb, "--user", USER,
        "--password-file", password, "--idle", 1, "--max-series", 1, "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    try:
        node.wait_for("listening as")
        assert storescu(port, series_files()).returncode == 0
        code, out, err = node.finish(600)
        assert code == 0 and "1 series done" in out, err + out
        assert pacs.count_instances() == 2  # the SEG and its report; the node had the CT
        modalities = sorted(pacs.rest(f"/instances/{i}/simplified-tags")["Modality"] for i in pacs.rest("/instances"))
        assert modalities == ["SEG", "SR"]
        assert PASSWORD not in out + err + (spool / "series.jsonl").read_text()
    finally:
        node.terminate()
        pacs.stop()
