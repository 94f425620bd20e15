"""ctfm evaluate seg: metrics against hand-computed values, empty-mask rules, files, CLI."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from ctfm.evaluate.metrics.segmentation import mask_metrics
from ctfm.predict.scoring import evaluate_segmentation

LABELS = {0: "background", 1: "liver", 2: "spleen"}


def test_distances_and_overlap_by_hand():
    truth = np.zeros((12, 6, 6), bool)
    pred = np.zeros_like(truth)
    truth[2, 2, 2] = True
    pred[5, 2, 2] = True  # 3 voxels apart along axis 0 at 2 mm: every surface distance is 6 mm
    m = mask_metrics(truth, pred, spacing=(2.0, 1.0, 1.0), nsd_tolerance_mm=2.0)
    assert m["dice"] == 0.0 and m["hd95"] == pytest.approx(6.0) and m["nsd"] == 0.0 and m["status"] == "ok"
    assert mask_metrics(truth, pred, (2.0, 1.0, 1.0), nsd_tolerance_mm=7.0)["nsd"] == pytest.approx(1.0)
    cube = np.zeros((10, 10, 10), bool)
    cube[2:6, 2:6, 2:6] = True
    shifted = np.roll(cube, 1, axis=0)  # overlap 3*4*4 = 48 of 64 + 64 voxels
    assert mask_metrics(cube, shifted, (1.0, 1.0, 1.0))["dice"] == pytest.approx(2 * 48 / 128)
    same = mask_metrics(cube, cube, (1.0, 1.0, 1.0))
    assert (same["dice"], same["hd95"], same["nsd"]) == (1.0, 0.0, 1.0)


def test_empty_mask_rules():
    empty = np.zeros((6, 6, 6), bool)
    full = empty.copy()
    full[2:4, 2:4, 2:4] = True
    both = mask_metrics(empty, empty, (1, 1, 1))
    assert both["status"] == "absent" and all(math.isnan(both[k]) for k in ("dice", "hd95", "nsd"))
    missed = mask_metrics(full, empty, (1, 1, 1))
    assert (missed["status"], missed["dice"], missed["nsd"]) == ("missed", 0.0, 0.0) and math.isnan(missed["hd95"])
    extra = mask_metrics(empty, full, (1, 1, 1))
    assert (extra["status"], extra["dice"], extra["nsd"]) == ("false_positive", 0.0, 0.0) and math.isnan(extra["hd95"])


def _save(array, path, affine=None):
    nib.save(
        nib.Nifti1Image(array.astype(np.uint8), np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine), str(path)
    )


def _cases(tmp_path):
    truth, pred, other = (tmp_path / n for n in ("truth", "pred", "other"))
    for folder in (truth, pred, other):
        folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        t = np.zeros((16, 16, 8), np.uint8)
        t[3:9, 3:9, 2:6] = 1
        if i != 3:
            t[10:14, 10:14, 2:5] = 2  # case 3 has no spleen: "absent" or "false_positive"
        p = t.copy()
        p[3 + (i % 2), 3:9, 2:6] = 0  # a slab of liver missed in two cases
        _save(t, truth / f"case{i}.nii.gz")
        _save(p, pred / f"case{i}.nii.gz")
        q = np.where(rng.random(t.shape) < 0.1, 0, t)
        _save(q, other / f"case{i}.nii.gz")
    return truth, pred, other


@pytest.mark.slow
def test_folders_macro_ci_compare_and_outputs(tmp_path):
    truth, pred, other = _cases(tmp_path)
    result = evaluate_segmentation(pred, truth, labels=LABELS, compare=other, out=tmp_path / "eval", n_resamples=200)
    per_case = result["per_case"]
    # 6*6*4 = 144 liver voxels, one slab of 6*4 = 24 removed: Dice = 2 * 120 / (144 + 120)
    expected_liver = {f"case{i}": 2 * (144 - 24) / (144 + 120) for i in range(4)}
    for name, value in expected_liver.items():
        assert per_case[name]["liver"]["dice"] == pytest.approx(value)
    assert per_case["case3"]["spleen"]["status"] == "absent"
    summary = result["summary"]
    assert summary["per_class"]["spleen"]["n_defined"] == 3  # the absent case is not counted
    assert summary["per_class"]["spleen"]["dice"]["estimate"] == pytest.approx(1.0)
    assert summary["macro"]["dice"]["estimate"] == pytest.approx((expected_liver["case0"] + 1.0) / 2)
    low, high = summary["macro"]["dice"]["low"], summary["macro"]["dice"]["high"]
    assert low <= summary["macro"]["dice"]["estimate"] <= high
    assert "p_value" in result["compare"]["wilcoxon"]["per_class"]["liver"]
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["provenance"]["data_manifest_sha256"] and len(saved["provenance"]["inputs"]) == 4
    assert (tmp_path / "eval" / "metrics.csv").read_text().count("\n") == 1 + 4 * 2
    assert (tmp_path / "eval" / "overlay.png").stat().st_size > 1000


def test_bad_predictions_are_recorded_and_the_cli_exits_1(tmp_path, capsys):
    from ctfm.cli import main

    truth, pred, _ = _cases(tmp_path)
    _save(np.zeros((16, 16, 9), np.uint8), pred / "case1.nii.gz")  # another grid
    bad = np.zeros((16, 16, 8), np.uint8)
    bad[0, 0, 0] = 7  # not in the class map: scored as its own class, not refused
    _save(bad, pred / "case2.nii.gz")
    (pred / "case3.nii.gz").unlink()
    code = main(
        ["evaluate", "seg", "--pred", str(pred), "--truth", str(truth), "--labels", "liver,spleen", "--resamples", "50"]
    )
    captured = capsys.readouterr()
    out = captured.out
    assert code == 1
    assert "another grid" in out and "no prediction" in out
    assert "2 case(s) scored, 2 failed" in out
    row = next(line for line in out.splitlines() if line.startswith("label_7 "))
    assert row.split()[1:5] == ["0.000", "[0.000,", "0.000]", "n/a"] and row.endswith("1 false_positive")
    notice = [line for line in captured.err.splitlines() if "label_7" in line]
    assert len(notice) == 1 and notice[0].startswith("warning: the class map given does not name them")


def test_missing_truth_is_a_one_line_error(tmp_path, capsys):
    from ctfm.cli import main

    assert main(["evaluate", "seg", "--pred", str(tmp_path), "--truth", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no such file" in err[0]
