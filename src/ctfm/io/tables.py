"""The one table reader: manifests, label sheets and annotation files (CSV, TSV, Parquet, XLSX).

>>> table = read_table("labels.csv", required=("scan_id", "label"))   # doctest: +SKIP
>>> table.column("label").to_pylist()                                  # doctest: +SKIP

Every sheet comes back as columns (a pyarrow Table), never as Python rows. Text formats (CSV, TSV,
and the cells of an XLSX sheet) come back as text columns, header names and cells stripped, so a
scan id ``007`` stays ``007``; Parquet keeps its types. CSV files separated by ``;`` (as
TotalSegmentator's ``meta.csv``) are recognised by their header line.

Encodings, as hospitals write them: UTF-8 with or without a byte-order mark, UTF-16 with its mark
(Excel's "Unicode text"); a file that is not UTF-8 is read as cp1252 when every byte decodes so,
else as Latin-1, with a one-line notice naming the encoding used and the first byte that is not
UTF-8. ``encoding=`` (``--encoding`` on the verbs that read tables, through
:func:`using_encoding`) names it instead; bytes that do not decode with it are one line naming
the file, the byte offset and the fix. A missing file, an unknown suffix, an empty sheet or a
missing required column is a one-line :class:`~ctfm.errors.CTInputError` naming the file and
the fix.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import csv
import datetime
import io
import os
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ctfm.errors import CTInputError, MissingDependencyError, OptionError, one_line, optional_import

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".xlsx", ".xlsm")
FORMATS_TEXT = "CSV, TSV, Parquet or XLSX"
# The encoding of text tables that ``--encoding`` names for one command (None: detected).
_ENCODING: contextvars.ContextVar[str | None] = contextvars.ContextVar("ctfm_table_encoding", default=None)


def check_encoding(name: str) -> str:
    """A text encoding Python knows (``latin-1``, ``cp1252``, ``utf-8``, ...), else a one-line
    :class:`~ctfm.errors.OptionError`. Returns its canonical name."""
    try:
        return codecs.lookup(str(name)).name
    except LookupError:
        raise OptionError(
            f"--encoding {name!r}: not a text encoding Python knows (e.g. utf-8, cp1252, latin-1, utf-16)"
        ) from None


@contextlib.contextmanager
def using_encoding(encoding: str | None):
    """Within the block, text tables are read with ``encoding`` (None: detected); the CLI's
    ``--encoding`` sets it for one command."""
    token = _ENCODING.set(check_encoding(encoding) if encoding else None)
    try:
        yield
    finally:
        _ENCODING.reset(token)


def is_table(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a file of a format :func:`read_table` reads (by its suffix)."""
    return Path(path).suffix.lower() in TABLE_SUFFIXES


