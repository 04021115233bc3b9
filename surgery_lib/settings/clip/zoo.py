"""The real-CLIP "zoo": published checkpoints and the papers' datasets behind the same :class:`~surgery_lib.settings.base.Zoo` interface.

``build_zoo("clip-vit-b-32")`` lands here, so every merge, AdaMerging, Surgery, SurgeryV2 and bias
function, every command and every notebook runs on the papers' setting unchanged. What happens once,
then comes from the cache (``<cache>/clip/``):

1. checkpoints are converted to safetensors (:func:`~surgery_lib.settings.clip.checkpoints.convert_task_vectors` from
   a task_vectors folder, or :func:`~surgery_lib.settings.clip.checkpoints.convert_fusionbench` from the hub);
2. each task's test split and a training subset are decoded once (:mod:`surgery_lib.settings.clip.data`);
3. heads: task_vectors' own ``head_<Task>.pt``, or zero-shot heads from the text tower (FusionBench);
4. the pretrained model's and each expert's test accuracy are measured once and recorded.

Where the inputs are: :class:`~surgery_lib.settings.clip.sources.ClipSources` (arguments, else the
``SURGERY_BOOK_*`` variables that papermill kernels inherit, else the preset's defaults).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.storage import (
    CorruptFileError,
    cache_root,
    config_hash,
    read_json,
    write_json,
)
from surgery_lib.core.taskdata import Suite
from surgery_lib.evaluation import task_accuracy
from surgery_lib.models import load_encoder, resolve_device
from surgery_lib.presets import Preset, get_preset
from surgery_lib.settings.base import EXPERT_ROW, ZERO_SHOT_ROW, Zoo
from surgery_lib.settings.clip.checkpoints import (
    convert_fusionbench,
    convert_task_vectors,
    fusionbench_sources,
    load_converted,
)
from surgery_lib.settings.clip.config import clip_config
from surgery_lib.settings.clip.data import load_clip_suite
from surgery_lib.settings.clip.sources import ClipSources
from surgery_lib.settings.clip.tasks import CLIP_TASKS
from surgery_lib.settings.clip.zero_shot import cached_zero_shot_head, openai_clip

#: The label of the pretrained model's row: CLIP classifies zero-shot through its heads.
CLIP_PRETRAINED_ROW = ZERO_SHOT_ROW
#: The reference rows of a CLIP zoo (no MTL model: the papers' MTL row is quoted, not rerun).
CLIP_REFERENCE_ROWS = {"pretrained": CLIP_PRETRAINED_ROW, "expert": EXPERT_ROW}


def converted_checkpoints(preset: Preset, sources: ClipSources, cache: Path, progress: bool = True) -> Path:
    """The folder of converted safetensors for ``preset``, converting on first use (and again when the
    source named now differs from the one converted before).

    Raises:
        SurgeryBookError: no converted folder and no source to convert from (naming the fix).
    """
    config = clip_config(preset)
    model = config.model
    given = Path(sources.checkpoints) if sources.checkpoints not in (None, "hub") else None
    if given is not None and (given / "manifest.json").is_file():
        return given  # already a converted folder
    target_root = cache / "checkpoints" / sources.family
    if (target_root / model / "manifest.json").is_file():
        try:
            converted_from = read_json(target_root / model / "manifest.json")["sources"]["pretrained"]
        except (CorruptFileError, KeyError):
            converted_from = None
        if given is None:  # nothing named now: whatever was converted last; "hub": FusionBench's hub models
            named_hub = sources.checkpoints == "hub" and sources.family == "fusionbench"
            wanted = fusionbench_sources(model, "hub", ())["pretrained"] if named_hub else None
        elif sources.family == "task_vectors":
            wanted = str((given / model / "zeroshot.pt").resolve())
        else:
            wanted = str(Path(fusionbench_sources(model, str(given), ())["pretrained"]).resolve())
        if (
            converted_from is not None and Path(converted_from).exists()
        ):  # a local file or folder: compare resolved paths
            converted_from = str(Path(converted_from).resolve())
        if converted_from is not None and wanted in (None, converted_from):
            return target_root / model  # converted before from the same source (or no source named now)
    if sources.family == "task_vectors":
        if given is None:
            raise SurgeryBookError(
                f"no converted {model} checkpoints in {target_root} and no task_vectors folder given",
                "download task_vectors' checkpoint folder and pass --checkpoints DIR (or set SURGERY_BOOK_CHECKPOINTS)",
            )
        convert_task_vectors(given, model, target_root, config.tasks, progress=progress)
    else:
        convert_fusionbench(
            str(given) if given is not None else "hub",
            model,
            target_root,
            config.tasks,
            progress=progress,
            owner=config.fusionbench_owner,
        )
    return target_root / model


def clip_suite(
    preset: Preset,
    *,
    sources: ClipSources | None = None,
    tasks: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    hub_load: Any = None,
    progress: bool = True,
) -> Suite:
    """The preset's datasets (all eight, or ``tasks``), decoded once into ``<cache>/clip/data``."""
    sources = sources or ClipSources.from_environment(preset)
    return load_clip_suite(
        tuple(tasks) if tasks is not None else clip_config(preset).tasks,
        source=sources.data_source,
        cache_dir=cache_root(cache_dir) / "clip" / "data",
        image_size=preset.encoder.image_size,
        root=sources.data_root,
        test_folder=sources.test_folder,
        train_images=sources.train_images,
        validation_images=sources.validation_images,
        workers=workers,
        hub_load=hub_load,
        progress=progress,
    )


