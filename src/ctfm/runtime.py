"""Small helpers every batch job shares: UTC timestamps, progress bars, all-or-nothing files,
output paths and devices checked before any work, the process's rank, a crash-tolerant process pool."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

from ctfm.errors import CTInputError, OptionError, one_line

PARTIAL_SUFFIX = ".partial"  # hidden temporaries are named .<name>.<uuid>.partial until renamed


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``2026-11-27T21:04:05+00:00``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def progress_bar(total: int, enabled: bool, unit: str = "scan", desc: str | None = None):
    """A tqdm bar over ``total`` items (a no-op bar when ``enabled`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


# --------------------------------------------------------------------------- atomic writes


def temporary_name(path: Path, suffix: str = "") -> Path:
    """A hidden, unique name beside ``path`` to write to before the rename (``suffix`` last, for
    writers that choose the format by extension, e.g. ``.nii.gz``)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}{suffix}")


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def require_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse, before any work and without creating anything, an output folder that cannot be made:
    an empty path, a file in its place, a file or an unwritable folder as its nearest existing
    ancestor. Returns the path."""
    if not str(path).strip():
        raise OptionError(f"{what}: empty path (give the folder to write)")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CTInputError(path, "exists and is not a folder", f"give a folder (or a new path) for the {what}")
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise CTInputError(probe, f"is a file, so the {what} {path} cannot be made under it", "give another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CTInputError(probe, "is not writable", f"give a {what} where you may write")
    return path


def require_output_file(path: str | os.PathLike, suffixes: tuple[str, ...], what: str = "output") -> Path:
    """Refuse, before any work, an output file whose suffix is not one of ``suffixes`` (the format
    it is written in), that is a folder, or whose folder cannot be made. Creates nothing."""
    if not str(path).strip():
        raise OptionError(f"{what}: empty path (give the file to write)")
    path = Path(path)
    if not path.name.lower().endswith(tuple(s.lower() for s in suffixes)):
        raise OptionError(
            f"{what} {path}: written as {' or '.join(suffixes)}, so the name must end so (e.g. {path.name.split('.')[0] or 'out'}{suffixes[0]})"
        )
    if path.is_dir():
        raise CTInputError(path, "is a folder", f"give a file name ending {suffixes[0]} for the {what}")
    require_output_dir(path.parent if str(path.parent) else ".", f"folder of the {what}")
    return path


# What --device may name: torch device types ctfm runs on.
DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(device: str | None, option: str = "--device") -> str:
    """The device to run on: ``None`` or ``""`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``;
    a named device must exist on this machine (``cuda`` without CUDA, ``cuda:3`` with two GPUs and
    ``bogus`` are one-line :class:`OptionError`). The one check of every ``--device``."""
    import torch

    if device is None or not str(device).strip():
        return "cuda" if torch.cuda.is_available() else "cpu"
    text = str(device).strip()
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise OptionError(f"{option} {text!r}: not a device ctfm runs on (use cpu, cuda or cuda:N, or mps)")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{option} {text}: no CUDA GPU is visible on this machine (use {option} cpu)")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise OptionError(f"{option} {text}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    if parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise OptionError(f"{option} {text}: MPS is not available on this machine (use {option} cpu)")
    return text


# Lightning accelerators a run may name; "auto" picks what the machine has.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def check_accelerator(accelerator: str, option: str = "accelerator") -> str:
    """A Lightning accelerator that this machine has (``tpu`` or ``gpu`` without CUDA: :class:`OptionError`)."""
    import torch

    name = str(accelerator).strip().lower()
    if name not in ACCELERATORS:
        raise OptionError(f"{option} {accelerator!r}: unknown or not supported here; known: {', '.join(ACCELERATORS)}")
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise OptionError(f"{option} {accelerator}: no CUDA GPU is visible on this machine (use {option}=cpu or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise OptionError(f"{option} {accelerator}: MPS is not available on this machine (use {option}=cpu or auto)")
    return name


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Write ``path`` all or nothing: yields a hidden temporary beside it to write (a file, or a
    folder the caller creates); on success its bytes are fsynced, it is renamed onto ``path`` and
    the folder is fsynced; on any error (in the write, flush, fsync or close) it is removed and
    ``path`` is left as it was.

    A folder replaces an existing folder by a swap (the old one is renamed aside, then deleted).
    Readers never see half a file; a crash leaves no debris under the final name.

    >>> with atomic_path(out / "table.json") as tmp:      # doctest: +SKIP
    ...     tmp.write_text(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, suffix)
    try:
        yield tmp
        if not (tmp.exists() or tmp.is_symlink()):
            raise FileNotFoundError(f"{tmp}: nothing was written to the temporary path")
        _fsync_tree(tmp)
        if tmp.is_dir() and path.is_dir():
            old = temporary_name(path, ".old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
        _fsync_folder(path.parent)  # the rename itself on disk (as SQLite and Parquet writers do)
    finally:
        _remove(tmp)


def _fsync_folder(folder: Path) -> None:
    """fsync a folder's entry list, where the platform allows opening a folder (POSIX)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; the rename stands as the OS keeps it
        return
    try:
        os.fsync(handle)
    except OSError:  # some filesystems refuse fsync on a folder; the file's own bytes are synced
        pass
    finally:
        os.close(handle)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``Path(path).write_text(text)`` (UTF-8), all or nothing (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_parquet_atomic(table, path: str | os.PathLike) -> Path:
    """Write a pyarrow ``table`` to ``path`` all or nothing (see :func:`atomic_path`)."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


# --------------------------------------------------------------------------- ranks

_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # torchrun/Lightning, SLURM, LSF
_WORLD_VARIABLES = ("WORLD_SIZE", "SLURM_NTASKS", "JSM_NAMESPACE_SIZE")


def jsonable(value):
    """``value`` with numpy scalars/arrays, paths and dataclasses turned into JSON types and
    non-finite floats into ``None`` (JSON has no NaN)."""
    if hasattr(value, "as_dict") and callable(value.as_dict):
        value = value.as_dict()
    elif isinstance(value, Result):
        value = value.to_json()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if type(value).__module__ == "numpy":  # arrays and numpy scalars, without importing numpy here
        value = value.tolist() if hasattr(value, "shape") and value.shape else value.item()
        if isinstance(value, list):
            return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


@dataclasses.dataclass
class Result:
    """What a verb returns: typed fields, :meth:`to_json` (a JSON-able dict) and :meth:`summary`
    (one line for people). Subclasses are dataclasses; ``to_json`` holds their fields."""

    def to_json(self) -> dict:
        return jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def summary(self) -> str:
        return type(self).__name__


@dataclasses.dataclass
class DocumentResult(Result):
    """A result whose body is a document: ``data`` (the keys results.json records beside
    ``provenance``) and ``provenance`` (what produced it). Reads like the body: ``result["summary"]``,
    ``"compare" in result``. :meth:`to_json` is the results.json layout, ``{"provenance": ..., **data}``."""

    data: dict = dataclasses.field(default_factory=dict)
    provenance: dict = dataclasses.field(default_factory=dict)

    def __getitem__(self, key: str):
        return self.data[key]

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def keys(self):
        return self.data.keys()

    def items(self):
        return self.data.items()

    def to_json(self) -> dict:
        return jsonable({"provenance": self.provenance, **self.data})


def _env_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def rank_and_world_size(environment: bool = True) -> tuple[int, int]:
    """(global rank, world size) of this process.

    torch.distributed's when a process group is initialised; else, with ``environment``, what
    the launcher set before the group exists (as Lightning reads it): ``RANK``/``WORLD_SIZE``
    (torchrun, Lightning), ``SLURM_PROCID``/``SLURM_NTASKS``, ``JSM_NAMESPACE_*`` (LSF), or
    ``NODE_RANK``/``LOCAL_RANK`` (Lightning's own launcher; the rank is then
    ``NODE_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK``, with 1000 standing in for an unset
    ``LOCAL_WORLD_SIZE``: nonzero for every process but the first); else (0, 1).

    ``environment=False`` answers (0, 1) without a process group: for code that communicates
    (a gather needs the group, not just the variables).
    """
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # torch is a dependency; this keeps the helper usable without it
        pass
    if not environment:
        return 0, 1
    world = _env_int(_WORLD_VARIABLES)
    rank = _env_int(_RANK_VARIABLES)
    if rank is None:
        node = _env_int(("NODE_RANK", "GROUP_RANK")) or 0
        local = _env_int(("LOCAL_RANK", "SLURM_LOCALID")) or 0
        rank = node * (_env_int(("LOCAL_WORLD_SIZE",)) or 1000) + local
    return rank, max(world or 1, rank + 1)


# --------------------------------------------------------------------------- process pools


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    warnings.simplefilter("ignore")


def parallel_map(fn, items, workers: int = 1, on_crash=None):
    """Yield ``(item, fn(item))`` for every item, in completion order.

    ``workers > 1`` runs ``fn`` (a picklable, top-level function) in a pool of spawned processes,
    each with ``cpu_count // workers`` torch threads. An exception escaping ``fn``, or a worker
    process dying (out of memory), yields ``(item, on_crash(item, message))`` (re-raised when
    ``on_crash`` is None); a dead pool is replaced and the remaining items go on.
    """
    items = list(items)

    def crashed(item, message):
        if on_crash is None:
            raise RuntimeError(message)
        return on_crash(item, message)

    if workers <= 1 or len(items) <= 1:
        for item in items:
            try:
                result = fn(item)
            except Exception as exc:
                result = crashed(item, f"{item}: {one_line(exc, 300, with_type=True)}")
            yield item, result
        return

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, (os.cpu_count() or 1) // workers)
    pending = list(reversed(items))

    def new_pool():
        return ProcessPoolExecutor(
            max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(threads,)
        )

    pool = new_pool()
    running: dict = {}
    try:
        while pending or running:
            while pending and len(running) < 2 * workers:
                item = pending.pop()
                running[pool.submit(fn, item)] = item
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for future in finished:
                item = running.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:
                    broken = True
                    result = crashed(
                        item, f"{item}: a worker process died while working on it (out of memory? use fewer --workers)"
                    )
                except Exception as exc:
                    result = crashed(item, f"{item}: {one_line(exc, 300, with_type=True)}")
                yield item, result
            if broken:
                for item in list(running.values()):
                    yield (
                        item,
                        crashed(
                            item,
                            f"{item}: a worker process died while working on it (out of memory? use fewer --workers)",
                        ),
                    )
                running.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
