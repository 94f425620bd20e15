"""Weights: the published folder layout, explicit sources, strict loading, checkpoint conversion.

A weights folder is exactly what lighter-zoo (huggingface_hub ``PyTorchModelHubMixin`` on MONAI's
SegResEncoder) publishes as ``project-lighter/ct_fm_feature_extractor``::

    config.json        constructor kwargs only: {"blocks_down": [1, 2, 2, 4, 4], "in_channels": 1, ...}
    model.safetensors  the plain MONAI state dict (conv_init.weight, layers.0.blocks.0.norm1.weight, ...)
    ctfm.json          ctfm's sidecar (optional): model name, PreprocessSpec, embedding pooling,
                       sha256 of model.safetensors, provenance

ctfm's own metadata lives in the sidecar because lighter-zoo's wrappers take ``**kwargs`` and the
hub mixin then forwards *every* config.json key to MONAI's constructor: one extra key there would
break ``SegResEncoder.from_pretrained`` for lighter-zoo users.

Weight sources, parsed explicitly (timm / open_clip style):

- a local folder in that layout, or a ``.safetensors``, ``.ckpt`` (CT-FM / Lightning),
  ``.pt``, ``.pth``, ``.bin`` or ``.torch`` file;
- ``hf-hub:ORG/NAME[@REVISION]``: the Hugging Face cache first, then the network unless offline.

A bare ``ORG/NAME`` that is not an existing path is refused with the ``hf-hub:`` spelling.
Loading is strict: after ``convert_state_dict`` every key and shape must match.

This module knows no model names: :mod:`ctfm.models.factory` joins it with the registry
(``create_model(name, weights=...)``, a registered name given as a source, sidecars).

>>> from ctfm.models import create_model
>>> encoder = create_model("ct-fm", weights="hf-hub:project-lighter/ct_fm_feature_extractor")  # doctest: +SKIP
>>> encoder.weights_info.sha256                                                                   # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ctfm.errors import CTInputError, OptionError, one_line
from ctfm.io.hashing import file_sha256
from ctfm.runs import RunFolder
from ctfm.runtime import atomic_path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SIDECAR_NAME = "ctfm.json"
SIDECAR_FORMAT = 1
HUB_PREFIX = "hf-hub:"
HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, SIDECAR_NAME]
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".torch")

# Checkpoint key rewriting (docs/recipe.md, checkpoint keys): wrappers are stripped wherever they stack,
# ``backbone.`` / ``encoder.`` mark encoder keys, the SimCLR projection head is not part of a model.
WRAPPER_PREFIXES = ("model.", "_orig_mod.", "module.")
ENCODER_PREFIXES = ("backbone.", "encoder.")
ENCODER_ROOTS = ("conv_init.", "layers.")
IGNORED_PREFIXES = ("projection_head.",)
TARGETS = ("encoder", "segresnet")

# Files that may sit in a weights folder that ``save_pretrained(..., overwrite=True)`` replaces.
_REPLACEABLE = {CONFIG_NAME, WEIGHTS_NAME, SIDECAR_NAME, "README.md", ".gitattributes", ".cache"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SCHEME = re.compile(r"^([A-Za-z][\w+.-]+):")
_SOURCE_FIX = (
    f"give a weights folder ({CONFIG_NAME} + {WEIGHTS_NAME}), a .safetensors/.ckpt/.pt file, or {HUB_PREFIX}ORG/NAME"
)


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights came from, set on the model as ``model.weights_info``.

    ``format``: "folder", "hf-hub", "safetensors", "ckpt" or "torch". ``sha256`` is that of the
    weights file (model.safetensors for folders). ``config`` is config.json (None for files),
    ``metadata`` ctfm.json or the checkpoint's epoch/global_step. ``loaded_into`` is "model", or
    "encoder" when encoder-only weights initialised a SegResNetDS (its decoder stays as built).
    """

    source: str
    path: Path
    sha256: str
    format: str
    ignored_keys: tuple[str, ...] = ()
    config: dict | None = None
    metadata: dict | None = None
    loaded_into: str = "model"

    def to_dict(self) -> dict:
        """JSON-ready provenance (no machine paths): source, format, sha256, model, ignored keys."""
        model = (self.metadata or {}).get("model") if self.format in ("folder", "hf-hub") else None
        return {
            "source": portable_source(self.source),
            "format": self.format,
            "sha256": self.sha256,
            "model": model,
            "loaded_into": self.loaded_into,
            "ignored_keys": list(self.ignored_keys),
        }


