"""The preprocessed-volume cache: every scan preprocessed once, read crop by crop while training.

Pre-training draws 15 small crops per scan per step (docs/recipe.md, Pretraining) from the
``ct-fm-ssl`` volume (SPL, 3x1x1 mm, foreground crop, pad, HU window to [0, 1]).
Loading and resampling a CT costs far more than the crops, so the cache makes that volume once per
scan and stores the result where a training step can read only the voxels of its crops.

Layout of a cache folder::

    CACHE/index.parquet      one row per cached volume (schema below)
    CACHE/failures.parquet   the scans that could not be cached, with the one-line reason
    CACHE/volumes/<scan_id>-<preset hash[:12]>-<f32|f16>.npy
                             the volume [D, H, W] (axis 0 superior-inferior), uncompressed .npy,
                             opened with ``np.load(mmap_mode="r")``

``index.parquet``: scan_id, source_path, series_uid (as requested), SeriesInstanceUID,
StudyInstanceUID, source_format, source_shape, source_spacing_mm, content_hash (sha256 of the
source voxels and affine), shape, spacing_mm and affine (16 values, RAS mm) of the cached volume,
dtype, preset, preset_hash, file (relative to CACHE), file_bytes, package_version, created_at.

Storage: float32 by default, bit-identical to ``preprocess(load_ct(path)[0], spec)``.
``dtype="float16"`` halves disk and read volume; on [0, 1] data its rounding error is at most
2**-12 (2.4e-4, 0.75 HU of the [-1024, 2048] window), measured in the tests.

Writes are atomic (a volume is written under a hidden temporary name, then renamed; the index is
rewritten the same way), so a run killed at any moment leaves no entry that points at a partial
file. A run resumes: scans whose entry exists for the same preset hash and dtype, with their
file present and of the recorded size, are skipped. One build per cache folder at a time (a lock
file enforces it).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctfm import __version__
from ctfm.errors import CTInputError, OptionError, one_line
from ctfm.io import content_hash
from ctfm.io.sources import resolve_sources
from ctfm.preprocess import PreprocessSpec, get_preset, load_usable_ct, preprocess
from ctfm.runtime import PARTIAL_SUFFIX, atomic_path, parallel_map, progress_bar, utc_now, write_parquet_atomic

INDEX_NAME = "index.parquet"
FAILURES_NAME = "failures.parquet"
VOLUMES_DIR = "volumes"
LOCK_NAME = ".build.lock"
DTYPES = {"float32": "f32", "float16": "f16"}
DEFAULT_PRESET = "ct-fm-ssl"
FLUSH_SECONDS = 10.0  # how often a long build rewrites index.parquet (and always at the end)


def _index_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("scan_id", pa.string()),
            ("source_path", pa.string()),
            ("series_uid", pa.string()),
            ("SeriesInstanceUID", pa.string()),
            ("StudyInstanceUID", pa.string()),
            ("source_format", pa.string()),
            ("source_shape", pa.list_(pa.int64())),
            ("source_spacing_mm", pa.list_(pa.float64())),
            ("content_hash", pa.string()),
            ("shape", pa.list_(pa.int64())),
            ("spacing_mm", pa.list_(pa.float64())),
            ("affine", pa.list_(pa.float64())),
            ("dtype", pa.string()),
            ("preset", pa.string()),
            ("preset_hash", pa.string()),
            ("file", pa.string()),
            ("file_bytes", pa.int64()),
            ("package_version", pa.string()),
            ("created_at", pa.string()),
        ]
    )


def _failures_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("scan_id", pa.string()),
            ("source_path", pa.string()),
            ("series_uid", pa.string()),
            ("preset_hash", pa.string()),
            ("dtype", pa.string()),
            ("error", pa.string()),
            ("created_at", pa.string()),
        ]
    )


@dataclass
class CacheSummary:
    """What a :func:`build_cache` run did."""

    cache_dir: str
    done: int = 0  # volumes written by this run
    skipped: int = 0  # already cached for this preset and dtype
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source, one-line error)
    unreadable: int = 0  # manifest rows marked unreadable by `ctfm cohort scan`, left out
    not_downloaded: int = 0  # manifest rows without a path, left out
    bytes_written: int = 0
    seconds: float = 0.0


def resolve_spec(spec=None):
    """A PreprocessSpec from a spec, a preset name, or None (``ct-fm-ssl``)."""

    if spec is None:
        return get_preset(DEFAULT_PRESET)
    if isinstance(spec, PreprocessSpec):
        return spec
    if isinstance(spec, str):
        return get_preset(spec)
    raise TypeError(f"spec must be a PreprocessSpec or a preset name, not {type(spec).__name__}")


def _check_dtype(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise OptionError(f"cache dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return name


def volume_file_name(scan_id: str, preset_hash: str, dtype: str) -> str:
    return f"{scan_id}-{preset_hash[:12]}-{DTYPES[dtype]}.npy"


# ---- one scan ---------------------------------------------------------------------------------
def preprocessed_volume(source, spec):
    """(volume [D, H, W] float32 numpy, preprocessed MetaTensor, source image, record) of one scan."""

    image, record = load_usable_ct(source.path, series_uid=source.series_uid, spec=spec)
    out = preprocess(image, spec)
    array = out.as_tensor().detach().cpu().numpy() if hasattr(out, "as_tensor") else np.asarray(out)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    return array, out, image, record


def _save_npy_atomic(array: np.ndarray, path: Path) -> int:
    """np.save to ``path`` all or nothing (:func:`ctfm.runtime.atomic_path`); returns the file size."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
    return path.stat().st_size


