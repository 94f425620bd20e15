"""A voxel size is never guessed. Tiny files with bad geometry in every format, built here: each is
refused with one `error: <path>: <problem> (<fix>)` line, exit status 2 and no output file, and no
raw line of nibabel, ITK or pydicom reaches the terminal. Valid files still read with the right
spacing, and say where it came from."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ctfm.cli import main
from ctfm.io import CTGeometryWarning, load_ct
from dicom_factory import axial_positions, write_series

SHAPE = (12, 10, 6)  # x, y, z
SPACING = (0.8, 0.7, 2.5)
ORIGIN = (-10.0, -12.0, 30.0)
RAW_LIBRARY_LINES = (
    "pixdim",
    "should be",
    "setting",
    "MetaImage",
    "MetaObject",
    "ITK",
    "itk::",
    "nrrd",
    "WARNING",
    "Traceback",
)


def body() -> np.ndarray:
    array = np.full(SHAPE, -1000, dtype=np.int16)
    array[3:9, 2:8, :] = 40
    return array


# ----------------------------------------------------------------------------------------------
# Builders (the libraries "fix" bad values when writing, so bad fields are patched in afterwards)


def write_nifti(path: Path, *, nifti2=False, qform=True, sform=False, **raw) -> Path:
    """A NIfTI of body() at SPACING; ``raw`` sets header fields as stored, unchecked
    (``pixdimN=value`` sets one pixdim entry, ``srow_col2=0`` zeroes column 2 of the sform)."""
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = ORIGIN
    img = (nib.Nifti2Image if nifti2 else nib.Nifti1Image)(body(), None)
    img.set_qform(affine, code=1 if qform else 0)
    img.set_sform(affine, code=1 if sform else 0)
    nib.save(img, str(path))
    if not raw:
        return path
    gz = path.name.endswith(".gz")
    data = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    klass = nib.Nifti2Header if nifti2 else nib.Nifti1Header
    header = klass(data[: klass.sizeof_hdr], check=False)
    for key, value in raw.items():
        if key.startswith("pixdim"):
            pixdim = np.array(header["pixdim"])
            pixdim[int(key[len("pixdim") :])] = value
            header["pixdim"] = pixdim
        elif key.startswith("srow_col"):
            column = int(key[len("srow_col") :])
            for row in ("srow_x", "srow_y", "srow_z"):
                values = np.array(header[row])
                values[column] = value
                header[row] = values
        else:
            header[key] = value
    data = header.binaryblock + data[klass.sizeof_hdr :]
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_nrrd(path: Path, geometry: str, detached: bool = False) -> Path:
    """A raw little-endian int16 NRRD of body() whose geometry lines are ``geometry``."""
    lines = [
        "NRRD0004",
        "type: short",
        "dimension: 3",
        f"sizes: {SHAPE[0]} {SHAPE[1]} {SHAPE[2]}",
        "endian: little",
        "encoding: raw",
        *geometry.splitlines(),
    ]
    data = body().transpose(2, 1, 0).tobytes()  # NRRD: fastest axis first
    if detached:
        (path.with_suffix(".raw")).write_bytes(data)
        path.write_text("\n".join([*lines, f"data file: {path.with_suffix('.raw').name}"]) + "\n")
    else:
        path.write_bytes(("\n".join(lines) + "\n\n").encode() + data)
    return path


def write_mha(path: Path, geometry: str, data_file: bool = True) -> Path:
    """A MetaImage (.mha inline, .mhd with a .raw beside it) of body() with ``geometry`` lines."""
    lines = [
        "ObjectType = Image",
        "NDims = 3",
        "BinaryData = True",
        "BinaryDataByteOrderMSB = False",
        f"DimSize = {SHAPE[0]} {SHAPE[1]} {SHAPE[2]}",
        "ElementType = MET_SHORT",
        *geometry.splitlines(),
    ]
    data = body().transpose(2, 1, 0).tobytes()
    if path.suffix == ".mhd":
        path.with_suffix(".raw").write_bytes(data)
        lines.append(f"ElementDataFile = {path.with_suffix('.raw').name}" if data_file else "")
        path.write_text("\n".join(lines) + "\n")
    else:
        if data_file:
            lines.append("ElementDataFile = LOCAL")
        path.write_bytes(("\n".join(lines) + "\n").encode() + data)
    return path


def write_dicom(folder: Path, change=None, n: int = 6) -> Path:
    """A tiny CT series (PixelSpacing 1.5\\1.0, 2 mm apart); ``change(index, dataset)`` edits
    each slice before it is written again."""
    paths = write_series(folder, axial_positions(n))
    if change is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the invalid values we write on purpose
            for index, path in enumerate(paths):
                ds = pydicom.dcmread(path)
                change(index, ds)
                ds.save_as(path)
    return folder


def _set(keyword, value, only=None):
    def change(index, ds):
        if only is None or index == only:
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)

    return change


# ----------------------------------------------------------------------------------------------
# The bad-geometry corpus: name -> (builder(root) -> path, words the error must contain)

BAD = {
    "nifti qform pixdim zero": (lambda r: write_nifti(r / "q_zero.nii.gz", pixdim3=0.0), "pixdim[3] (axis z) is 0"),
    "nifti qform pixdim negative": (
        lambda r: write_nifti(r / "q_neg.nii.gz", pixdim2=-0.7),
        "pixdim[2] (axis y) is -0.7: negative",
    ),
    "nifti qform pixdim nan": (lambda r: write_nifti(r / "q_nan.nii", pixdim1=np.nan), "pixdim[1] (axis x) is nan"),
    "nifti qform pixdim inf": (lambda r: write_nifti(r / "q_inf.nii.gz", pixdim1=np.inf), "pixdim[1] (axis x) is inf"),
    "nifti qform quaternion nan": (
        lambda r: write_nifti(r / "q_quat.nii.gz", quatern_b=np.nan),
        "quaternion or offset",
    ),
    "nifti ambiguous qfac": (lambda r: write_nifti(r / "q_qfac.nii.gz", pixdim0=-0.5), "qfac pixdim[0] is -0.5"),
    "nifti2 qform pixdim zero": (
        lambda r: write_nifti(r / "q2_zero.nii.gz", nifti2=True, pixdim3=0.0),
        "pixdim[3] (axis z) is 0",
    ),
    "nifti no qform/sform pixdim zero": (
        lambda r: write_nifti(r / "n_zero.nii.gz", qform=False, pixdim2=0.0),
        "voxel size (no qform or sform) pixdim[2]",
    ),
    "nifti sform zero column": (
        lambda r: write_nifti(r / "s_zero.nii.gz", qform=False, sform=True, srow_col2=0.0),
        "sform gives axis z a voxel size of 0",
    ),
    "nifti sform nan": (
        lambda r: write_nifti(r / "s_nan.nii.gz", qform=False, sform=True, srow_col0=np.nan),
        "sform (srow_x/y/z) holds NaN",
    ),
    "nifti sform singular": (
        lambda r: write_nifti(
            r / "s_sing.nii.gz",
            qform=False,
            sform=True,
            srow_x=[0.8, 0.8, 0, 0],
            srow_y=[0, 0, 0.7, 0],
            srow_z=[0, 0, 0, 0.0],
        ),
        "not independent",
    ),
    "nifti2 sform singular": (
        lambda r: write_nifti(
            r / "s2_sing.nii.gz",
            nifti2=True,
            qform=False,
            sform=True,
            srow_x=[0.8, 0.8, 0, 0],
            srow_y=[0.1, 0.1, 2.5, 0],
            srow_z=[0, 0, 0.1, 0],
        ),
        "not independent",
    ),
    "nrrd zero direction": (
        lambda r: write_nrrd(
            r / "zero.nrrd",
            "space: left-posterior-superior\nspace directions: (0.8,0,0) (0,0.7,0) (0,0,0)\nspace origin: (0,0,0)",
        ),
        "space direction of axis 2 is zero",
    ),
    "nrrd nan direction": (
        lambda r: write_nrrd(
            r / "nan.nrrd",
            "space: left-posterior-superior\nspace directions: (0.8,0,0) (0,nan,0) (0,0,2.5)\nspace origin: (0,0,0)",
        ),
        "space direction of axis 1 is (0,nan,0): not finite",
    ),
    "nrrd none direction": (
        lambda r: write_nrrd(
            r / "none.nrrd",
            "space: left-posterior-superior\nspace directions: (0.8,0,0) none (0,0,2.5)\nspace origin: (0,0,0)",
        ),
        "axis 1 is 'none'",
    ),
    "nrrd dependent directions": (
        lambda r: write_nrrd(
            r / "dep.nrrd",
            "space: left-posterior-superior\nspace directions: (0.8,0,0) (1.6,0,0) (0,0,2.5)\nspace origin: (0,0,0)",
        ),
        "not independent",
    ),
    "nrrd no voxel size": (lambda r: write_nrrd(r / "nosize.nrrd", ""), "neither 'space directions' nor 'spacings'"),
    "nrrd zero spacing": (
        lambda r: write_nrrd(r / "sp_zero.nrrd", "spacings: 0.8 0 2.5"),
        "spacing of axis 1 is 0: zero",
    ),
    "nrrd negative spacing": (
        lambda r: write_nrrd(r / "sp_neg.nrrd", "spacings: 0.8 0.7 -2.5"),
        "spacing of axis 2 is -2.5: negative",
    ),
    "nrrd nan spacing": (lambda r: write_nrrd(r / "sp_nan.nrrd", "spacings: nan 0.7 2.5"), "spacing of axis 0 is nan"),
    "nhdr zero direction": (
        lambda r: write_nrrd(
            r / "det.nhdr",
            "space: left-posterior-superior\nspace directions: (0,0,0) (0,0.7,0) (0,0,2.5)\nspace origin: (0,0,0)",
            detached=True,
        ),
        "axis 0 is zero",
    ),
    "mha zero spacing": (
        lambda r: write_mha(r / "zero.mha", "ElementSpacing = 0.8 0 2.5"),
        "ElementSpacing of axis y is 0: zero",
    ),
    "mha negative spacing": (
        lambda r: write_mha(r / "neg.mha", "ElementSpacing = 0.8 0.7 -2.5"),
        "ElementSpacing of axis z is -2.5: negative",
    ),
    "mha nan spacing": (
        lambda r: write_mha(r / "nan.mha", "ElementSpacing = nan 0.7 2.5"),
        "ElementSpacing of axis x is nan",
    ),
    "mha missing spacing": (lambda r: write_mha(r / "none.mha", ""), "no ElementSpacing line"),
    "mha short spacing": (
        lambda r: write_mha(r / "short.mha", "ElementSpacing = 0.8 0.7"),
        "gives 2 value(s) for 3 axes",
    ),
    "mha zero element size": (
        lambda r: write_mha(r / "size0.mha", "ElementSize = 0.8 0.7 0"),
        "ElementSize of axis z is 0",
    ),
    "mha no data file line": (
        lambda r: write_mha(r / "nodata.mha", "ElementSpacing = 0.8 0.7 2.5", data_file=False),
        "no ElementDataFile line",
    ),
    "mhd zero spacing": (
        lambda r: write_mha(r / "zero.mhd", "ElementSpacing = 0 0.7 2.5"),
        "ElementSpacing of axis x is 0",
    ),
    "mha singular matrix": (
        lambda r: write_mha(r / "tm.mha", "TransformMatrix = 1 0 0 1 0 0 0 0 1\nElementSpacing = 0.8 0.7 2.5"),
        "TransformMatrix",
    ),
    "dicom no PixelSpacing": (lambda r: write_dicom(r / "no_ps", _set("PixelSpacing", None)), "has no PixelSpacing"),
    "dicom zero PixelSpacing": (
        lambda r: write_dicom(r / "zero_ps", _set("PixelSpacing", [0.0, 1.0])),
        "PixelSpacing 0.0\\1.0",
    ),
    "dicom negative PixelSpacing": (
        lambda r: write_dicom(r / "neg_ps", _set("PixelSpacing", [1.5, -1.0])),
        "is not two positive numbers",
    ),
    "dicom nan PixelSpacing": (
        lambda r: write_dicom(r / "nan_ps", _set("PixelSpacing", ["nan", "1.0"])),
        "PixelSpacing nan\\1.0",
    ),
    "dicom nan position": (
        lambda r: write_dicom(r / "nan_ipp", _set("ImagePositionPatient", ["0", "nan", "10"], only=2)),
        "ImagePositionPatient 0\\nan\\10 of slice002.dcm",
    ),
    "dicom one-value PixelSpacing": (
        lambda r: write_dicom(r / "one_ps", _set("PixelSpacing", 1.5)),
        "is not two positive numbers",
    ),
    "dicom mixed PixelSpacing": (
        lambda r: write_dicom(r / "mix_ps", _set("PixelSpacing", [1.0, 1.0], only=2)),
        "mixes pixel spacings",
    ),
    "dicom slice without position": (
        lambda r: write_dicom(r / "no_ipp1", _set("ImagePositionPatient", None, only=3)),
        "have no ImagePositionPatient",
    ),
    "dicom no positions": (
        lambda r: write_dicom(r / "no_ipp", _set("ImagePositionPatient", None)),
        "have no ImagePositionPatient",
    ),
    "dicom empty position": (
        lambda r: write_dicom(r / "empty_ipp", _set("ImagePositionPatient", "", only=1)),
        "is not three finite numbers",
    ),
    "dicom zero orientation": (
        lambda r: write_dicom(r / "zero_iop", _set("ImageOrientationPatient", [0, 0, 0, 0, 1, 0])),
        "has a zero direction",
    ),
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_geometry")
    return {name: build(root) for name, (build, _) in BAD.items()}


def assert_refused(err: str, path: Path, words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"error: {path}: ") and line.endswith(")") and " (" in line, line
    assert words in line, line
    problem = line[len(f"error: {path}: ") :]
    assert not any(raw in problem.split(" (")[0] for raw in ("0x", ".cxx", "Exception thrown")), line


@pytest.mark.parametrize("name", sorted(BAD))
def test_info_refuses_bad_geometry(name, bad, capfd):
    code = main(["info", str(bad[name])])
    out, err = capfd.readouterr()  # file-descriptor level: C++ and logging lines are caught too
    assert code == 2 and out == ""
    assert_refused(err, bad[name], BAD[name][1])


@pytest.mark.parametrize("name", sorted(BAD))
def test_preprocess_refuses_bad_geometry_and_writes_nothing(name, bad, capfd, tmp_path):
    out_path = tmp_path / "out" / "pre.nii.gz"
    code = main(["preprocess", str(bad[name]), "--preset", "ct-fm-ssl", "-o", str(out_path)])
    _, err = capfd.readouterr()
    assert code == 2
    assert_refused(err, bad[name], BAD[name][1])
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


DRIVER = """
import sys
from ctfm.cli import main
for entry in sys.argv[2:]:
    kind, path = entry.split(":", 1)
    verbs = [["info", path], ["preprocess", path, "-o", sys.argv[1]]] if kind == "bad" else [["info", path]]
    for verb in verbs:
        print("=== " + " ".join(verb[:2]), file=sys.stderr, flush=True)
        code = main(verb)
        sys.stderr.flush()
        print("=== exit", code, file=sys.stderr, flush=True)
