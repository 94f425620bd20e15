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


# --------------------------------------------------------------------------- label maps without names


def _save_like(array, reference, path):
    """``array`` [X, Y, Z] as a NIfTI on the grid of the NIfTI ``reference`` (no label table)."""
    source = nib.load(str(reference))
    nib.save(nib.Nifti1Image(np.asarray(array).astype(np.int16), source.affine), str(path))
    return path


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.realdata
def test_binary_masks_need_no_class_map(tmp_path, run_cli):
    from scipy import ndimage

    from conftest import data_path
    from ctfm.evaluate.metrics.segmentation import DEFAULT_NSD_TOLERANCE_MM

    truth_path = data_path("sarcoma_ct/STS_019/CT_mask.nii.gz")
    truth = np.asarray(nib.load(str(truth_path)).dataobj) > 0
    # the GTV shifted by 2 voxels (2 mm) along x and eroded by one voxel: a plausible prediction
    pred = ndimage.binary_erosion(np.roll(truth, 2, axis=0))
    pred_path = _save_like(pred, truth_path, tmp_path / "CT_mask.nii.gz")
    code, out, err = run_cli("evaluate", "seg", "--pred", pred_path, "--truth", truth_path, "--out", tmp_path / "eval")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("label_1 "))
    dice, hd95, nsd = float(row.split()[1]), float(row.split()[4]), float(row.split()[5])
    assert dice == pytest.approx(_dice(truth, pred), abs=5e-4)  # measured 0.811
    assert 2.0 < hd95 < 5.0 and 0.4 < nsd < 0.8  # measured 3.4 mm, 0.592
    assert "NSD@2mm" in out and row.endswith("1 ok")
    notice = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(notice) == 1 and "label_1" in notice[0] and "--labels" in notice[0]
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["labels"] == {"0": "background", "1": "label_1"} and saved["labels_source"] == "none"
    assert saved["rules"]["nsd_tolerance_mm"] == DEFAULT_NSD_TOLERANCE_MM == 2.0
    assert saved["per_case"]["CT_mask"]["label_1"]["hd95"] == pytest.approx(hd95, abs=0.05)
    csv_rows = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) == 2 and csv_rows[1].startswith("CT_mask,1,label_1,")


def test_values_that_disagree_are_scored_per_class(tmp_path):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir(), pred.mkdir()
    t = np.zeros((16, 16, 8), np.uint8)
    t[2:6, 2:6, 2:6] = 1
    t[9:13, 9:13, 2:6] = 2  # only in the truth: missed
    p = t.copy()
    p[p == 2] = 0
    p[2:5, 10:14, 2:6] = 3  # only in the prediction: a false-positive class
    _save(t, truth / "a.nii.gz"), _save(p, pred / "a.nii.gz")
    _save(np.where(t == 2, 0, t), truth / "b.nii.gz"), _save(np.where(p == 3, 0, p), pred / "b.nii.gz")
    with pytest.warns(UserWarning, match=r"label value\(s\) 1, 2, 3 scored as label_1, label_2, label_3"):
        result = evaluate_segmentation(pred, truth, n_resamples=50)
    assert result["labels"] == {"0": "background", "1": "label_1", "2": "label_2", "3": "label_3"}
    a, b = result["per_case"]["a"], result["per_case"]["b"]
    assert (a["label_1"]["dice"], a["label_1"]["hd95"], a["label_1"]["nsd"]) == (1.0, 0.0, 1.0)
    assert (a["label_2"]["status"], a["label_2"]["dice"], a["label_2"]["nsd"]) == ("missed", 0.0, 0.0)
    assert (a["label_3"]["status"], a["label_3"]["dice"], a["label_3"]["nsd"]) == ("false_positive", 0.0, 0.0)
    assert math.isnan(a["label_2"]["hd95"]) and math.isnan(a["label_3"]["hd95"])
    assert b["label_2"]["status"] == b["label_3"]["status"] == "absent" and math.isnan(b["label_2"]["dice"])
    per_class = result["summary"]["per_class"]
    assert per_class["label_2"]["status_counts"] == {"missed": 1, "absent": 1}
    assert per_class["label_3"]["n_defined"] == 1 and per_class["label_3"]["dice"]["estimate"] == 0.0
    assert per_class["label_3"]["hd95"] is None  # undefined in every case
    assert result["summary"]["macro"]["dice"]["estimate"] == pytest.approx(1 / 3)


