"""Where a real-CLIP zoo's checkpoints and data come from, and the one place that reads and writes the
``SURGERY_BOOK_*`` variables that carry them into notebook kernels started by papermill.

``SURGERY_BOOK_FAMILY`` (``task_vectors`` or ``fusionbench``), ``SURGERY_BOOK_CHECKPOINTS`` (task_vectors'
folder, a converted folder, or FusionBench snapshots; ``hub`` for FusionBench's default),
``SURGERY_BOOK_DATA_SOURCE`` (``hub`` or ``local``), ``SURGERY_BOOK_DATA_ROOT`` (task_vectors' dataset
folders), ``SURGERY_BOOK_TEST_FOLDER`` (``val`` or ``test``: which DTD/SUN397 folder is the test split) and
``SURGERY_BOOK_VALIDATION_IMAGES`` (labelled images per task held out of each training split as task_vectors
held them out, for the ``*_tuned`` merges; 0, the default: none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.presets import Preset
from surgery_lib.settings.clip.config import clip_config

FAMILIES = ("task_vectors", "fusionbench")
#: Which of DTD's and SUN397's folders in task_vectors' local layout is the test split ("val": task_vectors').
TEST_FOLDERS = ("val", "test")

#: Field of :class:`ClipSources` -> the environment variable that carries it to notebook kernels.
VARIABLES = {
    "family": "SURGERY_BOOK_FAMILY",
    "checkpoints": "SURGERY_BOOK_CHECKPOINTS",
    "data_source": "SURGERY_BOOK_DATA_SOURCE",
    "data_root": "SURGERY_BOOK_DATA_ROOT",
    "test_folder": "SURGERY_BOOK_TEST_FOLDER",
    "validation_images": "SURGERY_BOOK_VALIDATION_IMAGES",
}


@dataclass(frozen=True)
class ClipSources:
    """Where a real-CLIP zoo's checkpoints and data come from (see the module docstring)."""

    family: str = "task_vectors"
    checkpoints: str | None = None
    data_source: str = "hub"
    data_root: str | None = None
    test_folder: str = "val"  # DTD and SUN397 in task_vectors' layout: one of TEST_FOLDERS
    train_images: int = 1000
    validation_images: int = 0

    @classmethod
    def from_environment(cls, preset: Preset, **given: Any) -> ClipSources:
        """Arguments that are not None, else ``SURGERY_BOOK_*`` variables that are set and not blank (as a shell's
        ``${VAR:-default}``: ``SURGERY_BOOK_CHECKPOINTS=`` looked for the checkpoints in the current folder), else
        the preset's defaults."""
        config = clip_config(preset)
        defaults = {"family": config.family, "data_source": config.data_source, "test_folder": "val"}
        set_values = {field: os.environ.get(variable, "") for field, variable in VARIABLES.items()}
        env = {field: value if value.strip() else defaults.get(field) for field, value in set_values.items()}
        sources = cls(**{**env, **{k: v for k, v in given.items() if v is not None}})
        count = sources.validation_images
        if isinstance(count, str):
            if not count.strip().isdigit():
                raise SurgeryBookError(
                    f"{VARIABLES['validation_images']}={count!r} is not a number of images",
                    "set it to a whole number such as 5000 (0: no validation split), or unset it",
                )
            sources = dataclasses.replace(sources, validation_images=int(count))
        if sources.validation_images is None:
            sources = dataclasses.replace(sources, validation_images=0)
        if sources.validation_images < 0:
            raise SurgeryBookError(
                f"--validation-images {sources.validation_images} is negative", "pass 0 (none) or a number of images"
            )
        if sources.test_folder not in TEST_FOLDERS:  # the variable's value: the option offers only these
            raise SurgeryBookError(
                f"{VARIABLES['test_folder']}={sources.test_folder!r} names no DTD/SUN397 test folder",
                f"set it to one of: {', '.join(TEST_FOLDERS)} (task_vectors reads val), or unset it",
            )
        if sources.family not in FAMILIES:
            raise SurgeryBookError(
                f"unknown checkpoint family {sources.family!r}", f"use one of: {', '.join(FAMILIES)}"
            )
        return sources

    @staticmethod
    def variables(given: Mapping[str, Any]) -> dict[str, str]:
        """The environment variables that carry the given (not None) fields; folders become absolute paths,
        so that kernels running in another directory find them."""
        out = {}
        for field, variable in VARIABLES.items():
            value = given.get(field)
            if value is not None:
                out[variable] = (
                    os.path.abspath(value) if field in ("checkpoints", "data_root") and value != "hub" else str(value)
                )
        return out

    @staticmethod
    @contextlib.contextmanager
    def exported(given: Mapping[str, Any]) -> Iterator[None]:
        """While inside, the given fields are in ``os.environ`` (for papermill's kernels); restored after."""
        variables = ClipSources.variables(given)
        saved = {name: os.environ.get(name) for name in variables}
        os.environ.update(variables)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
