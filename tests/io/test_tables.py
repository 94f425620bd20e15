"""ctfm.io.read_table: one reader for CSV, TSV, Parquet and XLSX sheets, returning columns."""

from __future__ import annotations

import importlib.util
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctfm.errors import CTInputError, MissingDependencyError
from ctfm.io import read_table

HAS_OPENPYXL = importlib.util.find_spec("openpyxl") is not None


def test_csv_reads_text_columns_stripped_with_bom(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("\ufeff scan_id , label\n007, 1 \n008,0\n".encode("utf-8"))
    table = read_table(path, required=("scan_id", "label"))
    assert isinstance(table, pa.Table)
    assert table.column_names == ["scan_id", "label"]
    assert table.column("scan_id").to_pylist() == ["007", "008"]  # ids stay text
    assert table.column("label").to_pylist() == ["1", "0"]


def test_semicolon_csv_and_tsv(tmp_path):
    (tmp_path / "meta.csv").write_text("image_id;split\ns0001;train\ns0002;test\n", encoding="utf-8")
    assert read_table(tmp_path / "meta.csv").column("split").to_pylist() == ["train", "test"]
    (tmp_path / "pairs.tsv").write_text("scan_a\tscan_b\na.nii.gz\tb.nii.gz\n", encoding="utf-8")
    assert read_table(tmp_path / "pairs.tsv", required=("scan_a", "scan_b")).num_rows == 1


def test_parquet_keeps_types(tmp_path):
    pq.write_table(pa.table({"path": ["a.nii.gz", "b.nii.gz"], "age": [61, 70]}), tmp_path / "m.parquet")
    table = read_table(tmp_path / "m.parquet", required=("path",))
    assert table.column("age").type == pa.int64() and table.column("age").to_pylist() == [61, 70]


@pytest.mark.skipif(not HAS_OPENPYXL, reason="openpyxl is not installed (pip install openpyxl)")
def test_xlsx_cells_as_text(tmp_path):
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["scan", "label", "score"])
    sheet.append(["a.nii.gz", 1, 0.5])
    sheet.append(["b.nii.gz", 0, None])
    book.save(tmp_path / "labels.xlsx")
    table = read_table(tmp_path / "labels.xlsx", required=("scan", "label"))
    assert table.column("label").to_pylist() == ["1", "0"]
    assert table.column("score").to_pylist() == ["0.5", ""]


def test_xlsx_without_openpyxl_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # the import system then refuses it, as when absent
    (tmp_path / "labels.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(MissingDependencyError, match=r"pip install 'ctfm\[eval\]'"):
        read_table(tmp_path / "labels.xlsx")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("labels.csv", "scan\na\n", "missing column(s) label (found: scan)"),
        ("empty.csv", "", "empty sheet"),
        ("header_only.csv", "scan,label\n", "no rows"),
        ("labels.json", "{}", "not a table format"),
    ],
)
def test_one_line_errors_name_the_file_and_fix(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CTInputError) as info:
        read_table(path, required=("scan", "label") if name == "labels.csv" else ())
    text = str(info.value)
    assert message in text and str(path) in text and len(text.splitlines()) == 1


def test_missing_file(tmp_path):
    with pytest.raises(CTInputError, match="no such file"):
        read_table(tmp_path / "nope.csv")
