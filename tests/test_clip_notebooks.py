"""Every notebook runs on a real-CLIP preset: papermill executes them against fabricated task_vectors
checkpoints and dataset folders, through the same environment variables a user sets (heavy: minutes; needs no
mini zoo, so `make test` runs it beside the unit tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from clip_fixtures import (
    TINY_CLIP,
    fabricate_datasets,
    fabricate_task_vectors_checkpoints,
)

from surgery_lib.presets import PRESETS
from surgery_lib.settings.clip.tasks import CLIP_TASK_NAMES

pytestmark = [pytest.mark.heavy, pytest.mark.filterwarnings("ignore:Couldn.t retrieve source code")]
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_every_notebook_runs_on_a_clip_preset(tmp_path, monkeypatch, published_classes, tiny_visual):
    pytest.importorskip("papermill")
    from surgery_lib.cli import main

    checkpoints = fabricate_task_vectors_checkpoints(tmp_path / "checkpoints", published_classes, tiny_visual)
    data = fabricate_datasets(tmp_path / "datasets")
    presets = tmp_path / "presets.json"
    presets.write_text(json.dumps([TINY_CLIP.to_dict()]))
    monkeypatch.setenv("SURGERY_BOOK_PRESETS", str(presets))  # the kernels register the tiny CLIP preset from it
    monkeypatch.setitem(PRESETS, TINY_CLIP.name, TINY_CLIP)  # ... and this process, imported before, directly
    for variable in ("FAMILY", "TEST_FOLDER"):
        monkeypatch.delenv(f"SURGERY_BOOK_{variable}", raising=False)
    for variable, value in (
        ("CHECKPOINTS", checkpoints),
        ("DATA_SOURCE", "local"),
        ("DATA_ROOT", data),
        ("CACHE", tmp_path / "cache"),
    ):
        monkeypatch.setenv(f"SURGERY_BOOK_{variable}", str(value))  # what --checkpoints, --data-source ... export
    out = tmp_path / "out"
    status = main(
        [
            "reproduce",
            "--preset",
            TINY_CLIP.name,
            "--out",
            str(out),
            "--device",
            "cpu",
            "--source",
            str(NOTEBOOKS),
            "-p",
            "surgery_steps",
            "20",
            "-p",
            "deep_surgery_steps",
            "10",
            "-p",
            "tsne_points",
            "20",
            "-p",
            "methods",
            "task_arithmetic,tsv",
            "-p",
            "seeds",
            "1",
            "--quiet",
        ]
    )
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [run["status"] for run in summary["notebooks"]] == ["ok"] * len(list(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")))
    table = pd.read_csv(out / "06_reproduce_tables" / "main_table.csv", index_col=0)
    assert list(table.columns) == [*CLIP_TASK_NAMES, "average", "std", "bias"]
    assert "pretrained (zero-shot)" in table.index and "traditional MTL" not in table.index
    assert "task arithmetic + SurgeryV2" in table.index
    assert any(
        label.startswith("task-wise AdaMerging++ [") and label.endswith("] + SurgeryV2") for label in table.index
    )
    ties = [label for label in table.index if label.startswith("TIES-merging (disjoint sum) [")]
    assert ties and "% of the tower" in ties[0]  # the official trim scope, named in the label
    # The from-scratch Surgery (04) and SurgeryV2 (05) learn the library's modules on CLIP too, where a task has fewer
    # images than two batches (the official schedule then takes one batch per iteration).
    for chapter, check in (("04_surgery", "scratch-check"), ("05_surgery_v2", "scratch-v2-check")):
        cells = json.loads((out / "notebooks" / f"{chapter}.ipynb").read_text())["cells"]
        (printed,) = ["".join(o.get("text", "")) for c in cells if c.get("id") == check for o in c["outputs"]]
        assert "same module" in printed and printed.count(": True") == printed.count(": "), (chapter, printed)
    (table,) = (out / "07_beyond_the_papers" / "grid").glob("*/table.csv")  # one folder per zoo, in its output
    grid = pd.read_csv(table)
    assert set(grid["method"]) == {"task_arithmetic", "tsv"} and set(grid["version"]) == {0, 1, 2}
