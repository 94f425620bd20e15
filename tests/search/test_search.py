"""Scan and region search: world points survive reorientation and crops; CLI schema; bad input.

One phantom is stored three times: as written, rewritten in another orientation (nibabel), and
cropped into its anatomy; a second phantom is the distractor. A narrow random CT-FM encoder and
small windows (16x64x64 voxels at 3x1x1 mm) keep it fast. (Smaller windows make the
untrained encoder's vectors too sensitive to a shift of a few voxels for the refinement to be
tested.)
"""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest

import ctfm
from ctfm.cli import main
from ctfm.preprocess import get_preset
from ctfm.search import SearchSession
from ctfm.synth import make_phantom, write_phantom

WINDOW_SPEC = get_preset("ct-fm-patches").with_(name="small-windows", patch_size_mm=(48.0, 64.0, 64.0))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_weights):
    root = tmp_path_factory.mktemp("search")
    scans = root / "scans"
    original = write_phantom(make_phantom(0, shape=(48, 40, 30), spacing_mm=(3.0, 3.0, 3.0)), scans, stem="p0")[0]
    other = write_phantom(make_phantom(1, shape=(48, 40, 30), spacing_mm=(3.0, 3.0, 3.0)), scans, stem="p1")[0]
    img = nib.load(str(original))
    # Another orientation: x flipped, y and z swapped (the affine follows, the anatomy stays put).
    reoriented = scans / "p0_reoriented.nii.gz"
    nib.save(img.as_reoriented(np.array([[0, -1], [2, 1], [1, 1]])), str(reoriented))
    # A crop into the anatomy (30 mm off x, 9 mm off z): the foreground box and window grid move.
    cropped = scans / "p0_cropped.nii.gz"
    nib.save(img.slicer[10:, :, 3:], str(cropped))
    assert main(["models", "init", "ct-fm", "--seed", "1", "--out", str(root / "w1"), "--init-filters", "4"]) == 0
    store = root / "store"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctfm.embed(
            [str(p) for p in (original, reoriented, cropped, other)],
            weights=str(tiny_weights),
            mode="patches",
            overlap=0.5,
            preset=WINDOW_SPEC,
            out=store,
            device="cpu",
            return_records=False,
        )
    session = SearchSession(store)
    grid = session._grid_of(session.resolve(str(original)).scan_id)
    centre = grid.centers_mm.mean(0)
    on_grid = grid.centers_mm[int(np.argmin(np.linalg.norm(grid.centers_mm - centre, axis=1)))]
    return {
        "root": root,
        "store": store,
        "original": original,
        "reoriented": reoriented,
        "cropped": cropped,
        "other": other,
        "weights": tiny_weights,
        "weights_b": root / "w1",
        "point": on_grid,
    }


def _distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


@pytest.mark.slow
def test_stored_query_finds_its_own_window_and_the_same_point_in_another_orientation(world):
    session = SearchSession(world["store"])
    point = world["point"]
    own = session.search_point(str(world["original"]), point, target=str(world["original"]), refine="none")
    assert own[0].score == pytest.approx(1.0, abs=1e-5) and _distance(own[0].point_mm, point) < 1e-6
    weighted = session.search_point(str(world["original"]), point, target=str(world["original"]))[0]
    assert weighted.refine == "weighted" and _distance(weighted.point_mm, point) < 8.0
    # The reoriented copy has the same windows at the same world centres: the same answer.
    turned = session.search_point(str(world["original"]), point, target=str(world["reoriented"]))[0]
    assert turned.score == pytest.approx(1.0, abs=1e-4)
    assert _distance(turned.point_mm, weighted.point_mm) < 1e-3 and _distance(turned.window_center_mm, point) < 1e-3


@pytest.mark.slow
def test_fine_refinement_recovers_the_point_in_the_scan_and_after_a_crop(world):
    session = SearchSession(world["store"], weights=str(world["weights"]))
    point = np.asarray(world["point"]) + np.array([2.0, -3.0, 4.0])  # off the window grid
    for target in ("original", "cropped"):
        hit = session.search_point(str(world["original"]), point, target=str(world[target]))[0]
        assert hit.refine == "fine" and hit.score > 0.999, (target, hit)
        assert _distance(hit.point_mm, point) <= 1.6, (target, hit.point_mm, point)  # within a voxel (3 mm slices)


def test_store_wide_region_search_leaves_out_the_query_scan(world):
    session = SearchSession(world["store"])
    hits = session.search_point(str(world["original"]), world["point"], k=2)
    assert len(hits) == 2 and str(world["original"]) not in {h.source_path for h in hits}
    assert hits[0].score >= hits[1].score and all(h.refine == "weighted" for h in hits)
    everything = session.search_point(str(world["original"]), world["point"], k=10, include_self=True)
    assert len(everything) == 4 and everything[0].source_path in (str(world["original"]), str(world["reoriented"]))
    only_copies = session.search_point(str(world["original"]), world["point"], k=10, filters={"orientation": "RAS"})
    assert {h.source_path for h in only_copies} == {str(world["cropped"]), str(world["other"])}


