"""Class maps: a model's channels (0..N-1) and the label values of files (gaps allowed)."""

from __future__ import annotations

import json

import pytest

from ctfm.errors import CTInputError
from ctfm.models.labelmaps import check_labels, resolve_labels


def test_channel_maps_need_every_value_and_file_maps_do_not(tmp_path):
    vertebrae = {"26": "vertebrae_S1", "27": "vertebrae_L5", "33": "vertebrae_T11"}
    with pytest.raises(CTInputError, match="0..N-1 without gaps"):
        check_labels(vertebrae)
    assert check_labels(vertebrae, channels=False) == {
        0: "background",
        26: "vertebrae_S1",
        27: "vertebrae_L5",
        33: "vertebrae_T11",
    }
    (tmp_path / "map.json").write_text(json.dumps({"labels": vertebrae}))
    assert resolve_labels(tmp_path / "map.json", channels=False)[33] == "vertebrae_T11"
    assert resolve_labels("tumour,node", channels=False) == {0: "background", 1: "tumour", 2: "node"}
    for bad, message in (
        ({"-1": "x"}, ">= 0"),
        ({"0": "background"}, "at least one above 0"),
        ({1: "a", 2: "a"}, "unique"),
    ):
        with pytest.raises(CTInputError, match=message):
            check_labels(bad, channels=False)
