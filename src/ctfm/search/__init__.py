"""Scan and region search over an embedding store: queries embedded the store's way, FAISS or
exact matching, hits refined to world points (RAS mm), similarity volumes on a target's grid."""

from ctfm.search.query import ScanRef, WeightsMismatchError
from ctfm.search.session import (
    RegionHit,
    RegionQuery,
    ScanHit,
    SearchSession,
    search_point,
    search_scans,
    similarity_volume,
)

__all__ = [
    "RegionHit",
    "RegionQuery",
    "ScanHit",
    "ScanRef",
    "SearchSession",
    "WeightsMismatchError",
    "search_point",
    "search_scans",
    "similarity_volume",
]
