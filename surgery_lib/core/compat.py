"""The module paths of release 0.1, kept for one release.

0.1 was 29 flat modules; 0.2 groups them into ``core``, ``merging``, ``surgery`` and ``settings``. Importing
an old path (``surgery_lib.methods``, ``surgery_lib.zoo``, ...) gives a stand-in module whose names are
looked up, on first access, in the new modules that took them over, with a ``DeprecationWarning`` naming
the new path. ``surgery_lib.merging`` and ``surgery_lib.surgery`` are packages now and re-export their 0.1
names themselves. Delete this module (and its uses in ``surgery_lib/__init__.py``, ``presets.py``, ``merging/__init__.py`` and ``surgery/__init__.py``) in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

#: Old module -> the new modules that hold its public names, searched in order.
MOVED: dict[str, tuple[str, ...]] = {
    "errors": ("core.errors",),
    "storage": ("core.storage",),
    "progress": ("core.progress",),
    "project": ("core.project",),
    "methods": ("merging", "merging.api", "core.storage", "evaluation", "models", "core.errors"),
    "fisher": ("merging.fisher",),
    "regmean": ("merging.regmean",),
    "adamerging": ("merging.adamerging", "core.taskdata", "models", "core.errors"),
    "schedule": ("surgery.schedule", "core.errors"),
    "surgery_v2": ("surgery.v2", "core.taskdata", "models", "core.errors"),
    "pipeline": ("surgery", "surgery.run", "bias", "evaluation", "models", "core.storage", "core.errors"),
    "data": ("core.taskdata", "settings", "settings.offline.suite", "settings.offline.generators"),
    "data.generators": ("settings.offline.generators",),
    "data.suite": ("core.taskdata", "settings", "settings.offline.suite", "core.storage", "presets", "core.errors"),
    "training": ("settings.offline.training", "core.taskdata", "models"),
    "zoo": (
        "settings",
        "settings.base",
        "settings.offline.zoo",
        "settings.clip.zoo",
        "settings.offline.training",
        "core.taskdata",
        "core.storage",
        "evaluation",
        "models",
        "presets",
        "core.errors",
    ),
    "clip_tasks": ("settings.clip.tasks",),
    "clip_data": ("settings.clip.data", "settings.clip.tasks", "core.taskdata", "core.storage", "core.errors"),
    "zero_shot": ("settings.clip.zero_shot", "core.storage", "models", "core.errors"),
    "checkpoints": ("settings.clip.checkpoints", "core.errors"),
    "clip_zoo": (
        "settings.clip.zoo",
        "settings.clip.sources",
        "settings.clip.tasks",
        "settings.clip.checkpoints",
        "settings.clip.data",
        "settings.clip.zero_shot",
        "core.taskdata",
        "core.storage",
        "evaluation",
        "models",
        "presets",
        "core.errors",
    ),
}

#: Names that left a module that still exists (``presets``, ``models``, ...): where they went.
MOVED_NAMES: dict[str, dict[str, str]] = {
    "presets": {
        "config_hash": "core.storage",
        "OFFLINE_TASKS": "settings.offline.suite",
        "OPENAI_MEAN": "settings.clip.tasks",
        "OPENAI_STD": "settings.clip.tasks",
        "text_leftover_entries": "settings.clip.tasks",
        "ClipConfig": "settings.clip.config",
    },
    "surgery": {"task_seed": "surgery.schedule"},
}

PACKAGE = __name__.split(".")[0]


class _MovedModule(types.ModuleType):
    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"Moved in 0.2 to {', '.join(f'{PACKAGE}.{t}' for t in targets[:1])}.")
        self._targets = targets
        self.__path__: list[str] = []  # a package, so that old submodule paths (``data.suite``) resolve too

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for target in self._targets:
            module = importlib.import_module(f"{PACKAGE}.{target}")
            if hasattr(module, name):
                warnings.warn(
                    f"{self.__name__}.{name} moved to {PACKAGE}.{target}.{name}; the old path goes in 0.3",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        names = set()
        for target in self._targets:
            names.update(n for n in vars(importlib.import_module(f"{PACKAGE}.{target}")) if not n.startswith("_"))
        return sorted(names)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        old = fullname[len(PACKAGE) + 1 :] if fullname.startswith(PACKAGE + ".") else None
        if old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _MovedModule(spec.name, MOVED[spec.name[len(PACKAGE) + 1 :]])

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def moved_name(module: str, name: str) -> Any:
    """A name that left the still-existing ``module`` (see :data:`MOVED_NAMES`), with a DeprecationWarning."""
    target = MOVED_NAMES[module][name]
    warnings.warn(
        f"{PACKAGE}.{module}.{name} moved to {PACKAGE}.{target}.{name}; the old path goes in 0.3",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(f"{PACKAGE}.{target}"), name)


def install() -> None:
    """Let the 0.1 module paths resolve (idempotent)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
