"""Damaged store files: reading them safely, saying so in one line, writing without leaving any.

Every Parquet file of a store is read through :func:`read_parquet`: a file that is not readable
Parquet in the store's schema (truncated, empty, overwritten with garbage, another table) raises
:class:`DamagedFileError`, one line naming the file and the command that repairs it
(``ctfm store check --repair STORE``), never a bare pyarrow error. Every file the store and its
index write goes through :func:`writing`: the write lands under a hidden temporary name and is
renamed only once it was written, flushed, fsynced and closed without an error
(:func:`ctfm.runtime.atomic_path`); a full disk or a file size limit (``ENOSPC``, ``EDQUOT``,
``EFBIG``) leaves the previous file as it was and says so in one line (:class:`StoreWriteError`).

:func:`quarantine` moves damaged files into ``STORE/quarantine/<time>-<id>/`` with a note of why
(``note.json``), for ``ctfm store check --repair``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from pathlib import Path

from ctfm.errors import CTInputError, one_line
from ctfm.runtime import utc_now, write_text_atomic
from ctfm.store.schema import conform

QUARANTINE_DIR = "quarantine"
NOTE_NAME = "note.json"
# The filesystem ran out of room for the write: reported as a one-line error, the old file kept.
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DamagedFileError(CTInputError):
    """A file of the store or of its index is damaged (truncated, empty, garbage, inconsistent)."""


class StoreWriteError(CTInputError):
    """A store or index file could not be written (disk full, file size limit); nothing was replaced."""


def damaged_store_file(path, root, problem: str) -> DamagedFileError:
    """The one-line error of a damaged store file, pointing to ``ctfm store check``."""
    return DamagedFileError(
        path,
        f"damaged store file: {problem}",
        f"run `ctfm store check {root}`; `ctfm store check --repair {root}` moves it to {QUARANTINE_DIR}/ and the "
        "next `ctfm embed` of the same sources recomputes the scans it held",
    )


def read_parquet(path: Path, root, schema, columns: list[str] | None = None):
    """The table of the store file ``path`` in ``schema`` (only ``columns`` when given).

    Missing columns (files of an older ctfm) read as nulls (:func:`ctfm.store.schema.conform`).
    ``FileNotFoundError`` passes through (a concurrent compaction folded the part), as does
    ``PermissionError`` (not damage: the CLI reports it as such); anything else that stops the
    file from reading is a :class:`DamagedFileError` naming it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        _check_shape(pq.read_schema(path), schema)
        if columns is None:
            table = pq.read_table(path)
        else:
            present = set(pq.read_schema(path).names)
            table = pq.read_table(path, columns=[name for name in columns if name in present])
        return conform(table, schema if columns is None else pa.schema([f for f in schema if f.name in columns]))
    except (FileNotFoundError, PermissionError):
        raise
    except (pa.ArrowException, OSError, ValueError, TypeError, KeyError) as exc:
        raise damaged_store_file(path, root, f"not readable Parquet of this table ({reason(exc, path)})") from None


# Columns every file of a table has had, in any ctfm version: a file without them is another table.
REQUIRED_COLUMNS = {  # most specific first: a table is the first whose columns its schema holds
    "patches": ("scan_id", "patch_index", "embedding"),
    "scans": ("scan_id", "embedding"),
    "failures": ("source_path", "error"),
}


def _check_shape(found, schema) -> None:
    """Refuse a file whose schema is not the table's: required columns missing, or a column of a
    type that cannot be read as the store's (checked on the footer, before any row is read)."""
    import pyarrow as pa

    names = set(found.names)
    kind = next((k for k, cols in REQUIRED_COLUMNS.items() if set(cols) <= set(schema.names)), None)
    missing = [c for c in REQUIRED_COLUMNS.get(kind, ()) if c not in names]
    if missing:
        raise ValueError(f"no {', '.join(missing)} column (another table)")
    for field in schema:
        if field.name in names:
            have = found.field(field.name).type
            if have != field.type:
                try:
                    pa.array([], type=have).cast(field.type)
                except (pa.ArrowException, ValueError, TypeError):
                    raise ValueError(f"column {field.name} is {have}, not {field.type}") from None


def reason(exc: BaseException, path) -> str:
    """A reader's error in a few words: the file's own name, given in the message, left out."""
    text = one_line(exc, 1000)
    for prefix in (f"Could not open Parquet input source '{path}': ", f"{path}: "):
        text = text.replace(prefix, "")
    text = text.split(". Either the file")[0]
    return text[:140]


@contextlib.contextmanager
def writing(path):
    """Turn a full disk (or a file size limit) met while writing ``path`` into one line saying that
    nothing was replaced; other errors pass through unchanged."""
    try:
        yield
    except OSError as exc:
        if exc.errno in FULL_ERRNOS:
            raise StoreWriteError(
                path,
                f"could not be written ({os.strerror(exc.errno)}); the previous file, if any, is unchanged",
                "free space on the disk (or raise the file size limit) and run the command again",
            ) from None
        raise


def quarantine(root: Path, entries: list[tuple[Path, str]]) -> tuple[Path | None, list[dict]]:
    """Move each ``(file, reason)`` under ``root`` into a new ``root/quarantine/<time>-<id>/``,
    keeping its path relative to the store: ``(folder, moved)``, ``moved`` one ``{file, moved_to,
    reason}`` per file (paths relative to the store); ``(None, [])`` when there was nothing to move.
    :func:`write_note` then records them there."""
    if not entries:
        return None, []
    root = Path(root)
    stamp = utc_now()[:19].replace(":", "").replace("-", "")
    folder = root / QUARANTINE_DIR / f"{stamp}Z-{uuid.uuid4().hex[:8]}"
    moved = []
    for path, reason in entries:
        relative = Path(path).relative_to(root)
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        moved.append({"file": str(relative), "moved_to": str(target.relative_to(root)), "reason": reason})
    return folder, moved


def write_note(folder: Path, moved: list[dict], extra: dict | None = None) -> Path:
    """``folder/note.json``: when, every file moved there (from where, why), and ``extra``."""
    note = {"created_at": utc_now(), "moved": moved, **(extra or {})}
    return write_text_atomic(Path(folder) / NOTE_NAME, json.dumps(note, indent=1) + "\n")
