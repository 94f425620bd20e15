"""The embedding store (Parquet records + vectors): its key and schemas, the store, its checks."""

from ctfm.store.embeddings import EmbeddingStore
from ctfm.store.integrity import Problem, check_store, is_consistent, open_store, summarise
from ctfm.store.schema import RECORD_COLUMNS, RUN_KEY, SCAN_KEY

__all__ = ["RECORD_COLUMNS", "RUN_KEY", "SCAN_KEY", "EmbeddingStore", "Problem", "check_store", "is_consistent", "open_store", "summarise"]