# ---------------------------------------------------------------------------------------------
# small helpers


def portable_source(source: str | os.PathLike) -> str:
    """A source as it can be recorded: ``hf-hub:`` ids as given, local paths by file name only."""
    text = os.fspath(source)
    return text if text.startswith(HUB_PREFIX) else Path(text).name


def hub_cache_dir() -> Path:
    """The Hugging Face cache as the environment says *now* (HF_HUB_CACHE, else HF_HOME/hub).

    huggingface_hub reads these variables once, at import; re-reading them honours a variable set
    later (tests, notebooks).
    """
    from huggingface_hub import constants

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as the environment says now, else ``huggingface_hub.constants.HF_HUB_OFFLINE``."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE)


def parse_hub_id(text: str) -> tuple[str, str | None]:
    """``ORG/NAME[@REVISION]`` (with or without ``hf-hub:``) -> (repo_id, revision or None)."""
    body = text[len(HUB_PREFIX) :] if text.startswith(HUB_PREFIX) else text
    repo_id, _, revision = body.partition("@")
    if not _HUB_ID.match(repo_id) or (("@" in body) and not revision.strip()):
        raise CTInputError(
            text,
            "is not a Hugging Face model id",
            f"write {HUB_PREFIX}ORG/NAME or {HUB_PREFIX}ORG/NAME@REVISION, e.g. "
            f"{HUB_PREFIX}project-lighter/ct_fm_feature_extractor",
        )
    return repo_id, (revision or None)


def _spell(repo_id: str, revision: str | None) -> str:
    return repo_id + (f"@{revision}" if revision else "")


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CTInputError(
            path,
            f"is not readable JSON ({exc})",
            "restore the file from the published weights, or write the folder again with ctfm models convert/init",
        ) from None
    if not isinstance(value, dict):
        raise CTInputError(
            path, f"holds a JSON {type(value).__name__}, not an object", "restore the file from the published weights"
        )
    return value


