"""bench/stages.py: the stage timer of `make test` and `make run`, and the history row it prints."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def stages(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("stages", ROOT / "bench" / "stages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "BUILD", tmp_path)
    return module


def _record(stages, rows):
    assert stages.reset("test") == 0
    for stage, seconds, status, note in rows:
        stages._append("test", stage, seconds, status, note)


PASSING = [
    ("venv", 59.4, 0, ""),
    ("zoo", 582.9, 0, ""),
    ("tests", 587.7, 0, ""),
    ("book", 5.9, 0, ""),
    ("chromium", 80.0, 0, "in the background; waited 2.5 s for it"),
    ("browser", 29.5, 0, ""),
]


def test_the_history_row_has_each_stage_and_the_total_that_report_prints(stages, capsys):
    _record(stages, PASSING)
    assert stages.history_row("test") == 0
    cells = [c.strip() for c in capsys.readouterr().out.strip().strip("|").split("|")]
    # A background stage counts only the seconds a foreground step waited for it: 1,265.4 + 2.5.
    assert cells[0] == "?" and re.fullmatch(r"[0-9a-f]{7}|\?", cells[1])
    assert cells[2:] == ["1,268 (21.1)", "59", "583", "588", "?", "6", "30", ""]
    assert stages.report("test") == 0
    assert "1267.9" in capsys.readouterr().out


def test_a_failed_or_incomplete_run_gets_no_history_row(stages, capsys):
    _record(stages, [(s, t, 2 if s == "tests" else 0, n) for s, t, _, n in PASSING])
    assert stages.history_row("test") == 1
    assert "(tests failed)" in capsys.readouterr().err
    _record(stages, PASSING[:2])
    assert stages.history_row("test") == 1
    assert "no stage tests, book, browser" in capsys.readouterr().err
    (stages.BUILD / "stages-test.tsv").unlink()
    assert stages.history_row("test") == 1 and "no stages recorded" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("damage", "line"),
    [
        ("venv\t5.0\n", 3),
        ("zoo\tfive\t0\t\n", 3),
        ("#epoch yesterday\n", 3),
        ("book\t5.0\tok\t\n", 3),
        ("chromium\t80.0\t0\tin the background; waited long s for it\n", 3),
    ],
)
def test_a_damaged_record_is_one_line_naming_the_line_and_the_fix(stages, capsys, damage, line):
    _record(stages, PASSING[:1])
    record = stages.BUILD / "stages-test.tsv"
    lines = record.read_text().splitlines(keepends=True)
    record.write_text("".join([*lines[:2], damage, *lines[2:]]))
    for verb in (stages.report, stages.history_row):
        assert verb("test") == 1
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and f"damaged (line {line}:" in error and "reset test" in error


def test_a_damaged_background_marker_is_one_line_and_is_cleared(stages, capsys):
    assert stages.reset("test") == 0
    marker = stages.BUILD / "stages-test-chromium.background"
    marker.write_text("killed\n")
    assert stages.wait("test", "chromium") == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "damaged ('killed')" in error and "make test" in error
    assert not marker.exists()
