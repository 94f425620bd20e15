"""A FAISS index beside the store, over the vectors of exactly one run at one level.

Files (``STORE/index/``), per level and run digest (format in docs/store.md)::

    <level>-<digest>.json                 the manifest: what the index covers (written last)
    <level>-<digest>.<build>.faiss        the FAISS index, rows in the order of ...
    <level>-<digest>.<build>.ids.parquet  scan_id, write_id (, patch_index) of every index row

The manifest names its build's files, so a crash mid-build leaves the previous index usable.
A manifest may name only files of its own index inside ``STORE/index/`` (a plain name starting
``<level>-<digest>.``, resolving inside the folder): anything else (an absolute path, ``..``, a
symlink out, another index's file) makes it a damaged manifest, and nothing it names is opened
or deleted. A damaged index (manifest not JSON or not a manifest, a FAISS or ids file missing,
truncated or not matching the manifest's sha256 and counts) is a one-line
:class:`DamagedIndexError`; searches fall back to exact search with a warning, ``ctfm index
check`` lists it, and ``ctfm index build`` replaces it.
It records the computation key (model, weights, preset, mode, pool, precision, overlap) and the
scan rows ``(scan_id, write_id)`` covered; an index is **stale** when the store's rows of that
run differ (scans added: :func:`update_index` extends it; scans re-embedded or removed: it is
rebuilt). Vectors of another run are never added (:class:`MixedKeysError`).

Kinds: ``flat`` (exact, the default), ``ivf`` (inverted lists, ``nlist``/``nprobe``; lists
stored flat, as 8-bit scalars (``sq8``) or product-quantised (``pq64``), optionally re-ranked
exactly over ``refine * k`` candidates), ``hnsw`` (graph, ``m``/``ef_construction``/``ef_search``). Metrics: ``cosine`` (vectors
L2-normalised, inner product; score = cosine similarity) and ``l2`` (score = -distance).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctfm import __version__
from ctfm.errors import CTInputError, OptionError, UserError, one_line, optional_import
from ctfm.runtime import atomic_path, utc_now, write_parquet_atomic, write_text_atomic
from ctfm.store.damage import DamagedFileError, writing
from ctfm.store.embeddings import STALE_TEMPORARY_SECONDS
from ctfm.store.schema import RUN_KEY
from ctfm.store.vectors import LEVELS, RunVectors, key_dict, load_run_vectors, run_digest, run_scan_table, select_run

KINDS = ("flat", "ivf", "hnsw")
METRICS = ("cosine", "l2")
FORMAT_VERSION = 1
INDEX_DIR = "index"


MANIFEST_NAME = re.compile(r"(scan|patch)-([0-9a-f]{16})\.json")  # what ctfm writes; other names are not indexes
HASH_CHUNK = 1 << 22


class UnusableIndexError(UserError):
    """The index cannot answer for the store (stale or damaged): search the store exactly instead."""


class StaleIndexError(UnusableIndexError):
    """The store's rows of the index's run changed since the index was built."""


class DamagedIndexError(UnusableIndexError, DamagedFileError):
    """A manifest, FAISS or ids file of the index is damaged, or the manifest names a file outside
    its own index (refused: nothing it names is opened or deleted)."""


class MixedKeysError(UserError):
    """Vectors of another computation key were offered to an index."""


@dataclass
class IndexParams:
    """How to build (and by default search) an index."""

    kind: str = "flat"
    metric: str = "cosine"
    nlist: int | None = None  # ivf: inverted lists (default ~4 sqrt(N))
    nprobe: int = 16  # ivf: lists visited per query
    m: int = 32  # hnsw: links per node
    ef_construction: int = 80  # hnsw: candidate list while building
    ef_search: int = 64  # hnsw: candidate list while searching
    train_size: int | None = None  # ivf: vectors sampled to train the quantiser (default 64 per list)
    codec: str = "flat"  # ivf: how list entries are stored: flat, sq8, pq<M> or pq<M>x<bits>
    refine: int = 0  # > 0: keep the full vectors and re-rank refine * k candidates exactly
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise OptionError(f"index kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.metric not in METRICS:
            raise OptionError(f"metric {self.metric!r}: expected one of {', '.join(METRICS)}")
        for name in ("nprobe", "m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise OptionError(f"{name} {getattr(self, name)}: must be >= 1")
        if self.nlist is not None and self.nlist < 1:
            raise OptionError(f"nlist {self.nlist}: must be >= 1")
        if self.refine < 0:
            raise OptionError(f"refine {self.refine}: must be >= 0 (0: no re-ranking)")
        codec_factory(self.codec)

    @staticmethod
    def from_manifest(data: dict) -> IndexParams:
        """The params a manifest records (keys of older or newer ctfm versions ignored)."""
        known = set(IndexParams.__dataclass_fields__)
        return IndexParams(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def codec_factory(codec: str) -> str:
    """The FAISS factory string of an IVF list codec: ``flat`` -> Flat, ``sq8`` -> SQ8,
    ``pq64`` -> PQ64 (64 sub-vectors of 8 bits), ``pq64x4`` -> PQ64x4."""
    text = str(codec).lower()
    if text == "flat":
        return "Flat"
    if text == "sq8":
        return "SQ8"
    match = re.fullmatch(r"pq(\d+)(?:x(\d+))?", text)
    if match:
        return f"PQ{match.group(1)}" + (f"x{match.group(2)}" if match.group(2) else "")
    raise OptionError(f"codec {codec!r}: expected flat, sq8, pq<M> or pq<M>x<bits> (e.g. pq64)")


def ivf_part(index):
    """The IVF index inside ``index`` (under a refine wrapper), or None."""
    faiss = optional_import("faiss", "search")
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None


def index_dir(store) -> Path:
    return Path(store.root) / INDEX_DIR


def manifest_path(store, level: str, digest: str) -> Path:
    return index_dir(store) / f"{level}-{digest}.json"


def damaged_index(store, path: Path, level: str, digest: str, problem: str) -> DamagedIndexError:
    """The one-line error of a damaged index file, pointing to ``ctfm index check`` and the rebuild."""
    return DamagedIndexError(
        path,
        f"damaged {level}-level index: {problem}",
        f"`ctfm index check {store.root}` lists damaged indexes; `ctfm index build {store.root} --level {level} "
        f"--run {digest}` replaces it",
    )


def index_member(store, level: str, digest: str, name, what: str) -> Path:
    """The path of ``name``, a file a manifest of index ``level``/``digest`` names, or a
    :class:`DamagedIndexError`: it must be a plain file name of that index (no folder, no ``..``,
    not absolute, starting ``<level>-<digest>.``) resolving inside ``STORE/index/`` (no symlink out)."""
    folder = index_dir(store)
    where = manifest_path(store, level, digest)
    prefix = f"{level}-{digest}."
    if not isinstance(name, str) or not name:
        raise damaged_index(store, where, level, digest, f"{what} is not a file name ({name!r})")
    if os.path.isabs(name) or "/" in name or "\\" in name or name in (".", "..") or not name.startswith(prefix):
        raise damaged_index(
            store,
            where,
            level,
            digest,
            f"{what} {name!r} is not a file of this index in {folder} (a manifest names only its own files there; "
            "refused, nothing it names was opened or deleted)",
        )
    if not inside_index_dir(store, folder / name):
        raise damaged_index(
            store,
            where,
            level,
            digest,
            f"{what} {name!r} leads outside {folder} (a symlink; refused, nothing it names was opened or deleted)",
        )
    return folder / name


def inside_index_dir(store, path: Path) -> bool:
    """Whether ``path``, symlinks followed, lies in ``STORE/index/``, itself inside the store."""
    folder = index_dir(store)
    try:
        real = folder.resolve()
        return real.is_relative_to(Path(store.root).resolve()) and path.resolve().is_relative_to(real)
    except (OSError, RuntimeError):  # a symlink loop
        return False


def read_manifest(store, path: Path) -> dict:
    """The manifest at ``path`` (``<level>-<digest>.json``), checked: JSON, the keys and types
    ctfm writes, level and digest those of its name, files inside its own index; a one-line
    :class:`DamagedIndexError` otherwise."""
    match = MANIFEST_NAME.fullmatch(path.name)
    level, digest = (match.group(1), match.group(2)) if match else ("scan", "?")

    def damaged(problem: str) -> DamagedIndexError:
        return damaged_index(store, path, level, digest, problem)

    if not inside_index_dir(store, path):
        raise damaged(f"the manifest leads outside {index_dir(store)} (a symlink; refused, not read)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, PermissionError):
            raise
        raise damaged(f"the manifest is not JSON ({one_line(exc, 100)})") from None
    if not isinstance(data, dict):
        raise damaged(f"the manifest is not a JSON object (a {type(data).__name__})")
    expected = {
        "format": int,
        "level": str,
        "digest": str,
        "key": dict,
        "params": dict,
        "dim": int,
        "vectors": int,
        "scans": int,
        "covered": list,
        "faiss_file": str,
        "ids_file": str,
    }
    missing = [k for k in expected if k not in data]
    if missing:
        raise damaged(f"the manifest lacks {', '.join(missing)}")
    wrong = [k for k, kind in expected.items() if not isinstance(data[k], kind) or isinstance(data[k], bool)]
    if wrong:
        raise damaged(
            f"the manifest's {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not of the type ctfm writes"
        )
    if data["level"] != level or data["digest"] != digest:
        raise damaged(f"the manifest says index {data['level']}-{data['digest']}, its file name {path.name}")
    if data.get("format") != FORMAT_VERSION:
        return data  # another format: load_index says which, and how to rebuild
    missing_key = [k for k in RUN_KEY if k not in data["key"]]
    if missing_key:
        raise damaged(f"the manifest's key lacks {', '.join(missing_key)}")
    if not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair) for pair in data["covered"]
    ):
        raise damaged("the manifest's covered rows are not [scan_id, write_id] pairs")
    try:
        IndexParams.from_manifest(data["params"])
    except (OptionError, TypeError, ValueError) as exc:
        raise damaged(f"the manifest's params are not valid ({one_line(exc, 100)})") from None
    for what in ("faiss_file", "ids_file"):
        index_member(store, level, digest, data[what], what)
    return data


def default_nlist(n: int) -> int:
    """~4 sqrt(N) lists, at most N / 39 (FAISS wants >= 39 training vectors per list)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))


