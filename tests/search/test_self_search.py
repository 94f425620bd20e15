"""A point searched in the scan it came from, or in a copy of it, comes back at that point.

Real scans (../shared/data): abdomen_3mm's full scan with a point inside a vertebra
(``vertebrae.nii.gz`` lives on the full grid), its ``_sm`` crop with a point inside the liver
(``example_seg.nii.gz`` lives on the ``_sm`` grid, whose header repeats the full scan's affine),
and neck_a (1.5 mm, a slightly oblique affine) with a point in bone. Copies: the abdomen in LPS
(x and y flipped, written by nibabel) and cropped to its body, neck_a cropped to its body. The
store holds them all, embedded with the random tiny weights (64-d, a flat similarity landscape)
in windows of 16x64x64 voxels at 3x1x1 mm and overlap 0 (`ctfm embed`'s default), so the
clicked point is off the window grid. The error is measured per axis in voxels of the store's
grid (3x1x1 mm).
"""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest

import ctfm
from conftest import data_path
from ctfm.preprocess import get_preset
from ctfm.search import SearchSession
from ctfm.search.regions import nominal_axes, pattern_search, weighted_centre, window_axes

SPEC = get_preset("ct-fm-patches").with_(name="small-windows", patch_size_mm=(48.0, 64.0, 64.0))
MAX_VOXELS = 2.0


def _label_point(labels: nib.Nifti1Image, value: int) -> np.ndarray:
    """World mm of the label voxel nearest the label's centroid (inside the structure)."""
    ijk = np.argwhere(np.asarray(labels.dataobj) == value)
    voxel = ijk[np.argmin(np.linalg.norm(ijk - ijk.mean(0), axis=1))]
    return (labels.affine @ np.append(voxel, 1.0))[:3]


def _body_crop(img: nib.Nifti1Image, out, margin: int = 2) -> None:
    """``img`` cropped to its voxels above 0 HU (the foreground the preprocessing keeps) plus a
    margin, by an even number of voxels on each side."""
    body = np.argwhere(np.asarray(img.dataobj) > 0)
    low = np.maximum(body.min(0) - margin, 0) // 2 * 2
    high = body.max(0) + margin + 1
    nib.save(img.slicer[low[0] : high[0], low[1] : high[1], low[2] : high[2]], str(out))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_weights):
    root = tmp_path_factory.mktemp("self_search")
    full = data_path("abdomen_3mm/example_ct.nii.gz")
    small = data_path("abdomen_3mm/example_ct_sm.nii.gz")
    neck = data_path("whole_scans_1p5mm/neck_a.nii.gz")
    img = nib.load(str(full))
    lps = root / "abdomen_lps.nii.gz"
    nib.save(img.as_reoriented(np.array([[0, -1], [1, -1], [2, 1]])), str(lps))
    assert nib.aff2axcodes(nib.load(str(lps)).affine) == ("L", "P", "S")
    abdomen_crop = root / "abdomen_body.nii.gz"
    _body_crop(img, abdomen_crop)
    neck_img = nib.load(str(neck))
    neck_crop = root / "neck_body.nii.gz"
    _body_crop(neck_img, neck_crop)
    bone = np.argwhere(np.asarray(neck_img.dataobj) > 400)
    neck_point = (neck_img.affine @ np.append(bone[np.argmin(np.linalg.norm(bone - bone.mean(0), axis=1))], 1.0))[:3]
    store = root / "store"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = ctfm.embed(
            [str(p) for p in (full, lps, abdomen_crop, small, neck, neck_crop)],
            weights=str(tiny_weights),
            mode="patches",
            preset=SPEC,
            out=store,
            device="cpu",
            return_records=False,
        )
    assert run.totals.done == 6 and not run.totals.failed, run.totals.failed
    cases = [
        (full, _label_point(nib.load(str(data_path("abdomen_3mm/vertebrae.nii.gz"))), 29), [full, lps, abdomen_crop]),
        (small, _label_point(nib.load(str(data_path("abdomen_3mm/example_seg.nii.gz"))), 5), [small]),
        (neck, neck_point, [neck, neck_crop]),
    ]
    return {"store": store, "weights": tiny_weights, "cases": cases}


def _voxel_error(hit_mm, point_mm) -> np.ndarray:
    """|hit - point| per axis in voxels of the store's grid (S, P, L at 3, 1, 1 mm)."""
    return np.abs(np.linalg.solve(nominal_axes(SPEC), np.asarray(hit_mm) - np.asarray(point_mm)))


def _off_grid(session, scan, point) -> float:
    """How far the point lies from the nearest stored window centre of its scan (mm)."""
    grid = session._grid_of(session.resolve(str(scan)).scan_id)
    return float(np.min(np.linalg.norm(grid.centers_mm - point, axis=1)))


