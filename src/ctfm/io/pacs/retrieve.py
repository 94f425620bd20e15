"""PACS addresses as scan sources, and series retrieved into the local cache.

:func:`pacs_sources` expands an address (the archive, a study, a series; QIDO / C-FIND filtered,
CT only unless ``--query Modality=...`` says otherwise) into one scan source per series, whose
path is the series' own address. :func:`fetch_series` gives the local folder of a series: from the
cache when it is there, else retrieved (WADO-RS, C-GET or C-MOVE) instance by instance into a
partial folder, checked against the instance count the query reported, and moved into the cache
whole. A series with instances missing is refused, never loaded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ctfm.errors import CTInputError
from ctfm.io.pacs import dicomweb, dimse
from ctfm.io.pacs.cache import SeriesCache
from ctfm.io.pacs.options import PacsOptions, current_options
from ctfm.io.pacs.url import DICOMWEB, PacsURL, parse_pacs_url

# series address -> instance count reported by the query that found it (set by pacs_sources)
_EXPECTED: dict[str, int] = {}


def _backend(url: PacsURL):
    return dicomweb if url.scheme == DICOMWEB else dimse


def find_series(url: PacsURL, options: PacsOptions | None = None) -> list[dicomweb.SeriesInfo]:
    """The series ``url`` names that pass the query filters, each with its instance count."""
    options = options or current_options()
    found = _backend(url).find_series(url, options)
    modality = options.query.get("Modality")
    return [s for s in found if not modality or not s.modality or s.modality == modality]


def pacs_sources(text: str, options: PacsOptions | None = None) -> list[tuple[str, str]]:
    """``(series address, SeriesInstanceUID)`` for every series the address names (sorted)."""
    url = parse_pacs_url(text)
    options = options or current_options()
    found = find_series(url, options)
    if url.series_uid and not found:
        raise CTInputError(
            str(url), "no such series on the PACS (or not one of the --query modalities)", "check the UIDs"
        )
    out = []
    for info in found:
        address = str(url.series(info.study_uid, info.series_uid))
        if info.n_instances is not None:
            _EXPECTED[address] = info.n_instances
        out.append((address, info.series_uid))
    return sorted(out)


def cache_for(options: PacsOptions) -> SeriesCache:
    return SeriesCache(options.cache_path, options.cache_gb)


def fetch_series(text: str | PacsURL, options: PacsOptions | None = None, on_instance=None) -> Path:
    """The local folder of the series at ``text`` (a series address), complete or refused.

    ``on_instance(n_saved)`` is called after each instance is written (progress).
    """
    options = options or current_options()
    url = text if isinstance(text, PacsURL) else parse_pacs_url(text)
    if not url.series_uid:
        url = _single_series(url, options)
    cache = cache_for(options)
    cached = cache.lookup(url.series_uid)
    if cached is not None:
        return cached
    expected = _EXPECTED.get(str(url))
    if expected is None:
        found = [s for s in _backend(url).find_series(url, options) if s.series_uid == url.series_uid]
        if not found:
            raise CTInputError(str(url), "no such series on the PACS", "check the UIDs")
        expected = found[0].n_instances
        if url.study_uid is None:
            url = url.series(found[0].study_uid, url.series_uid)
    partial = cache.partial(url.series_uid)
    partial.mkdir(parents=True, exist_ok=True)
    have = {p.stem for p in partial.glob("*.dcm")}

    def save(ds):
        target = partial / f"{ds.SOPInstanceUID}.dcm"
        tmp = partial / f".{ds.SOPInstanceUID}.tmp"
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, target)
        if on_instance is not None:
            on_instance(len(have) + 1)

    _retrieve_with_retries(url, options, save, have)
    n = len(list(partial.glob("*.dcm")))
    if expected is not None and n < expected:
        raise CTInputError(
            str(url),
            f"incomplete series: {n} of {expected} instances retrieved",
            "the PACS may still be receiving it; retry later (the retrieved instances are kept)",
        )
    if n == 0:
        raise CTInputError(str(url), "the PACS returned no instances for this series", "check the series on the PACS")
    return cache.commit(url.series_uid, str(url), n)


def _retrieve_with_retries(url: PacsURL, options: PacsOptions, save, have: set[str]) -> None:
    """DICOMweb retries each request itself; a DIMSE retrieval that drops is run again for the
    instances still missing, within the same bound."""
    if url.scheme == DICOMWEB:
        dicomweb.retrieve_series(url, options, save, have)
        return
    wait = options.backoff_s
    for attempt in range(options.retries + 1):
        try:
            dimse.retrieve_series(url, options, save, have)
            return
        except CTInputError:
            if attempt == options.retries:
                raise
        time.sleep(wait)
        wait *= 2


def _single_series(url: PacsURL, options: PacsOptions) -> PacsURL:
    found = find_series(url, options)
    if len(found) != 1:
        what = "no CT series" if not found else f"{len(found)} series"
        raise CTInputError(
            str(url),
            f"the address names {what}",
            "give the address of one series (.../studies/S/series/X or dimse://.../S/X)",
        )
    return url.series(found[0].study_uid, found[0].series_uid)