def cache_one(source, spec, cache_dir: str, dtype: str = "float32") -> dict:
    """Preprocess one scan into the cache folder; ``{"row": index row}`` or ``{"error": message}``.

    Never raises for a bad scan (batch jobs record the failure and go on).
    """

    try:
        array, out, image, record = preprocessed_volume(source, spec)
        source_hash = content_hash(image)
        del image
        preset_hash = spec.content_hash()
        name = volume_file_name(source.scan_id, preset_hash, dtype)
        file_bytes = _save_npy_atomic(array.astype(dtype, copy=False), Path(cache_dir) / VOLUMES_DIR / name)
        affine = np.asarray(out.affine, dtype=np.float64)
        row = {
            "scan_id": source.scan_id,
            "source_path": os.path.abspath(source.path),
            "series_uid": source.series_uid,
            "SeriesInstanceUID": record.series_uid,
            "StudyInstanceUID": record.study_uid,
            "source_format": record.format,
            "source_shape": [int(v) for v in record.shape],
            "source_spacing_mm": [float(v) for v in record.spacing_mm],
            "content_hash": source_hash,
            "shape": [int(v) for v in array.shape],
            "spacing_mm": [float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))],
            "affine": [float(v) for v in affine.ravel()],
            "dtype": dtype,
            "preset": spec.name,
            "preset_hash": preset_hash,
            "file": f"{VOLUMES_DIR}/{name}",
            "file_bytes": int(file_bytes),
            "package_version": __version__,
            "created_at": utc_now(),
        }
        return {"row": row}
    except CTInputError as exc:
        return {"error": str(exc)}
    except MemoryError:
        return {"error": f"{source}: out of memory while preprocessing (use fewer --workers)"}
    except Exception as exc:  # a batch job records every failure and goes on
        return {"error": f"{source}: {one_line(exc, 300, with_type=True)}"}


# ---- running many -------------------------------------------------------------------------------
class _BuildLock:
    """An exclusive lock on the cache folder for the duration of a build (released on exit or death)."""

    def __init__(self, cache_dir: Path):
        self.path = cache_dir / LOCK_NAME
        self.fh = None

    def __enter__(self):
        self.fh = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise CTInputError(
                self.path.parent,
                "another `ctfm cohort cache` run is writing this cache",
                "wait for it to finish, or use another cache folder",
            ) from None
        return self

    def __exit__(self, *exc):
        self.fh.close()  # closing releases the flock


