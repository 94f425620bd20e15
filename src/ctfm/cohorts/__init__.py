"""Cohorts as Parquet manifests, for pretraining and embedding alike.

``idc``: select CT series from the Imaging Data Commons with CT-FM's filters, download them.
``inventory``: describe a local archive (``ctfm cohort scan``). Every manifest has a ``path``
column (and ``series_uid``), so ``ctfm cohort cache`` and ``ctfm embed`` read it directly.
"""

from ctfm.cohorts.idc import (
    PAPER_FILTERS,
    DownloadSummary,
    IDCCohort,
    apply_paper_filters,
    download_idc,
    format_size_mb,
    select_idc_cohort,
    series_folder,
)
from ctfm.cohorts.inventory import ScanSummary, describe_source, scan_local

__all__ = [
    "PAPER_FILTERS",
    "DownloadSummary",
    "IDCCohort",
    "ScanSummary",
    "apply_paper_filters",
    "describe_source",
    "download_idc",
    "format_size_mb",
    "scan_local",
    "select_idc_cohort",
    "series_folder",
]
