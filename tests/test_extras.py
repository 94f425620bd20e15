"""The light core: with every extra's packages refused by the import system, the core modules import
and the core verbs run, and a verb of each extra exits 2 with one line naming ``ctfm[EXTRA]``.

One subprocess does it all (the refusal is installed before ``ctfm`` is first imported); the tests
read its JSON report. Real imports, real verbs on a small synthetic phantom, nothing mocked.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ctfm.errors import EXTRAS

pytestmark = pytest.mark.slow  # one subprocess with the extras refused

# top-level modules of every extra's packages (pyproject.toml), refused in the subprocess
REFUSED = [
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "tensorboardX",  # train
    "faiss",  # search
    "fastapi",
    "uvicorn",
    "starlette",
    "python_multipart",
    "PIL",  # app
    "highdicom",  # dicom-seg
    "sklearn",
    "matplotlib",
    "umap",  # eval
    "idc_index",  # idc
    "dicomweb_client",
    "pynetdicom",  # pacs
]

# packages that need no extra, imported module by module
CORE_PACKAGES = ["ctfm.io", "ctfm.preprocess", "ctfm.models", "ctfm.embedding", "ctfm.store", "ctfm.synth"]
LIGHT_PACKAGES = ["ctfm.search", "ctfm.predict", "ctfm.cohorts", "ctfm.evaluate", "ctfm.cli"]

PROGRAM = r"""
import contextlib, importlib, importlib.abc, io, json, os, pkgutil, sys

refused, core_packages, work = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in refused:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Refuse())
report = {"imported": [], "import_errors": {}, "verbs": {}}
for package in core_packages:
    module = importlib.import_module(package)
    names = [package] + [info.name for info in pkgutil.walk_packages(module.__path__, package + ".")]
    for name in names:
        try:
            importlib.import_module(name)
            report["imported"].append(name)
        except Exception as exc:
            report["import_errors"][name] = f"{type(exc).__name__}: {exc}"
for name in ("ctfm.errors", "ctfm.runtime"):
    importlib.import_module(name)
    report["imported"].append(name)

from ctfm.cli import main

def verb(key, *argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    report["verbs"][key] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}

from ctfm.synth import make_phantom, write_phantom

phantoms = [make_phantom(seed, shape=(40, 32, 24), spacing_mm=(3.0, 3.0, 3.0)) for seed in (0, 1)]
scans = [write_phantom(phantom, f"{work}/scans", stem=f"p{seed}")[0] for seed, phantom in enumerate(phantoms)]
scan = scans[0]
store, weights, seg, labels = f"{work}/store", f"{work}/weights", f"{work}/seg", f"{work}/labels.csv"
verb("info", "info", scan, "--json")
verb("models init", "models", "init", "ct-fm", "--seed", "0", "--out", weights, "--init-filters", "4")
verb("embed", "embed", *scans, "--weights", weights, "--mode", "patches", "--out", store, "--no-progress")
verb("store info", "store", "info", store, "--json")
verb("search scans", "search", store, "--scan", scan, "-k", "1", "--json")
verb("models init seg", "models", "init", "ct-fm-segresnet", "--seed", "0", "--out", seg, "--init-filters", "4")
verb("predict seg", "predict", "seg", scan, "--model", seg, "-o", f"{work}/labels", "--no-progress")
# a verb of each extra
verb("train", "embed", scan, "--weights", weights, "--out", f"{work}/ddp", "--devices", "2", "--accelerator", "cpu")
verb("train (pretrain)", "pretrain", "--preset", "tiny", "--set", f"data={work}/cache", "--set", f"out={work}/run")
verb("search", "index", "build", store)
verb("app", "serve", store, "--port", "0")
verb("dicom-seg", "predict", "seg", scan, "--model", seg, "--format", "dicom-seg", "-o", f"{work}/preds")
verb("idc", "cohort", "idc", "--out", f"{work}/cohort.parquet")
verb("pacs", "info", "dicomweb:http://127.0.0.1:9/dicom-web")
verb("eval", "probe", store, "--labels", labels, "--target", "organ", "--out", f"{work}/probes")
verb("eval (evaluate)", "evaluate", "clustering", store, "--labels", labels, "--no-umap", "--out", f"{work}/clusters")
verb("eval (demo)", "demo", "--out", f"{work}/demo")
report["predicted"] = sorted(os.listdir(f"{work}/labels")) if os.path.isdir(f"{work}/labels") else []
report["refused_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in refused)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def light(tmp_path_factory):
    """The subprocess's report: imports, and each verb's exit code, stdout and stderr."""
    work = tmp_path_factory.mktemp("light")
    argv = [sys.executable, "-c", PROGRAM, json.dumps(REFUSED), json.dumps(CORE_PACKAGES + LIGHT_PACKAGES), str(work)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_core_modules_import_without_any_extra(light):
    assert light["import_errors"] == {}
    expected = {"ctfm.io.dicom", "ctfm.store.index", "ctfm.embedding.distributed", "ctfm.cli.serve"}
    assert expected <= set(light["imported"])
    assert light["refused_loaded"] == []


CORE_VERBS = ["info", "models init", "embed", "store info", "search scans", "models init seg", "predict seg"]


@pytest.mark.parametrize("key", CORE_VERBS)
def test_core_verbs_run_without_any_extra(light, key):
    verb = light["verbs"][key]
    assert verb["code"] == 0, verb["stderr"]


def test_core_verbs_give_their_results(light):
    assert json.loads(light["verbs"]["info"]["stdout"])["usable"] is True
    assert "embedded 2 scan(s), skipped 0 already in the store, 0 failed" in light["verbs"]["embed"]["stdout"]
    assert json.loads(light["verbs"]["store info"]["stdout"])["scans"] == 2
    hits = json.loads(light["verbs"]["search scans"]["stdout"])  # exact search: no index, no FAISS
    assert len(hits) == 1 and hits[0]["source_path"].endswith("p1.nii.gz")
    assert {"p0.nii.gz", "p0.labels.json"} <= set(light["predicted"])


@pytest.mark.parametrize(
    "key", ["train", "search", "app", "dicom-seg", "idc", "pacs", "eval", "eval (evaluate)", "eval (demo)"]
)
def test_a_verb_of_each_extra_names_it_in_one_line(light, key):
    extra, verb = key.split()[0], light["verbs"][key]
    lines = verb["stderr"].strip().splitlines()
    assert verb["code"] == 2, verb["stderr"]
    assert len(lines) == 1 and lines[0].startswith("error: "), verb["stderr"]
    assert f"(pip install 'ctfm[{extra}]')" in lines[0]
    assert extra in EXTRAS
    assert verb["stdout"] == ""  # refused before any work


def test_pretrain_without_the_train_extra_names_it_in_one_line(light):
    verb = light["verbs"]["train (pretrain)"]
    lines = verb["stderr"].strip().splitlines()
    assert verb["code"] == 2 and len(lines) == 1 and "(pip install 'ctfm[train]')" in lines[0], verb["stderr"]
