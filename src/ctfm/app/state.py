"""What the server keeps in memory: one store run, its scans, their volumes, the encoder.

The app works on one computation of the store (a patch-level run: one model, weights, preset,
pooling and overlap; :meth:`ctfm.store.EmbeddingStore.find_run`), so every vector it compares was
computed the same way. Volumes, patch vectors and the encoder stay in the process, so a click
costs one matrix product over the run's windows (plus one window embedding for a centred query).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

import ctfm
from ctfm import __version__
from ctfm.app.security import echo
from ctfm.app.uploads import DEFAULT_MAX_VOXELS, UploadFolder, shown_name
from ctfm.app.volumes import (
    DisplayVolumeCache,
    colour_overlay,
    load_display,
    png_bytes,
    render_slice,
    save_display,
    to_display,
)
from ctfm.embedding.runner import DEFAULT_SEED, default_device, weights_sha256_of
from ctfm.errors import CTInputError, OptionError, UserError
from ctfm.io import load_ct
from ctfm.io.sources import discover_inputs
from ctfm.models import init_model
from ctfm.preprocess import PreprocessSpec
from ctfm.search import SearchSession
from ctfm.search.query import load_encoder
from ctfm.search.session import QUERY_SOURCES, REFINEMENTS
from ctfm.store import open_store
from ctfm.store.schema import RUN_KEY
from ctfm.store.vectors import matching_scans

UPLOAD_FOLDER = "app-uploads"  # inside the store: the server's own folder for uploaded scans
DISPLAY_FOLDER = "app-cache"  # inside the store: scans converted for display (int16 .npy, memory-mapped)
DEFAULT_SEARCH_SECONDS = 30.0  # the time budget of one search that runs the encoder


class NotFound(OptionError):
    """A scan id that is not in the store's run (answered 404)."""


class ServerBusy(UserError):
    """A search that ran past its time budget, or found the encoder busy for as long (answered 503)."""


class SearchBudget:
    """The time budget of the calls that run the encoder (a fine refinement, a centred query).

    :meth:`running` sets a deadline for the calling thread; :meth:`check`, a forward pre-hook
    of the encoder, raises :class:`ServerBusy` in a thread past its deadline, so that a long
    refinement stops at its next batch of windows. Threads without a deadline (uploads) pass.
    """

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self._local = threading.local()

    @contextlib.contextmanager
    def running(self):
        self._local.deadline = time.monotonic() + self.seconds
        try:
            yield
        finally:
            self._local.deadline = None

    def check(self, module, args) -> None:
        deadline = getattr(self._local, "deadline", None)
        if deadline is not None and time.monotonic() > deadline:
            raise ServerBusy(
                f"the search ran past its time budget of {self.seconds:g} s (ask for refine weighted, or start the "
                "server with a larger --search-seconds)"
            )


