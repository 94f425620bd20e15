"""The embedding store (Parquet records + vectors)."""

from ctfm.store.embeddings import EmbeddingStore

__all__ = ["EmbeddingStore"]