def _remove_partials(cache_dir: Path) -> int:
    """Delete temporary files left by a killed run (safe: the build lock is held)."""
    n = 0
    for folder in (cache_dir, cache_dir / VOLUMES_DIR):
        for p in folder.glob(f".*{PARTIAL_SUFFIX}"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def _read_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    if not path.exists():
        return []
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:
        raise CTInputError(
            path, f"unreadable cache file ({one_line(exc, 120)})", "delete it and rebuild the cache"
        ) from None


def _entry_key(row: dict) -> tuple[str, str, str]:
    return (row["scan_id"], row["preset_hash"], row["dtype"])


def _file_ok(cache_dir: Path, row: dict) -> bool:
    try:
        return (cache_dir / row["file"]).stat().st_size == row["file_bytes"]
    except (OSError, TypeError):
        return False


def _write_index(cache_dir: Path, old_rows: list[dict], new_rows: list[dict]) -> None:
    import pyarrow as pa

    merged = {_entry_key(r): r for r in [*old_rows, *new_rows]}
    rows = sorted(
        merged.values(), key=lambda r: (r["source_path"], r.get("series_uid") or "", r["preset_hash"], r["dtype"])
    )
    schema = _index_schema()
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    write_parquet_atomic(table, cache_dir / INDEX_NAME)


def build_cache(
    sources_or_manifest, cache_dir, spec=None, workers: int = 1, progress: bool = True, dtype: str = "float32"
) -> CacheSummary:
    """Preprocess every scan once into ``cache_dir`` (see the module docstring for the layout).

    Args:
        sources_or_manifest: a path or a list of files, folders, DICOM trees, manifests
            (CSV/Parquet with ``path``; rows marked unreadable or not downloaded are left out) or
            :class:`~ctfm.embedding.runner.ScanSource` objects.
        cache_dir: the cache folder (created).
        spec: a PreprocessSpec or preset name (default ``ct-fm-ssl``).
        workers: processes preprocessing in parallel.
        progress: show a progress bar.
        dtype: ``"float32"`` (exact) or ``"float16"``.

    Returns:
        a :class:`CacheSummary`; failures are recorded in ``failures.parquet`` and listed in
        ``summary.failed``, never raised.
    """

    spec = resolve_spec(spec)
    dtype = _check_dtype(dtype)
    cache_dir = Path(cache_dir)
    start = time.perf_counter()
    resolved = resolve_sources(sources_or_manifest)
    (cache_dir / VOLUMES_DIR).mkdir(parents=True, exist_ok=True)
    summary = CacheSummary(
        cache_dir=str(cache_dir), unreadable=resolved.unreadable, not_downloaded=resolved.not_downloaded
    )
    preset_hash = spec.content_hash()
    with _BuildLock(cache_dir):
        _remove_partials(cache_dir)
        old_rows = _read_rows(cache_dir / INDEX_NAME)
        done = {
            r["scan_id"]
            for r in old_rows
            if r["preset_hash"] == preset_hash and r["dtype"] == dtype and _file_ok(cache_dir, r)
        }
        todo = [s for s in resolved.sources if s.scan_id not in done]
        summary.skipped = len(resolved.sources) - len(todo)
        new_rows: list[dict] = []
        failures: list[dict] = []
        bar = progress_bar(len(todo), progress, desc="caching")
        last_flush = time.monotonic()
        job = functools.partial(cache_one, spec=spec, cache_dir=str(cache_dir), dtype=dtype)
        try:
            for source, result in parallel_map(
                job, todo, workers=workers, on_crash=lambda s, message: {"error": message}
            ):
                if "row" in result:
                    new_rows.append(result["row"])
                    summary.done += 1
                    summary.bytes_written += result["row"]["file_bytes"]
                else:
                    summary.failed.append((str(source), result["error"]))
                    failures.append(
                        {
                            "scan_id": source.scan_id,
                            "source_path": os.path.abspath(source.path),
                            "series_uid": source.series_uid,
                            "preset_hash": preset_hash,
                            "dtype": dtype,
                            "error": result["error"],
                            "created_at": utc_now(),
                        }
                    )
                bar.update(1)
                bar.set_postfix_str(f"{len(summary.failed)} failed")
                if time.monotonic() - last_flush > FLUSH_SECONDS:
                    _write_index(cache_dir, old_rows, new_rows)
                    last_flush = time.monotonic()
        finally:
            bar.close()
            _write_index(cache_dir, old_rows, new_rows)
            _write_failures(
                cache_dir,
                failures,
                attempted={s.scan_id for s in todo},
                preset_hash=preset_hash,
                dtype=dtype,
                write=write_parquet_atomic,
            )
    summary.seconds = time.perf_counter() - start
    return summary


def _write_failures(
    cache_dir: Path, failures: list[dict], attempted: set[str], preset_hash: str, dtype: str, write
) -> None:
    """Keep earlier failures of scans not attempted now; replace those attempted by this run's."""
    import pyarrow as pa

    path = cache_dir / FAILURES_NAME
    old = [
        r
        for r in _read_rows(path)
        if not (r["scan_id"] in attempted and r["preset_hash"] == preset_hash and r["dtype"] == dtype)
    ]
    rows = old + failures
    if not rows:
        path.unlink(missing_ok=True)
        return
    schema = _failures_schema()
    write(pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema), path)