@pytest.mark.slow
def test_default_path_returns_the_point_in_its_scan_and_its_copies(world):
    session = SearchSession(world["store"])
    for scan, point, targets in world["cases"]:
        assert _off_grid(session, scan, point) > 3.0, (scan, point)  # the click is not on a window centre
        for target in targets:
            for refine in ("auto", "none"):
                hit = session.search_point(str(scan), point, k=1, target=str(target), refine=refine)[0]
                error = _voxel_error(hit.point_mm, point)
                assert np.all(error <= MAX_VOXELS), (scan.name, target.name, refine, hit.point_mm, point, error)


@pytest.mark.slow
def test_fine_refinement_of_a_centred_window_returns_the_point_with_random_weights(world):
    session = SearchSession(world["store"], weights=str(world["weights"]))
    for scan, point, targets in world["cases"]:
        for target in targets:
            hit = session.search_point(str(scan), point, k=1, target=str(target), refine="fine")[0]
            error = _voxel_error(hit.point_mm, point)
            assert hit.refine == "fine" and np.all(error <= MAX_VOXELS), (scan.name, target.name, hit.point_mm, error)
            # It never ends below what the stored windows offered.
            assert hit.score >= hit.window_score - 1e-6


@pytest.mark.slow
def test_the_reported_command_answers_at_the_clicked_point(world, run_cli):
    scan, point, _ = world["cases"][0]
    where = f"{scan}:{point[0]:.2f},{point[1]:.2f},{point[2]:.2f}"
    for extra in ([], ["--weights", str(world["weights"]), "--refine", "fine"]):
        code, out, err = run_cli(
            "search", world["store"], "--point", where, "--target", scan, "-k", "1", "--json", *extra
        )
        assert code == 0, err
        (hit,) = json.loads(out)
        assert np.all(_voxel_error(hit["point_mm"], np.round(point, 2)) <= MAX_VOXELS), (extra, hit)
    code, out, err = run_cli("search", world["store"], "--point", where, "--target", scan, "-k", "1")
    assert code == 0 and "each hit keeps the point's offset from that window" in err, err


# ---- the pieces, on hand-made inputs ----------------------------------------------------------
def test_an_exact_match_keeps_its_own_centre_in_the_weighted_refinement():
    centres = np.array([[0.0, 0, 0], [10, 0, 0], [20, 0, 0], [100, 0, 0]])
    half = np.array([10.0, 10, 10])
    point, best = weighted_centre(centres, np.array([0.99, 1.0, 0.995, 0.9]), half)
    assert best == 1 and np.allclose(point, centres[1])
    # Below the ceiling the neighbours pull, less the closer the best is to a perfect score.
    near, _ = weighted_centre(centres, np.array([0.3, 0.95, 0.94, 0.2]), half)
    far, _ = weighted_centre(centres, np.array([0.3, 0.95, 0.94, 0.2]), half, ceiling=None)
    assert 10.0 < near[0] < far[0] < 20.0


def test_pattern_search_never_ends_below_a_start_and_stops_at_the_ceiling():
    peak = np.array([5.0, 5.0, 5.0])

    def score(p):  # a narrow peak (1 at `peak`) on a plateau with a lower bump at the origin
        p = np.asarray(p, dtype=float)
        return np.where(np.all(p == peak, axis=1), 1.0, 0.99 - 0.001 * np.abs(p).sum(axis=1))

    found, best, used = pattern_search(score, np.array([[0.0, 0, 0], peak]), np.array([8.0, 8, 8]), ceiling=1.0)
    assert np.allclose(found, peak) and best == 1.0 and used == 2
    found, best, _ = pattern_search(score, np.array([[0.0, 0, 0]]), np.array([8.0, 8, 8]))
    assert best >= 0.99 and np.allclose(found, 0.0)


def test_window_axes_read_an_oblique_grid_and_keep_the_nominal_axis_where_windows_do_not_vary():
    rotation = np.array([[0.0, 0, 1], [0, -1, 0], [1, 0, 0]]) @ np.diag([3.0, 1.0, 1.0])
    tilt = np.array([[1, 0, 0], [0, np.cos(0.05), -np.sin(0.05)], [0, np.sin(0.05), np.cos(0.05)]])
    axes = tilt @ rotation
    starts = np.array([[0, 0, 0], [16, 0, 0], [0, 64, 0], [0, 0, 64], [16, 64, 64]])
    centres = (starts + 7.5) @ axes.T + np.array([4.0, -2.0, 9.0])
    np.testing.assert_allclose(window_axes(centres, starts, nominal_axes(SPEC)), axes, atol=1e-9)
    flat = starts[starts[:, 0] == 0]
    fitted = window_axes((flat + 7.5) @ axes.T, flat, nominal_axes(SPEC))
    np.testing.assert_allclose(fitted[:, 1:], axes[:, 1:], atol=1e-9)
    np.testing.assert_allclose(fitted[:, 0], nominal_axes(SPEC)[:, 0])
