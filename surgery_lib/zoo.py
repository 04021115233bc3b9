"""The model zoo: a pretrained encoder, frozen heads, one expert per task, and the multi-task baseline.

``build_zoo`` trains what is missing and loads what is already there. Every model is a safetensors
file next to a ``manifest.json`` that records, per model, its SHA-256, what it was trained from,
its test accuracies and wall time, plus the preset, config hash, seeds and package versions. The
manifest is rewritten (atomically) after every finished model, so an interrupted build resumes at the
last finished model; a file whose checksum no longer matches is rebuilt with a warning; a model
whose inputs changed is rebuilt.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery_lib.data import Suite, load_suite
from surgery_lib.errors import SurgeryBookError
from surgery_lib.evaluation import accuracy_from_features, task_accuracy
from surgery_lib.models import (
    ClassificationHead,
    StateDict,
    build_encoder,
    clone_state,
    embed,
    embed_blocks,
    load_encoder,
    resolve_device,
)
from surgery_lib.presets import Preset, config_hash, get_preset
from surgery_lib.project import __version__
from surgery_lib.storage import CorruptFileError, cache_root, load_tensors, read_json, save_tensors, write_json
from surgery_lib.training import derive_seed, finetune, fit_probe, pretrain

log = logging.getLogger(__name__)

ZOO_FORMAT = 1
MANIFEST = "manifest.json"

#: Rows of the zoo's accuracy table, in the order of the papers' tables.
ZOO_ROWS = {"pretrained": "pretrained + probe", "expert": "individual (expert)", "mtl": "traditional MTL"}
CLIP_PRETRAINED_ROW = "pretrained (zero-shot)"


def zoo_config_hash(preset: Preset) -> str:
    """The hash that names a zoo: the preset's encoder, data and recipe plus the zoo format."""
    return config_hash({"format": ZOO_FORMAT, "encoder": preset.encoder, "suite": preset.suite, "recipe": preset.recipe})


