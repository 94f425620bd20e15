"""The public API: ``ctfm.__all__`` names one function per verb, resolves lazily, keeps ``import ctfm``
light, and every CLI verb is one call into it."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import ctfm
from ctfm.cli import VERBS, main
from ctfm.runtime import Result

CLI = Path(ctfm.__file__).parent / "cli"
# Verbs whose job has no top-level name: they manage inputs (cohort), write phantoms (synth) or
# weights folders (models) rather than run one step of the data path.
NO_API_NAME = {"cohort": "cohort selection and caching", "synth": "synthetic phantoms", "models": "weights folders"}
NESTED = {
    "cohort": "command",
    "evaluate": "evaluation",
    "finetune": "task",
    "index": "command",
    "models": "action",
    "predict": "task",
    "store": "command",
}
TYPED = [
    "embed",
    "probe",
    "predict_seg",
    "predict_cls",
    "evaluate_retrieval",
    "evaluate_semantic_search",
    "evaluate_clustering",
]
TYPED += ["evaluate_concepts", "evaluate_stability", "evaluate_saliency", "evaluate_seg"]
VERB_MODULES = {m for m, _ in VERBS.values()} | {"ctfm.cli.evaluate_seg", "ctfm.cli.finetune_cls"}


def test_all_names_one_function_per_verb_and_each_resolves():
    expected = {"load_ct", "preprocess", "create_model", "embed", "open_store", "build_index", "search_scans"}
    expected |= {"search_point", "pretrain", "finetune_seg", "finetune_cls", "predict_seg", "predict_cls"}
    expected |= {"probe", "serve", "listen"}
    names = set(ctfm.__all__) - {"__version__"}
    assert expected <= names and all(n == "evaluate_seg" or n in expected or n.startswith("evaluate_") for n in names)
    assert len(ctfm.__all__) == len(set(ctfm.__all__))
    for name in names:
        value = getattr(ctfm, name)
        assert callable(value) and not inspect.ismodule(value), name
        assert name in dir(ctfm)
    with pytest.raises(AttributeError, match="no_such_name"):
        ctfm.no_such_name  # noqa: B018


def test_names_shared_with_subpackages_stay_the_functions():
    import ctfm.preprocess.spec  # noqa: F401  binds the subpackage on ctfm, as any import does
    import ctfm.pretrain.train  # noqa: F401
    from ctfm.preprocess import PreprocessSpec
    from ctfm.preprocess.transforms import preprocess
    from ctfm.pretrain.train import pretrain

    assert ctfm.preprocess is preprocess and ctfm.pretrain is pretrain and inspect.isclass(PreprocessSpec)
    from ctfm import preprocess as imported

    assert imported is preprocess


def test_verbs_return_typed_results():
    for name in TYPED:
        returned = typing.get_type_hints(getattr(ctfm, name))["return"]
        assert inspect.isclass(returned) and issubclass(returned, Result), name
        assert returned.summary is not Result.summary, f"{name}: {returned.__name__} has no summary()"


@pytest.mark.slow
def test_import_ctfm_is_light():
    command = [sys.executable, "-X", "importtime", "-c", "import ctfm"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    modules = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    imported = {name.split(".")[0] for name in modules}
    heavy = {"torch", "monai", "numpy", "lightning"}
    assert not imported & heavy, sorted(imported & heavy)
    ctfm_modules = {name for name in modules if name.split(".")[0] == "ctfm"}
    assert ctfm_modules == {"ctfm"}, ctfm_modules


def _module_tree(module: str) -> tuple[ast.Module, str]:
    path = Path(importlib.import_module(module).__file__)
    return ast.parse(path.read_text(encoding="utf-8")), module


def _api_calls_reachable_from_run(module: str) -> set[str]:
    """Names ``ctfm.X`` called by ``run`` of ``module`` and by the functions it reaches there and in
    other ``ctfm.cli`` modules."""
    seen, calls, todo = set(), set(), [(module, "run")]
    while todo:
        mod, name = todo.pop()
        if (mod, name) in seen:
            continue
        seen.add((mod, name))
        tree, _ = _module_tree(mod)
        functions = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        if name not in functions:
            continue
        cli_aliases = {}
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.ImportFrom) and node.module == "ctfm.cli":
                for alias in node.names:
                    if f"ctfm.cli.{alias.name}" in VERB_MODULES:
                        cli_aliases[alias.asname or alias.name] = f"ctfm.cli.{alias.name}"
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "ctfm":
                    calls.add(node.attr)
                elif node.value.id in cli_aliases:
                    todo.append((cli_aliases[node.value.id], node.attr))
            elif isinstance(node, ast.Name) and node.id in functions:
                todo.append((mod, node.id))
    return calls


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_calls_the_public_api(verb):
    module = VERBS[verb][0]
    calls = _api_calls_reachable_from_run(module)
    private = calls - set(ctfm.__all__) - {"cli", "errors"}
    assert not private, f"{verb}: ctfm.{sorted(private)} is not in ctfm.__all__"
    if verb in NO_API_NAME:
        return
    assert calls & set(ctfm.__all__), f"ctfm {verb} calls no name in ctfm.__all__"


def test_nested_verbs_register_one_way():
    for path in CLI.glob("*.py"):
        if path.name != "__init__.py":
            text = path.read_text(encoding="utf-8")
            assert "add_subparsers" not in text, f"{path.name}: use ctfm.cli.add_subcommands"
    for verb in NESTED:
        source = Path(importlib.import_module(VERBS[verb][0]).__file__).read_text(encoding="utf-8")
        assert "add_subcommands(" in source and "run_subcommand(" in source, verb


@pytest.mark.parametrize("verb", sorted(NESTED))
def test_a_nested_verb_without_its_sub_verb_is_a_one_line_error(verb, capsys):
    assert main([verb]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: ctfm {verb} needs a {NESTED[verb]}: "), err
    assert err[0].endswith(f"(see ctfm {verb} --help)"), err