def _normalise(value: Any) -> Any:
    """Tuples -> lists, recursively, so that constructor values compare with JSON ones."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def target_of(model: nn.Module) -> str:
    from monai.networks.nets import SegResNetDS
    from monai.networks.nets.segresnet_ds import SegResEncoder

    if isinstance(model, SegResNetDS):
        return "segresnet"
    if isinstance(model, SegResEncoder):
        return "encoder"
    raise TypeError(
        f"ctfm weights load into a SegResEncoder (CTEncoder) or a SegResNetDS (CTSegResNet), not {type(model).__name__}"
    )


def arch_config(model: nn.Module) -> dict:
    """Constructor kwargs of ``model`` as config.json holds them (``model.arch_config()`` if defined)."""
    if hasattr(model, "arch_config"):
        return _normalise(model.arch_config())
    names = ["spatial_dims", "in_channels", "init_filters", "blocks_down"]
    if target_of(model) == "segresnet":
        names += ["out_channels", "dsdepth"]
    return {k: _normalise(getattr(model, k)) for k in names if hasattr(model, k)}


def _constructor_defaults(cls: type) -> dict:
    defaults: dict = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        defaults.update({p.name: _normalise(p.default) for p in params if p.default is not inspect.Parameter.empty})
    return defaults


def _check_arch(config: dict, model: nn.Module, config_path: Path) -> None:
    """Every config.json key must describe ``model`` (its arch_config, its attribute or the default)."""
    arch = arch_config(model)
    defaults = _constructor_defaults(type(model))
    differing, suggested = [], []
    for key, given in sorted(config.items()):
        given = _normalise(given)
        if key in arch:
            if given != arch[key]:
                differing.append(f"{key}={json.dumps(given)} vs {json.dumps(arch[key])}")
                suggested.append(f"{key}={given!r}")
            continue
        accepted = [defaults[key]] if key in defaults else []
        if hasattr(model, key) and isinstance(
            getattr(model, key), (int, float, str, bool, list, tuple, dict, type(None))
        ):
            accepted.append(_normalise(getattr(model, key)))
        if not accepted:
            differing.append(f"{key}={json.dumps(given)} vs no such argument")
        elif given not in accepted:
            differing.append(f"{key}={json.dumps(given)} vs {json.dumps(accepted[0])}")
            suggested.append(f"{key}={given!r}")
    if differing:
        example = f"e.g. create_model(NAME, {', '.join(suggested)}), " if suggested else ""
        raise CTInputError(
            config_path,
            f"describes another architecture than the model: weights {json.dumps(config, sort_keys=True)}, model "
            f"{json.dumps(arch, sort_keys=True)} (differs: {'; '.join(differing)})",
            f"build the model with the folder's arguments, {example}or choose weights made for this architecture",
        )


# ---------------------------------------------------------------------------------------------
# sources


def resolve_source(source: str | os.PathLike) -> tuple[Path, str]:
    """-> (local path, format) with format in folder / hf-hub / safetensors / ckpt / torch."""
    if isinstance(source, os.PathLike):
        path = Path(source).expanduser()
        if not path.exists():
            raise CTInputError(path, "no such weights file or folder", _SOURCE_FIX)
        return _local_kind(path)
    if not isinstance(source, str):
        raise TypeError(f"weights must be a str or os.PathLike, not {type(source).__name__}")
    if source.startswith(HUB_PREFIX):
        repo_id, revision = parse_hub_id(source)
        return _resolve_hub(source, repo_id, revision), "hf-hub"
    path = Path(source).expanduser()
    if path.exists():
        return _local_kind(path)
    scheme = _SCHEME.match(source)
    if scheme:
        raise CTInputError(
            source,
            f"unknown weights source scheme {scheme.group(1)!r}",
            f"the only scheme is {HUB_PREFIX}, e.g. {HUB_PREFIX}project-lighter/ct_fm_feature_extractor; URLs are not "
            "fetched directly",
        )
    if _HUB_ID.match(source.partition("@")[0]):
        raise CTInputError(
            source,
            "is neither an existing path nor an explicit Hugging Face id",
            f"for the Hub write {HUB_PREFIX}{source}; for a local folder give a path that exists",
        )
    raise CTInputError(source, "no such weights file or folder", _SOURCE_FIX)


def _local_kind(path: Path) -> tuple[Path, str]:
    path = path.absolute()
    if path.is_dir():
        export = RunFolder.exported(path, WEIGHTS_NAME) if not (path / WEIGHTS_NAME).is_file() else None
        if export is not None:  # a training run's folder: the weights it exported
            return export, "folder"
        if not (path / WEIGHTS_NAME).is_file():
            legacy = [n for n in ("pytorch_model.bin", "model.pt", "model.ckpt") if (path / n).is_file()]
            fix = f"convert it: ctfm models convert {path / legacy[0]} --out FOLDER" if legacy else _SOURCE_FIX
            raise CTInputError(path, f"is a folder without {WEIGHTS_NAME}", fix)
        return path, "folder"
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return path, "safetensors"
    if suffix == ".ckpt":
        return path, "ckpt"
    if suffix in TORCH_SUFFIXES:
        return path, "torch"
    raise CTInputError(
        path,
        f"has an unknown weights suffix {path.suffix!r}",
        f"use a .safetensors, {', '.join(TORCH_SUFFIXES)} file or a weights folder",
    )


def _resolve_hub(source: str, repo_id: str, revision: str | None) -> Path:
    """The cached snapshot folder of ``repo_id``; downloaded first when online and not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    cache_dir = hub_cache_dir()
    spelled = _spell(repo_id, revision)
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_FILES, cache_dir=str(cache_dir), local_files_only=True
        )
    except Exception:  # not cached, partially cached, unreadable refs: all mean "not usable offline"
        folder = None
    if folder is not None and (Path(folder) / WEIGHTS_NAME).is_file():
        return Path(folder)
    if hub_offline():
        raise CTInputError(
            source,
            f"is not in the Hugging Face cache ({cache_dir}) and HF_HUB_OFFLINE is set",
            f"run `ctfm models download {spelled}` on a machine with network access (downloading needs network), or "
            "pass a local weights folder",
        )
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES, cache_dir=str(cache_dir))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise CTInputError(
            source,
            f"was not found on the Hugging Face Hub or needs a token ({type(exc).__name__})",
            "check the id (ctfm models list shows the published ones) or log in with `hf auth login`",
        ) from None
    except Exception as exc:
        raise CTInputError(
            source,
            f"is not in the Hugging Face cache ({cache_dir}) and downloading it failed "
            f"({one_line(exc, 200, with_type=True)})",
            f"run `ctfm models download {spelled}` where there is network access (it needs network), or pass a local "
            "weights folder",
        ) from None
    if not (Path(folder) / WEIGHTS_NAME).is_file():
        raise CTInputError(
            source, f"has no {WEIGHTS_NAME} on the Hub", "choose a repository published with safetensors weights"
        )
    return Path(folder)