def check_positive(value, flag: str, unit: str, zero: bool = False) -> float:
    """A finite number > 0 (>= 0 with ``zero``) for a server option; else :class:`OptionError`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{flag} {echo(value, 40)}: expected a number of {unit}") from None
    if not np.isfinite(number) or number < 0 or (number == 0 and not zero):
        least = "0 or more" if zero else "more than 0"
        raise OptionError(f"{flag} {value!r}: expected a finite number of {unit}, {least}")
    return number


def weights_are_random(weights_sha256: str | None, sidecar: dict | None) -> str | None:
    """Why the run's weights are a random initialisation (a sentence), or None when they are not
    known to be: an in-memory init (``state:`` sha) or a folder whose provenance says
    ``random-init``."""
    provenance = (sidecar or {}).get("provenance") or {}
    if provenance.get("source") == "random-init":
        return f"these weights are a random initialisation (seed {provenance.get('seed', '?')}), not a trained model: similarities show the plumbing, not anatomy"
    if str(weights_sha256 or "").startswith("state:"):
        return "the store was embedded with a randomly initialised encoder (no weights given): similarities show the plumbing, not anatomy"
    return None


class AppState:
    """The server's view of a store (see the module docstring).

    Args:
        store: the store folder.
        weights: the weights the run was computed with (folder, ``hf-hub:ORG/NAME``, file):
            needed to embed query points and uploads; checked against the run's sha256. Without
            it, a run embedded with ctfm's seeded random init is rebuilt from the seed.
        run: digest (or unique prefix) of the patch-level run, when the store holds several.
        where: ``{column: value}`` of the scan rows: picks the run (with ``run``) and keeps
            only the scans that match (in the list and as hits).
        max_upload_mb: the upload size limit (MiB, as sent: compressed).
        max_voxels: the largest scan an upload may hold, in voxels, read from its header (NIfTI)
            or headers (DICOM) before anything is decoded; the free memory is checked too.
        search_seconds: the time budget of a search that runs the encoder (fine refinement, a
            centred query) and of the wait for the encoder when another search holds it.
        device: where the encoder runs (default: CUDA when visible, else CPU).
        query_from: the default query vector (:mod:`ctfm.search.session`): ``stored`` (the
            query scan's stored window nearest the click: no model run, milliseconds) or
            ``centred`` (the window centred on the click, embedded: the reference protocol,
            about a second or more per click on a CPU); requests may choose either.
        display_cache_gb: disk budget of the scans converted for display (``STORE/app-cache``);
            past it, scans are read from their sources when chosen.
        refine: the default hit refinement (``weighted``: no model run; ``fine``: pattern
            search with the encoder, many window embeddings per hit).
    """

    def __init__(
        self,
        store,
        weights=None,
        run: str | None = None,
        where: dict | None = None,
        max_upload_mb: float = 512,
        device: str | None = None,
        volume_cache: int = 32,
        display_cache_gb: float = 20.0,
        query_from: str = "stored",
        refine: str = "weighted",
        max_voxels: int = DEFAULT_MAX_VOXELS,
        search_seconds: float = DEFAULT_SEARCH_SECONDS,
    ):

        # The options first: a bad value is refused before the store and the weights are read.
        max_upload_mb = check_positive(max_upload_mb, "--max-upload-mb", "MiB")
        display_cache_gb = check_positive(display_cache_gb, "--display-cache-gb", "GiB", zero=True)
        search_seconds = check_positive(search_seconds, "--search-seconds", "seconds")
        if isinstance(max_voxels, bool) or not isinstance(max_voxels, (int, np.integer)) or max_voxels < 1:
            raise OptionError(f"--max-voxels {max_voxels!r}: expected a whole number of voxels, 1 or more")
        self.store = open_store(store)
        self.root = self.store.root
        if query_from not in QUERY_SOURCES:
            raise OptionError(f"query {query_from!r}: expected one of {', '.join(QUERY_SOURCES)}")
        if refine not in REFINEMENTS:
            raise OptionError(f"refine {refine!r}: expected one of {', '.join(REFINEMENTS)}")
        self.run_name, self.where = run, where
        self.query_from, self.refine = query_from, refine
        self.device = device or default_device()
        self.uploads = UploadFolder(self.root / UPLOAD_FOLDER, int(max_upload_mb * 2**20), int(max_voxels))
        self.display_folder = self.root / DISPLAY_FOLDER
        self.display_budget = int(display_cache_gb * 2**30)
        self.budget = SearchBudget(search_seconds)
        self._display_bytes: int | None = None
        self.volumes = DisplayVolumeCache(self._load_volume, capacity=volume_cache)
        # The session is not thread-safe where it runs the encoder or fills its prepared-scan
        # cache: those calls (and reload) hold _lock, within the time budget; a search over the
        # stored vectors, scan lists and slices never wait for it. The caches have their own lock.
        self._lock = threading.RLock()
        self._cache_lock = threading.Lock()
        self._heatmaps: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._queries: OrderedDict[tuple, object] = OrderedDict()
        self.encoder = None
        self.reload()
        self.encoder, self.weights_note, self.sidecar = self._build_encoder(weights)
        if self.encoder is not None:
            self.encoder.register_forward_pre_hook(self.budget.check)
        self.session.encoder = self.encoder

    # ---- the store's run -----------------------------------------------------------------
    def reload(self) -> None:
        """Open the store's patch run for search (at start, and after an upload)."""

        with self._lock:
            session = SearchSession(
                self.store, run=self.run_name, where=self.where, encoder=self.encoder, device=self.device
            )
            vectors = session.patch_vectors  # read once; an OptionError names the runs to choose from
            kept = matching_scans(vectors.scan_table, self.where)
            rows = {s: r for s, r in vectors.scans.items() if kept is None or s in kept}
            if not rows:
                raise OptionError(
                    f"{self.root}: no scan of the patch run matches the --where filters (drop or change them)"
                )
            # Requests read these without a lock: the rows (a superset of the old ones) go first,
            # the session that may name new scans last.
            self.rows = rows
            self.order = sorted(rows, key=lambda s: (self._name(rows[s]), s))
            self.spec = _spec_of(next(iter(rows.values())))
            self.key = vectors.key
            self.vectors = vectors
            self._private = _private_paths(self.root, rows.values())
            with self._cache_lock:
                self._heatmaps.clear()
                self._queries.clear()
            self.session = session

    @property
    def key_fields(self) -> dict:

        return dict(zip(RUN_KEY, self.key))

    def _build_encoder(self, weights):
        """``(encoder or None, random-weights note, sidecar)``: the run's encoder, checked
        against its sha256. Without ``weights``, a run embedded with ctfm's seeded random init
        is rebuilt from the seed; any other run is served without an encoder (stored query
        windows, no uploads)."""

        fields = self.key_fields
        expected = str(fields["weights_sha256"])
        encoder = None
        if weights is not None:
            encoder = load_encoder(self.key, weights=weights)
        elif expected.startswith("state:"):
            candidate = init_model(fields["model"], DEFAULT_SEED, **self._arch_overrides())
            if weights_sha256_of(candidate) == expected:
                encoder = candidate
        info = getattr(encoder, "weights_info", None)
        sidecar = getattr(info, "metadata", None) if info is not None else None
        sidecar = sidecar if isinstance(sidecar, dict) else {}
        if encoder is not None:
            encoder = encoder.eval().to(self.device)
        return encoder, weights_are_random(expected, sidecar), sidecar

    def _arch_overrides(self) -> dict:
        """Constructor overrides of an in-memory run (the vector width says the first level's)."""
        dim = int(self.vectors.vectors.shape[1])
        return {} if dim == 512 else {"init_filters": dim // 16}

    @property
    def can_embed(self) -> bool:
        return self.encoder is not None

    # ---- scans ---------------------------------------------------------------------------
    @staticmethod
    def _name(row: dict) -> str:
        path = str(row.get("source_path") or "")
        base = os.path.basename(path.rstrip("/")) or row["scan_id"]
        return row.get("series_description") or base

    def row(self, scan_id: str) -> dict:
        row = self.rows.get(scan_id)
        if row is None:
            raise NotFound(f"scan {echo(scan_id)} is not in the store's run (GET /api/scans lists the ids)")
        return row

    def scan_entry(self, scan_id: str) -> dict:
        row = self.row(scan_id)
        return {
            "id": scan_id,
            "name": self._name(row),
            "shape": list(row.get("shape") or []),
            "spacing_mm": [float(v) for v in row.get("spacing_mm") or []],
            "orientation": row.get("orientation"),
            "format": row.get("format"),
            "n_patches": row.get("n_patches"),
            "uploaded": Path(str(row.get("source_path"))).parent == self.uploads.root,
            "provenance": {
                "model": row.get("model"),
                "weights_sha256": row.get("weights_sha256"),
                "preset": row.get("preset"),
                "preset_hash": row.get("preset_hash"),
                "content_hash": row.get("content_hash"),
                "series_uid": row.get("series_uid"),
                "package_version": row.get("package_version"),
                "created_at": row.get("created_at"),
            },
        }

    def scan_list(self) -> list[dict]:
        return [self.scan_entry(s) for s in self.order]

    def scan_detail(self, scan_id: str) -> dict:
        entry = self.scan_entry(scan_id)
        entry["display"] = self.volumes.get(scan_id).geometry()
        return entry

    def _display_stem(self, scan_id: str) -> str:
        row = self.row(scan_id)
        return f"{scan_id.replace('#', '_')}-{str(row.get('content_hash') or 'nohash')[:16]}"

    def _load_volume(self, scan_id: str):
        """The scan's display volume: from the server's folder when converted before, else read
        from its source (the store's own path for that id), converted and kept there."""

        stem = self._display_stem(scan_id)
        volume = load_display(self.display_folder, stem)
        if volume is not None:
            return volume
        volume = to_display(self._read_source(scan_id))
        if self._display_room(volume.hu.nbytes):
            try:
                save_display(volume, self.display_folder, stem)
            except OSError:  # a read-only store: the memory cache still serves
                pass
        return volume

    def _read_source(self, scan_id: str):
        """The scan read from the path the store recorded; an input error naming the scan by id
        (never the server's path) when the file moved or cannot be read."""
        row = self.row(scan_id)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the scan was checked when it was embedded
                image, _ = load_ct(row["source_path"], series_uid=row.get("series_uid"))
        except (CTInputError, OSError):
            raise _unreadable(scan_id) from None
        return image

    def redact(self, message: str) -> str:
        """A message with the server's own paths (the store's, the scans' folders) replaced."""
        for path, name in self._private:
            message = message.replace(path, name)
        return message

    @contextlib.contextmanager
    def _exclusive(self):
        """Hold the session for a call that runs the encoder or fills its caches, within the
        time budget (waiting for it included)."""
        if not self._lock.acquire(timeout=self.budget.seconds):
            raise ServerBusy(
                f"the encoder stayed busy with another search for {self.budget.seconds:g} s (try again, or ask for the "
                "stored query window and refine weighted, which do not wait for it)"
            )
        try:
            with self.budget.running():
                yield
        finally:
            self._lock.release()

    def _encoder_use(self, embeds: bool):
        return self._exclusive() if embeds else contextlib.nullcontext()

    def _display_room(self, nbytes: int) -> bool:
        """Whether the display folder may grow by ``nbytes`` within its budget."""
        with self._cache_lock:
            if self._display_bytes is None:
                self._display_bytes = (
                    sum(p.stat().st_size for p in self.display_folder.glob("*.npy"))
                    if self.display_folder.is_dir()
                    else 0
                )
            if self._display_bytes + nbytes > self.display_budget:
                return False
            self._display_bytes += nbytes
            return True

    def warm_up(self) -> threading.Thread:
        """Convert, in a background thread, every scan not yet in the server's folder (first
        slices then come from a memory map). Returns the thread (daemon)."""

        def work():
            for scan_id in list(self.order):
                try:
                    stem = self._display_stem(scan_id)
                    if (self.display_folder / f"{stem}.json").exists() or scan_id in self.volumes:
                        continue
                    image = self._read_source(scan_id)
                    volume = to_display(image)
                    del image
                    if not self._display_room(volume.hu.nbytes):
                        return  # the folder's budget is spent: further scans are read from their sources
                    save_display(volume, self.display_folder, stem)
                except Exception:  # a scan that cannot be read now is reported when it is chosen
                    continue

        thread = threading.Thread(target=work, name="ctfm-app-warm-up", daemon=True)
        thread.start()
        return thread

    def info(self) -> dict:

        fields = self.key_fields
        return {
            "store": self.root.name,
            "scans": len(self.rows),
            "patches": int(self.vectors.vectors.shape[0]),
            "run": {
                **{k: v for k, v in fields.items()},
                "digest": self.vectors.digest,
                "preset": self.spec.name,
                "vector_dim": int(self.vectors.vectors.shape[1]),
            },
            "weights": {
                "sha256": fields["weights_sha256"],
                "source": (self.sidecar.get("provenance") or {}).get("source") if self.sidecar else None,
                "random": self.weights_note is not None,
                "message": self.weights_note,
            },
            "search": {"query": self.query_from, "refine": self.refine, "can_embed": self.can_embed},
            "display_cache": {
                "scans": len(self.rows),
                "converted": sum((self.display_folder / f"{self._display_stem(s)}.json").exists() for s in self.order),
            },
            "ctfm_version": __version__,
            "max_upload_mb": self.uploads.max_bytes / 2**20,
            "max_voxels": self.uploads.max_voxels,
            "search_seconds": self.budget.seconds,
        }

    # ---- slices --------------------------------------------------------------------------
    def slice_png(self, scan_id: str, axis: str, index: int, window: str, size: int | None = None) -> bytes:

        self.row(scan_id)
        return render_slice(self.volumes.get(scan_id), axis, index, window, size)

    # ---- search and heatmaps -------------------------------------------------------------
    def query(self, scan_id: str, point_mm, query_from: str | None = None):
        """The region query at a point (cached: a search and its heatmaps share one embedding)."""
        self._check_point(scan_id, point_mm)
        source = query_from or self.query_from
        cache_key = (scan_id, tuple(round(float(v), 3) for v in point_mm), source)
        with self._cache_lock:
            if cache_key in self._queries:
                self._queries.move_to_end(cache_key)
                return self._queries[cache_key]
        with self._encoder_use(source == "centred"), _by_id(scan_id):
            query = self.session.region_query(scan_id, [float(v) for v in point_mm], source)
        with self._cache_lock:
            self._queries[cache_key] = query
            while len(self._queries) > 32:
                self._queries.popitem(last=False)
        return query

    def search(
        self,
        scan_id: str,
        point_mm,
        k: int,
        target: str | None,
        query_from: str | None = None,
        refine: str | None = None,
    ) -> list[dict]:
        """Top-``k`` hits ``{scan_id, point_mm, score, window_score, rank}`` for a point of a scan."""
        if target is not None:
            self.row(target)
        query = self.query(scan_id, point_mm, query_from)
        with self._encoder_use((refine or self.refine) == "fine"), _by_id(target or scan_id):
            hits = self.session.search_point(query, None, k=k, target=target, refine=refine or self.refine)
        return [
            {
                "scan_id": h.scan_id,
                "point_mm": [round(v, 2) for v in h.point_mm],
                "score": round(h.score, 5),
                "rank": h.rank,
                "window_score": round(h.window_score, 5),
                "name": self._name(self.rows[h.scan_id]),
                "query": query.source,
            }
            for h in hits
        ]

    def _check_point(self, scan_id: str, point_mm) -> None:
        self.row(scan_id)
        if len(point_mm) != 3 or not np.all(np.isfinite(np.asarray(point_mm, dtype=np.float64))):
            raise OptionError(f"point {list(point_mm)}: expected three finite numbers x, y, z (mm, RAS)")
        if not self.volumes.get(scan_id).contains(point_mm):
            raise OptionError(
                f"point {[round(float(v), 1) for v in point_mm]} mm lies outside scan {scan_id} (click inside the image)"
            )

    def heatmap_volume(self, target: str, query_scan: str, point_mm, query_from: str | None = None) -> np.ndarray:
        """Similarity to the query point on the target's display grid, [X, Y, Z] scaled to [0, 1]."""
        self.row(target)
        query = self.query(query_scan, point_mm, query_from)
        cache_key = (target, query_scan, tuple(round(float(v), 3) for v in point_mm), query.source)
        with self._cache_lock:
            if cache_key in self._heatmaps:
                self._heatmaps.move_to_end(cache_key)
                return self._heatmaps[cache_key]
        with self._exclusive(), _by_id(target):
            source_grid, _ = self.session.similarity_volume(query, target)
        volume = self.volumes.get(target).reorient(np.asarray(source_grid, dtype=np.float32))
        low, high = float(np.min(volume)), float(np.max(volume))
        volume = ((volume - low) / (high - low) if high > low else np.ones_like(volume)).astype(np.float32)
        with self._cache_lock:
            self._heatmaps[cache_key] = volume
            while len(self._heatmaps) > 16:
                self._heatmaps.popitem(last=False)
        return volume

    def heatmap_png(
        self, target: str, query_scan: str, point_mm, axis: str, index: int, query_from: str | None = None
    ) -> bytes:

        volume = self.heatmap_volume(target, query_scan, point_mm, query_from)
        display = self.volumes.get(target)
        return png_bytes(colour_overlay(display.view(volume, axis, index)))

    def heatmap_nifti(self, target: str, query_scan: str, point_mm, query_from: str | None = None) -> bytes:
        import gzip

        import nibabel as nib

        volume = self.heatmap_volume(target, query_scan, point_mm, query_from)
        image = nib.Nifti1Image(np.nan_to_num(volume, nan=0.0).astype(np.float32), self.volumes.get(target).affine)
        image.header["descrip"] = (
            f"ctfm similarity to {query_scan} at {[round(float(v), 1) for v in point_mm]} mm".encode()[:79]
        )
        return gzip.compress(image.to_bytes(), compresslevel=1)

    # ---- uploads -------------------------------------------------------------------------
    def add_upload(self, stream, filename: str) -> dict:
        """Check, store, embed (the run's model, weights, preset, pooling, overlap) and add a scan."""

        if self.encoder is None:
            raise OptionError(
                "this server was started without the store's weights, so it cannot embed uploads the store's way "
                "(restart it with --weights)"
            )

        path = self.uploads.receive(stream, filename)
        filename = shown_name(filename)  # as the messages below repeat it: one line, 200 characters at most
        fields = self.key_fields
        try:
            sources = discover_inputs([str(path)])
        except CTInputError as exc:
            self.uploads.discard(path)
            raise CTInputError(
                filename, "the upload is not a usable CT", exc.problem.replace(str(path), "the upload")
            ) from None
        except BaseException:
            self.uploads.discard(path)
            raise
        if len(sources) != 1:
            self.uploads.discard(path)
            found = "no CT series" if not sources else f"{len(sources)} series"
            raise CTInputError(
                filename,
                f"the upload is not a usable CT: it holds {found}",
                "upload one NIfTI file or a zip of exactly one DICOM CT series",
            )
        try:
            result = ctfm.embed(
                [str(path)],
                encoder=self.encoder,
                model=fields["model"],
                mode="patches",
                out=str(self.root),
                precision=fields["precision"],
                device=self.device,
                overlap=float(fields["overlap"]),
                pool=fields["pool"],
                preset=self.spec,
            )
        except BaseException:
            self.uploads.discard(path)
            raise
        if result.totals.failed:
            self.uploads.discard(path)
            _, message = result.totals.failed[0]
            raise CTInputError(filename, "the upload is not a usable CT", message.replace(str(path), "the upload"))
        if not result:
            self.uploads.discard(path)
            raise CTInputError(
                filename, "the scan was embedded but is not in the store's run", "check the store with ctfm store check"
            )
        self.reload()
        return self.scan_entry(result[0]["scan_id"])


@contextlib.contextmanager
def _by_id(scan_id: str):
    """Input errors about a scan named by its store id, not by the server's path to it (a file
    that cannot be read is one: its source moved)."""
    try:
        yield
    except CTInputError as exc:
        if exc.path is None or exc.path in (scan_id, f"scan {scan_id}"):
            raise
        if not os.path.exists(exc.path):
            raise _unreadable(scan_id) from None
        problem, fix = (part.replace(exc.path, "its source file") for part in (exc.problem, exc.fix))
        raise CTInputError(f"scan {scan_id}", problem, fix) from None
    except OSError:
        raise _unreadable(scan_id) from None


def _unreadable(scan_id: str) -> CTInputError:
    return CTInputError(
        f"scan {scan_id}",
        "its source file cannot be read now (moved, deleted or unreadable)",
        "put it back where it was embedded from, or embed it again",
    )


def _private_paths(root: Path, rows) -> list[tuple[str, str]]:
    """``(server path, what a reply says instead)``, longest first: each scan's source, its
    folder and the folder above, and the store."""
    pairs = {}
    for row in rows:
        source = str(row.get("source_path") or "")
        if not os.path.isabs(source):
            continue
        pairs[source] = f"scan {row['scan_id']}"
        parent = Path(source).parent
        for folder in (parent, parent.parent):
            if str(folder) not in ("/", "") and len(folder.parts) > 1:
                pairs.setdefault(str(folder), "<server folder>")
    pairs[str(Path(root).resolve())] = "<store>"
    pairs[str(root)] = "<store>"
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))


def _spec_of(row: dict):

    return PreprocessSpec.from_json(row["preprocess_spec"])
