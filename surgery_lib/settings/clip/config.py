"""The real-CLIP setting's own part of a preset: which published model, where its weights and data come from.

A preset of the ``clip`` setting carries this section as JSON data in ``setting_config`` (the generic schema in
:mod:`surgery_lib.presets` stores it without knowing its fields); :func:`clip_config` reads and checks it. Of its
keys the generic code reads two, as it does for every setting: ``tasks`` (the preset has no suite) and
``surgery_v2_rank`` (:meth:`~surgery_lib.presets.Preset.surgery_rank`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.presets import Preset, check_fields, get_preset


@dataclass(frozen=True)
class ClipConfig:
    """Where a real-CLIP preset's weights come from.

    ``model`` is the open_clip architecture and task_vectors folder name (``"ViT-B-32"``); ``hub_model``
    the transformers id of the pretrained CLIP (``"openai/clip-vit-base-patch32"``), whose name
    also prefixes FusionBench's experts (``"tanganke/clip-vit-base-patch32_<task>"``).
    ``surgery_v2_rank`` is the papers' SurgeryV2 rank for this backbone (16 for ViT-B, 4 for ViT-L/14).
    """

    model: str
    hub_model: str
    fusionbench_owner: str = "tanganke"
    family: str = "task_vectors"  # or "fusionbench"
    data_source: str = "hub"  # or "local"
    surgery_v2_rank: int = 16
    #: Entries of the text-tower leftovers (token and positional embeddings, text projection, ln_final,
    #: logit scale) that the published ``ImageEncoder`` pickles keep and whose task vectors are zero. The
    #: official TIES flattens them together with the image tower, so its top 20 % keeps 25.83 % (ViT-B/32),
    #: 25.94 % (B/16) or 22.54 % (L/14) of the image tower: TIES and AdaMerging++ trim with this count.
    ties_text_entries: int = 0
    #: The eight tasks in the papers' table order (the setting's task catalogue describes each).
    tasks: tuple[str, ...] = ()

    def section(self) -> dict[str, Any]:
        """This configuration as a preset's ``setting_config`` (JSON data)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def clip_config(preset: str | Preset) -> ClipConfig:
    """The :class:`ClipConfig` of a real-CLIP ``preset``, read from its ``setting_config`` and checked.

    Raises:
        SurgeryBookError: the preset has no such section, or a field is missing, unknown or invalid (named).
    """
    preset = get_preset(preset)
    data = preset.setting_config

    def fail(path: str, value: Any, expected: str) -> None:
        raise SurgeryBookError(f"preset {preset.name!r}: {path} = {value!r} is invalid", f"use {expected}")

    if not isinstance(data, dict):
        fail("setting_config", data, "a section with model, hub_model and tasks for a preset of the clip setting")
    known = {f.name for f in dataclasses.fields(ClipConfig)}
    for name in sorted(set(data) - known):
        fail(f"setting_config.{name}", data[name], f"only the fields {', '.join(sorted(known))}")
    for name in ("model", "hub_model"):
        if name not in data:
            fail(f"setting_config.{name}", None, f"the {name} of the real-CLIP section")
    config = ClipConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    check_fields(config, "setting_config.", fail)
    return config
