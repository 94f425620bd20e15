"""The preprocessed-volume cache: exact ct-fm-ssl volumes, crop reads, resume, failures, workers."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import data_path
from ctfm.cli import main
from ctfm.errors import CTInputError
from ctfm.io.sources import ScanSource
from ctfm.preprocess import get_preset
from ctfm.pretrain.cache import INDEX_NAME, VOLUMES_DIR, VolumeCache, _BuildLock, build_cache

pytestmark = pytest.mark.realdata

SCANS = ["sarcoma_ct/STS_019/CT_image.nii.gz", "abdomen_dicom/dicom", "lung_tumour_nrrd/lung1_image.nrrd"]


def _sources():
    return [str(data_path(name)) for name in SCANS]


def _reference(path):
    """What the cache must hold: the ct-fm-ssl chain applied to the loaded scan, [D, H, W]."""
    from ctfm.io import load_ct
    from ctfm.preprocess import preprocess

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image, _ = load_ct(path)
    return preprocess(image, get_preset("ct-fm-ssl")).as_tensor().numpy()[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache") / "c"
    summary = build_cache(_sources(), cache_dir, progress=False)
    return cache_dir, summary


@pytest.fixture(scope="module")
def references():
    return {os.path.abspath(p): _reference(p) for p in _sources()}


@pytest.mark.slow
def test_cached_volumes_equal_the_preprocessing_chain(built, references):
    cache_dir, summary = built
    assert (summary.done, summary.skipped, summary.failed) == (3, 0, [])
    cache = VolumeCache(cache_dir)
    assert len(cache) == 3 and sorted(cache.ids) == sorted(ScanSource(p).scan_id for p in _sources())
    spec = get_preset("ct-fm-ssl")
    for i in range(len(cache)):
        entry = cache.entry(i)
        volume = cache.volume(i)
        assert isinstance(volume, np.memmap) and volume.dtype == np.float32
        expected = references[entry["source_path"]]
        assert volume.shape == expected.shape == cache.shape(i)
        assert np.array_equal(np.asarray(volume), expected)  # exact: float32, same chain
        assert entry["preset"] == "ct-fm-ssl" and entry["preset_hash"] == spec.content_hash()
        assert (
            entry["file"].startswith(f"{VOLUMES_DIR}/")
            and entry["file_bytes"] == (cache_dir / entry["file"]).stat().st_size
        )
        assert np.allclose(cache.spacing(i), (3.0, 1.0, 1.0)) and len(entry["affine"]) == 16
        assert entry["content_hash"] and entry["source_shape"] and entry["dtype"] == "float32"
        assert min(volume.shape) >= 32  # padded to the 32x128x128 crop
    dicom = cache.entry(ScanSource(str(data_path("abdomen_dicom/dicom"))).scan_id)
    assert dicom["source_format"] == "dicom" and dicom["source_shape"] == [
        512,
        512,
        20,
    ]  # (its UIDs are blank: anonymised)


def test_read_crop_equals_slicing(built):
    cache = VolumeCache(built[0])
    rng = np.random.default_rng(0)
    for i in range(len(cache)):
        shape = cache.shape(i)
        size = (32, 128, 128)
        start = tuple(int(rng.integers(0, s - c + 1)) for s, c in zip(shape, size))
        crop = cache.read_crop(i, start, size)
        expected = np.asarray(cache.volume(i))[
            start[0] : start[0] + 32, start[1] : start[1] + 128, start[2] : start[2] + 128
        ]
        assert not isinstance(crop, np.memmap) and crop.dtype == np.float32
        assert np.array_equal(crop, expected)
    assert np.array_equal(cache.read_crop(cache.ids[0], (0, 0, 0), (1, 2, 3)), np.asarray(cache.volume(0))[:1, :2, :3])
    with pytest.raises(ValueError, match="does not fit"):
        cache.read_crop(0, (0, 0, 0), (cache.shape(0)[0] + 1, 1, 1))
    with pytest.raises(ValueError, match="does not fit"):
        cache.read_crop(0, (-1, 0, 0), (1, 1, 1))
    # DataLoader workers get a pickled copy: memory maps are reopened there
    copy = pickle.loads(pickle.dumps(cache))
    assert np.array_equal(copy.read_crop(1, (0, 0, 0), (4, 4, 4)), cache.read_crop(1, (0, 0, 0), (4, 4, 4)))


def test_resume_skips_finished_scans(built):
    cache_dir, _ = built
    mtimes = {p.name: p.stat().st_mtime_ns for p in (cache_dir / VOLUMES_DIR).iterdir()}
    summary = build_cache(_sources(), cache_dir, progress=False)
    assert (summary.done, summary.skipped, summary.failed) == (0, 3, [])
    assert {p.name: p.stat().st_mtime_ns for p in (cache_dir / VOLUMES_DIR).iterdir()} == mtimes


@pytest.mark.slow
def test_killed_mid_write_leaves_no_visible_entry(built, tmp_path):
    cache_dir = tmp_path / "c"
    shutil.copytree(built[0], cache_dir)
    before = VolumeCache(cache_dir).ids
    victim = VolumeCache(cache_dir).entry(0)
    # simulated kill: a volume half written under its temporary name, a half-written index, and a
    # volume renamed into place whose index row was never written (killed between the two)
    (cache_dir / VOLUMES_DIR / f".{os.path.basename(victim['file'])}.0123abcd.partial").write_bytes(b"\x93NUMPY half")
    (cache_dir / f".{INDEX_NAME}.0123abcd.partial").write_bytes(b"PAR1 half")
    table = pq.read_table(cache_dir / INDEX_NAME)
    pq.write_table(
        table.filter(np.array([sid != victim["scan_id"] for sid in table.column("scan_id").to_pylist()])),
        cache_dir / INDEX_NAME,
    )
    cache = VolumeCache(cache_dir)
    assert len(cache) == 2 and victim["scan_id"] not in cache.ids  # only complete, indexed entries are visible
    # the resumed run clears the temporaries and redoes only the unindexed scan
    summary = build_cache(_sources(), cache_dir, progress=False)
    assert (summary.done, summary.skipped) == (1, 2)
    assert not list(cache_dir.rglob("*.partial"))
    assert VolumeCache(cache_dir).ids == before
    # an indexed volume whose file went missing is redone too
    (cache_dir / victim["file"]).unlink()
    assert build_cache(_sources(), cache_dir, progress=False).done == 1


def test_broken_and_unusable_inputs_are_recorded_and_the_run_goes_on(tmp_path, capsys):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    label = data_path("sarcoma_ct/STS_019/CT_mask.nii.gz")
    good = data_path("sarcoma_ct/STS_019/CT_image.nii.gz")
    cache_dir = tmp_path / "c"
    code = main(["cohort", "cache", str(broken), str(label), str(good), str(cache_dir), "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    assert "cached 1 scan(s)" in captured.out and "2 failed" in captured.out
    assert str(broken) in captured.err and "not HU" in captured.err
    failures = pq.read_table(cache_dir / "failures.parquet").to_pylist()
    assert {f["source_path"] for f in failures} == {str(broken), str(label)}
    assert all(f["error"] for f in failures)
    assert len(VolumeCache(cache_dir)) == 1
    # a rerun retries only the failures; fixed inputs leave the failure list
    broken.unlink()
    code = main(["cohort", "cache", str(label), str(good), str(cache_dir), "--no-progress"])
    assert code == 1 and "skipped 1 already cached, 1 failed" in capsys.readouterr().out
    assert {f["source_path"] for f in pq.read_table(cache_dir / "failures.parquet").to_pylist()} == {
        str(broken),
        str(label),
    }


@pytest.mark.slow
def test_two_workers_give_the_same_cache_as_one(built, tmp_path):
    cache_dir = tmp_path / "c2"
    summary = build_cache(_sources(), cache_dir, workers=2, progress=False)
    assert (summary.done, summary.failed) == (3, [])
    one, two = VolumeCache(built[0]), VolumeCache(cache_dir)
    assert one.ids == two.ids
    for i in range(len(one)):
        a, b = one.entry(i), two.entry(i)
        a.pop("created_at"), b.pop("created_at")
        assert a == b
        assert np.array_equal(np.asarray(one.volume(i)), np.asarray(two.volume(i)))


@pytest.mark.slow
def test_float16_error_is_below_the_bound(built, tmp_path):
    cache_dir = tmp_path / "mixed"
    shutil.copytree(built[0], cache_dir)
    sources = _sources()[:1] + _sources()[2:]
    summary = build_cache(sources, cache_dir, dtype="float16", progress=False)
    assert summary.done == 2
    with pytest.raises(CTInputError, match="several presets/dtypes"):
        VolumeCache(cache_dir)
    f32, f16 = VolumeCache(cache_dir, dtype="float32"), VolumeCache(cache_dir, dtype="float16", spec="ct-fm-ssl")
    assert len(f32) == 3 and len(f16) == 2
    worst = 0.0
    for scan_id in f16.ids:
        half = np.asarray(f16.volume(scan_id))
        assert half.dtype == np.float16
        worst = max(worst, float(np.abs(half.astype(np.float32) - np.asarray(f32.volume(scan_id))).max()))
    # round to nearest on [0, 1]: at most half a float16 step below 1, 2**-12; the bar is 1e-3
    assert 0 < worst <= 2.0**-12 < 1e-3


def test_manifests_feed_the_cache(built, tmp_path):
    import pyarrow as pa

    good = str(data_path("sarcoma_ct/STS_019/CT_image.nii.gz"))
    manifest = tmp_path / "m.parquet"
    pq.write_table(
        pa.table(
            {
                "path": [good, None, good.replace("CT_image", "CT_mask")],
                "series_uid": [None, "1.2.3", None],
                "error": [None, None, "label map"],
            }
        ),
        manifest,
    )
    summary = build_cache(manifest, built[0], progress=False)
    assert (summary.done, summary.skipped, summary.not_downloaded, summary.unreadable) == (0, 1, 1, 1)


def test_one_build_per_cache_folder(tmp_path):
    (tmp_path / "c").mkdir()
    with _BuildLock(tmp_path / "c"):
        with pytest.raises(CTInputError, match="another `ctfm cohort cache` run"):
            build_cache([], tmp_path / "c", progress=False)


def test_not_a_cache_is_one_line(tmp_path):
    with pytest.raises(CTInputError, match="not a volume cache"):
        VolumeCache(tmp_path)


def _square_or_die(x: int) -> int:
    if x < 0:
        os._exit(1)  # simulated: the worker process is killed (as by the out-of-memory killer)
    return x * x


@pytest.mark.slow
def test_a_dead_worker_is_recorded_and_the_rest_goes_on():
    from ctfm.runtime import parallel_map

    items = [-1, *range(1, 10)]
    results = dict(parallel_map(_square_or_die, items, workers=2, on_crash=lambda item, message: message))
    assert sorted(results) == sorted(items)  # every item answered once, no hang
    assert "worker process died" in results[-1]
    done = [x for x in items if results[x] == x * x]
    assert len(done) >= 5  # items after the crash ran in a fresh pool (in-flight ones may share the crash)
    assert all(isinstance(results[x], str) for x in items if x not in done)
