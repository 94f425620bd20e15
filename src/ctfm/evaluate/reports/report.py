"""Results with provenance, and one self-contained HTML page per evaluation.

Every ``ctfm evaluate`` / ``ctfm probe`` run writes the same three kinds of output into its
folder: ``results.json`` (the figures and a ``provenance`` block saying what produced them),
PNG figures, and ``report.html``, which embeds those figures and tables so that the page can be
mailed or archived on its own (no external file, script or font).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctfm import __version__
from ctfm.runtime import jsonable, utc_now, write_text_atomic

RESULTS_NAME = "results.json"
REPORT_NAME = "report.html"


def provenance(**fields: Any) -> dict:
    """What produced a result: the ctfm, Python and torch versions, the time, the command line,
    and the caller's ``fields`` (model, weights sha256, preset, spec hash, store, input hashes...)."""
    import torch

    return jsonable(
        {
            "ctfm_version": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "created_utc": utc_now(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
            **fields,
        }
    )


def write_results(out_dir: str | os.PathLike, results: dict, provenance_fields: dict) -> Path:
    """Write ``OUT/results.json`` = ``{"provenance": ..., **results}`` all or nothing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    document = {"provenance": jsonable(provenance_fields), **jsonable(results)}
    return write_text_atomic(out / RESULTS_NAME, json.dumps(document, indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------- HTML


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    if value is None:
        return "–"
    return html.escape(str(value))


@dataclass
class Report:
    """A page built top to bottom: headings, paragraphs, tables and embedded PNG figures.

    >>> page = Report("Retrieval")
    >>> page.table([{"k": 5, "P@k": 0.81}])
    >>> page.write("out/report.html")
    """

    title: str
    subtitle: str = ""
    _parts: list[str] = field(default_factory=list)

    def heading(self, text: str) -> "Report":
        self._parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def paragraph(self, text: str) -> "Report":
        self._parts.append(f"<p>{html.escape(text)}</p>")
        return self

    def table(self, rows: list[dict], columns: list[str] | None = None, caption: str = "", digits: int = 3) -> "Report":
        """One row per dict; ``columns`` (default: keys of the first row) in order."""
        if not rows:
            return self.paragraph(f"{caption}: no rows" if caption else "no rows")
        columns = columns or list(rows[0])
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{_cell(row.get(c), digits)}</td>" for c in columns) + "</tr>" for row in rows
        )
        title = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self._parts.append(f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def figure(self, png: str | os.PathLike, caption: str = "") -> "Report":
        """Embed a PNG file (base64), so that the page needs no file beside it."""
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        note = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._parts.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">{note}</figure>'
        )
        return self

    def provenance(self, fields: dict) -> "Report":
        rows = [
            {"field": k, "value": json.dumps(v) if isinstance(v, (dict, list)) else v}
            for k, v in jsonable(fields).items()
        ]
        self.heading("Provenance")
        return self.table(rows, ["field", "value"])

    def html(self) -> str:
        subtitle = f"<p class=sub>{html.escape(self.subtitle)}</p>" if self.subtitle else ""
        return (
            "<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1>{subtitle}{''.join(self._parts)}</body></html>\n"
        )

    def write(self, path: str | os.PathLike) -> Path:
        """Write the page all or nothing; ``path`` may be a folder (then ``report.html`` in it)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / REPORT_NAME
        return write_text_atomic(path, self.html())


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#1d1d1f}"
    "h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}"
    ".sub{color:#555}table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}"
    "th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}caption{caption-side:top;text-align:left;font-weight:600;padding:.3rem 0}"
    "figure{margin:1rem 0}img{max-width:100%}figcaption{color:#555;font-size:.85rem}"
)
