"""The listening node: a C-STORE SCP that embeds, predicts and sends each series it receives.

Instances are written as they arrive to ``<spool>/series/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
A series is complete once ``idle_s`` seconds pass without a new instance of it; then the
configured jobs run on its folder, one series at a time: ``embed`` (into a store), ``predict``
(a segmentation model; ``send`` sends its DICOM SEG and measurement report back). Each series
ends with one log line (its UIDs, instance count, timings, outcome), one row in
``<spool>/series.jsonl`` and its marker ``<spool>/finished/<SeriesInstanceUID>.json``; the folder
stays (the store rows and predictions name it). A series received but not finished when the node
stopped (no marker) is picked up again at the next start. A non-CT
or broken series is a recorded failure; the node keeps serving.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from ctfm.embedding.api import build_encoder, embed
from ctfm.errors import OptionError, UserError, one_line, optional_import
from ctfm.io.dicom import looks_like_dicom_file
from ctfm.models.segmentation import load_segmentation_model
from ctfm.predict.seg import predict_seg
from ctfm.runtime import Result, utc_now, write_text_atomic

FEATURE = "the listening node (ctfm listen)"


@dataclass
class NodeConfig:
    """What a node listens on and what it does with each complete series."""

    spool: Path
    aet: str = "CTFM"
    host: str = "127.0.0.1"
    port: int = 11112
    idle_s: float = 10.0
    allow_aets: tuple[str, ...] = ()
    embed_store: str | None = None
    weights: str | None = None
    model: str = "ct-fm"
    predict_model: str | None = None
    send: str | None = None
    device: str | None = None
    max_series: int | None = None  # stop after this many series (tests, benchmarks); None: serve until stopped

    def __post_init__(self):
        self.spool = Path(self.spool)
        if not 1 <= len(self.aet) <= 16:
            raise OptionError(f"--aet {self.aet!r}: an AE title has 1..16 characters")
        if self.idle_s <= 0:
            raise OptionError(f"--idle {self.idle_s}: must be > 0 seconds")
        if self.embed_store is None and self.predict_model is None:
            raise OptionError("ctfm listen needs a job: --embed STORE (with --weights) and/or --predict MODEL")
        if self.send is not None and self.predict_model is None:
            raise OptionError("--send sends predictions: give --predict MODEL too")


@dataclass
class ListenSummary(Result):
    """What a node did: series finished and failed ``(series_uid, message)``, seconds served."""

    done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return f"listened {self.seconds:.0f} s: {self.done} series done, {len(self.failed)} failed"


class Node:
    """One running node (:func:`listen` builds, starts and serves it)."""

    def __init__(self, config: NodeConfig, log=print):
        self.config = config
        self.log = log
        self.incoming = config.spool / "series"
        self.finished = config.spool / "finished"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.finished.mkdir(parents=True, exist_ok=True)
        self.segmentation = load_segmentation_model(config.predict_model) if config.predict_model is not None else None
        self.lock = threading.Lock()
        self.last_arrival: dict[str, float] = {}
        self.first_arrival: dict[str, float] = {}
        self.summary = ListenSummary()
        self.stopping = threading.Event()
        self.server = None
        self.encoder = None
        for folder in sorted(self.incoming.iterdir()):  # received before a stop, not finished: picked up
            if folder.is_dir() and not (self.finished / f"{folder.name}.json").exists():
                self.last_arrival[folder.name] = self.first_arrival[folder.name] = time.monotonic()
                self.log(f"resuming series {folder.name} ({_count(folder)} instances received before the restart)")

    # ---- the SCP ----------------------------------------------------------------------------
    def on_store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        if not series_uid or not sop_uid or "/" in series_uid + sop_uid or series_uid.startswith("."):
            return 0xA900  # dataset does not match SOP class: no UIDs to file it under
        folder = self.incoming / series_uid
        folder.mkdir(parents=True, exist_ok=True)
        (self.finished / f"{series_uid}.json").unlink(missing_ok=True)  # more instances: the series runs again
        tmp = folder / f".{sop_uid}.tmp"
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, folder / f"{sop_uid}.dcm")
        now = time.monotonic()
        with self.lock:
            self.first_arrival.setdefault(series_uid, now)
            self.last_arrival[series_uid] = now
        return 0x0000

    def start(self) -> None:
        pn = optional_import("pynetdicom", "pacs", FEATURE)
        ae = pn.AE(ae_title=self.config.aet)
        for context in pn.AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, pn.ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(pn.sop_class.Verification)
        if self.config.allow_aets:
            ae.require_calling_aet = list(self.config.allow_aets)
        try:
            self.server = ae.start_server(
                (self.config.host, self.config.port),
                block=False,
                evt_handlers=[(pn.evt.EVT_C_STORE, self.on_store)],
            )
        except OSError as exc:
            raise OptionError(
                f"--host {self.config.host} --port {self.config.port}: cannot listen there ({exc.strerror or exc}); "
                "choose a free port"
            ) from None
        self.config.port = self.server.server_address[1]
        allowed = ", ".join(self.config.allow_aets) if self.config.allow_aets else "any calling AE"
        self.log(f"listening as {self.config.aet} on {self.config.host}:{self.config.port} ({allowed})")

    def stop(self) -> None:
        self.stopping.set()
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # ---- the jobs ---------------------------------------------------------------------------
    def due(self) -> list[str]:
        now = time.monotonic()
        with self.lock:
            return sorted(uid for uid, t in self.last_arrival.items() if now - t >= self.config.idle_s)

    def serve(self) -> ListenSummary:
        start = time.monotonic()
        try:
            while not self.stopping.is_set():
                for series_uid in self.due():
                    self.process(series_uid)
                    if self.config.max_series is not None and self.summary.done + len(self.summary.failed) >= (
                        self.config.max_series
                    ):
                        self.stopping.set()
                        break
                self.stopping.wait(0.2)
        finally:
            self.stop()
            self.summary.seconds = time.monotonic() - start
        return self.summary

    def process(self, series_uid: str) -> None:
        with self.lock:
            received = self.last_arrival.pop(series_uid, time.monotonic()) - self.first_arrival.pop(
                series_uid, time.monotonic()
            )
        folder = self.incoming / series_uid
        n = _count(folder)
        t0 = time.perf_counter()
        row = {"series_uid": series_uid, "instances": n, "received_s": round(received, 3), "jobs": {}}
        try:
            row["study_uid"], modality = _study_and_modality(folder)
            if modality != "CT":
                raise UserError(f"{series_uid}: modality {modality or 'none'}, not CT (ctfm reads CT only)")
            if self.config.embed_store is not None:
                row["jobs"]["embed"] = self.run_embed(folder)
            if self.config.predict_model is not None:
                row["jobs"]["predict"] = self.run_predict(folder)
            row["outcome"] = "ok"
        except UserError as exc:
            row["outcome"] = "failed"
            row["error"] = one_line(exc, 300)
        except Exception as exc:  # a bug or an environment fault: recorded, the node keeps serving
            row["outcome"] = "failed"
            row["error"] = f"internal error {one_line(exc, 300, with_type=True)}"
        row["seconds"] = round(time.perf_counter() - t0, 3)
        row["finished_at"] = utc_now()
        self.finish(folder, row)

    def run_embed(self, folder: Path) -> dict:
        t0 = time.perf_counter()
        if self.encoder is None:
            self.encoder = build_encoder(self.config.model, self.config.weights, 0)
        run = embed(
            [str(folder)],
            model=self.config.model,
            out=self.config.embed_store,
            device=self.config.device,
            encoder=self.encoder,
            return_records=False,
        )
        if run.totals.failed:
            raise UserError(run.totals.failed[0][1])
        return {
            "seconds": round(time.perf_counter() - t0, 3),
            "embedded": run.totals.done,
            "skipped": run.totals.skipped,
        }

    def run_predict(self, folder: Path) -> dict:
        t0 = time.perf_counter()
        summary = predict_seg(
            [str(folder)],
            self.segmentation,
            self.config.spool / "predictions",
            output_format="dicom-seg",
            statistics=True,
            device=self.config.device,
            progress=False,
            send=self.config.send,
        )
        if summary.failed:
            raise UserError(summary.failed[0][1])
        return {"seconds": round(time.perf_counter() - t0, 3), "predicted": summary.done, "sent": summary.sent}

    def finish(self, folder: Path, row: dict) -> None:
        write_text_atomic(self.finished / f"{folder.name}.json", json.dumps(row, indent=2) + "\n")
        with open(self.config.spool / "series.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        jobs = ", ".join(f"{name} {info['seconds']:.1f} s" for name, info in row["jobs"].items()) or "no job ran"
        outcome = "ok" if row["outcome"] == "ok" else f"failed: {row['error']}"
        self.log(
            f"series {row['series_uid']} study {row.get('study_uid') or '?'}: {row['instances']} instances, received in "
            f"{row['received_s']:.1f} s; {jobs}; {row['seconds']:.1f} s in all; {outcome}"
        )
        if row["outcome"] == "ok":
            self.summary.done += 1
        else:
            self.summary.failed.append((row["series_uid"], row["error"]))


def _count(folder: Path) -> int:
    return len(list(folder.glob("*.dcm"))) if folder.is_dir() else 0


def _study_and_modality(folder: Path) -> tuple[str | None, str]:
    for path in sorted(folder.glob("*.dcm")):
        if looks_like_dicom_file(path):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return str(ds.get("StudyInstanceUID", "") or "") or None, str(ds.get("Modality", "") or "")
    raise UserError(f"{folder.name}: no readable DICOM instance received")


def listen(config: NodeConfig | None = None, log=print, **kwargs) -> ListenSummary:
    """Run a listening node until stopped (Ctrl-C, SIGTERM) or ``max_series`` series are done."""
    node = Node(config or NodeConfig(**kwargs), log=log)
    node.start()
    try:
        return node.serve()
    except KeyboardInterrupt:
        node.stop()
        return node.summary