# ---- reading ------------------------------------------------------------------------------------
class VolumeCache:
    """Random access to a cache folder built by :func:`build_cache`.

    Volumes are ordered by source path (then series), so index ``i`` means the same scan however
    the cache was built. ``i`` may also be a scan id.

    >>> cache = VolumeCache("cache")                              # doctest: +SKIP
    >>> crop = cache.read_crop(0, (10, 40, 40), (32, 128, 128))   # reads only those voxels

    Args:
        cache_dir: the folder holding ``index.parquet``.
        spec: which preset's volumes to use (PreprocessSpec or name); needed only when the folder
            holds volumes of several presets or dtypes.
        dtype: ``"float32"`` or ``"float16"``, likewise.
        max_open: how many memory maps stay open (least recently used are dropped).
    """

    def __init__(self, cache_dir, spec=None, dtype: str | None = None, max_open: int = 64):
        self.cache_dir = Path(cache_dir)
        index = self.cache_dir / INDEX_NAME
        if not index.exists():
            raise CTInputError(
                self.cache_dir,
                f"not a volume cache (no {INDEX_NAME})",
                "build it with `ctfm cohort cache MANIFEST CACHE_DIR`",
            )
        rows = _read_rows(index)
        if spec is not None:
            wanted = resolve_spec(spec).content_hash()
            rows = [r for r in rows if r["preset_hash"] == wanted]
        if dtype is not None:
            rows = [r for r in rows if r["dtype"] == _check_dtype(dtype)]
        kinds = sorted({(r["preset"], r["preset_hash"][:12], r["dtype"]) for r in rows})
        if len(kinds) > 1:
            listed = ", ".join(f"{p} ({h}, {d})" for p, h, d in kinds)
            raise CTInputError(
                self.cache_dir,
                f"the cache holds volumes of several presets/dtypes: {listed}",
                "pick one with VolumeCache(cache_dir, spec=..., dtype=...)",
            )
        self._rows = sorted(rows, key=lambda r: (r["source_path"], r.get("series_uid") or ""))
        self._position = {r["scan_id"]: i for i, r in enumerate(self._rows)}
        self.max_open = max_open
        self._open: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"VolumeCache({str(self.cache_dir)!r}, {len(self)} volumes)"

    def __getstate__(self):  # memory maps are reopened in the receiving process (DataLoader workers)
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    @property
    def ids(self) -> list[str]:
        return [r["scan_id"] for r in self._rows]

    def _index(self, i) -> int:
        if isinstance(i, str):
            try:
                return self._position[i]
            except KeyError:
                raise KeyError(f"scan id {i!r} is not in the cache {self.cache_dir}") from None
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"volume {i} out of range: the cache holds {len(self)}")
        return i % len(self)

    def entry(self, i) -> dict:
        """The index row of volume ``i`` (source path, UIDs, preset, spacing, affine, ...)."""
        return dict(self._rows[self._index(i)])

    def shape(self, i) -> tuple[int, ...]:
        return tuple(int(v) for v in self._rows[self._index(i)]["shape"])

    def spacing(self, i) -> tuple[float, ...]:
        return tuple(float(v) for v in self._rows[self._index(i)]["spacing_mm"])

    def path(self, i) -> Path:
        return self.cache_dir / self._rows[self._index(i)]["file"]

    def volume(self, i) -> np.ndarray:
        """The volume [D, H, W] as a read-only ``np.memmap`` (nothing is read until sliced)."""
        k = self._index(i)
        volume = self._open.pop(k, None)
        if volume is None:
            row = self._rows[k]
            path = (self.cache_dir / row["file"]).resolve()
            if not path.is_relative_to(self.cache_dir.resolve()):  # an index must not point outside its cache
                raise CTInputError(
                    self.cache_dir / "index.parquet",
                    f"entry {row['file']!r} points outside the cache",
                    "rebuild the cache with `ctfm cohort cache`",
                )
            try:
                volume = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise CTInputError(
                    path,
                    f"cached volume unreadable ({one_line(exc, 120)})",
                    "rebuild the cache with `ctfm cohort cache` (it redoes missing files)",
                ) from None
            if tuple(volume.shape) != tuple(row["shape"]) or volume.dtype.name != row["dtype"]:
                raise CTInputError(
                    path,
                    f"cached volume is {volume.dtype.name} {tuple(volume.shape)}, the index says {row['dtype']} "
                    f"{tuple(row['shape'])}",
                    "rebuild the cache",
                )
            if len(self._open) >= self.max_open:
                self._open.pop(next(iter(self._open)))
        self._open[k] = volume  # most recently used last
        return volume

    def read_crop(self, i, start, size, dtype=np.float32) -> np.ndarray:
        """The box ``[start, start + size)`` of volume ``i`` as an array; only its voxels are read.

        ``start`` and ``size`` are (d, h, w) voxel tuples; the box must lie inside the volume.
        ``dtype=None`` keeps the stored dtype.
        """
        volume = self.volume(i)
        start = tuple(int(v) for v in start)
        size = tuple(int(v) for v in size)
        if len(start) != volume.ndim or len(size) != volume.ndim:
            raise ValueError(f"start {start} and size {size} must have {volume.ndim} values (d, h, w)")
        if (
            any(s < 0 for s in start)
            or any(n < 1 for n in size)
            or any(s + n > v for s, n, v in zip(start, size, volume.shape))
        ):
            raise ValueError(
                f"crop at {start} of size {size} does not fit in volume {self._index(i)} of shape {tuple(volume.shape)}"
            )
        crop = volume[tuple(slice(s, s + n) for s, n in zip(start, size))]
        return np.array(crop, dtype=dtype if dtype is not None else crop.dtype)