def resolve_weights(source: str | os.PathLike) -> Path:
    """The local path that ``source`` names: a weights folder or file, or the cached hub snapshot folder.

    Raises :class:`CTInputError` for a missing path, an ambiguous ``ORG/NAME`` (spelled as
    ``hf-hub:ORG/NAME`` in the message) and a hub id that is neither cached nor downloadable.
    """
    return resolve_source(source)[0]


def download_weights(repo: str, out: str | os.PathLike | None = None) -> Path:
    """Download ``ORG/NAME[@REV]`` (``hf-hub:`` optional) -> its folder (a registered model
    name is resolved by :func:`ctfm.models.factory.download_weights`).

    With ``out`` the files land there as a plain weights folder; otherwise in the Hugging Face
    cache, where ``hf-hub:ORG/NAME`` then finds them offline.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id, revision = parse_hub_id(repo)
    if hub_offline():
        raise CTInputError(
            repo,
            "cannot be downloaded: HF_HUB_OFFLINE is set",
            "downloading needs network access: unset HF_HUB_OFFLINE (or set it to 0) on a machine that can reach "
            "huggingface.co",
        )
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=HUB_FILES,
            cache_dir=str(hub_cache_dir()),
            local_dir=None if out is None else str(out),
        )
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise CTInputError(
            repo,
            f"was not found on the Hugging Face Hub or needs a token ({type(exc).__name__})",
            "check the id (ctfm models list shows the published ones) or log in with `hf auth login`",
        ) from None
    except Exception as exc:
        raise CTInputError(
            repo,
            f"could not be downloaded ({one_line(exc, 200, with_type=True)})",
            "downloading needs network access to huggingface.co; check the connection or proxy and retry",
        ) from None
    if not (Path(folder) / WEIGHTS_NAME).is_file():
        raise CTInputError(
            repo, f"has no {WEIGHTS_NAME} on the Hub", "choose a repository published with safetensors weights"
        )
    return Path(folder)


# ---------------------------------------------------------------------------------------------
# reading and converting state dicts


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise CTInputError(
            path,
            f"is not a readable safetensors file ({one_line(exc, 200)})",
            "download or write the file again; it may be truncated",
        ) from None


def read_torch(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A ``.ckpt``/``.pt`` file -> (state dict, {epoch, global_step} if present). Only ``weights_only``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CTInputError(
            path,
            f"holds Python objects that safe loading (weights_only=True) refuses ({one_line(exc, 200)})",
            "if you trust the file, re-save only its tensors: torch.save(torch.load(PATH, "
            "weights_only=False)['state_dict'], 'state.pt'), then load state.pt",
        ) from None
    except Exception as exc:
        raise CTInputError(
            path,
            f"is not a readable PyTorch file ({one_line(exc, 200, with_type=True)})",
            "check that the download finished; the file may be truncated",
        ) from None
    extra: dict = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        extra = {k: obj[k] for k in ("epoch", "global_step") if isinstance(obj.get(k), (int, float, str))}
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, Mapping) else type(obj).__name__
        raise CTInputError(
            path,
            f"holds no state dict of tensors (found: {keys})",
            "save a dict of tensors (model.state_dict()) or a Lightning checkpoint with a 'state_dict' entry",
        )
    return dict(obj), extra


def strip_prefixes(name: str, prefixes: tuple[str, ...]) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], target: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a CT-FM / Lightning / MONAI state dict for ``target`` -> (converted, ignored keys).

    Wrappers ``model.``, ``_orig_mod.``, ``module.`` are stripped; ``backbone.`` and ``encoder.``
    mark encoder keys (as do bare ``conv_init.``/``layers.``); ``projection_head.*`` is ignored.
    target "encoder": encoder keys bare (CTEncoder); "segresnet": encoder keys under ``encoder.``
    (CTSegResNet), other keys (``up_layers.*``) as they are. Ignored keys keep their original name.
    """
    if target not in TARGETS:
        raise OptionError(f"unknown conversion target {target!r}; choose one of {', '.join(TARGETS)}")
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    ignored: list[str] = []
    for key, tensor in state_dict.items():
        name = strip_prefixes(key, WRAPPER_PREFIXES)
        if name.startswith(IGNORED_PREFIXES):
            ignored.append(key)
            continue
        is_encoder = name.startswith(ENCODER_PREFIXES) or name.startswith(ENCODER_ROOTS)
        if name.startswith(ENCODER_PREFIXES):
            name = strip_prefixes(name[name.index(".") + 1 :], WRAPPER_PREFIXES)
        if is_encoder and target == "segresnet":
            name = "encoder." + name
        if name in converted:
            raise OptionError(
                f"checkpoint keys {origin[name]!r} and {key!r} both become {name!r}; the file mixes two models"
            )
        converted[name], origin[name] = tensor, key
    return converted, ignored