def check_nlist(params: IndexParams, n: int) -> None:
    """An ivf index cannot have more lists than vectors to train them on: a one-line :class:`OptionError`."""
    if params.kind == "ivf" and params.nlist is not None and params.nlist > n:
        raise OptionError(
            f"--nlist {params.nlist}: more inverted lists than the {n} vector(s) of this run; give --nlist <= {n} "
            f"(or leave it out: ~4 sqrt(N), {default_nlist(n)} here)"
        )


def new_faiss_index(dim: int, params: IndexParams, n: int):
    """An empty (untrained for ivf) FAISS index for ``n`` vectors of ``dim``."""
    faiss = optional_import("faiss", "search")
    metric = faiss.METRIC_INNER_PRODUCT if params.metric == "cosine" else faiss.METRIC_L2
    if params.kind == "flat":
        return faiss.IndexFlatIP(dim) if params.metric == "cosine" else faiss.IndexFlatL2(dim)
    if params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.m, metric)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
        return index
    nlist = params.nlist or default_nlist(n)
    index = faiss.index_factory(dim, f"IVF{nlist},{codec_factory(params.codec)}", metric)
    index.nprobe = min(params.nprobe, nlist)
    if params.refine:
        index = faiss.IndexRefineFlat(index)
        index.k_factor = float(params.refine)
    return index