def default_zoo_dir(preset: Preset, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<cache>/zoo/<preset>-<config hash>``: a changed config gets a fresh directory."""
    return cache_root(cache_dir) / "zoo" / f"{preset.name}-{zoo_config_hash(preset)}"


def package_versions() -> dict[str, str]:
    """Versions recorded in the manifest."""
    import numpy
    import open_clip

    return {
        "surgery_lib": __version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


@dataclass
class Zoo:
    """Trained weights of one preset. Encoders are returned as fresh modules so callers may modify them."""

    preset: Preset
    directory: Path
    manifest: dict[str, Any]
    pretrained: StateDict
    heads: dict[str, ClassificationHead]
    experts: dict[str, StateDict]
    mtl: StateDict | None  # None for the real-CLIP presets (the papers' MTL numbers are quoted instead)
    suite: Suite = field(repr=False)
    _expert_features: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor | None]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.experts)

    def expert_features(
        self, task: str, split: str = "test", *, blocks: bool = False, device: str | torch.device = "cpu", precision: str = "fp32"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``task``'s expert embeddings of its ``split`` images: final (N, output_dim) and, with ``blocks``,
        the per-block token means (N, blocks, width), float32 on the CPU (``None`` without ``blocks``).

        Every surgery run and bias measurement compares against these targets, and they never change for a
        zoo, so they are computed once per process and kept (the papers' grid reuses them 30 times). Treat
        them as read-only; :meth:`forget_features` frees them (for ViT-L/14 with blocks, gigabytes).
        """
        key = (task, split, blocks, str(torch.device(device)), precision)
        if key not in self._expert_features:
            data, encoder = self.suite[task], self.encoder(task)
            if blocks:
                final, means = embed_blocks(encoder, data.images[split], data.mean, data.std, device=device, precision=precision)
                self._expert_features[key] = (final, means)
            else:
                self._expert_features[key] = (embed(encoder, data.images[split], data.mean, data.std, device=device, precision=precision), None)
        return self._expert_features[key]

    def forget_features(self) -> None:
        """Free the expert embeddings :meth:`expert_features` kept."""
        self._expert_features.clear()

    def encoder(self, which: str = "pretrained") -> nn.Module:
        """A fresh encoder loaded with ``"pretrained"``, ``"mtl"`` or a task's expert weights."""
        if which == "pretrained":
            state = self.pretrained
        elif which == "mtl" and self.mtl is not None:
            state = self.mtl
        elif which in self.experts:
            state = self.experts[which]
        else:
            models = ["pretrained", *(["mtl"] if self.mtl is not None else [])]
            raise SurgeryBookError(
                f"the zoo has no model {which!r}", f"use {', '.join(repr(m) for m in models)} or a task: {', '.join(self.tasks)}"
            )
        return load_encoder(self.preset.encoder, state).eval()

    def reference_rows(self) -> dict[str, dict[str, float]]:
        """The reference rows of the papers' tables, ``{label: {task: accuracy %}}``: pretrained (+ probe
        offline, zero-shot for CLIP), each expert on its own task, and MTL where the zoo has it."""
        accuracy = self.manifest["accuracy"]
        labels = dict(ZOO_ROWS, pretrained=CLIP_PRETRAINED_ROW) if self.preset.clip is not None else ZOO_ROWS
        return {label: {t: accuracy[key][t] for t in self.tasks} for key, label in labels.items() if key in accuracy}

    def accuracy_table(self):  # -> pandas.DataFrame
        """Test accuracy (%) of the reference rows (:meth:`reference_rows`), with the average."""
        from surgery_lib.evaluation import results_table

        return results_table(self.reference_rows())


def _check_manifest(manifest: dict[str, Any], preset: Preset, directory: Path) -> None:
    expected = zoo_config_hash(preset)
    if manifest.get("config_hash") != expected:
        raise SurgeryBookError(
            f"the zoo in {directory} was built for preset {manifest.get('preset')!r} with config "
            f"{manifest.get('config_hash')}, not for preset {preset.name!r} with config {expected}",
            "pass --rebuild (rebuild=True) to replace it, or choose another --zoo-dir",
        )


class _Builder:
    """Runs the zoo's steps in order, reusing every step whose file and inputs are unchanged."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.directory, self.manifest = directory, manifest

    def save_manifest(self) -> None:
        write_json(self.manifest, self.directory / MANIFEST)

    def step(
        self, name: str, depends_on: dict[str, str], train: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]]
    ) -> tuple[dict[str, torch.Tensor], str]:
        """Load model ``name`` if its file and inputs are unchanged, otherwise train and save it.

        ``train`` returns ``(tensors, record)``; the record (metrics, wall time) goes into the manifest.
        Returns the tensors and the file's SHA-256 (which later steps name as their input).
        """
        entry = self.manifest["models"].get(name)
        path = self.directory / f"{name.replace('/', '-')}.safetensors"
        if entry and entry.get("depends_on") == depends_on and path.exists():
            try:
                tensors, _ = load_tensors(path, expected_sha256=entry["sha256"])
                return tensors, entry["sha256"]
            except CorruptFileError as exc:
                log.warning("zoo file %s; rebuilding it", exc.problem)
        elif entry:
            reason = "its file is missing" if not path.exists() else "a model it was trained from changed"
            log.warning("rebuilding %s: %s", name, reason)
        started = time.perf_counter()
        tensors, record = train()
        sha = save_tensors(tensors, path, metadata={"model": name, "config_hash": self.manifest["config_hash"]})
        self.manifest["models"][name] = {
            "file": path.name,
            "sha256": sha,
            "depends_on": depends_on,
            "wall_time_s": round(time.perf_counter() - started, 2),
            **record,
        }
        self.save_manifest()
        return tensors, sha


def build_zoo(
    preset: str | Preset = "mini",
    *,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    zoo_dir: str | os.PathLike[str] | None = None,
    rebuild: bool = False,
    progress: bool = True,
) -> Zoo:
    """Build (or load) the zoo of ``preset``: pretrained encoder, heads, experts and the MTL baseline.

    For the real-CLIP presets (``clip-*``) nothing is trained: :func:`surgery_lib.clip_zoo.load_clip_zoo`
    loads the published checkpoints and the datasets (locations from ``SURGERY_BOOK_*`` variables).

    Args:
        preset: preset name or object; its config hash names the zoo directory.
        device: ``"cpu"`` or ``"cuda"`` (default: the preset's default device).
        cache_dir: root of data and zoo caches (default ``$SURGERY_BOOK_CACHE`` or the user cache).
        zoo_dir: an explicit zoo directory (default ``<cache>/zoo/<preset>-<hash>``).
        rebuild: discard whatever the directory holds and train everything again.
        progress: show progress bars.

    Raises:
        SurgeryBookError: for an unknown preset, an unwritable cache, CUDA requested without a GPU, or
            an explicit ``zoo_dir`` that holds a zoo of another config (without ``rebuild``).
    """
    preset = get_preset(preset)
    if preset.clip is not None:
        from surgery_lib.clip_zoo import load_clip_zoo

        if zoo_dir is not None or rebuild:
            raise SurgeryBookError(
                f"zoo_dir and rebuild do not apply to the real-CLIP preset {preset.name!r}",
                "its caches live under <cache>/clip/; delete a file there to redo that step",
            )
        return load_clip_zoo(preset, device=device, cache_dir=cache_dir, progress=progress)
    device = resolve_device(device, preset.default_device)
    directory = Path(zoo_dir) if zoo_dir is not None else default_zoo_dir(preset, cache_dir)
    if rebuild and directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)

    manifest: dict[str, Any] | None = None
    if (directory / MANIFEST).exists():
        try:
            manifest = read_json(directory / MANIFEST)
        except CorruptFileError as exc:
            log.warning("%s; starting the zoo afresh", exc.problem)
        if manifest is not None:
            _check_manifest(manifest, preset, directory)
    if manifest is None:
        manifest = {"format": ZOO_FORMAT, "preset": preset.name, "config_hash": zoo_config_hash(preset), "models": {}}
    manifest.update(
        config=preset.to_dict(),
        recipe_notes=list(preset.notes),
        versions=package_versions(),
        device=str(device),
    )
    started = time.perf_counter()
    suite = load_suite(preset, cache_dir=cache_dir, progress=progress)
    recipe, encoder_cfg = preset.recipe, preset.encoder
    builder = _Builder(directory, manifest)
    seeds: dict[str, int] = {}

    # 1. Pretraining on the label-disjoint mix.
    seeds["pretrained"] = derive_seed(recipe.seed, "pretrained")

    def train_pretrained():
        torch.manual_seed(seeds["pretrained"])
        encoder = build_encoder(encoder_cfg)
        stats = pretrain(
            encoder, suite.mix, epochs=recipe.pretrain_epochs, lr=recipe.pretrain_lr,
            weight_decay=recipe.pretrain_weight_decay, warmup_steps=recipe.pretrain_warmup_steps,
            batch_size=recipe.batch_size, translate_px=recipe.translate_px, seed=seeds["pretrained"],
            device=device, progress=progress,
        )  # fmt: skip
        return clone_state(encoder), {"steps": stats.steps, "images_seen": stats.images, "final_loss": round(stats.final_loss, 4)}

    pretrained, pretrained_sha = builder.step("pretrained", {}, train_pretrained)
    pretrained_encoder = load_encoder(encoder_cfg, pretrained).to(device)

    # 2. Heads: linear probes on frozen pretrained embeddings (the stand-in for CLIP's zero-shot heads).
    seeds["heads"] = derive_seed(recipe.seed, "heads")

    def features(task: str, split: str, index: torch.Tensor | None = None) -> torch.Tensor:
        data = suite[task]
        images = data.images[split] if index is None else data.images[split][index]
        return embed(pretrained_encoder, images, data.mean, data.std, device=device)

    def train_heads():
        tensors, accuracy = {}, {}
        for task in suite.task_names:
            seed = derive_seed(seeds["heads"], task)
            shots = suite[task].few_shot("train", recipe.probe_shots, seed)
            head = fit_probe(
                features(task, "train", shots), suite[task].labels["train"][shots], suite[task].num_classes,
                steps=recipe.probe_steps, lr=recipe.probe_lr, weight_decay=recipe.probe_weight_decay, seed=seed,
            )  # fmt: skip
            accuracy[task] = accuracy_from_features(features(task, "test"), head, suite[task].labels["test"])
            tensors.update({f"{task}.{k}": v for k, v in head.state_dict().items()})
        return tensors, {"test_accuracy": accuracy}

    head_tensors, heads_sha = builder.step("heads", {"pretrained": pretrained_sha}, train_heads)
    heads = {}
    for task in suite.task_names:
        head = ClassificationHead(encoder_cfg.output_dim, suite[task].num_classes)
        head.load_state_dict({k.split(".", 1)[1]: v for k, v in head_tensors.items() if k.split(".", 1)[0] == task})
        heads[task] = head.requires_grad_(False).eval()
    inputs = {"pretrained": pretrained_sha, "heads": heads_sha}

    # 3. Experts: the whole encoder fine-tuned per task through its frozen head.
    experts: dict[str, StateDict] = {}
    for task in suite.task_names:
        seeds[f"expert/{task}"] = derive_seed(recipe.seed, "expert", task)

        def train_expert(task: str = task):
            encoder = load_encoder(encoder_cfg, pretrained)
            stats = finetune(
                encoder, [(suite[task], heads[task])], steps=recipe.expert_steps, batch_per_task=recipe.batch_size,
                lr=recipe.expert_lr, weight_decay=recipe.expert_weight_decay,
                warmup_fraction=recipe.expert_warmup_fraction, translate_px=recipe.translate_px,
                seed=seeds[f"expert/{task}"], device=device, progress=progress, desc=f"expert {task}",
            )  # fmt: skip
            accuracy = task_accuracy(encoder, heads[task], suite[task], device=device)
            return clone_state(encoder), {"steps": stats.steps, "final_loss": round(stats.final_loss, 4), "test_accuracy": accuracy}

        experts[task], _ = builder.step(f"expert/{task}", inputs, train_expert)

    # 4. Traditional multi-task learning: one encoder fine-tuned on all tasks jointly.
    seeds["mtl"] = derive_seed(recipe.seed, "mtl")

    def train_mtl():
        encoder = load_encoder(encoder_cfg, pretrained)
        stats = finetune(
            encoder, [(suite[t], heads[t]) for t in suite.task_names], steps=recipe.mtl_steps,
            batch_per_task=recipe.mtl_batch_per_task, lr=recipe.mtl_lr, weight_decay=recipe.expert_weight_decay,
            warmup_fraction=recipe.expert_warmup_fraction, translate_px=recipe.translate_px, seed=seeds["mtl"],
            device=device, progress=progress, desc="multi-task learning",
        )  # fmt: skip
        accuracy = {t: task_accuracy(encoder, heads[t], suite[t], device=device) for t in suite.task_names}
        return clone_state(encoder), {"steps": stats.steps, "final_loss": round(stats.final_loss, 4), "test_accuracy": accuracy}

    mtl, _ = builder.step("mtl", inputs, train_mtl)

    models = manifest["models"]
    manifest["seeds"] = seeds
    manifest["accuracy"] = {
        "pretrained": models["heads"]["test_accuracy"],
        "expert": {t: models[f"expert/{t}"]["test_accuracy"] for t in suite.task_names},
        "mtl": models["mtl"]["test_accuracy"],
    }
    manifest["train_wall_time_s"] = round(sum(m["wall_time_s"] for m in models.values()), 2)
    manifest["last_run_wall_time_s"] = round(time.perf_counter() - started, 2)
    builder.save_manifest()
    return Zoo(preset, directory, manifest, pretrained, heads, experts, mtl, suite)

