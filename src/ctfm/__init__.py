"""ctfm: foundation models for computed tomography.

The public API is one function per job, all at the top level::

    import ctfm

    image, record = ctfm.load_ct("scan.nii.gz")
    records = ctfm.embed(["scans/"], weights="hf-hub:project-lighter/ct_fm_feature_extractor", out="store")
    hits = ctfm.search_scans("store", "scan.nii.gz", k=5)

The package follows the path of the data (docs/architecture.md): ``io`` reads CT archives,
``preprocess`` holds the one definition of CT-FM preprocessing, ``models`` the encoders, their
registry and weights, ``embedding`` whole-scan / patch / dense embeddings in bounded memory,
``store`` the Parquet embedding store, ``pretrain`` contrastive pretraining, ``finetune`` and
``predict`` segmentation and classification, ``search`` scan and region search, ``evaluate``
probes and zero-shot evaluations, ``app`` the browser app, ``cli`` the ``ctfm`` command.

Every name in ``__all__`` is resolved on first use (PEP 562), so ``import ctfm`` imports neither
torch nor MONAI. Two names, ``preprocess`` and ``pretrain``, are also subpackages: ``ctfm.preprocess``
and ``ctfm.pretrain`` are always the functions, ``from ctfm.preprocess import PreprocessSpec`` still
reads the subpackage.
"""

import importlib
import sys
import types
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctfm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

# public name -> "module:attribute" it stands for (one function or class per verb)
_API = {
    "load_ct": "ctfm.io:load_ct",
    "preprocess": "ctfm.preprocess.transforms:preprocess",
    "create_model": "ctfm.models.factory:create_model",
    "embed": "ctfm.embedding.api:embed",
    "open_store": "ctfm.store:open_store",
    "build_index": "ctfm.store.index:build_index",
    "search_scans": "ctfm.search.session:search_scans",
    "search_point": "ctfm.search.session:search_point",
    "pretrain": "ctfm.pretrain.train:pretrain",
    "finetune_seg": "ctfm.finetune.seg:finetune_seg",
    "finetune_cls": "ctfm.finetune.cls:finetune_cls",
    "predict_seg": "ctfm.predict.seg:predict_seg",
    "predict_cls": "ctfm.predict.cls:predict_cls",
    "probe": "ctfm.evaluate.probes.probe_run:run_probe",
    "evaluate_retrieval": "ctfm.evaluate.zeroshot.retrieval:evaluate_retrieval",
    "evaluate_semantic_search": "ctfm.evaluate.zeroshot.semantic_search:run_semantic_search",
    "evaluate_clustering": "ctfm.evaluate.zeroshot.clustering:evaluate_clustering",
    "evaluate_concepts": "ctfm.evaluate.zeroshot.concepts:run_concepts",
    "evaluate_stability": "ctfm.evaluate.zeroshot.stability:run_stability",
    "evaluate_saliency": "ctfm.evaluate.zeroshot.saliency:run_saliency",
    "evaluate_seg": "ctfm.predict.scoring:evaluate_segmentation",
    "serve": "ctfm.app:serve",
    "listen": "ctfm.node:listen",
}

__all__ = ["__version__", *_API]


def _resolve(name: str):
    module, _, attribute = _API[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def __getattr__(name: str):
    if name in _API:
        value = _resolve(name)
        globals()[name] = value  # later reads skip __getattr__
        return value
    raise AttributeError(f"module 'ctfm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps the public functions named like subpackages (``preprocess``, ``pretrain``) when the
    import system binds the subpackage of that name on ``ctfm``."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            self.__dict__.pop(name, None)  # resolved again, as the function, on the next read
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