def test_similarity_volume_lies_on_the_targets_own_grid(world):
    session = SearchSession(world["store"])
    query = session.region_query(str(world["original"]), world["point"])
    volume, affine = session.similarity_volume(query, str(world["reoriented"]))
    img = nib.load(str(world["reoriented"]))
    assert volume.shape == img.shape and np.allclose(affine, img.affine)
    assert np.all(np.isfinite(volume)) and volume.max() <= 1.0 + 1e-5
    peak = np.unravel_index(np.argmax(volume), volume.shape)
    peak_mm = (img.affine @ np.append(peak, 1.0))[:3]
    assert _distance(peak_mm, world["point"]) < 40.0  # inside the matching window (48 x 64 x 64 mm)


@pytest.mark.slow
def test_scan_search_and_region_cli_json_schema(world, capsys, tmp_path):
    store = str(world["store"])
    assert main(["index", "build", store]) == 0
    capsys.readouterr()
    assert main(["search", store, "--scan", str(world["original"]), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert set(hits[0]) == {"rank", "scan_id", "source_path", "score", "series_uid", "body_part", "series_description"}
    assert str(world["original"]) not in {h["source_path"] for h in hits}  # the query itself is left out
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    heatmap = tmp_path / "sim.nii.gz"
    x, y, z = world["point"]
    assert (
        main(
            [
                "search",
                store,
                "--point",
                f"{world['original']}:{x},{y},{z}",
                "-k",
                "2",
                "--json",
                "--heatmap",
                str(heatmap),
            ]
        )
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2
    for h in hits:
        assert set(h) == {
            "rank",
            "scan_id",
            "source_path",
            "score",
            "point_mm",
            "window_center_mm",
            "window_score",
            "refine",
        }
        assert (
            isinstance(h["scan_id"], str)
            and isinstance(h["score"], float)
            and len(h["point_mm"]) == 3
            and all(isinstance(v, float) for v in h["point_mm"])
        )
    assert nib.load(str(heatmap)).shape == nib.load(hits[0]["source_path"]).shape


def test_search_index_and_serve_take_run_and_where_and_refuse_the_old_flags(world, capsys):
    from ctfm.store import open_store

    store = str(world["store"])
    (run,) = open_store(store).runs("patch")
    assert (
        main(
            [
                "search",
                store,
                "--scan",
                str(world["original"]),
                "-k",
                "5",
                "--json",
                "--run",
                run["digest"][:6],
                "--where",
                "orientation=RAS",
            ]
        )
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    rows = open_store(store).select("scan", where={"orientation": "RAS"}).scans
    assert hits and {h["scan_id"] for h in hits} <= set(rows)
    assert (
        main(
            ["index", "build", store, "--level", "patch", "--where", "mode=patches", "--where", "overlap=0.5", "--json"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["digest"] == run["digest"]
    assert main(["index", "status", store, "--run", run["digest"][:6], "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [r["digest"] for r in status["runs"]["patch"]] == [run["digest"]] and status["indexes"]
    err = _one_line_error(capsys, ["search", store, "--scan", str(world["original"]), "--where", "overlap=0.25"])
    assert "no scan-level vectors match --where overlap=0.25" in err and run["digest"] in err
    for argv in (
        ["search", store, "--scan", str(world["original"]), "--mode", "patches"],
        ["index", "build", store, "--overlap", "0.5"],
        ["index", "update", store, "--select", "mode=patches"],
        ["serve", store, "--weights-sha256", "abc", "--port", "0"],
    ):
        err = _one_line_error(capsys, argv)
        assert "this option was removed" in err and "--run DIGEST" in err and "--where COLUMN=VALUE" in err, err


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.slow
def test_bad_input_gets_one_line(world, capsys, tmp_path):
    store = str(world["store"])
    scan = str(world["original"])
    assert "lies outside every stored window" in _one_line_error(
        capsys, ["search", store, "--point", f"{scan}:900,0,0"]
    )
    assert "lies outside the scan (its extent" in _one_line_error(
        capsys, ["search", store, "--point", f"{scan}:900,0,0", "--weights", str(world["weights"])]
    )
    assert "neither a scan id of the store" in _one_line_error(capsys, ["search", store, "--scan", "0123456789abcdef"])
    assert "expected PATH_OR_ID:x,y,z" in _one_line_error(capsys, ["search", store, "--point", f"{scan}:1,2"])
    err = _one_line_error(capsys, ["search", store, "--point", f"{scan}:0,0,0", "--weights", str(world["weights_b"])])
    assert "are not the store's" in err
    # A file outside the store needs the store's weights to be embedded.
    outside = write_phantom(make_phantom(3, shape=(40, 32, 24), spacing_mm=(3.0, 3.0, 3.0)), tmp_path, stem="new")[0]
    assert "give --weights" in _one_line_error(capsys, ["search", store, "--scan", str(outside)])
    # An index of the run, then the store grows: searches say so and fall back to exact search.
    assert main(["index", "build", store]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctfm.embed(
            [str(outside)],
            weights=str(world["weights"]),
            mode="patches",
            overlap=0.5,
            preset=WINDOW_SPEC,
            out=world["store"],
            device="cpu",
            return_records=False,
        )
    capsys.readouterr()
    with pytest.warns(UserWarning, match="index is stale: 1 scan"):
        hits = SearchSession(store).search_scans(str(outside), k=2)
    assert len(hits) == 2
    assert main(["index", "check", store]) == 1


# ---- the refinement and heatmap arithmetic on hand-sized inputs ------------------------------
def test_window_cells_average_the_windows_covering_each_voxel():
    from ctfm.search.regions import similarity_on_grid, window_cells, window_similarity_grid

    starts = np.array([[0, 0, 0], [0, 2, 0]])
    edges, means = window_cells(starts, np.array([1.0, 3.0]), (1, 4, 1), (1, 7, 1))
    assert [e.tolist() for e in edges] == [[0, 1], [0, 2, 4, 6, 7], [0, 1]]
    np.testing.assert_allclose(means[0, :, 0], [1.0, 2.0, 3.0, np.nan])
    grid = window_similarity_grid(starts, np.array([1.0, 3.0]), (1, 4, 1), (1, 7, 1))
    np.testing.assert_allclose(grid[0, :, 0], [1, 1, 2, 2, 3, 3, np.nan])
    # Onto a grid with axes swapped and the second one flipped: the same world voxels, same values.
    prepared_affine = np.eye(4)
    target_affine = np.array(
        [[0, 0, 1, 0], [0, -1, 0, 6], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float
    )  # target (i,j,k) -> prepared (k, 6-j, i)
    out = similarity_on_grid(
        starts, np.array([1.0, 3.0]), (1, 4, 1), (1, 7, 1), prepared_affine, (1, 7, 1), target_affine
    )
    np.testing.assert_allclose(out[0, :, 0], [np.nan, 3, 3, 2, 2, 1, 1])


def test_weighted_centre_and_pattern_search_on_known_landscapes():
    from ctfm.search.regions import pattern_search, weighted_centre

    centres = np.array([[0.0, 0, 0], [10, 0, 0], [20, 0, 0], [100, 0, 0]])
    point, best = weighted_centre(
        centres, np.array([0.5, 1.0, 0.9, 0.0]), np.array([10.0, 10, 10]), sharpness=10.0, ceiling=None
    )
    # No ceiling (scores not cosines): spread = 1.0 - median 0.7; weights exp(-10 * (1 - s) / 0.3) over the windows overlapping the best (not the one at 100)
    w = np.exp(-10 * (1.0 - np.array([0.5, 1.0, 0.9])) / 0.3)
    assert best == 1
    np.testing.assert_allclose(point, [(w * [0.0, 10, 20]).sum() / w.sum(), 0, 0])
    flat, _ = weighted_centre(centres, np.ones(4), np.array([10.0, 10, 10]))
    np.testing.assert_allclose(flat, centres[0])  # no spread: the best window's centre
    target = np.array([7.0, -3.0, 12.0])
    found, score, used = pattern_search(
        lambda p: -np.abs(np.asarray(p) - target).sum(axis=1), np.array([[0.0, 0, 0]]), np.array([8.0, 8, 8])
    )
    np.testing.assert_allclose(found, target)
    assert score == 0 and used < 400


@pytest.mark.slow
def test_a_file_outside_the_store_is_embedded_the_stores_way(world, tmp_path):
    outside = write_phantom(make_phantom(5, shape=(48, 40, 30), spacing_mm=(3.0, 3.0, 3.0)), tmp_path, stem="outside")[
        0
    ]
    session = SearchSession(world["store"], weights=str(world["weights"]))
    vector, ref = session.scan_vector(str(outside))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a stale index left by another test: exact search
        assert not ref.in_store and len(session.search_scans(str(outside), k=2)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = ctfm.embed(
            [str(outside)], weights=str(world["weights"]), mode="patches", overlap=0.5, preset=WINDOW_SPEC, device="cpu"
        )
    np.testing.assert_allclose(vector, records[0]["embedding"], atol=1e-6)  # the same chain as ctfm embed