def _strict_load(model: nn.Module, state_dict: dict[str, torch.Tensor], target: str, where: Path) -> str:
    """Load every key strictly; encoder-only weights into a SegResNetDS load strictly into its encoder.

    Missing ``num_batches_tracked`` buffers are tolerated (PyTorch fills them for un-versioned
    state dicts, as safetensors files are). Returns "model" or "encoder".
    """
    module, loaded_into = model, "model"
    if target == "segresnet" and state_dict and all(k.startswith("encoder.") for k in state_dict):
        module, loaded_into = model.encoder, "encoder"
        state_dict = {k[len("encoder.") :]: v for k, v in state_dict.items()}
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {list(state_dict[k].shape)} vs {list(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape (weights vs model)", wrong_shape),
        ):
            if keys:
                more = f", ... {len(keys) - 4} more" if len(keys) > 4 else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:4])}{more}")
        raise CTInputError(
            where,
            f"weights do not fit the {type(model).__name__}{' encoder' if loaded_into == 'encoder' else ''} "
            f"({'; '.join(parts)})",
            "use weights made for this architecture, or build the model with the arguments in the weights' config.json "
            "(ctfm models list names the models)",
        )
    module.load_state_dict(state_dict, strict=True)
    return loaded_into


def load_state_into(model: nn.Module, source: str | os.PathLike) -> WeightsInfo:
    """Load ``source`` into ``model`` strictly; returns the :class:`WeightsInfo`, also set as ``model.weights_info``.

    Folders (local or ``hf-hub:``) are checked against ``model.arch_config()`` and, when ctfm.json
    is present, against its sha256. Checkpoints are renamed by :func:`convert_state_dict`.
    """
    target = target_of(model)
    path, kind = resolve_source(source)
    config = metadata = None
    if kind in ("folder", "hf-hub"):
        weights_file = path / WEIGHTS_NAME
        if (path / CONFIG_NAME).is_file():
            config = read_json(path / CONFIG_NAME)
            _check_arch(config, model, path / CONFIG_NAME)
        if (path / SIDECAR_NAME).is_file():
            metadata = read_json(path / SIDECAR_NAME)
        digest = file_sha256(weights_file)
        recorded = ((metadata or {}).get("weights") or {}).get("sha256")
        if recorded and recorded != digest:
            raise CTInputError(
                weights_file,
                f"has sha256 {digest[:12]}... but {SIDECAR_NAME} records {recorded[:12]}...",
                "the file was changed or truncated: download or write the folder again",
            )
        raw = _read_safetensors(weights_file)
    else:
        weights_file = path
        digest = file_sha256(path)
        if kind == "safetensors":
            raw = _read_safetensors(path)
        else:
            raw, metadata = read_torch(path)
            metadata = metadata or None
    try:
        converted, ignored = convert_state_dict(raw, target)
    except ValueError as exc:
        raise CTInputError(weights_file, str(exc), "load a checkpoint of one model") from None
    loaded_into = _strict_load(model, converted, target, weights_file)
    info = WeightsInfo(
        source=os.fspath(source),
        path=path,
        sha256=digest,
        format=kind,
        ignored_keys=tuple(ignored),
        config=config,
        metadata=metadata,
        loaded_into=loaded_into,
    )
    model.weights_info = info
    return info


