"""Settings: where the pretrained model, the experts, the heads and the tasks come from.

- :mod:`~surgery_lib.settings.base`     the :class:`~surgery_lib.settings.base.Setting` contract and the :class:`Zoo`
- :mod:`~surgery_lib.settings.offline`  the offline suite and the zoo trained on this machine
- :mod:`~surgery_lib.settings.clip`     the papers' real CLIP checkpoints, datasets and heads

A setting is one folder holding a ``Setting`` object named ``SETTING`` and a ``presets.json``; a preset's
``setting`` field names its folder. :func:`build_zoo` and :func:`load_suite` look the setting up by that
name (the package's one plugin lookup), so the algorithms never import a setting.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from surgery_lib.core.errors import SurgeryBookError, use_one_of
from surgery_lib.core.taskdata import Suite
from surgery_lib.presets import Preset, SuiteConfig, get_preset
from surgery_lib.settings.base import Setting, Zoo


def available_settings() -> tuple[str, ...]:
    """The names of the setting folders (each a subpackage with a ``SETTING``)."""
    here = Path(__file__).parent
    return tuple(sorted(p.parent.name for p in here.glob("*/__init__.py")))


def get_setting(name: str) -> Setting:
    """The :class:`Setting` of folder ``name``, imported on first use.

    Raises:
        SurgeryBookError: no such setting folder, listing the known ones.
    """
    if name not in available_settings():
        raise SurgeryBookError(f"unknown setting {name!r}", use_one_of(name, available_settings()))
    setting = importlib.import_module(f"{__name__}.{name}").SETTING
    if not isinstance(setting, Setting):
        raise SurgeryBookError(
            f"settings/{name} defines no Setting named SETTING", "define SETTING = <a Setting subclass>()"
        )
    return setting


def build_zoo(
    preset: str | Preset = "mini",
    *,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    zoo_dir: str | os.PathLike[str] | None = None,
    rebuild: bool = False,
    progress: bool = True,
    options: Any = None,
    exact: bool = False,
) -> Zoo:
    """Build (or load) ``preset``'s zoo through its setting: pretrained model, heads, experts (and MTL offline).

    Args:
        preset: preset name or object.
        device: ``"cpu"`` or ``"cuda"`` (default: the preset's default device).
        cache_dir: root of data and zoo caches (default ``$SURGERY_BOOK_CACHE`` or the user cache).
        zoo_dir, rebuild: an explicit zoo directory; retrain everything (offline setting only).
        progress: show progress bars.
        options: the setting's own options (for real CLIP a dict of
            :class:`~surgery_lib.settings.clip.sources.ClipSources` fields; None: its defaults).
        exact: also retrain a model that another machine (device, thread count, CPU instruction set) trained,
            as the ``zoo`` command does; by default such a model is reused (offline setting; the real-CLIP
            setting trains nothing). A model trained by other code or torch is retrained either way.

    Raises:
        SurgeryBookError: for an unknown preset, an unwritable cache, CUDA requested without a GPU, or
            an explicit ``zoo_dir`` that holds a zoo of another config (without ``rebuild``).
    """
    preset = get_preset(preset)
    setting = get_setting(preset.setting)
    setting.check_preset(preset)
    return setting.build_zoo(
        preset,
        device=device,
        cache_dir=cache_dir,
        zoo_dir=zoo_dir,
        rebuild=rebuild,
        progress=progress,
        options=options,
        exact=exact,
    )


def load_suite(
    preset: str | Preset | SuiteConfig = "mini",
    *,
    tasks: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
    options: Any = None,
) -> Suite:
    """Load ``preset``'s tasks through its setting (a bare :class:`SuiteConfig` is an offline suite).

    Returns:
        A :class:`~surgery_lib.core.taskdata.Suite` of uint8 (N, 3, H, W) images, normalised on access.
    """
    if isinstance(preset, SuiteConfig):
        return get_setting("offline").load_suite(
            preset, tasks=tasks, cache_dir=cache_dir, workers=workers, progress=progress
        )
    preset = get_preset(preset)
    setting = get_setting(preset.setting)
    setting.check_preset(preset)
    return setting.load_suite(
        preset, tasks=tasks, cache_dir=cache_dir, workers=workers, progress=progress, options=options
    )


__all__ = ["Setting", "Zoo", "available_settings", "build_zoo", "get_setting", "load_suite"]
