"""One formatter and linter (ruff, configured in pyproject.toml) for the library, the tests and the benchmarks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["surgery_lib", "tests", "bench"]


def _ruff() -> list[str]:
    executable = Path(sys.executable).with_name("ruff")
    if executable.exists():
        return [str(executable)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed (pip install -e '.[dev]')")


def test_the_code_is_formatted_by_ruff():
    result = subprocess.run(
        [*_ruff(), "format", "--check", *PATHS], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"run `ruff format {' '.join(PATHS)}`:\n{result.stdout}{result.stderr}"


def test_the_code_passes_ruffs_lint_rules():
    result = subprocess.run([*_ruff(), "check", *PATHS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"run `ruff check --fix {' '.join(PATHS)}`:\n{result.stdout}{result.stderr}"
