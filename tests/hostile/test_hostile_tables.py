"""Hostile sheets: tables in the encodings hospitals write (UTF-8 with or without BOM, UTF-16,
cp1252, Latin-1) are read by the one reader, with a notice when the encoding was guessed; what
cannot be read is one line naming the file, the byte offset and the fix."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest

from ctfm.errors import CTInputError, OptionError
from ctfm.io.tables import read_table, using_encoding


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def read_quietly(path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = read_table(path, **kw)
    return table, [str(w.message) for w in caught]


def test_utf8_with_bom(tmp_path):
    table, notes = read_quietly(write(tmp_path / "a.csv", "\ufeffscan,label\nsk\u00e5n,1\n".encode()))
    assert table.column_names == ["scan", "label"] and table.column("scan").to_pylist() == ["sk\u00e5n"]
    assert not notes


def test_cp1252_detected_with_a_notice(tmp_path):
    """Excel on Windows: cp1252, with the euro sign and curly quotes that Latin-1 lacks."""
    path = write(tmp_path / "labels.csv", "scan,finding\nA1,\u201ch\u00e9morragie\u201d \u20ac\n".encode("cp1252"))
    table, notes = read_quietly(path)
    assert table.column("finding").to_pylist() == ["\u201ch\u00e9morragie\u201d \u20ac"]
    assert len(notes) == 1 and "read as cp1252" in notes[0] and "labels.csv" in notes[0] and "offset 16" in notes[0]


def test_latin1_detected_when_cp1252_cannot_decode(tmp_path):
    """0x81 has no cp1252 character: the file is Latin-1."""
    path = write(tmp_path / "labels.csv", b"scan,label\nA\x81,caf\xe9\n")
    table, notes = read_quietly(path)
    assert table.column("label").to_pylist() == ["caf\u00e9"] and table.column("scan").to_pylist() == ["A\x81"]
    assert len(notes) == 1 and "read as latin-1" in notes[0]


def test_semicolon_separated_cp1252(tmp_path):
    path = write(tmp_path / "meta.csv", "image_id;split;Befund\ns0001;train;L\u00e4sion\n".encode("cp1252"))
    table, _ = read_quietly(path)
    assert table.column("Befund").to_pylist() == ["L\u00e4sion"]


def test_tsv_in_latin1(tmp_path):
    path = write(tmp_path / "a.tsv", "path\tlabel\nx\u00e9.nii.gz\t1\n".encode("latin-1"))
    table, notes = read_quietly(path)
    assert table.column("path").to_pylist() == ["x\u00e9.nii.gz"] and notes


def test_utf16_with_bom(tmp_path):
    """Excel's "Unicode text" export: UTF-16 with a byte-order mark, tab separated."""
    path = write(tmp_path / "a.tsv", "path\tlabel\nsk\u00e5n.nii.gz\t0\n".encode("utf-16"))
    table, notes = read_quietly(path)
    assert table.column("path").to_pylist() == ["sk\u00e5n.nii.gz"] and not notes


def test_utf16_without_bom_is_one_line(tmp_path):
    path = write(tmp_path / "a.csv", "path,label\n".encode("utf-16-le"))
    with pytest.raises(CTInputError, match=r"NUL byte at offset 1") as info:
        read_table(path)
    assert "a.csv" in str(info.value) and "utf-16" in str(info.value)


def test_encoding_given(tmp_path):
    path = write(tmp_path / "a.csv", "scan,label\nA,caf\u00e9\n".encode("latin-1"))
    table, notes = read_quietly(path, encoding="latin-1")
    assert table.column("label").to_pylist() == ["caf\u00e9"] and not notes
    with using_encoding("cp1252"):
        table, notes = read_quietly(path)
    assert table.column("label").to_pylist() == ["caf\u00e9"] and not notes


def test_wrong_encoding_given_names_the_byte_offset(tmp_path):
    path = write(tmp_path / "a.csv", "scan,label\nA,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(CTInputError, match=r"a\.csv: byte 0xe9 at offset 16 is not utf-8") as info:
        read_table(path, encoding="utf-8")
    assert "--encoding" in str(info.value)


def test_unknown_encoding_is_an_option_error(tmp_path):
    with pytest.raises(OptionError, match="klingon"):
        read_table(write(tmp_path / "a.csv", b"a\n1\n"), encoding="klingon")


# ---- through the CLI -------------------------------------------------------------------------------
@pytest.fixture
def latin1_manifest(tmp_path):
    """A manifest whose scan path holds an accented letter, written in Latin-1."""
    array = np.full((20, 18, 16), -1000, np.int16)
    array[4:-4, 4:-4, 3:-3] = 200
    scan = tmp_path / "sc\u00e4n_\u00e9.nii.gz"
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])), str(scan))
    return write(tmp_path / "manifest.csv", f"path,note\n{scan.name},f\u00fcr\n".encode("latin-1"))


@pytest.fixture
def seg_weights(tmp_path):
    from ctfm.models.segmentation import load_segmentation_model, save_segmentation_model
    from ctfm.preprocess import PreprocessSpec

    model, names, _spec, _ = load_segmentation_model(None, labels="liver", init_filters=2, seed=0)
    return save_segmentation_model(
        model,
        tmp_path / "weights",
        names,
        spec=PreprocessSpec(name="tiny", spacing_mm=None, foreground_crop=None),
        inference={"roi_size": [16, 16, 16], "sw_batch_size": 1, "overlap": 0.25},
    )


def test_latin1_manifest_on_the_cli(run_cli, tmp_path, latin1_manifest, seg_weights):
    code, out, err = run_cli(
        "predict", "seg", latin1_manifest, "--model", seg_weights, "-o", tmp_path / "o", "--no-progress"
    )
    assert code == 0, err
    assert "read as cp1252" in err and "predicted 1 input(s)" in out
    assert (tmp_path / "o" / "sc\u00e4n_\u00e9.nii.gz").exists()


def test_encoding_option_on_the_cli(run_cli, tmp_path, latin1_manifest, seg_weights):
    code, _out, err = run_cli(
        "predict", "seg", latin1_manifest, "--model", seg_weights, "-o", tmp_path / "o", "--encoding", "latin-1"
    )
    assert code == 0 and "read as" not in err, err


def test_wrong_encoding_option_on_the_cli(run_cli, tmp_path, latin1_manifest, seg_weights):
    code, _out, err = run_cli(
        "predict", "seg", latin1_manifest, "--model", seg_weights, "-o", tmp_path / "o", "--encoding", "utf-8"
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "manifest.csv: byte 0xe" in lines[0] and "offset" in lines[0], err
    assert not (tmp_path / "o").exists()


def test_encoding_option_only_where_sheets_are_read(run_cli, tmp_path):
    code, _out, err = run_cli("info", tmp_path, "--encoding", "latin-1")
    assert code == 2 and err.startswith("error: ") and "--encoding" in err and len(err.strip().splitlines()) == 1
    code, _out, err = run_cli("embed", tmp_path, "--out", tmp_path / "s", "--encoding", "klingon")
    assert code == 2 and "klingon" in err and len(err.strip().splitlines()) == 1
