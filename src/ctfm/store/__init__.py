"""The embedding store (Parquet records + vectors): its key and schemas, the store, its runs, its checks.

``open_store(path)`` opens a store; ``.runs(level)`` lists its runs (computation keys) and
``.select(level, run=DIGEST, where={"column": value})`` returns one run's vectors as columns.
"""

from ctfm.store.damage import DamagedFileError, StoreWriteError
from ctfm.store.embeddings import EmbeddingStore, open_store
from ctfm.store.integrity import Problem, RepairResult, check_store, is_consistent, repair_store, summarise
from ctfm.store.schema import RECORD_COLUMNS, RUN_KEY, SCAN_KEY
from ctfm.store.vectors import RunVectors

__all__ = [
    "RECORD_COLUMNS",
    "RUN_KEY",
    "SCAN_KEY",
    "DamagedFileError",
    "EmbeddingStore",
    "Problem",
    "RepairResult",
    "RunVectors",
    "StoreWriteError",
    "check_store",
    "is_consistent",
    "open_store",
    "repair_store",
    "summarise",
]
