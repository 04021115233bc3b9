"""The Makefile's tests stage hands its files to the workers in the order it documents (heavy: a collection
in a subprocess, about ten seconds)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy
ROOT = Path(__file__).resolve().parents[1]


def _collected_files(order: list[str]) -> list[str]:
    """The files of ``pytest --collect-only`` over ``order``, in collection order, each once."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "--nbval-lax"]
        + ["-m", "not browser", *order],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files: list[str] = []
    for line in result.stdout.splitlines():
        if "::" not in line:
            continue
        path = line.split("::")[0]
        if path not in files:
            files.append(path)
    return files


def test_the_tests_stage_collects_its_files_in_the_makefiles_order():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    order = subprocess.run(
        ["make", "-s", "--no-print-directory", "test-order"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    notebooks = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    test_files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
    assert sorted(order) == sorted(notebooks + test_files), "every notebook and test file, each once"
    collected = _collected_files(order)
    # a file whose every test is deselected (the browser's) is not collected; the rest keep the given order
    assert collected == [path for path in order if path in collected]
    assert collected[:3] == order[:3], "the longest files go first"
