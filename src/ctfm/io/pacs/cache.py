"""The local series cache: one folder per SeriesInstanceUID, bounded, least recently used out first.

``<cache>/<SeriesInstanceUID>/`` holds the instances of a complete series and ``series.json``
(its source address, instance count, bytes, last use); a series being retrieved lives in
``<cache>/.partial/<SeriesInstanceUID>/`` and moves into place (one rename) only once every
instance has arrived, so a complete folder is never half a series and an interrupted retrieval
resumes with the instances it already has.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ctfm.runtime import write_text_atomic

MARKER = "series.json"


class SeriesCache:
    def __init__(self, root: str | os.PathLike, max_gb: float):
        self.root = Path(root)
        self.max_bytes = int(max_gb * 1e9)

    def folder(self, series_uid: str) -> Path:
        return self.root / series_uid

    def partial(self, series_uid: str) -> Path:
        return self.root / ".partial" / series_uid

    def lookup(self, series_uid: str) -> Path | None:
        """The folder of a complete cached series (its last use noted), or None."""
        folder = self.folder(series_uid)
        marker = folder / MARKER
        if not marker.is_file():
            return None
        os.utime(marker)  # last use, for LRU eviction
        return folder

    def commit(self, series_uid: str, source: str, n_instances: int) -> Path:
        """Move a complete partial series into place, note it, and evict to the bound."""
        partial, folder = self.partial(series_uid), self.folder(series_uid)
        size = sum(p.stat().st_size for p in partial.iterdir() if p.is_file())
        info = {"source": source, "series_uid": series_uid, "instances": n_instances, "bytes": size}
        write_text_atomic(partial / MARKER, json.dumps(info, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, folder)
        self.evict(keep=series_uid)
        return folder

    def entries(self) -> list[tuple[float, int, Path]]:
        """``(last use, bytes, folder)`` of every complete series, oldest first."""
        out = []
        if not self.root.is_dir():
            return out
        for folder in self.root.iterdir():
            marker = folder / MARKER
            if folder.name.startswith(".") or not marker.is_file():
                continue
            try:
                size = int(json.loads(marker.read_text(encoding="utf-8")).get("bytes", 0))
            except (OSError, ValueError):
                size = 0
            out.append((marker.stat().st_mtime, size, folder))
        return sorted(out, key=lambda e: e[0])

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least recently used series until the cache fits its bound (never ``keep``)."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, folder in entries:
            if total <= self.max_bytes:
                break
            if folder.name == keep:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
            removed.append(folder.name)
        return removed

    def touch(self, series_uid: str) -> None:
        marker = self.folder(series_uid) / MARKER
        if marker.is_file():
            now = time.time()
            os.utime(marker, (now, now))
