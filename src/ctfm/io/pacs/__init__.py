"""A PACS as a scan source: DICOMweb (QIDO-RS, WADO-RS) and DIMSE (C-FIND, C-GET, C-MOVE).

Wherever ctfm takes a path it takes a PACS address too (``dicomweb:https://host/dicom-web``,
``dimse://AET@host:104``, narrowed by study and series): :func:`ctfm.io.sources.discover_inputs`
expands it into one source per series and :func:`ctfm.io.load_ct` loads a series address from the
local series cache, retrieving it first when needed. See docs/pacs.md.
"""

from ctfm.io.pacs.cache import SeriesCache
from ctfm.io.pacs.dicomweb import SeriesInfo
from ctfm.io.pacs.options import PacsOptions, current_options, parse_query, read_secret, redact, use_options
from ctfm.io.pacs.retrieve import fetch_series, find_series, pacs_sources
from ctfm.io.pacs.url import PacsURL, is_pacs_url, parse_pacs_url

__all__ = [
    "PacsOptions",
    "PacsURL",
    "SeriesCache",
    "SeriesInfo",
    "current_options",
    "fetch_series",
    "find_series",
    "is_pacs_url",
    "pacs_sources",
    "parse_pacs_url",
    "parse_query",
    "read_secret",
    "redact",
    "use_options",
]
