"""Small helpers every batch job shares: UTC timestamps, progress bars, all-or-nothing Parquet files."""

from __future__ import annotations

import datetime as _dt
import os
import uuid
from pathlib import Path

PARTIAL_SUFFIX = ".partial"  # hidden temporaries are named .<name>.<uuid>.partial until renamed


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``2026-11-27T21:04:05+00:00``)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def progress_bar(total: int, enabled: bool, unit: str = "scan", desc: str | None = None):
    """A tqdm bar over ``total`` items (a no-op bar when ``enabled`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def temporary_name(path: Path) -> Path:
    """A hidden, unique name beside ``path`` to write to before the rename."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")


def write_parquet_atomic(table, path: str | os.PathLike) -> Path:
    """Write a pyarrow ``table`` to ``path`` so that the file is complete or absent: a hidden
    temporary beside it, fsync, rename (readers never see half a file; a crash leaves no debris
    under the final name)."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
