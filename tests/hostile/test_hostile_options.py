"""Hostile option and config values: each is refused where it enters, in one line (`error: ...`),
exit 2, no traceback, before any work; argparse's own refusals are one line too."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch

from ctfm.errors import OptionError
from ctfm.runtime import check_accelerator, check_device, require_output_dir, require_output_file


def refused(result, *words):
    """One `error: ...` line on stderr (warnings aside), exit 2, nothing else, ``words`` in it."""
    code, _out, err = result
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err and "usage:" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


# ---- devices and accelerators ------------------------------------------------------------------
def test_device_bogus(run_cli, tmp_path):
    refused(run_cli("embed", tmp_path, "--out", tmp_path / "s", "--device", "bogus"), "--device", "bogus")


@no_cuda
def test_device_cuda_without_cuda(run_cli, tmp_path):
    refused(run_cli("embed", tmp_path, "--out", tmp_path / "s", "--device", "cuda"), "no CUDA GPU")


def test_device_cuda_index_past_the_gpus(run_cli, tmp_path):
    refused(run_cli("predict", "seg", tmp_path, "--model", "m", "-o", tmp_path / "o", "--device", "cuda:99"), "cuda")


@pytest.mark.parametrize(
    "verb", [("evaluate", "saliency", "scan.nii.gz", "--out", "o"), ("search", "st", "--scan", "x")]
)
def test_device_checked_on_every_verb(run_cli, verb):
    refused(run_cli(*verb, "--device", "tpu"), "--device", "tpu")


def test_check_device_resolves_the_default():
    assert check_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert check_device("cpu") == "cpu"
    with pytest.raises(OptionError, match="not a device"):
        check_device("bogus")


def test_accelerator_tpu_in_a_run_config(run_cli, tmp_path):
    refused(
        run_cli("finetune", "seg", "--preset", "tiny", "--set", "accelerator=tpu", "--set", f"out={tmp_path / 'run'}"),
        "accelerator",
        "tpu",
    )
    assert not (tmp_path / "run").exists()


def test_accelerator_tpu_on_embed(run_cli, tmp_path):
    refused(run_cli("embed", tmp_path, "--out", tmp_path / "s", "--accelerator", "tpu"), "--accelerator", "tpu")


@no_cuda
def test_accelerator_gpu_without_cuda():
    with pytest.raises(OptionError, match="no CUDA GPU"):
        check_accelerator("gpu")


# ---- counts and numbers --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, words",
    [
        (("evaluate", "clustering", "st", "--labels", "l.csv", "--out", "o", "--k", "0"), ("--k 0", ">= 1")),
        (("evaluate", "clustering", "st", "--out", "o", "--perplexity", "-5"), ("--perplexity", "-5")),
        (("evaluate", "clustering", "st", "--out", "o", "--perplexity", "nan"), ("--perplexity", "nan")),
        (("evaluate", "saliency", "s.nii.gz", "--out", "o", "--batch", "0"), ("--batch 0",)),
        (("evaluate", "saliency", "s.nii.gz", "--out", "o", "--mask-size", "-1"), ("--mask-size",)),
        (("evaluate", "saliency", "s.nii.gz", "--out", "o", "--overlap", "1.5"), ("--overlap", "[0, 1)")),
        (("serve", "st", "--max-upload-mb", "inf"), ("--max-upload-mb", "inf")),
        (("serve", "st", "--max-upload-mb", "0"), ("--max-upload-mb",)),
        (("serve", "st", "--port", "70000"), ("--port",)),
        (("serve", "st", "--display-cache-gb", "-1"), ("--display-cache-gb",)),
        (("search", "st", "--scan", "x", "-k", "0"), ("-k",)),
        (("index", "build", "st", "--kind", "ivf", "--nlist", "0"), ("--nlist",)),
        (("predict", "seg", "x", "--model", "m", "-o", "o", "--overlap", "1"), ("--overlap",)),
        (("cohort", "scan", "x", "--out", "o.parquet", "--workers", "0"), ("--workers",)),
        (("synth", "--out", "o", "--n", "0"), ("--n",)),
        (("probe", "st", "--labels", "l.csv", "--out", "o", "--cv", "1.5"), ("--cv 1.5", "expected a whole number")),
        (("embed", "x", "--out", "s", "--devices", "0"), ("--devices",)),
        (("evaluate", "concepts", "s.nii.gz", "--out", "o", "--zoom", "0"), ("--zoom",)),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) and len(v) > 2 else None,
)
def test_counts_and_numbers_refused_by_the_parser(run_cli, argv, words):
    refused(run_cli(*argv), *words)


def test_saliency_options_checked_in_the_api(tmp_path):
    import ctfm

    with pytest.raises(OptionError, match="--batch"):
        ctfm.evaluate_saliency("s.nii.gz", tmp_path / "o", n_batch=0)
    assert not (tmp_path / "o").exists()


# ---- parser errors are one line -------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, words",
    [
        (("embed",), ("ctfm embed", "required")),
        (("finetune", "seg", "--nope"), ("unrecognized arguments", "--nope")),
        (("predict", "seg", "x", "--model", "m", "-o", "o", "--format", "png"), ("invalid choice", "png")),
        (("evaluate", "saliency"), ("ctfm evaluate saliency", "required")),
        (("no-such-verb",), ("invalid choice",)),
        (("store", "info", "st", "--level", "x"), ()),
    ],
)
def test_parser_errors_are_one_line(run_cli, argv, words):
    refused(run_cli(*argv), *words)


def test_help_is_left_as_it_is(run_cli):
    code, out, _err = run_cli("evaluate", "saliency", "--help")
    assert code == 0 and out.startswith("usage: ctfm evaluate saliency") and len(out.splitlines()) > 5


# ---- run configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["", "  "])
def test_empty_out_refused(run_cli, tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    refused(run_cli("finetune", "seg", "--preset", "tiny", "--set", f"out={value}"), "out")
    assert not any(tmp_path.iterdir())


def seg_manifest(tmp_path):
    array = np.full((24, 22, 20), -1000, np.int16)
    array[5:-5, 5:-5, 3:-3] = 300
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = tmp_path / "image.nii.gz"
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), str(image))
    nib.save(nib.Nifti1Image((array > 0).astype(np.uint8), affine), str(label))
    manifest = tmp_path / "cases.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerows([["image", "label", "split"], [image, label, "train"], [image, label, "val"]])
    classes = tmp_path / "classes.json"
    classes.write_text('{"0": "background", "1": "bone"}')
    return manifest, classes


def test_freeze_prefix_matching_no_parameter(run_cli, tmp_path):
    manifest, classes = seg_manifest(tmp_path)
    out = tmp_path / "run"
    line = refused(
        run_cli(
            "finetune",
            "seg",
            "--preset",
            "tiny",
            "--set",
            f"data={manifest}",
            "--set",
            f"class_map={classes}",
            "--set",
            f"out={out}",
            "--set",
            'freeze=["encodr"]',
        ),
        "freeze",
        "encodr",
    )
    assert "encoder" in line  # the names that exist
    assert not (out / "cache").exists() and not (out / "checkpoints").exists()


def test_freeze_as_a_string_refused(run_cli, tmp_path):
    refused(
        run_cli("finetune", "seg", "--preset", "tiny", "--set", "freeze=encoder", "--set", f"out={tmp_path / 'r'}"),
        "freeze",
    )


def test_binary_labels_must_be_0_or_1(run_cli, tmp_path):
    manifest = tmp_path / "cases.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "abnormal"], ["a.nii.gz", "0"], ["b.nii.gz", "2"]])
    refused(
        run_cli(
            "finetune",
            "cls",
            "--preset",
            "tiny",
            "--set",
            f"data={manifest}",
            "--set",
            "task=binary",
            "--set",
            f"out={tmp_path / 'r'}",
        ),
        "not 0 or 1",
    )


# ---- output paths --------------------------------------------------------------------------------
def test_search_heatmap_png(run_cli, tmp_path):
    """--heatmap writes the similarity volume as NIfTI: a .png name is refused before the search."""
    refused(
        run_cli("search", tmp_path / "st", "--point", "a.nii.gz:1,2,3", "--heatmap", tmp_path / "x.png"),
        "--heatmap",
        ".nii.gz",
    )
    assert not (tmp_path / "x.png").exists()


def test_search_heatmap_under_a_file(run_cli, tmp_path):
    (tmp_path / "file").write_text("x")
    refused(
        run_cli("search", tmp_path / "st", "--point", "a.nii.gz:1,2,3", "--heatmap", tmp_path / "file" / "h.nii.gz"),
        "not a folder",
    )


def test_output_checks_create_nothing(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OptionError):
        require_output_dir("")
    with pytest.raises(Exception, match="not a folder"):
        require_output_dir(tmp_path / "f")
    assert require_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and not (tmp_path / "a").exists()
    with pytest.raises(OptionError, match="nii"):
        require_output_file(tmp_path / "h.png", (".nii.gz", ".nii"))
    assert require_output_file(tmp_path / "new" / "h.nii.gz", (".nii.gz",)).name == "h.nii.gz"


# ---- the IVF index -------------------------------------------------------------------------------
@pytest.fixture
def small_store(tmp_path):
    """Three scans of 16-d vectors, written through the store's own API."""
    from ctfm.store import EmbeddingStore

    key = {
        "mode": "whole",
        "model": "ct-fm",
        "weights_sha256": "w" * 64,
        "preset_hash": "p" * 64,
        "pool": "mean",
        "precision": "fp32",
        "overlap": 0.0,
    }
    store = EmbeddingStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    for i in range(3):
        row = {"scan_id": f"s{i}", "source_path": f"s{i}.nii.gz", **key, "n_patches": 0, "preset": "p"}
        store.add({**row, "embedding": rng.normal(size=16).astype(np.float32)}, [])
    store.compact()
    return tmp_path / "store"