def prepare_vectors(matrix: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous, L2-normalised for cosine (zero vectors stay zero)."""
    x = np.ascontiguousarray(matrix, dtype=np.float32)
    if metric == "cosine":
        x = x.copy()
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        np.divide(x, norms, out=x, where=norms > 0)
    return x


def train_and_add(index, vectors: np.ndarray, params: IndexParams) -> None:
    """Train (ivf) on a seeded sample, then add ``vectors`` (already prepared)."""
    if params.kind == "ivf" and not index.is_trained:
        n_train = min(len(vectors), params.train_size or 64 * ivf_part(index).nlist)
        rng = np.random.default_rng(params.seed)
        sample = (
            vectors if n_train >= len(vectors) else vectors[np.sort(rng.choice(len(vectors), n_train, replace=False))]
        )
        index.train(sample)
    if len(vectors):
        index.add(vectors)


def _rows_digest(covered) -> str:
    h = hashlib.sha256()
    for scan_id, write_id in sorted(covered):
        h.update(f"{scan_id}:{write_id}\n".encode())
    return h.hexdigest()


@dataclass
class Staleness:
    """How the store's rows of the run differ from what the index covers."""

    added: list[str] = field(default_factory=list)  # scan ids new in the store
    changed: list[str] = field(default_factory=list)  # re-embedded (new write id) or removed

    @property
    def stale(self) -> bool:
        return bool(self.added or self.changed)

    def describe(self) -> str:
        parts = []
        if self.added:
            parts.append(f"{len(self.added)} scan(s) added to the store since it was built")
        if self.changed:
            parts.append(f"{len(self.changed)} scan(s) re-embedded or removed")
        return ", ".join(parts) or "up to date"


class VectorIndex:
    """A loaded index: ``search(queries, k)`` over one run's vectors at one level.

    ``ids``: the index rows' ``scan_id``, ``write_id`` (and ``patch_index``) arrays;
    ``manifest``: the JSON manifest (key, params, covered rows, build facts).
    """

    def __init__(self, faiss_index, manifest: dict, ids: dict, path: Path | None = None):
        self.faiss_index = faiss_index
        self.manifest = manifest
        self.ids = ids
        self.path = path

    @property
    def key(self) -> tuple:
        return tuple(self.manifest["key"][k] for k in RUN_KEY)

    @property
    def level(self) -> str:
        return self.manifest["level"]

    @property
    def params(self) -> IndexParams:
        return IndexParams.from_manifest(self.manifest["params"])

    @property
    def ntotal(self) -> int:
        return int(self.faiss_index.ntotal)

    def covered(self) -> set[tuple[str, str]]:
        return {tuple(pair) for pair in self.manifest["covered"]}

    def staleness(self, store) -> Staleness:
        """Compare the covered rows with the store's current rows of the same run."""
        table = run_scan_table(store, self.key)
        current = set(zip(table.column("scan_id").to_pylist(), table.column("write_id").to_pylist()))
        covered = self.covered()
        current_ids = {s for s, _ in current}
        covered_ids = {s for s, _ in covered}
        added = sorted(current_ids - covered_ids)
        changed = sorted({s for s, _ in covered - current})
        return Staleness(added=added, changed=changed)

    def check_key(self, key: tuple, what: str = "the query") -> None:
        """Refuse vectors of another computation (other weights, preset, pool, ...)."""
        if tuple(key) != self.key:
            differing = [
                f"{name} {mine!r} vs {theirs!r}" for name, mine, theirs in zip(RUN_KEY, self.key, key) if mine != theirs
            ]
            raise MixedKeysError(
                f"{self.path or 'index'}: {what} was computed differently from the index's vectors "
                f"({'; '.join(differing)}) (embed it with the store's model, weights and preset, or build an index of "
                "that run with --run)"
            )

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        refine: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` [Q, d] -> ``(scores [Q, k], rows [Q, k])``; rows index ``ids`` (-1: none).

        Score: cosine similarity, or minus the Euclidean distance (higher is better for both).
        ``allowed``: index rows a hit may come from (a record filter); ``nprobe``, ``ef_search``,
        ``refine``: override the stored search defaults.
        """
        faiss = optional_import("faiss", "search")
        params = self.params
        q = prepare_vectors(np.atleast_2d(queries), params.metric)
        if q.shape[1] != self.faiss_index.d:
            raise OptionError(f"query vectors have {q.shape[1]} values, the index holds {self.faiss_index.d}-d vectors")
        k = max(1, min(int(k), self.ntotal)) if self.ntotal else 1
        kwargs = {}
        if params.kind == "ivf":
            kwargs["nprobe"] = min(nprobe or params.nprobe, ivf_part(self.faiss_index).nlist)
        if params.kind == "hnsw":
            kwargs["efSearch"] = max(ef_search or params.ef_search, k)
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64)) if allowed is not None else None
        if selector is not None:
            kwargs["sel"] = selector
        search_params = None
        if kwargs:
            cls = {"ivf": faiss.SearchParametersIVF, "hnsw": faiss.SearchParametersHNSW}.get(
                params.kind, faiss.SearchParameters
            )
            search_params = cls(**kwargs)
        if params.kind == "ivf" and params.refine:
            search_params = faiss.IndexRefineSearchParameters(
                k_factor=float(refine or params.refine), base_index_params=search_params
            )
            if selector is not None:
                search_params.sel = selector
        scores, rows = self.faiss_index.search(q, k, params=search_params)
        if params.metric == "l2":
            scores = -np.sqrt(np.maximum(scores, 0.0))
        scores[rows < 0] = -np.inf
        return scores, rows

    def allowed_rows(self, scan_ids: set[str] | None) -> np.ndarray | None:
        if scan_ids is None:
            return None
        return np.flatnonzero(np.isin(self.ids["scan_id"], np.asarray(sorted(scan_ids), dtype=object)))


def _ids_table(vectors: RunVectors):
    import pyarrow as pa

    columns = {
        "scan_id": pa.array(vectors.scan_id.tolist(), pa.string()),
        "write_id": pa.array(vectors.write_id.tolist(), pa.string()),
    }
    if vectors.level == "patch":
        columns["patch_index"] = pa.array(vectors.patch_index, pa.int32())
    return pa.table(columns)


def write_faiss(faiss_index, path: Path) -> tuple[int, str]:
    """Write ``faiss_index`` to ``path`` through Python's file object, every write checked:
    ``(bytes, sha256)``. (``faiss.write_index(index, filename)`` reports a failed final flush only
    on stderr and leaves a truncated file; here a failed write, flush or close raises.)"""
    faiss = optional_import("faiss", "search")
    h = hashlib.sha256()
    written = 0
    failure: list[BaseException] = []
    with open(path, "wb") as fh:

        def write(chunk: bytes) -> None:
            nonlocal written
            try:
                fh.write(chunk)
            except BaseException as exc:  # FAISS turns it into its own error; keep the real one
                failure.append(exc)
                raise
            h.update(chunk)
            written += len(chunk)

        try:
            faiss.write_index(faiss_index, faiss.PyCallbackIOWriter(write))
        except Exception:
            if failure:
                raise failure[0] from None
            raise
        fh.flush()
        os.fsync(fh.fileno())
    size = path.stat().st_size
    if size != written:
        raise OSError(f"{path}: {size} bytes on disk, {written} written")
    return written, h.hexdigest()


def writable_index_dir(store) -> Path:
    """``STORE/index/``, unless it is a link out of the store (refused in one line: an index is
    written, and its old files deleted, only inside its store)."""
    folder = index_dir(store)
    if folder.is_symlink() and not inside_index_dir(store, folder):
        raise CTInputError(
            folder,
            "leads outside the store (a symlink); refused: an index is written only inside its store",
            f"make {folder} a folder of the store (or remove the link) and run the command again",
        )
    return folder


def _previous_files(store, level: str, digest: str, keep: set[str]) -> list[Path]:
    """The files of the index's earlier builds, to delete once the new manifest is in place: the
    ones its previous manifest names when that manifest is sound (and names only files of this
    index inside the folder); when it is damaged, the files of this index's name pattern
    (``<level>-<digest>.<build>.faiss`` / ``.ids.parquet``) in the folder, never what it names."""
    path = manifest_path(store, level, digest)
    folder = index_dir(store)
    try:
        previous = read_manifest(store, path)
    except FileNotFoundError:
        return []
    except DamagedIndexError as exc:
        warnings.warn(f"{exc}: replacing it (nothing it names is opened or deleted)", stacklevel=3)
        pattern = re.compile(rf"{level}-{digest}\.[0-9a-f]{{12}}\.(faiss|ids\.parquet)")
        return [p for p in folder.iterdir() if pattern.fullmatch(p.name) and p.name not in keep]
    if previous.get("format") != FORMAT_VERSION:
        return []
    return [
        index_member(store, level, digest, previous[what], what)
        for what in ("faiss_file", "ids_file")
        if previous[what] not in keep
    ]


def _write(
    store,
    level: str,
    key: tuple,
    faiss_index,
    ids_table,
    params: IndexParams,
    covered,
    seconds: float,
    extra: dict | None = None,
) -> Path:
    """Write a build: the FAISS file and the ids, then the manifest that names them (each under
    a temporary name, renamed only when written, flushed, fsynced and closed), then delete the
    earlier build's files. A failed write leaves the previous index whole and in use."""
    faiss = optional_import("faiss", "search")

    digest = run_digest(key)
    folder = writable_index_dir(store)
    folder.mkdir(parents=True, exist_ok=True)
    build = uuid.uuid4().hex[:12]
    stem = f"{level}-{digest}.{build}"
    faiss_path, ids_path = folder / f"{stem}.faiss", folder / f"{stem}.ids.parquet"
    path = manifest_path(store, level, digest)
    try:
        with writing(faiss_path), atomic_path(faiss_path) as tmp:
            _, faiss_sha = write_faiss(faiss_index, tmp)
        with writing(ids_path):
            write_parquet_atomic(ids_table, ids_path)
        manifest = {
            "format": FORMAT_VERSION,
            "level": level,
            "digest": digest,
            "key": {k: v for k, v in key_dict(key).items()},
            "params": params.to_dict(),
            "dim": int(faiss_index.d),
            "vectors": int(faiss_index.ntotal),
            "scans": len({s for s, _ in covered}),
            "covered": sorted([list(pair) for pair in covered]),
            "rows_sha256": _rows_digest(covered),
            "faiss_file": faiss_path.name,
            "ids_file": ids_path.name,
            "faiss_sha256": faiss_sha,
            "ids_sha256": file_sha256(ids_path),
            "build_seconds": round(seconds, 3),
            "created_at": utc_now(),
            "package_version": __version__,
            "faiss_version": faiss.__version__,
            **(extra or {}),
        }
        superseded = _previous_files(store, level, digest, keep={faiss_path.name, ids_path.name})
        with writing(path):
            write_text_atomic(path, json.dumps(manifest, indent=1) + "\n")
    except BaseException:  # the new build's files, named by no manifest
        faiss_path.unlink(missing_ok=True)
        ids_path.unlink(missing_ok=True)
        raise
    for old in superseded:  # the old build's files, now unreferenced
        old.unlink(missing_ok=True)
    now = time.time()
    for stale in folder.glob(".*.partial"):  # temporaries of builds killed mid-write, an hour on
        try:
            if now - stale.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                stale.unlink(missing_ok=True)
        except FileNotFoundError:
            continue
    return path


def build_index(
    store, level: str = "scan", params: IndexParams | None = None, run: str | None = None, where: dict | None = None
) -> VectorIndex:
    """Build (or rebuild) the index of one run at ``level`` over every current row of it
    (``run``/``where`` pick the run, as :meth:`ctfm.store.EmbeddingStore.find_run`)."""
    params = params or IndexParams()
    key = select_run(store, level, run, where)
    writable_index_dir(store)
    start = time.perf_counter()
    vectors = load_run_vectors(store, level, key)
    check_nlist(params, len(vectors.vectors))
    x = prepare_vectors(vectors.vectors, params.metric)
    index = new_faiss_index(x.shape[1], params, len(x))
    train_and_add(index, x, params)
    seconds = time.perf_counter() - start
    _write(store, level, key, index, _ids_table(vectors), params, vectors.covered(), seconds)
    return load_index(store, level, run=run_digest(key))


def update_index(
    store, level: str = "scan", run: str | None = None, where: dict | None = None
) -> tuple[VectorIndex, str]:
    """Bring an index up to date: ``(index, what was done)``, one of "up to date", "extended"
    (only new scans: their vectors are added; ivf keeps its trained lists) or "rebuilt" (scans
    re-embedded or removed, or no index yet)."""
    key = select_run(store, level, run, where)
    writable_index_dir(store)
    path = manifest_path(store, level, run_digest(key))
    if not path.exists():
        return build_index(store, level, run=run_digest(key)), "built"
    try:
        index = load_index(store, level, run=run_digest(key), on_stale="ignore")
    except DamagedIndexError as exc:  # nothing to extend: build it anew, with the params it recorded if any
        warnings.warn(f"{exc}: rebuilding it", stacklevel=2)
        with warnings.catch_warnings():  # said once: the build would say it again of a damaged manifest
            warnings.simplefilter("ignore", UserWarning)
            return build_index(store, level, _recorded_params(store, path), run=run_digest(key)), "rebuilt"
    state = index.staleness(store)
    if not state.stale:
        return index, "up to date"
    if state.changed:
        return build_index(store, level, index.params, run=run_digest(key)), "rebuilt"
    start = time.perf_counter()
    vectors = load_run_vectors(store, level, key)
    new = np.isin(vectors.scan_id, np.asarray(state.added, dtype=object))
    added = vectors.take(new)
    train_and_add(index.faiss_index, prepare_vectors(added.vectors, index.params.metric), index.params)
    import pyarrow as pa

    ids = pa.concat_tables([_ids_from_arrays(index.ids, level), _ids_table(added)])
    covered = index.covered() | added.covered()
    _write(
        store,
        level,
        key,
        index.faiss_index,
        ids,
        index.params,
        covered,
        index.manifest.get("build_seconds", 0) + time.perf_counter() - start,
    )
    return load_index(store, level, run=run_digest(key)), "extended"


def _recorded_params(store, path: Path) -> IndexParams | None:
    """The params a (possibly damaged) manifest records, when they can be read; else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return IndexParams.from_manifest(data["params"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError, OptionError, RecursionError):
        return None


def _ids_from_arrays(ids: dict, level: str):
    import pyarrow as pa

    columns = {
        "scan_id": pa.array(ids["scan_id"].tolist(), pa.string()),
        "write_id": pa.array(ids["write_id"].tolist(), pa.string()),
    }
    if level == "patch":
        columns["patch_index"] = pa.array(ids["patch_index"], pa.int32())
    return pa.table(columns)


def manifest_files(store) -> list[Path]:
    """The manifests beside the store (``<level>-<digest>.json``, the names ctfm writes)."""
    folder = index_dir(store)
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.glob("*-*.json")) if MANIFEST_NAME.fullmatch(p.name)]


def list_indexes(store) -> list[dict]:
    """The manifests of every index beside the store. A damaged one is listed as ``level``,
    ``digest`` (from its file name), ``path`` and ``damaged`` (the one-line reason), so that a
    search still finds it, tries it and falls back with that reason."""
    found = []
    for path in manifest_files(store):
        try:
            found.append(read_manifest(store, path))
        except FileNotFoundError:  # replaced by a concurrent build
            continue
        except DamagedIndexError as exc:
            level, digest = MANIFEST_NAME.fullmatch(path.name).groups()
            found.append({"level": level, "digest": digest, "path": str(path), "damaged": str(exc)})
    return found


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def open_index_files(store, manifest: dict) -> tuple[object, dict]:
    """``(faiss index, ids)`` of a checked manifest, each file checked against it (present,
    readable, its sha256 where the manifest records one, the counts and dimension); a one-line
    :class:`DamagedIndexError` naming the file otherwise."""
    faiss = optional_import("faiss", "search")
    import pyarrow as pa
    import pyarrow.parquet as pq

    level, digest = manifest["level"], manifest["digest"]

    def damaged(path, problem: str) -> DamagedIndexError:
        return damaged_index(store, path, level, digest, problem)

    files = {what: index_member(store, level, digest, manifest[what], what) for what in ("faiss_file", "ids_file")}
    for what, path in files.items():
        if not path.is_file():
            raise damaged(path, f"the manifest names {path.name}, which is missing")
        recorded = manifest.get(what.replace("_file", "_sha256"))
        if recorded and file_sha256(path) != recorded:
            raise damaged(
                path, f"{path.name} is not the file the manifest recorded (sha256 differs: truncated or changed)"
            )
    try:
        faiss_index = faiss.read_index(str(files["faiss_file"]))
    except (RuntimeError, MemoryError, OSError, ValueError) as exc:
        raise damaged(files["faiss_file"], f"not a readable FAISS index ({one_line(exc, 100)})") from None
    try:
        table = pq.read_table(files["ids_file"])
        ids = {
            "scan_id": np.asarray(table.column("scan_id").to_pylist(), dtype=object),
            "write_id": np.asarray(table.column("write_id").to_pylist(), dtype=object),
        }
        if level == "patch":
            ids["patch_index"] = table.column("patch_index").to_numpy().astype(np.int64)
    except (pa.ArrowException, OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, PermissionError):
            raise
        raise damaged(files["ids_file"], f"not a readable ids table ({one_line(exc, 100)})") from None
    counts = {"FAISS vectors": int(faiss_index.ntotal), "id rows": len(ids["scan_id"])}
    if len(set(counts.values())) != 1 or int(faiss_index.ntotal) != manifest["vectors"]:
        shown = ", ".join(f"{v} {k}" for k, v in counts.items())
        raise damaged(files["faiss_file"], f"{shown}, the manifest records {manifest['vectors']} vectors")
    if int(faiss_index.d) != manifest["dim"]:
        raise damaged(files["faiss_file"], f"{faiss_index.d}-d vectors, the manifest records {manifest['dim']}")
    return faiss_index, ids


def load_index(store, level: str = "scan", run: str | None = None, on_stale: str = "error") -> VectorIndex:
    """The index of ``level`` (of run ``run``, or the only one), checked against the store.

    ``on_stale``: ``"error"`` (a :class:`StaleIndexError` saying what changed and the command
    that fixes it), ``"warn"`` or ``"ignore"``. A damaged index is a :class:`DamagedIndexError`
    whatever ``on_stale`` says.
    """
    optional_import("faiss", "search")
    if level not in LEVELS:
        raise OptionError(f"level {level!r}: expected one of {', '.join(LEVELS)}")
    manifests = [m for m in list_indexes(store) if m["level"] == level and (run is None or m["digest"].startswith(run))]
    if not manifests:
        raise OptionError(
            f"{store.root}: no {level}-level index{f' of run {run}' if run else ''} (build one: ctfm index build "
            f"{store.root} --level {level})"
        )
    if len(manifests) > 1:
        raise OptionError(
            f"{store.root}: {len(manifests)} {level}-level indexes (runs {', '.join(m['digest'] for m in manifests)}): "
            "choose one with --run DIGEST"
        )
    manifest = manifests[0]
    if "damaged" in manifest:
        read_manifest(store, Path(manifest["path"]))  # raises its DamagedIndexError
    if manifest.get("format") != FORMAT_VERSION:
        raise OptionError(
            f"{manifest_path(store, level, manifest['digest'])}: index format {manifest.get('format')} (this ctfm reads "
            f"{FORMAT_VERSION}; rebuild it: ctfm index build {store.root} --level {level})"
        )
    faiss_index, ids = open_index_files(store, manifest)
    index = VectorIndex(faiss_index, manifest, ids, manifest_path(store, level, manifest["digest"]))
    if manifest["params"]["kind"] == "ivf":
        ivf = ivf_part(faiss_index)
        if ivf is None:
            raise damaged_index(
                store, index.path, level, manifest["digest"], "the manifest says ivf, the FAISS file holds another kind"
            )
        ivf.nprobe = min(manifest["params"]["nprobe"], ivf.nlist)
    if on_stale != "ignore":
        state = index.staleness(store)
        if state.stale:
            message = f"{index.path}: the {level}-level index is stale: {state.describe()} (run: ctfm index update {store.root} --level {level})"
            if on_stale == "error":
                raise StaleIndexError(message)
            warnings.warn(message, stacklevel=2)
    return index


def index_status(store, run: str | None = None, where: dict | None = None) -> dict:
    """Runs by level (digest, key fields, counts) and every index with its staleness (``ctfm index status``);
    ``run`` (a digest prefix) and ``where`` keep only the runs they match and those runs' indexes."""
    runs = {
        level: [
            {k: v for k, v in r.items() if k != "key"}
            for r in store.runs(level, where)
            if run is None or r["digest"].startswith(run)
        ]
        for level in LEVELS
    }
    shown = {(level, r["digest"]) for level, level_runs in runs.items() for r in level_runs}
    indexes = []
    for manifest in list_indexes(store):
        if (run is not None or where) and (manifest["level"], manifest["digest"]) not in shown:
            continue
        try:
            index = load_index(store, manifest["level"], run=manifest["digest"], on_stale="ignore")
        except DamagedIndexError as exc:
            indexes.append(
                {
                    "level": manifest["level"],
                    "run": manifest["digest"],
                    "damaged": True,
                    "stale": True,
                    "state": str(exc),
                    "path": str(manifest_path(store, manifest["level"], manifest["digest"])),
                }
            )
            continue
        state = index.staleness(store)
        params = manifest["params"]
        indexes.append(
            {
                "level": manifest["level"],
                "run": manifest["digest"],
                "kind": params["kind"],
                "metric": params["metric"],
                "vectors": manifest["vectors"],
                "scans": manifest["scans"],
                "created_at": manifest["created_at"],
                "damaged": False,
                "stale": state.stale,
                "state": state.describe(),
                "added": len(state.added),
                "changed": len(state.changed),
                "path": str(index.path),
            }
        )
    return {"store": str(store.root), "runs": runs, "indexes": indexes}