def read_table(
    path: str | os.PathLike, required: tuple[str, ...] | list[str] = (), encoding: str | None = None
) -> pa.Table:
    """The sheet at ``path`` as a pyarrow Table; ``required`` columns must be present.

    Args:
        path: a ``.csv`` (``,`` or ``;`` separated), ``.tsv``, ``.parquet``/``.pq`` or
            ``.xlsx``/``.xlsm`` file (the first sheet; reading XLSX needs openpyxl).
        required: column names the caller needs.
        encoding: of a CSV/TSV file (default: :func:`using_encoding`'s, else detected: UTF-8,
            else cp1252, else Latin-1, with a notice).

    Raises:
        CTInputError: no such file, an unknown suffix, an unreadable file, no header or no rows,
            a required column missing (the message lists the columns found).
        MissingDependencyError: an XLSX file without openpyxl installed.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise CTInputError(
            path,
            f"not a table format ctfm reads (suffix {suffix or 'none'})",
            f"give a {FORMATS_TEXT} file ({', '.join(TABLE_SUFFIXES)})",
        )
    if not path.is_file():
        raise CTInputError(path, "no such file", f"check the path (a {FORMATS_TEXT} file)")
    try:
        if suffix in (".parquet", ".pq"):
            table = pq.read_table(path)
        elif suffix in (".xlsx", ".xlsm"):
            table = _read_xlsx(path)
        else:
            table = _read_text(path, "\t" if suffix == ".tsv" else None, encoding or _ENCODING.get())
    except (MissingDependencyError, CTInputError, OptionError):
        raise
    except (ValueError, OSError, UnicodeDecodeError, csv.Error, pa.ArrowException) as exc:
        raise CTInputError(
            path, f"unreadable table ({one_line(exc, 200)[:160]})", f"give a {FORMATS_TEXT} file with a header row"
        ) from None
    table = table.rename_columns([str(name).strip() for name in table.column_names])
    missing = [c for c in required if c not in table.column_names]
    if missing:
        found = ", ".join(table.column_names) or "none"
        raise CTInputError(
            path,
            f"missing column(s) {', '.join(missing)} (found: {found})",
            f"add a header row with {', '.join(required)}",
        )
    if not table.column_names:
        raise CTInputError(path, "empty sheet (no header row)", "add a header row and one row per item")
    if table.num_rows == 0:
        raise CTInputError(path, "no rows", "add one row per item below the header")
    return table


def decode_text(data: bytes, path, encoding: str | None = None) -> str:
    """The text of a table file's bytes: ``encoding`` when given, else UTF-8 (a byte-order mark
    dropped; UTF-16 by its mark), else cp1252 when every byte decodes so, else Latin-1, with a
    one-line notice. Bytes that do not decode with a named ``encoding``, and NUL bytes in a
    file without a UTF-16 mark, are a one-line :class:`CTInputError` naming the byte offset."""
    if encoding:
        encoding = check_encoding(encoding)
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError as exc:
            raise CTInputError(
                path,
                f"byte 0x{data[exc.start]:02x} at offset {exc.start} is not {encoding} text",
                "give the encoding the file was saved in (--encoding cp1252, latin-1, utf-16, ...) or save it as "
                "CSV UTF-8",
            ) from None
        return text.removeprefix("\ufeff")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16").removeprefix("\ufeff")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CTInputError(
            path,
            f"NUL byte at offset {nul}: not a text table (UTF-16 without its byte-order mark, or a binary file)",
            "save the sheet as CSV UTF-8, or give --encoding utf-16-le",
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start
    for fallback in ("cp1252", "latin-1"):
        try:
            text = data.decode(fallback)
        except UnicodeDecodeError:
            continue
        warnings.warn(
            f"{path}: not UTF-8 (byte 0x{data[offset]:02x} at offset {offset}); read as {fallback} "
            f"(give --encoding to name another)",
            stacklevel=3,
        )
        return text
    raise AssertionError("latin-1 decodes every byte")  # pragma: no cover


def _read_text(path: Path, delimiter: str | None, encoding: str | None = None) -> pa.Table:
    text = decode_text(path.read_bytes(), path, encoding)
    lines = text.splitlines()
    header = lines[0] if lines else ""
    if delimiter is None:
        delimiter = ";" if header.count(";") > header.count(",") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = [row for row in reader]
    return _text_table(rows)


def _read_xlsx(path: Path) -> pa.Table:
    openpyxl = optional_import("openpyxl", "eval", f"{path}: reading an XLSX sheet (or save it as CSV)")
    workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        rows = [[_cell_text(v) for v in row] for row in workbook.active.iter_rows(values_only=True)]
    finally:
        workbook.close()
    return _text_table(rows)


def _cell_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    return str(value)


def _text_table(rows: list[list[str]]) -> pa.Table:
    """Rows of text (the first is the header) -> a Table of stripped text columns; blank rows and
    unnamed trailing columns are dropped."""
    rows = [row for row in rows if any(str(cell).strip() for cell in row)]
    if not rows:
        return pa.table({})
    header = [str(name).strip() for name in rows[0]]
    while header and not header[-1]:
        header.pop()
    body = rows[1:]
    columns = {}
    for i, name in enumerate(header):
        if name in columns:
            raise ValueError(f"column {name!r} appears twice in the header")
        columns[name] = pa.array([str(row[i]).strip() if i < len(row) else "" for row in body], type=pa.string())
    return pa.table(columns)
