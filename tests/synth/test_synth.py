"""Tests of ctfm.synth: synthetic labelled torso phantoms (a fixture, not real data)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctfm.synth import (
    LABEL_IDS,
    LABEL_NAMES,
    Phantom,
    make_cohort,
    make_phantom,
    read_label_table,
    write_phantom,
)

ORGANS = [name for label_id, name in sorted(LABEL_NAMES.items()) if label_id != 0]
TINY = (32, 32, 24)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(3)


def _centroid(p: Phantom, name: str) -> np.ndarray:
    """World-independent centroid in voxel indices (x, y, z)."""
    return np.argwhere(p.labels == LABEL_IDS[name]).mean(axis=0)


def test_label_ids_are_stable():
    assert LABEL_NAMES == {
        0: "background",
        1: "fat",
        2: "muscle",
        3: "lung_left",
        4: "lung_right",
        5: "liver",
        6: "spleen",
        7: "kidney_left",
        8: "kidney_right",
        9: "aorta",
        10: "vertebrae",
        11: "ribs",
    }


def test_types_shapes_and_affine(phantom: Phantom):
    p = phantom
    assert p.image.dtype == np.float32 and p.labels.dtype == np.uint8
    assert p.image.shape == p.labels.shape and p.image.ndim == 3
    assert p.affine.dtype == np.float64 and p.affine.shape == (4, 4)
    np.testing.assert_allclose(np.diag(p.affine)[:3], p.spacing_mm)
    assert nib.aff2axcodes(p.affine) == ("R", "A", "S")
    # The volume centre maps to world ~(0, 0, 0).
    centre = p.affine @ np.array([*(np.array(p.shape) - 1) / 2, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-6)
    assert p.image.min() >= -1024 and p.image.max() <= 3071
    assert p.label_names == LABEL_NAMES and p.seed == 3
    # Default grid: small arrays, but a torso-sized field of view.
    extent = np.array(p.shape) * np.array(p.spacing_mm)
    assert 94 <= p.shape[0] <= 132 and 73 <= p.shape[1] <= 104 and 40 <= p.shape[2] <= 300
    assert 300 <= extent[0] <= 340 and 230 <= extent[1] <= 270 and 195 <= extent[2] <= 305


def test_same_seed_gives_identical_arrays():
    a, b = make_phantom(7), make_phantom(7)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.affine, b.affine)
    tiny_a, tiny_b = make_phantom(7, shape=TINY), make_phantom(7, shape=TINY)
    np.testing.assert_array_equal(tiny_a.image, tiny_b.image)


def test_different_seeds_differ():
    cohort = make_cohort(6, seed=10)
    assert [p.seed for p in cohort] == list(range(10, 16))
    assert len({p.shape for p in cohort}) > 1
    assert len({p.spacing_mm for p in cohort}) > 1
    # Same grid, different seed: anatomy (position/size) still differs.
    a, b = make_phantom(1, shape=TINY), make_phantom(2, shape=TINY)
    assert (a.labels != b.labels).mean() > 0.02
    body_a = np.argwhere(a.labels > 0).mean(axis=0)
    body_b = np.argwhere(b.labels > 0).mean(axis=0)
    liver_a, liver_b = _centroid(a, "liver"), _centroid(b, "liver")
    assert not np.allclose(body_a, body_b) and not np.allclose(liver_a, liver_b)


@pytest.mark.parametrize("seed", [0, 1, 2, 5, 11, 42])
@pytest.mark.parametrize("shape", [None, TINY, (16, 16, 12)])
def test_every_label_present(seed: int, shape):
    p = make_phantom(seed, shape=shape)
    counts = np.bincount(p.labels.ravel(), minlength=len(LABEL_NAMES))
    assert len(counts) == len(LABEL_NAMES)
    missing = [LABEL_NAMES[i] for i in LABEL_NAMES if counts[i] == 0]
    assert missing == []
    if shape is not None:
        assert p.shape == shape
        # The same torso-sized anatomy is scaled into the small array.
        extent = np.array(shape) * np.array(p.spacing_mm)
        assert 300 <= extent[0] <= 340


@pytest.mark.parametrize("seed", [0, 4, 9])
def test_hounsfield_units_are_realistic(seed: int):
    p = make_phantom(seed)

    def median(name: str) -> float:
        return float(np.median(p.image[p.labels == LABEL_IDS[name]]))

    assert median("background") <= -950
    assert -150 <= median("fat") <= -50
    assert 0 <= median("muscle") <= 80
    assert median("lung_left") < -700 and median("lung_right") < -700
    assert 30 <= median("liver") <= 130
    assert 30 <= median("spleen") <= 140
    assert 100 <= median("kidney_left") <= 220 and 100 <= median("kidney_right") <= 220
    assert 130 <= median("aorta") <= 300
    assert median("vertebrae") > 300 and median("ribs") > 300
    # Noise is present but moderate: spread of air well away from the body.
    corner = p.image[:5, :5, :]
    assert 5 <= corner.std() <= 30


def test_laterality_and_position(phantom: Phantom):
    p = phantom
    assert nib.aff2axcodes(p.affine) == ("R", "A", "S")
    # RAS+: the patient's left is at smaller x.
    assert _centroid(p, "spleen")[0] < _centroid(p, "liver")[0]
    assert _centroid(p, "kidney_left")[0] < _centroid(p, "kidney_right")[0]
    assert _centroid(p, "lung_left")[0] < _centroid(p, "lung_right")[0]
    spine = _centroid(p, "vertebrae")
    aorta = _centroid(p, "aorta")
    assert aorta[0] < spine[0] and aorta[1] > spine[1]  # aorta anterior-left of the spine
    body_y = np.argwhere(p.labels > 0)[:, 1].mean()
    assert spine[1] < body_y  # spine is posterior (+y is anterior)
    # Superior is +z: lungs above the liver above the kidneys.
    assert _centroid(p, "lung_right")[2] > _centroid(p, "liver")[2] > _centroid(p, "kidney_right")[2]


def test_write_phantom_round_trip(tmp_path: Path):
    p = make_phantom(5, shape=TINY)
    image_path, labels_path = write_phantom(p, tmp_path / "out", stem="case5")
    assert image_path == tmp_path / "out" / "case5.nii.gz"
    assert labels_path == tmp_path / "out" / "case5_labels.nii.gz"
    # Only the three final files, no temporary leftovers.
    expected_files = ["case5.nii.gz", "case5_labels.json", "case5_labels.nii.gz"]
    assert sorted(os.listdir(tmp_path / "out")) == expected_files

    image = nib.load(image_path)
    labels = nib.load(labels_path)
    np.testing.assert_allclose(image.affine, p.affine)
    np.testing.assert_allclose(labels.affine, p.affine)
    assert image.get_data_dtype() == np.int16 and labels.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.rint(p.image).astype(np.int16))
    np.testing.assert_array_equal(np.asarray(labels.dataobj), p.labels)

    expected = {k: v for k, v in LABEL_NAMES.items() if k != 0}
    assert read_label_table(labels_path) == expected
    extension = labels.header.extensions[0]
    assert extension.get_code() == 0
    xml = extension.get_content().decode("utf-8")
    assert xml.startswith('<?xml version="1.0" encoding="UTF-8"?>') and "<CaretExtension>" in xml
    assert "<![CDATA[spleen]]></Label>" in xml
    sidecar = json.loads((tmp_path / "out" / "case5_labels.json").read_text())
    assert {int(k): v for k, v in sidecar["labels"].items()} == expected
    assert read_label_table(image_path) == {}  # the CT itself carries no label table


def test_write_phantom_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import ctfm.synth.phantom as phantom_module

    p = make_phantom(0, shape=TINY)
    write_phantom(p, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    class FailingJson:  # fails after both NIfTI files were written to their temporary names
        @staticmethod
        def dumps(*args, **kwargs):
            raise RuntimeError("disk full")

    monkeypatch.setattr(phantom_module, "json", FailingJson)
    with pytest.raises(RuntimeError, match="disk full"):
        write_phantom(make_phantom(1, shape=TINY), tmp_path)
    # The earlier files are untouched and no temporary file is left behind.
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before

    with pytest.raises(ValueError):
        write_phantom(p, tmp_path, stem="../escape")
    broken = Phantom(
        image=p.image,
        labels=p.labels,
        affine=p.affine,
        spacing_mm=p.spacing_mm,
        label_names={**p.label_names, 3: "bad]]>name"},
        seed=p.seed,
    )
    with pytest.raises(ValueError):
        write_phantom(broken, tmp_path / "other")
    assert not any((tmp_path / "other").iterdir())


def test_given_spacing_and_bad_arguments():
    p = make_phantom(0, spacing_mm=(8.0, 8.0, 10.0))
    assert p.spacing_mm == (8.0, 8.0, 10.0)
    assert 35 <= p.shape[0] <= 45  # ~320 mm field of view
    both = make_phantom(0, shape=TINY, spacing_mm=(1.0, 1.0, 1.0))
    assert both.shape == TINY and both.spacing_mm == (1.0, 1.0, 1.0)
    assert set(np.unique(both.labels)) == set(LABEL_NAMES)
    with pytest.raises(ValueError):
        make_phantom(0, shape=(4, 32, 32))
    with pytest.raises(ValueError):
        make_phantom(0, spacing_mm=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError):
        make_cohort(-1)
    assert make_cohort(0) == []


# sha256 over (dtype, shape, bytes) of image, affine and labels, computed from the phantom code
# as it was when these were committed: a change of any voxel, of the grid or of the random draws
# fails here. Change them only on purpose, saying so in the commit.
GOLDEN = {
    (0, None): "4bf47174a3ddf4a831c5dc7da3039248ff5a56581209fbd4f36f93fc7708ed9a",
    (1, None): "1568e02dcd66e2d6460d35904ab6118ca25dc74776a9d2716145dd1a306016b9",
    (7, None): "2ef1899b05e506d90379a37d791e4507f2af98f1d3140e7eea0c0e60d76b0106",
    (3, TINY): "a2ec1f84207e3ce8689ddcb1debeaf28bc066ce6f19f3c1405e9b5c350fcdd49",
}


def _phantom_digest(p: Phantom) -> str:
    import hashlib

    digest = hashlib.sha256()
    for array in (p.image, p.affine, p.labels):
        array = np.ascontiguousarray(array)
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("seed,shape", list(GOLDEN))
def test_phantoms_match_their_golden_hash(seed, shape):
    assert _phantom_digest(make_phantom(seed, shape=shape)) == GOLDEN[(seed, shape)]