# ---------------------------------------------------------------------------------------------
# writing


def _check_destination(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise CTInputError(folder, "exists and is not a folder", "choose a new output folder")
    if not folder.is_dir():
        return
    names = set(os.listdir(folder))
    if names and not overwrite:
        raise CTInputError(
            folder,
            "already exists and is not empty",
            "choose a new output folder, or overwrite it (--overwrite / overwrite=True)",
        )
    foreign = sorted(names - _REPLACEABLE)
    if foreign:
        raise CTInputError(
            folder,
            f"holds other files ({', '.join(foreign[:4])}); refusing to replace it",
            "choose an empty or new output folder",
        )


def write_weights_folder(
    model: nn.Module, folder: str | os.PathLike, sidecar: Callable[[str], dict] | None = None, overwrite: bool = False
) -> Path:
    """Write ``model`` as a weights folder (config.json, model.safetensors, ctfm.json) -> the folder.

    ``sidecar(sha256)`` returns the ctfm.json content for the written model.safetensors (None:
    no ctfm.json); :func:`ctfm.models.factory.save_pretrained` builds it from the registry.
    All or nothing (:func:`ctfm.runtime.atomic_path`): an interrupted save leaves no partial
    folder. The bytes of model.safetensors depend only on the tensors (no timestamps), so equal
    weights give an equal sha256.
    """
    from safetensors.torch import save_file

    target_of(model)
    folder = Path(folder).expanduser()
    _check_destination(folder, overwrite)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        # Exactly as PyTorchModelHubMixin writes it: sorted keys, indent 2, constructor kwargs only.
        (tmp / CONFIG_NAME).write_text(json.dumps(arch_config(model), sort_keys=True, indent=2), encoding="utf-8")
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME))
        shutil.copymode(tmp / CONFIG_NAME, tmp / WEIGHTS_NAME)  # safetensors writes 0600; follow the umask
        if sidecar is not None:
            content = sidecar(file_sha256(tmp / WEIGHTS_NAME))
            (tmp / SIDECAR_NAME).write_text(json.dumps(content, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    return folder


__all__ = [
    "WeightsInfo",
    "arch_config",
    "convert_state_dict",
    "download_weights",
    "hub_cache_dir",
    "hub_offline",
    "load_state_into",
    "parse_hub_id",
    "portable_source",
    "resolve_weights",
    "write_weights_folder",
]
