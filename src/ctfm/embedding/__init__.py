"""Embeddings: whole-scan vectors, patch grids with world coordinates, dense feature maps;
streamed execution in bounded memory; batch runs over files, folders and manifests."""

from ctfm.embedding.api import embed
from ctfm.embedding.modes import DenseFeatures, EmbedOptions, PatchEmbeddings, embed_dense, embed_patches, embed_whole
from ctfm.embedding.runner import ScanSource, discover_inputs

__all__ = [
    "DenseFeatures",
    "EmbedOptions",
    "PatchEmbeddings",
    "ScanSource",
    "discover_inputs",
    "embed",
    "embed_dense",
    "embed_patches",
    "embed_whole",
]