"""


@pytest.mark.slow
def test_a_real_process_prints_one_error_line_per_bad_file_and_no_library_output(bad, tmp_path):
    """Real file descriptors and the libraries' own logging setup (no pytest capture): each bad
    file gives one error line; files nibabel or ITK would have "fixed" in silence print nothing."""
    out_path = tmp_path / "o.nii.gz"
    names = sorted(BAD)
    quiet = [
        write_nifti(tmp_path / "sform_zero_pixdim.nii.gz", sform=True, qform=False, pixdim3=0.0),
        write_nifti(tmp_path / "sform_zero_qform.nii.gz", sform=True, pixdim3=0.0),
        write_nifti(tmp_path / "qfac0.nii.gz", pixdim0=0.0),
        write_nrrd(tmp_path / "spacings.nrrd", "spacings: 0.8 0.7 2.5"),
        write_mha(tmp_path / "ok.mha", "ElementSpacing = 0.8 0.7 2.5"),
    ]
    entries = [f"bad:{bad[n]}" for n in names] + [f"good:{p}" for p in quiet]
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(out_path), *entries], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    blocks = result.stderr.split("=== ")[1:]
    assert len(blocks) == 4 * len(names) + 2 * len(quiet), result.stderr
    for k, name in enumerate(names):
        for verb in range(2):
            head, tail = blocks[4 * k + 2 * verb], blocks[4 * k + 2 * verb + 1]
            assert tail.strip() == "exit 2", (name, head, tail)
            assert_refused(head.split("\n", 1)[1], bad[name], BAD[name][1])
    for k, path in enumerate(quiet):
        head, tail = blocks[4 * len(names) + 2 * k], blocks[4 * len(names) + 2 * k + 1]
        assert tail.strip() == "exit 0" and head.strip() == "info " + str(path), (path, head, tail)
    assert not out_path.exists()


@pytest.mark.slow
def test_batch_embed_records_each_refusal_without_raw_library_lines(bad, tmp_path, tiny_weights):
    weights = tiny_weights
    inputs = [
        bad[n]
        for n in ("nifti qform pixdim zero", "nrrd no voxel size", "mha missing spacing", "dicom zero PixelSpacing")
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctfm",
            "embed",
            *map(str, inputs),
            "--weights",
            str(weights),
            "--mode",
            "patches",
            "--out",
            str(tmp_path / "store"),
            "--no-progress",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(inputs), result.stderr
    for path, line in zip(sorted(inputs, key=str), sorted(lines)):
        assert line.startswith(f"error: {path}: ") and line.endswith(")"), line
    assert "pixdim[3] (axis z) is 0" in result.stderr and "no ElementSpacing line" in result.stderr
    assert "0 failed" not in result.stdout and "embedded 0 scan(s)" in result.stdout


# ----------------------------------------------------------------------------------------------
# Valid files: the right spacing, and where it came from


GOOD_NRRD = f"space: left-posterior-superior\nspace directions: ({SPACING[0]},0,0) (0,{SPACING[1]},0) (0,0,{SPACING[2]})\nspace origin: (10,12,30)"
GOOD = {
    "nifti qform": (lambda r: write_nifti(r / "q.nii.gz"), "NIfTI qform (pixdim)"),
    "nifti sform": (lambda r: write_nifti(r / "s.nii", qform=False, sform=True), "NIfTI sform"),
    "nifti2 qform": (lambda r: write_nifti(r / "q2.nii.gz", nifti2=True), "NIfTI qform (pixdim)"),
    "nifti qfac 0": (lambda r: write_nifti(r / "qfac0.nii.gz", pixdim0=0.0), "NIfTI qform (pixdim)"),
    "nifti sform, zero pixdim": (
        lambda r: write_nifti(r / "s_p0.nii.gz", sform=True, qform=False, pixdim3=0.0),
        "NIfTI sform",
    ),
    "nrrd": (lambda r: write_nrrd(r / "ok.nrrd", GOOD_NRRD), "NRRD space directions"),
    "nhdr": (lambda r: write_nrrd(r / "ok.nhdr", GOOD_NRRD, detached=True), "NRRD space directions"),
    "mha": (lambda r: write_mha(r / "ok.mha", "ElementSpacing = 0.8 0.7 2.5"), "MetaImage ElementSpacing"),
    "mhd": (
        lambda r: write_mha(r / "ok.mhd", "TransformMatrix = 1 0 0 0 1 0 0 0 1\nElementSpacing = 0.8 0.7 2.5"),
        "MetaImage ElementSpacing",
    ),
    "mha element size": (lambda r: write_mha(r / "size.mha", "ElementSize = 0.8 0.7 2.5"), "MetaImage ElementSize"),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_valid_files_read_with_their_spacing_and_its_source(name, tmp_path, recwarn):
    build, source = GOOD[name]
    image, record = load_ct(build(tmp_path))
    assert record.spacing_mm == pytest.approx(SPACING, abs=1e-5)
    assert record.spacing_source == source
    np.testing.assert_array_equal(image[0].numpy(), body().astype(np.float32))
    assert record.geometry_warnings == [] and not [w for w in recwarn if issubclass(w.category, CTGeometryWarning)]


def test_qfac_zero_reads_as_qfac_one(tmp_path):
    """The standard defines qfac 0 as 1: same affine as a header with qfac 1."""
    zero, _ = load_ct(write_nifti(tmp_path / "qfac0.nii.gz", pixdim0=0.0))
    one, _ = load_ct(write_nifti(tmp_path / "qfac1.nii.gz", pixdim0=1.0))
    np.testing.assert_array_equal(np.asarray(zero.affine), np.asarray(one.affine))


def _info_json(path, capfd) -> dict:
    code = main(["info", str(path), "--json"])
    out, err = capfd.readouterr()
    assert code == 0 and err == "", err
    return json.loads(out)


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda r: write_nifti(r / "disagree.nii.gz", sform=True, qoffset_x=40.0), "qform and sform disagree"),
        (lambda r: write_nifti(r / "zero_qform.nii.gz", sform=True, pixdim3=0.0), "qform and sform disagree"),
        (lambda r: write_nifti(r / "no_xform.nii.gz", qform=False), "no qform or sform"),
        (lambda r: write_nrrd(r / "spacings.nrrd", "spacings: 0.8 0.7 2.5"), "spacings but no space directions"),
    ],
    ids=[
        "qform-sform disagreement",
        "sform with a zero-pixdim qform",
        "nifti without orientation",
        "nrrd spacings only",
    ],
)
def test_doubtful_header_geometry_is_a_warn_check_with_a_fix(build, words, tmp_path, capfd):
    path = build(tmp_path)
    report = _info_json(path, capfd)
    assert report["usable"] is True and report["spacing_mm"] == pytest.approx(list(SPACING), abs=1e-5)
    check = {c["name"]: c for c in report["checks"]}["geometry"]
    assert check["status"] == "warn" and words in check["message"] and check["fix"], check
    assert report["record"]["geometry_warnings"][0]["message"] == check["message"]
    assert any(words in w for w in report["record"]["warnings"])
    # preprocess says it once, as an explained warning line, and goes on
    out_path = tmp_path / "pre.nii.gz"
    assert main(["preprocess", str(path), "--preset", "ct-fm-ssl", "-o", str(out_path)]) == 0
    _, err = capfd.readouterr()
    assert (
        err.strip().splitlines() == [line for line in err.strip().splitlines() if line.startswith("warning: ")]
        and words in err
    )
    assert not any(raw in err for raw in ("pixdim[", "should be"))


def test_sheared_sform_with_its_rigid_qform_is_not_a_disagreement(tmp_path, capfd):
    """A writer stores the closest rigid transform of a sheared sform as qform: that is the
    format's convention, not a conflict."""
    affine = np.array(
        [[-0.8, 0.05, 0.0, 120.0], [0.0, 0.75, 0.3, -40.5], [0.04, 0.0, 2.5, 300.25], [0.0, 0.0, 0.0, 1.0]]
    )
    img = nib.Nifti1Image(body(), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(tmp_path / "sheared.nii.gz"))
    report = _info_json(tmp_path / "sheared.nii.gz", capfd)
    assert {c["name"]: c["status"] for c in report["checks"]}["geometry"] == "ok"


