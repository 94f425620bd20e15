"""Scan and region search over a store, with everything loaded once.

:class:`SearchSession` opens a store for searching: it picks the run (one computation key per
level; never mixes them), reads the run's vectors into memory once (scan vectors, and the
patch vectors with their world centres), loads a fresh FAISS scan index when there is one, and
builds the encoder only when a query needs it. Every query after the first is numpy on those
matrices: a region search over 100 stored scans of a few hundred windows each is one
[N, 512] x [512] product plus a per-scan maximum.

Which query vector a region search uses (``query_from``):

- ``"centred"``: the run's window centred on the point, cut from the freshly preprocessed
  query scan and encoded (the CT-FM demo's protocol; needs the encoder: ``weights=``);
- ``"stored"``: the query scan's stored window that contains the point, nearest its centre
  (no model run; the window is off-centre by up to half the grid stride, reported as
  ``offset_mm``, and that offset is carried to every hit). Only for scans in the store;
- ``"auto"`` (default): ``centred`` when the session has an encoder, else ``stored``.

Refinement of each hit (``refine``): ``"fine"`` (pattern search with the encoder, to a voxel),
``"weighted"`` (similarity-weighted centre of the top windows around the best one), ``"none"``
(the best window's centre); ``"auto"``: ``fine`` for a single target when the session has an
encoder, else ``weighted`` (a store-wide search refines k hits; ``fine`` costs ~100 window
embeddings each).

A hit means "the same place relative to the query's window": the click's offset from the query
window's centre, in that window's voxel axes, is added to the matched window through the
target's own axes (:func:`ctfm.search.regions.window_axes`). ``fine`` starts from every position
the hit proposes: the best window and the weighted centre for the query vector, and, for a
centred query of a stored scan, the target window that best matches the query scan's stored
window nearest the point (the ``anchor``), moved by that window's offset. So a point searched in
its own scan, or in a copy of it in any orientation, comes back at that point (its own window
scores 1) whatever the weights.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import numpy as np

from ctfm.embedding.modes import encode_windows, window_size
from ctfm.errors import CTInputError, OptionError
from ctfm.io import save_nifti
from ctfm.preprocess import load_usable_ct, preprocess
from ctfm.search.query import (
    ScanRef,
    centred_window,
    check_point_in_image,
    cut_window,
    embed_file,
    load_encoder,
    resolve_scan,
    run_spec,
)
from ctfm.search.regions import (
    grid_stride,
    nominal_axes,
    pattern_search,
    similarity_on_grid,
    weighted_centre,
    window_axes,
    window_half_extent_mm,
)
from ctfm.store import open_store
from ctfm.store.index import UnusableIndexError, list_indexes, load_index, prepare_vectors
from ctfm.store.vectors import RunVectors, load_run_vectors, matching_scans, run_digest, select_run

QUERY_SOURCES = ("auto", "centred", "stored")
REFINEMENTS = ("auto", "fine", "weighted", "none")
PREPARED_CACHE = 4  # preprocessed scans kept for centred queries and fine refinement


@dataclass
class ScanHit:
    rank: int
    scan_id: str
    source_path: str
    score: float
    series_uid: str | None = None
    body_part: str | None = None
    series_description: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RegionHit:
    """A region hit: ``point_mm`` (refined, RAS mm, the target's world frame), ``score``
    (cosine of the query and the best window, or of the refined window for ``fine``)."""

    rank: int
    scan_id: str
    source_path: str
    score: float
    point_mm: list[float]
    window_center_mm: list[float]
    window_score: float
    refine: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RegionQuery:
    """The query vector of a region search and how it was obtained."""

    scan: ScanRef
    point_mm: np.ndarray
    vector: np.ndarray
    source: str  # "centred" or "stored"
    window_center_mm: list[float] | None = None
    offset_mm: float = 0.0
    offset_vox: np.ndarray = field(default_factory=lambda: np.zeros(3))  # point - window centre, window voxels
    anchor: tuple[np.ndarray, np.ndarray] | None = None  # (stored window vector, its offset_vox)

    def describe(self) -> str:
        if self.source == "centred":
            return "the window centred on the point, embedded with the store's weights"
        return (
            f"the stored window nearest the point (centre {', '.join(f'{v:.1f}' for v in self.window_center_mm)} mm, "
            f"{self.offset_mm:.1f} mm away; each hit keeps the point's offset from that window)"
        )


@dataclass
class _Grid:
    """One scan's windows in memory: unit vectors [n, d], centres [n, 3] RAS, starts [n, 3]."""

    scan_id: str
    row: dict
    unit: np.ndarray
    centers_mm: np.ndarray
    starts: np.ndarray


@dataclass
class SearchSession:
    """A store opened for search (see the module docstring).

    Args:
        store: a store folder or :class:`ctfm.store.EmbeddingStore`.
        run: digest (or prefix) of the run to search when the store holds several.
        where: ``{column: value}`` of the scan rows: picks the run (with ``run``) and keeps only
            matching scans as hits (every query's ``filters`` add to it).
        weights / encoder: the store's weights (checked by sha256), for files outside the
            store, centred region queries and fine refinement.
        device: where the encoder runs.
        use_index: use a fresh scan-level FAISS index when one exists (exact search otherwise).
    """

    store: object
    run: str | None = None
    where: dict | None = None
    weights: str | None = None
    encoder: object = None
    device: str = "cpu"
    use_index: bool = True
    _scan: RunVectors | None = field(default=None, init=False, repr=False)
    _patch: RunVectors | None = field(default=None, init=False, repr=False)
    _patch_unit: np.ndarray | None = field(default=None, init=False, repr=False)
    _bounds: np.ndarray | None = field(default=None, init=False, repr=False)
    _index: object = field(default=None, init=False, repr=False)
    _index_checked: bool = field(default=False, init=False, repr=False)
    _prepared: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)
    _transient: dict = field(default_factory=dict, init=False, repr=False)
    _encoder_checked: bool = field(default=False, init=False, repr=False)
    _spec: object = field(default=None, init=False, repr=False)
    _spans: dict = field(default_factory=dict, init=False, repr=False)
    _axes: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):

        self.store = open_store(self.store)

    def _filters(self, filters: dict | None) -> dict | None:
        """The session's ``where`` and a query's own filters, together."""
        merged = {**(self.where or {}), **(filters or {})}
        return merged or None

    # ---- what is loaded once ------------------------------------------------------------
    @property
    def scan_vectors(self) -> RunVectors:
        if self._scan is None:
            self._scan = load_run_vectors(self.store, "scan", select_run(self.store, "scan", self.run, self.where))
        return self._scan

    @property
    def patch_vectors(self) -> RunVectors:
        if self._patch is None:
            patch = load_run_vectors(self.store, "patch", select_run(self.store, "patch", self.run, self.where))
            self._patch_unit = prepare_vectors(patch.vectors, "cosine")
            ids = patch.scan_id
            cuts = np.flatnonzero(ids[1:] != ids[:-1]) + 1 if len(ids) else np.zeros(0, dtype=int)
            self._bounds = np.concatenate([[0], cuts, [len(ids)]]).astype(np.int64)
            self._spans = {
                str(ids[lo]): (int(lo), int(hi)) for lo, hi in zip(self._bounds[:-1], self._bounds[1:]) if hi > lo
            }
            self._patch = patch
        return self._patch

    def preload(self) -> SearchSession:
        """Read the vectors of both levels now (an app calls this once at start-up)."""
        _ = self.scan_vectors  # the properties read and keep the vectors
        try:
            _ = self.patch_vectors
        except OptionError:  # a store without patch vectors still serves scan search
            pass
        self._scan_index()
        return self

    def _encoder(self, key: tuple, required: str | None = None):
        if not self._encoder_checked and (self.encoder is not None or self.weights is not None):
            self.encoder = load_encoder(key, self.weights, self.encoder).to(self.device)
            self._encoder_checked = True
        if self.encoder is None and required:
            raise OptionError(
                f"{required} needs the store's weights (model {key[1]}, weights sha256 {str(key[2])[:16]}...): give "
                "--weights (weights= in Python)"
            )
        return self.encoder if self._encoder_checked else None

    def _scan_index(self):
        if self._index_checked or not self.use_index:
            return self._index
        self._index_checked = True
        digest = run_digest(self.scan_vectors.key)
        if not any(m["level"] == "scan" and m["digest"] == digest for m in list_indexes(self.store)):
            return None
        try:
            self._index = load_index(self.store, "scan", run=digest)
        except UnusableIndexError as exc:  # stale or damaged
            warnings.warn(f"{exc}; searching the store exactly instead", stacklevel=3)
            self._index = None
        return self._index

    def _prepared_scan(self, path: str):
        """(loaded image, preprocessed volume) of a source, cached (LRU)."""
        if path in self._prepared:
            self._prepared.move_to_end(path)
            return self._prepared[path]

        image, _ = load_usable_ct(path, spec=self.spec)
        entry = (image, preprocess(image, self.spec))
        self._prepared[path] = entry
        while len(self._prepared) > PREPARED_CACHE:
            self._prepared.popitem(last=False)
        return entry

    @property
    def spec(self):
        """The PreprocessSpec of the patch run (one per run: it is part of the key)."""
        if self._spec is None:
            self._spec = run_spec(next(iter(self.patch_vectors.scans.values())))
        return self._spec

    @property
    def window_size(self) -> tuple[int, int, int]:

        return window_size(self.spec)

    # ---- scans ----------------------------------------------------------------------------
    def resolve(self, text: str, level: str = "patch") -> ScanRef:
        vectors = self.patch_vectors if level == "patch" else self.scan_vectors
        return resolve_scan(vectors.scans, text, self.store.root)

    def scan_vector(self, query: str | ScanRef) -> tuple[np.ndarray, ScanRef]:
        """The run's scan vector of a stored scan, or of a file embedded the run's way."""
        vectors = self.scan_vectors
        ref = query if isinstance(query, ScanRef) else resolve_scan(vectors.scans, query, self.store.root)
        if ref.in_store:
            i = int(np.flatnonzero(vectors.scan_id == ref.scan_id)[0])
            return vectors.vectors[i], ref
        encoder = self._encoder(vectors.key, required=f"{ref.path}: a scan outside the store")
        row = embed_file(ref.path, vectors.key, run_spec(next(iter(vectors.scans.values()))), encoder, self.device)
        if vectors.level == "scan" and row.get("patches"):
            self._remember_transient(ref, row)
        return np.asarray(row["embedding"], dtype=np.float32), ref

    def search_scans(
        self,
        query: str | ScanRef | np.ndarray,
        k: int = 10,
        filters: dict | None = None,
        include_self: bool = False,
        metric: str = "cosine",
    ) -> list[ScanHit]:
        """The ``k`` scans nearest to ``query`` (scan id, path or a vector of the run)."""
        _check_k(k)
        vectors = self.scan_vectors
        if isinstance(query, np.ndarray):
            vector, ref = query.astype(np.float32), None
        else:
            vector, ref = self.scan_vector(query)
        allowed = matching_scans(vectors.scan_table, self._filters(filters))
        skip = {ref.scan_id} if ref is not None and ref.scan_id and not include_self else set()
        index = self._scan_index()
        if index is not None:
            rows = index.allowed_rows(allowed)
            scores, found = index.search(vector[None], k + len(skip), allowed=rows)
            pairs = [(float(s), str(index.ids["scan_id"][r])) for s, r in zip(scores[0], found[0]) if r >= 0]
        else:
            if metric not in ("cosine", "l2"):
                raise OptionError(f"metric {metric!r}: expected cosine or l2")
            if metric == "cosine":
                scores = prepare_vectors(vectors.vectors, "cosine") @ prepare_vectors(vector[None], "cosine")[0]
            else:
                scores = -np.linalg.norm(vectors.vectors - vector[None], axis=1)
            order = np.argsort(-scores, kind="stable")
            pairs = [(float(scores[i]), str(vectors.scan_id[i])) for i in order]
        hits = []
        for score, scan_id in pairs:
            if scan_id in skip or (allowed is not None and scan_id not in allowed):
                continue
            row = vectors.scans[scan_id]
            hits.append(
                ScanHit(
                    len(hits) + 1,
                    scan_id,
                    row["source_path"],
                    score,
                    row.get("series_uid"),
                    row.get("body_part"),
                    row.get("series_description"),
                )
            )
            if len(hits) == k:
                break
        return hits

    # ---- regions --------------------------------------------------------------------------
    def _grid_of(self, scan_id: str) -> _Grid:
        if scan_id in self._transient:
            return self._transient[scan_id]
        vectors = self.patch_vectors
        span = self._spans.get(scan_id)
        if span is None:
            raise OptionError(
                f"scan {scan_id}: has no patch vectors in the store's patch run (embed it with --mode patches)"
            )
        lo, hi = span
        return _Grid(
            scan_id, vectors.scans[scan_id], self._patch_unit[lo:hi], vectors.centers_mm[lo:hi], vectors.starts[lo:hi]
        )

    def _remember_transient(self, ref: ScanRef, row: dict) -> _Grid:
        patches = sorted(row["patches"], key=lambda p: p["patch_index"])
        grid = _Grid(
            scan_id=f"file:{row['scan_id']}",
            row={k: v for k, v in row.items() if k not in ("patches", "embedding")},
            unit=prepare_vectors(np.asarray([p["embedding"] for p in patches], dtype=np.float32), "cosine"),
            centers_mm=np.asarray([p["center_mm"] for p in patches], dtype=np.float64),
            starts=np.asarray([p["start_voxel"] for p in patches], dtype=np.int64),
        )
        self._transient[grid.scan_id] = grid
        ref.scan_id = grid.scan_id
        return grid

    def _target_grid(self, target: str | ScanRef) -> _Grid:
        ref = target if isinstance(target, ScanRef) else self.resolve(target)
        if ref.in_store:
            return self._grid_of(ref.scan_id)
        encoder = self._encoder(self.patch_vectors.key, required=f"{ref.path}: a target outside the store")
        row = embed_file(ref.path, self.patch_vectors.key, self.spec, encoder, self.device)
        return self._remember_transient(ref, row)

    def region_query(self, scan: str | ScanRef, point_mm, query_from: str = "auto") -> RegionQuery:
        """The query vector of the region around ``point_mm`` (RAS mm) in ``scan``."""
        if query_from not in QUERY_SOURCES:
            raise OptionError(f"query_from {query_from!r}: expected one of {', '.join(QUERY_SOURCES)}")
        point = _point(point_mm)
        vectors = self.patch_vectors
        ref = scan if isinstance(scan, ScanRef) else self.resolve(scan)
        encoder = self._encoder(
            vectors.key,
            required=None if query_from != "centred" and ref.in_store else f"{ref.text}: a centred query window",
        )
        if query_from == "stored" or (query_from == "auto" and encoder is None):
            if not ref.in_store:
                raise OptionError(
                    f"{ref.text}: not in the store, so it has no stored windows (give --weights to embed it)"
                )
            grid = self._grid_of(ref.scan_id)
            i, offset = self._nearest_window(grid, point)
            return RegionQuery(
                ref,
                point,
                grid.unit[i],
                "stored",
                grid.centers_mm[i].tolist(),
                float(np.linalg.norm(grid.centers_mm[i] - point)),
                offset,
            )
        image, prepared = self._prepared_scan(ref.source_path)
        check_point_in_image(image, point, ref.source_path)
        window, start = centred_window(prepared, point, self.window_size)
        vector = self._encode(np.asarray(window)[None])[0]
        affine = np.asarray(prepared.affine, dtype=np.float64)
        centre_vox = start + (np.asarray(self.window_size) - 1) / 2.0
        offset = np.linalg.solve(affine, np.append(point, 1.0))[:3] - centre_vox
        anchor = None
        if ref.in_store and ref.scan_id in self._spans:
            grid = self._grid_of(ref.scan_id)
            near = self._nearest_window(grid, point, required=False)
            if near is not None:
                anchor = (grid.unit[near[0]], near[1])
        return RegionQuery(ref, point, vector, "centred", offset_vox=offset, anchor=anchor)

    def _grid_axes(self, grid: _Grid) -> np.ndarray:
        """RAS mm per voxel step of a scan's preprocessed grid, read off its windows (cached)."""
        if grid.scan_id not in self._axes:
            self._axes[grid.scan_id] = window_axes(grid.centers_mm, grid.starts, nominal_axes(self.spec))
        return self._axes[grid.scan_id]

    def _nearest_window(self, grid: _Grid, point: np.ndarray, required: bool = True):
        """``(index, offset_vox)`` of the stored window that contains ``point`` and whose centre is
        nearest it; the offset is point minus centre in the window's voxel axes."""
        half = window_half_extent_mm(self.spec, self.window_size)
        inside = np.all(np.abs(grid.centers_mm - point) <= half + 1e-6, axis=1)
        if not inside.any():
            if not required:
                return None
            raise CTInputError(
                grid.row["source_path"],
                f"point ({', '.join(f'{v:g}' for v in point)}) mm lies outside every stored window of the scan",
                "give x,y,z in world millimetres (RAS) inside the scan",
            )
        distance = np.linalg.norm(grid.centers_mm - point, axis=1)
        distance[~inside] = np.inf
        i = int(np.argmin(distance))
        return i, np.linalg.solve(self._grid_axes(grid), point - grid.centers_mm[i])

    def _encode(self, windows: np.ndarray) -> np.ndarray:
        """Windows [B, 1, D, H, W] -> unit vectors [B, d] (batches of 8)."""
        import torch

        precision = self.patch_vectors.key[5]
        out = []
        for i in range(0, len(windows), 8):
            out.append(
                encode_windows(
                    self.encoder, torch.from_numpy(np.ascontiguousarray(windows[i : i + 8])), self.device, precision
                ).numpy()
            )
        return prepare_vectors(np.concatenate(out), "cosine")

    def search_point(
        self,
        scan,
        point_mm,
        k: int = 10,
        target=None,
        filters: dict | None = None,
        query_from: str = "auto",
        refine: str = "auto",
        include_self: bool | None = None,
    ) -> list[RegionHit]:
        """The ``k`` scans (or the one ``target``) whose windows best match the region at
        ``point_mm`` of ``scan``, each hit refined to a point in its own world mm.

        ``include_self`` (default: only when ``target`` is the query scan) lets the query scan
        itself be a hit.
        """
        _check_k(k)
        if refine not in REFINEMENTS:
            raise OptionError(f"refine {refine!r}: expected one of {', '.join(REFINEMENTS)}")
        query = scan if isinstance(scan, RegionQuery) else self.region_query(scan, point_mm, query_from)
        encoder = self._encoder(self.patch_vectors.key)
        # auto: fine for a single target (one hit), weighted across the store (fine costs ~100
        # window embeddings per hit); "fine" asks for it on every hit.
        mode = refine if refine != "auto" else ("fine" if encoder is not None and target is not None else "weighted")
        if mode == "fine" and encoder is None:
            self._encoder(self.patch_vectors.key, required="fine refinement")
        if target is not None:
            grids = [self._target_grid(target)]
            candidates = [(float(np.max(grids[0].unit @ query.vector)), grids[0])]
        else:
            candidates = self._best_windows(query, k, filters, include_self=bool(include_self))
        hits = []
        for _, grid in candidates:
            hits.append(self._refined_hit(len(hits) + 1, grid, query, mode))
        if mode == "fine":
            hits.sort(key=lambda h: -h.score)
            for i, h in enumerate(hits):
                h.rank = i + 1
        return hits

    def _best_windows(self, query: RegionQuery, k: int, filters, include_self: bool) -> list[tuple[float, _Grid]]:
        vectors = self.patch_vectors
        scores = self._patch_unit @ query.vector
        starts = self._bounds[:-1]
        best = np.maximum.reduceat(scores, starts) if len(scores) else np.zeros(0)
        ids = vectors.scan_id[starts] if len(scores) else np.zeros(0, dtype=object)
        allowed = matching_scans(vectors.scan_table, self._filters(filters))
        keep = np.ones(len(ids), dtype=bool)
        if allowed is not None:
            keep &= np.isin(ids, np.asarray(sorted(allowed), dtype=object))
        if not include_self and query.scan.scan_id is not None:
            keep &= ids != query.scan.scan_id
        order = [i for i in np.argsort(-best, kind="stable") if keep[i]][:k]
        return [(float(best[i]), self._grid_of(str(ids[i]))) for i in order]

    def _refined_hit(self, rank: int, grid: _Grid, query: RegionQuery, mode: str) -> RegionHit:
        vector = query.vector
        scores = grid.unit @ vector
        size = self.window_size
        axes = self._grid_axes(grid)
        shift = axes @ query.offset_vox  # the point's offset from its window, in this scan's axes (mm)
        centre, best = weighted_centre(grid.centers_mm, scores, window_half_extent_mm(self.spec, size))
        score = float(scores[best])
        if mode == "none":
            point = grid.centers_mm[best] + shift
        elif mode == "weighted":
            point = centre + shift
        else:
            proposals = [grid.centers_mm[best], centre]  # where the query window's centre may lie
            if query.anchor is not None:
                anchor_vector, anchor_offset = query.anchor
                j = int(np.argmax(grid.unit @ anchor_vector))
                proposals.append(grid.centers_mm[j] + axes @ (anchor_offset - query.offset_vox))
            image, prepared = self._prepared_scan(grid.row["source_path"])
            affine = np.asarray(prepared.affine, dtype=np.float64)
            half = (np.asarray(size) - 1) / 2.0
            start0 = np.stack([np.linalg.solve(affine, np.append(p, 1.0))[:3] - half for p in proposals])

            def score_at(starts):
                windows = np.stack([cut_window(prepared, np.round(s).astype(int), size) for s in starts])
                return self._encode(windows) @ vector

            start, score, _ = pattern_search(score_at, start0, grid_stride(grid.starts, size) / 2.0, ceiling=1.0)
            point = (affine @ np.append(start + half + query.offset_vox, 1.0))[:3]
        return RegionHit(
            rank,
            grid.row["scan_id"],
            grid.row["source_path"],
            float(score),
            [float(v) for v in point],
            grid.centers_mm[best].tolist(),
            float(scores[best]),
            mode,
        )

    def similarity_volume(self, query: RegionQuery | np.ndarray, target) -> tuple[np.ndarray, np.ndarray]:
        """``(similarity [X, Y, Z] float32, affine 4x4 RAS)`` on the target's own voxel grid:
        per voxel, the mean cosine of the target windows covering it (voxels no window reaches
        carry the lowest value)."""
        vector = (
            query.vector if isinstance(query, RegionQuery) else prepare_vectors(np.asarray(query)[None], "cosine")[0]
        )
        grid = self._target_grid(target)
        image, prepared = self._prepared_scan(grid.row["source_path"])
        scores = grid.unit @ vector
        affine = np.asarray(image.affine, dtype=np.float64)
        volume = similarity_on_grid(
            grid.starts,
            scores,
            self.window_size,
            tuple(prepared.shape[1:]),
            np.asarray(prepared.affine, dtype=np.float64),
            tuple(image.shape[1:]),
            affine,
        )
        floor = float(np.nanmin(volume)) if np.isfinite(volume).any() else float(scores.min())
        return np.nan_to_num(volume, nan=floor).astype(np.float32), affine

    def write_similarity_volume(self, query, target, path) -> str:
        """:meth:`similarity_volume` written as NIfTI (atomically)."""
        import torch
        from monai.data import MetaTensor

        volume, affine = self.similarity_volume(query, target)
        save_nifti(MetaTensor(torch.from_numpy(volume)[None], affine=torch.as_tensor(affine)), path)
        return str(path)


def _point(point_mm) -> np.ndarray:
    point = np.asarray(point_mm, dtype=np.float64).reshape(-1)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise OptionError(f"point {point_mm!r}: expected three finite numbers x,y,z (RAS mm)")
    return point


def _check_k(k: int) -> None:
    if int(k) < 1:
        raise OptionError(f"k {k}: must be >= 1")


# ---- one-call functions (a session each; keep a SearchSession to search repeatedly) ----------
def search_scans(
    store, query, k: int = 10, filters: dict | None = None, include_self: bool = False, **session
) -> list[ScanHit]:
    return SearchSession(store, **session).search_scans(query, k, filters, include_self)


def search_point(
    store,
    scan,
    point_mm,
    k: int = 10,
    target=None,
    filters: dict | None = None,
    query_from: str = "auto",
    refine: str = "auto",
    **session,
) -> list[RegionHit]:
    return SearchSession(store, **session).search_point(scan, point_mm, k, target, filters, query_from, refine)


def similarity_volume(
    store, scan, point_mm, target, query_from: str = "auto", **session
) -> tuple[np.ndarray, np.ndarray]:
    s = SearchSession(store, **session)
    return s.similarity_volume(s.region_query(scan, point_mm, query_from), target)