def test_names_of_one_side_name_the_other(tmp_path):
    t = np.zeros((12, 12, 6), np.uint8)
    t[2:6, 2:6, 1:4] = 1
    _save(t, tmp_path / "truth.nii.gz")
    pred = tmp_path / "pred"
    pred.mkdir()
    _save(t, pred / "truth.nii.gz")
    # a model's prediction names value 1 "tumour": the unnamed truth's 1 is a tumour too
    (pred / "truth.labels.json").write_text(json.dumps({"labels": {"0": "background", "1": "tumour"}}))
    result = evaluate_segmentation(pred, tmp_path / "truth.nii.gz", n_resamples=20)
    assert result["labels"] == {"0": "background", "1": "tumour"} and result["per_case"]["truth"]["tumour"]["dice"] == 1
    # a model trained on unnamed values 26 (channel 1 = label_26): matched to the truth's value 26 by name
    _save(t * 26, tmp_path / "truth.nii.gz")
    (pred / "truth.labels.json").write_text(json.dumps({"labels": {"0": "background", "1": "label_26"}}))
    result = evaluate_segmentation(pred, tmp_path / "truth.nii.gz", n_resamples=20)
    assert list(result["per_case"]["truth"]) == ["label_26", "_macro_dice"]
    assert result["per_case"]["truth"]["label_26"]["dice"] == 1.0
    assert result["class_values"] == {"label_26": {"truth": 26, "prediction": 1}}


@pytest.mark.slow
@pytest.mark.realdata
def test_real_unnamed_label_maps(tmp_path):
    from conftest import data_path

    source = data_path("abdomen_3mm/vertebrae.nii.gz")  # values 26..33; the header's names dropped below
    vertebrae = np.asarray(nib.load(str(source)).dataobj)
    truth = _save_like(vertebrae, source, tmp_path / "truth.nii.gz")
    pred = np.where(vertebrae == 33, 34, vertebrae)  # T11 given a value the truth does not hold
    (tmp_path / "pred").mkdir()
    pred_path = _save_like(pred, source, tmp_path / "pred" / "truth.nii.gz")
    with pytest.warns(UserWarning, match="label_26"):
        result = evaluate_segmentation(pred_path, truth, n_resamples=20)
    case = result["per_case"]["truth"]
    assert [k for k in case if k != "_macro_dice"] == [f"label_{v}" for v in range(26, 35)]
    assert all(case[f"label_{v}"]["dice"] == 1.0 for v in range(26, 33))
    assert (case["label_33"]["status"], case["label_34"]["status"]) == ("missed", "false_positive")

    # --labels names the file values themselves, gaps allowed; the unnamed extra value keeps label_34
    (tmp_path / "names.json").write_text(json.dumps({"26": "vertebrae_S1", "33": "vertebrae_T11"}))
    with pytest.warns(UserWarning, match="class map given does not name them: label value"):
        result = evaluate_segmentation(pred_path, truth, labels=tmp_path / "names.json", n_resamples=20)
    case = result["per_case"]["truth"]
    assert case["vertebrae_S1"]["dice"] == 1.0 and case["vertebrae_T11"]["status"] == "missed"
    assert case["label_34"]["status"] == "false_positive" and case["label_27"]["dice"] == 1.0

    lung = data_path("lung_tumour_nrrd/lung1_label.nrrd")  # NRRD, 1 = tumour, no names
    with pytest.warns(UserWarning, match="label_1"):
        result = evaluate_segmentation(lung, lung, n_resamples=20)
    scores = result["per_case"]["lung1_label"]["label_1"]
    assert (scores["dice"], scores["hd95"], scores["nsd"]) == (1.0, 0.0, 1.0)


def test_the_nsd_tolerance_default_is_documented_and_used(tmp_path, run_cli):
    from ctfm.evaluate.metrics.segmentation import DEFAULT_NSD_TOLERANCE_MM

    t = np.zeros((16, 16, 8), np.uint8)
    t[4:10, 4:10, 2:6] = 1
    _save(t, tmp_path / "t.nii.gz")
    _save(np.roll(t, 1, axis=0), tmp_path / "p.nii.gz")  # surfaces 0 or 1.5 mm apart (1.5 mm voxels)
    with pytest.warns(UserWarning):
        default = evaluate_segmentation(tmp_path / "p.nii.gz", tmp_path / "t.nii.gz", n_resamples=20)
        tight = evaluate_segmentation(
            tmp_path / "p.nii.gz", tmp_path / "t.nii.gz", nsd_tolerance_mm=1.0, n_resamples=20
        )
    assert default["rules"]["nsd_tolerance_mm"] == DEFAULT_NSD_TOLERANCE_MM
    assert default["per_case"]["t"]["label_1"]["nsd"] == 1.0 > tight["per_case"]["t"]["label_1"]["nsd"]
    code, out, _ = run_cli("evaluate", "seg", "--help")
    assert code == 0 and f"(default {DEFAULT_NSD_TOLERANCE_MM:g}," in " ".join(out.split())
    code, out, _ = run_cli("evaluate", "seg", "--pred", tmp_path / "p.nii.gz", "--truth", tmp_path / "t.nii.gz")
    assert code == 0 and f"NSD@{DEFAULT_NSD_TOLERANCE_MM:g}mm" in out