def load_clip_zoo(
    preset: str | Preset = "clip-vit-b-32",
    *,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    sources: ClipSources | None = None,
    workers: int | None = None,
    hub_load: Any = None,
    load_text_model: Any = None,
    progress: bool = True,
) -> Zoo:
    """A :class:`~surgery_lib.settings.base.Zoo` of the real setting (no MTL model: the papers' MTL row is quoted).

    Args:
        preset: a ``clip-*`` preset.
        sources: where checkpoints and data are (default: :meth:`ClipSources.from_environment`).
        workers: DataLoader workers that decode images (default: up to 8).
        hub_load, load_text_model: replace ``datasets.load_dataset`` and the download of OpenAI's
            CLIP (tests pass local stand-ins).
    """
    preset = get_preset(preset)
    if preset.setting != "clip":
        raise SurgeryBookError(
            f"preset {preset.name!r} is a preset of the {preset.setting} setting", "use build_zoo for it"
        )
    config = clip_config(preset)
    sources = sources or ClipSources.from_environment(preset)
    device = resolve_device(device, preset.default_device)
    cache = cache_root(cache_dir) / "clip"
    checkpoint_dir = converted_checkpoints(preset, sources, cache, progress)
    pretrained, experts, heads, converted = load_converted(checkpoint_dir)
    if (
        converted["architecture"]["width"] != preset.encoder.width
        or converted["architecture"]["layers"] != preset.encoder.layers
    ):
        raise SurgeryBookError(
            f"{checkpoint_dir} holds a {converted['model']} model, preset {preset.name!r} is {config.model}",
            "pass the checkpoints of the preset's model",
        )
    suite = clip_suite(
        preset,
        sources=sources,
        tasks=converted["tasks"],
        cache_dir=cache_dir,
        workers=workers,
        hub_load=hub_load,
        progress=progress,
    )
    model = config.model
    loader = load_text_model or (lambda: openai_clip(model, device))
    for task in converted["tasks"]:
        if task not in heads:  # FusionBench: zero-shot heads from the pretrained text tower
            names = suite[task].class_names
            heads[task] = cached_zero_shot_head(
                cache / "heads", model, task, names, CLIP_TASKS[task].templates, loader, device=device
            )
        if heads[task].num_classes != suite[task].num_classes:
            raise SurgeryBookError(
                f"the {task} head has {heads[task].num_classes} classes, the data {suite[task].num_classes}",
                "check the dataset source (--data-source) and the checkpoint family",
            )

    key = config_hash(
        {
            "checkpoints": converted["files"],
            "data": {t: suite[t].labels["test"].shape[0] for t in suite.task_names},
            "sources": [sources.data_source, sources.test_folder],
            "heads": {t: float(h.linear.weight.sum()) for t, h in heads.items()},
        }
    )
    directory = cache / "zoo" / f"{preset.name}-{sources.family}-{key}"
    manifest_path = directory / "manifest.json"
    manifest: dict[str, Any] | None = None
    if manifest_path.is_file():
        try:
            manifest = read_json(manifest_path)
        except CorruptFileError:
            manifest = None
    if manifest is None:
        accuracy: dict[str, dict[str, float]] = {"pretrained": {}, "expert": {}}
        base = load_encoder(preset.encoder, pretrained)
        for task in converted["tasks"]:
            accuracy["pretrained"][task] = task_accuracy(base, heads[task], suite[task], device=device)
            accuracy["expert"][task] = task_accuracy(
                load_encoder(preset.encoder, experts[task]), heads[task], suite[task], device=device
            )
        manifest = {
            "preset": preset.name,
            "family": sources.family,
            "checkpoints": str(checkpoint_dir),
            "config": preset.to_dict(),
            "data_source": sources.data_source,
            "test_folder": sources.test_folder,
            "accuracy": accuracy,
        }
        write_json(manifest, manifest_path)
    return Zoo(
        preset,
        directory,
        manifest,
        pretrained,
        heads,
        experts,
        None,
        suite,
        reference_labels=dict(CLIP_REFERENCE_ROWS),
        ties_zero_entries=config.ties_text_entries,
        published=True,
    )