def test_ivf_nlist_above_the_vectors(run_cli, small_store):
    pytest.importorskip("faiss")
    refused(run_cli("index", "build", small_store, "--kind", "ivf", "--nlist", "50"), "--nlist 50", "3 vector")


@pytest.mark.parametrize("kw", [{"k": 0}, {"perplexity": float("nan")}, {"perplexity": -5.0}, {"batch_size": 0}])
def test_clustering_options_checked_in_the_api(tmp_path, kw):
    import ctfm

    with pytest.raises(OptionError, match="expected"):
        ctfm.evaluate_clustering(tmp_path / "st", out=tmp_path / "o", labels="l.csv", **kw)
    assert not (tmp_path / "o").exists()


def test_clustering_output_that_is_a_file(run_cli, tmp_path):
    (tmp_path / "o").write_text("x")
    refused(
        run_cli("evaluate", "clustering", tmp_path / "st", "--labels", "l.csv", "--out", tmp_path / "o"), "not a folder"
    )
    assert (tmp_path / "o").read_text() == "x"


@pytest.mark.parametrize(
    "argv",
    [
        ("concepts", "s.nii.gz"),
        ("stability", "st", "--manifest", "m.csv"),
        ("retrieval", "st", "--annotations", "a.csv"),
        ("semantic-search", "l.csv", "--label", "heart"),
    ],
)
def test_every_evaluation_checks_its_output_folder_first(run_cli, tmp_path, argv):
    (tmp_path / "o").write_text("x")
    refused(run_cli("evaluate", *argv, "--out", tmp_path / "o"), "not a folder")
