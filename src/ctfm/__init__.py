"""ctfm: foundation models for computed tomography.

The package follows the path of the data (docs/architecture.md): ``io`` reads CT archives,
``preprocess`` holds the one definition of CT-FM preprocessing, ``models`` the encoders, their
registry and weights, ``embedding`` whole-scan / patch / dense embeddings in bounded memory,
``store`` the Parquet embedding store, ``pretrain`` contrastive pretraining, ``synth`` labelled
phantoms, ``evaluate`` figures, ``cli`` the ``ctfm`` command. Submodules are imported lazily so
that ``import ctfm`` stays cheap.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctfm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__", "embed"]


def embed(inputs, **kwargs):
    """Embed scans (files, folders, DICOM trees, manifests) and return their records.

    See :func:`ctfm.embedding.api.embed` for the arguments; imported lazily so that
    ``import ctfm`` stays cheap.
    """
    from ctfm.embedding.api import embed as _embed

    return _embed(inputs, **kwargs)
