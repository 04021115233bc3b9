"""Rows are (method, version) keys: every label is built from its key in one place and reads back into it,
and colours come from the key."""

from __future__ import annotations

import pytest

from surgery_lib import plots
from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.merging import MERGE_METHODS, VERSION_NAMES, Row, row_label, row_of
from surgery_lib.merging.rows import REFERENCE_LABELS
from surgery_lib.settings.base import EXPERT_ROW


def test_every_row_label_reads_back_into_its_key():
    rows = [Row(method, version) for method in MERGE_METHODS for version in (0, 1, 2)]
    rows += [Row(reference) for reference in REFERENCE_LABELS]
    labels = [row.label() for row in rows]
    assert len(set(labels)) == len(labels), "two rows share a label"
    assert [row_of(label) for label in labels] == rows
    assert row_label("task_arithmetic", 1) == "task arithmetic + Surgery"
    assert row_label("expert") == EXPERT_ROW and row_of("no such row") is None
    assert VERSION_NAMES == {0: "merge alone", 1: "+ Surgery", 2: "+ SurgeryV2"}


def test_a_row_key_is_checked():
    with pytest.raises(SurgeryBookError, match="no table row for 'tie'"):
        Row("tie")
    with pytest.raises(SurgeryBookError, match="reference rows are version 0"):
        Row("expert", 1)
    with pytest.raises(SurgeryBookError, match="has version 3"):
        Row("ties", 3)


def test_a_row_has_the_same_colour_by_key_and_by_label():
    for method in MERGE_METHODS:
        for version in (0, 1, 2):
            row = Row(method, version)
            assert plots.colour_of(row) == plots.colour_of(row.label()) is not None
        assert plots.colour_of(Row(method, 1)) == plots.SURGERY_COLOUR
        assert plots.colour_of(Row(method, 2)) == plots.SURGERY_V2_COLOUR
    assert plots.colour_of(Row("task_arithmetic")) == plots.MERGED_COLOUR
    assert plots.colour_of(Row("expert")) == plots.EXPERT_COLOUR
    # a real-CLIP trimming label (it says what its top-k keeps) is still its method's row
    trimmed = MERGE_METHODS["ties"].label + " [top 20 % of tower + text leftovers = 25.83 % of the tower]"
    assert row_of(trimmed) == Row("ties") and row_of(trimmed + " + SurgeryV2") == Row("ties", 2)


def test_the_published_clip_numbers_are_keyed_like_the_rows_and_agree_with_the_reproduce_page():
    """Each published average names a table row (a typo in a method name fails here), equals the average that
    book/reproduce.md lists for that row, and is the mean of the row's eight per-task numbers there (within their truncation)."""
    import re
    from pathlib import Path

    from surgery_lib.settings.clip.published import VIT_B32_AVERAGES

    assert len({Row(method, version) for method, version in VIT_B32_AVERAGES}) == len(VIT_B32_AVERAGES)
    page_names = {
        "pretrained": "zero_shot",
        "individual": "expert",
        "traditional MTL": "mtl",
        "weight averaging": "weight_averaging",
        "task arithmetic": "task_arithmetic",
        "TIES-merging": "ties",
        "layer-wise AdaMerging": "adamerging_layer",
    }
    page = (Path(__file__).resolve().parents[1] / "book" / "reproduce.md").read_text()
    listed = {}
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and all(re.fullmatch(r"\d+\.\d", c) for c in cells[1:]):
            name = cells[0].split(" (")[0]
            version = 1 if name.endswith(" + Surgery") else 0
            key = (page_names[name.removesuffix(" + Surgery")], version)
            average, per_task = float(cells[1]), [float(c) for c in cells[2:]]
            assert abs(sum(per_task) / 8 - average) < 0.2, cells[0]  # each number truncated to 0.1, as published
            listed[key] = average
    assert {k: v for k, v in VIT_B32_AVERAGES.items() if k in listed} == listed
    assert len(listed) >= 11