def test_dicom_slice_spacing_derivation_is_recorded_and_shown(tmp_path, capfd):
    folder = write_dicom(tmp_path / "series", _set("SpacingBetweenSlices", 3.0))
    _, record = load_ct(folder)
    assert record.spacing_mm == pytest.approx((1.0, 1.5, 2.0))
    assert record.spacing_source == (
        "PixelSpacing 1.5\\1 mm; slice spacing 2 mm derived from ImagePositionPatient "
        "(gap along the slice normal; SliceThickness 2, SpacingBetweenSlices 3)"
    )
    report = _info_json(folder, capfd)
    assert report["record"]["spacing_source"] == record.spacing_source
    assert main(["info", str(folder)]) == 0
    out, _ = capfd.readouterr()
    assert (
        "geometry        voxel size from PixelSpacing 1.5\\1 mm; slice spacing 2 mm derived from ImagePositionPatient"
        in out
    )


def test_dicom_without_spacing_between_slices_says_absent(tmp_path):
    _, record = load_ct(write_dicom(tmp_path / "series"))
    assert record.spacing_source.endswith("(gap along the slice normal; SliceThickness 2, SpacingBetweenSlices absent)")


def test_nan_pixdim_message_names_the_value(tmp_path):
    path = write_nifti(tmp_path / "nan.nii.gz", pixdim2=math.nan)
    with pytest.raises(ValueError, match=r"pixdim\[2\] \(axis y\) is nan: not a number"):
        load_ct(path)


def test_a_dicom_series_without_positions_in_a_folder_batch_is_listed_and_refused(bad):
    """Folder discovery keeps the series (it is CT), so a batch records why it was not embedded."""
    from ctfm.io.sources import discover_inputs

    sources = discover_inputs([bad["dicom no positions"]])
    assert len(sources) == 1 and sources[0].series_uid
    with pytest.raises(ValueError, match="6 image file"):
        load_ct(sources[0].path, series_uid=sources[0].series_uid)


@pytest.mark.parametrize("name", ["nrrd zero direction", "mha missing spacing", "nifti qform pixdim zero"])
def test_label_maps_with_a_voxel_size_to_guess_are_refused_as_such(name, bad, tmp_path, capfd):
    from ctfm.io import load_labels

    image, _ = load_ct(write_nifti(tmp_path / "grid.nii.gz"))
    with pytest.raises(ValueError) as caught:
        load_labels(bad[name], image)
    assert BAD[name][1] in str(caught.value) and str(caught.value).startswith(f"{bad[name]}: ")
    assert capfd.readouterr().err == ""
