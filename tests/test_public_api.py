"""The public names of release 0.1 keep working after the package was reorganised.

``public_api_0.1.json`` was written from the flat 0.1 package before any module moved: every module and the
public names it offered (functions, classes, constants, re-exported names). Old module paths now resolve
through :mod:`surgery_lib.core.compat` to the new subpackages, for one release.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import pytest

SNAPSHOT = json.loads((Path(__file__).parent / "public_api_0.1.json").read_text())

#: Names deliberately gone, and why (each is an internal of the old layout, not an API).
REMOVED = {
    # The CLI no longer hands options to the library through the environment; the CLIP setting's
    # sources module owns the variables now (surgery_lib.settings.clip.sources.VARIABLES).
    ("surgery_lib.cli", "CLIP_OPTION_VARIABLES"),
}


@pytest.mark.parametrize("module", sorted(SNAPSHOT))
def test_every_public_name_of_0_1_still_imports(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = importlib.import_module(module)
        missing = [name for name in SNAPSHOT[module] if (module, name) not in REMOVED and not hasattr(loaded, name)]
    assert not missing, f"{module} lost {missing}"


def test_old_paths_warn_and_name_the_new_one():
    import surgery_lib.methods

    with pytest.warns(DeprecationWarning, match="surgery_lib.merging"):
        assert surgery_lib.methods.cached_merge is importlib.import_module("surgery_lib.merging").cached_merge
    with pytest.warns(DeprecationWarning, match="surgery_lib.settings"):
        from surgery_lib.zoo import build_zoo
    assert build_zoo is importlib.import_module("surgery_lib.settings").build_zoo


def test_the_snapshot_covers_the_whole_old_package():
    assert len(SNAPSHOT) == 33 and sum(map(len, SNAPSHOT.values())) == 425
    assert "task_arithmetic" in SNAPSHOT["surgery_lib.merging"] and "build_zoo" in SNAPSHOT["surgery_lib.zoo"]


def test_the_package_has_one_version_and_the_changelog_describes_it():
    import importlib.metadata
    from pathlib import Path

    import surgery_lib

    assert importlib.metadata.version("surgery-book") == surgery_lib.__version__  # pyproject reads the same attribute
    changelog = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    assert f"## {surgery_lib.__version__}" in changelog
