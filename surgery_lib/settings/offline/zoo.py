"""The model zoo: a pretrained encoder, frozen heads, one expert per task, and the multi-task baseline.

:func:`build_offline_zoo` (reached through :func:`surgery_lib.settings.build_zoo`) trains what is missing and loads what is already there. Every model is a safetensors
file next to a ``manifest.json`` that records, per model, its SHA-256, what it was trained from,
its test accuracies and wall time, plus the preset, config hash, seeds and package versions. The
manifest is rewritten (atomically) after every finished model, so an interrupted build resumes at the
last finished model, and inside the model it was training from that loop's last checkpoint (saved every
minute under ``checkpoints/``; :mod:`~surgery_lib.settings.offline.checkpoint`); a file whose checksum no
longer matches is rebuilt with a warning; a model whose inputs changed is rebuilt. Its inputs are the data, the
models it was trained from and the code that trains it (with the torch and open_clip versions), so a zoo in a
cache that outlived an edit of the training code, or an upgrade, is retrained rather than reused; the ``zoo``
command also retrains a model that another machine (device, thread count, CPU instruction set) trained.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.openclip import import_open_clip
from surgery_lib.core.project import __version__
from surgery_lib.core.state_dict import state_fingerprint
from surgery_lib.core.storage import (
    CorruptFileError,
    cache_root,
    config_hash,
    content_checksum,
    entry_lock,
    load_tensors,
    read_json,
    save_tensors,
    source_checksum,
    write_json,
)
from surgery_lib.evaluation import accuracy_from_features, task_accuracy
from surgery_lib.models import (
    ClassificationHead,
    StateDict,
    build_encoder,
    clone_state,
    load_encoder,
    resolve_device,
    task_features,
)
from surgery_lib.presets import Preset, get_preset, suite_identity
from surgery_lib.settings.base import EMBEDDINGS_DIR, Zoo
from surgery_lib.settings.offline.checkpoint import TrainingCheckpoint
from surgery_lib.settings.offline.suite import check_image_size, check_tasks, load_suite, suite_fingerprint
from surgery_lib.settings.offline.training import (
    TrainStats,
    derive_seed,
    finetune,
    fit_probe,
    pretrain,
)

log = logging.getLogger(__name__)

ZOO_FORMAT = 1
MANIFEST = "manifest.json"
#: The zoo's folder of mid-training checkpoints (one file per model being trained; none once the build finished).
CHECKPOINTS_DIR = "checkpoints"


#: Recipe fields added after zoos were first built, with the value every earlier zoo was trained with: at that
#: value they are left out of the hash, so an existing zoo keeps its name (and its cache) when the field appears.
_RECIPE_FIELDS_ADDED = {"expert_finetune": "full", "expert_lora_rank": 4}


def zoo_config_hash(preset: Preset) -> str:
    """The hash that names a zoo: the preset's encoder, data and recipe plus the zoo format."""
    recipe = dataclasses.asdict(preset.recipe) if preset.recipe is not None else None
    if recipe is not None:
        for name, default in _RECIPE_FIELDS_ADDED.items():
            if recipe.get(name) == default:
                del recipe[name]
    suite = suite_identity(preset.suite) if preset.suite is not None else None
    return config_hash({"format": ZOO_FORMAT, "encoder": preset.encoder, "suite": suite, "recipe": recipe})


def default_zoo_dir(preset: Preset, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<cache>/zoo/<preset>-<config hash>``: a changed config gets a fresh directory."""
    return cache_root(cache_dir) / "zoo" / f"{preset.name}-{zoo_config_hash(preset)}"


def package_versions() -> dict[str, str]:
    """Versions recorded in the manifest."""
    import numpy

    open_clip = import_open_clip()

    return {
        "surgery_lib": __version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def machine_record() -> dict[str, Any]:
    """What decides the last bits of a CPU build, recorded in the manifest by the build that last trained a model
    (each model records its own in ``built_on``): CPU kernels reduce in an order that depends on the thread count
    and the instruction set, so builds agree only to a tolerance (README)."""
    return {
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "system": platform.system(),
    }


def _check_manifest(manifest: dict[str, Any], preset: Preset, directory: Path) -> None:
    expected = zoo_config_hash(preset)
    if manifest.get("config_hash") != expected:
        raise SurgeryBookError(
            f"the zoo in {directory} was built for preset {manifest.get('preset')!r} with config "
            f"{manifest.get('config_hash')}, not for preset {preset.name!r} with config {expected}",
            "pass --rebuild (rebuild=True) to replace it, or choose another --zoo-dir",
        )


def _well_formed(manifest: Any) -> bool:
    """A manifest of this format: an object whose ``models`` map names to entries with a file and its SHA-256."""
    models = manifest.get("models") if isinstance(manifest, dict) else None
    return isinstance(models, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)
        for entry in models.values()
    )


@dataclass(frozen=True)
class _Built:
    """A finished step: its tensors and the checksum of its tensors (what later steps depend on)."""

    tensors: dict[str, torch.Tensor]
    content: str


#: The modules whose code decides a zoo model's weights and recorded accuracies: the encoder, the pretraining,
#: probing and fine-tuning loops and their checkpoints, evaluation, batching, state handling and this module (the
#: data is an input of its own, checked by content; the preset decides the zoo's folder).
TRAINING_MODULES = (
    "surgery_lib.models",
    "surgery_lib.settings.offline.training",
    "surgery_lib.settings.offline.checkpoint",
    "surgery_lib.finetuning",
    "surgery_lib.evaluation",
    "surgery_lib.core.taskdata",
    "surgery_lib.core.state_dict",
    __name__,
)


def training_sources() -> list[Path]:
    """The source files of :data:`TRAINING_MODULES`, in sorted order."""
    return sorted(Path(inspect.getfile(importlib.import_module(name))) for name in TRAINING_MODULES)


@functools.cache
def _training_code() -> str:
    """A checksum of :func:`training_sources` with the torch and open_clip versions: a model trained by other
    code, or under other versions, is retrained instead of reused (as a merge computed by other code is)."""
    versions = f"torch {torch.__version__}/open_clip {importlib.metadata.version('open_clip_torch')}"
    return f"{source_checksum(training_sources())}/{versions}"


def _built_on(device: torch.device) -> dict[str, Any]:
    """What besides the code decides the last bits of a trained model: kernels sum in an order that depends on
    the device, the thread count and the CPU instruction set."""
    machine = {
        "device": device.type,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def _described(machine: Any) -> str:
    """A recorded :func:`_built_on` in words: ``"cpu, 2 threads, AVX512"``."""
    if not isinstance(machine, dict):
        return "an unrecorded machine"
    parts = [str(machine.get("gpu") or machine.get("device"))]
    threads = machine.get("torch_threads")
    parts += [f"{threads} thread{'' if threads == 1 else 's'}", str(machine.get("cpu_capability"))]
    return ", ".join(parts)


class _Builder:
    """Runs the zoo's steps in order, reusing every step whose file and inputs are unchanged, and resuming a
    step that a killed run left half-trained from its checkpoint."""

    def __init__(self, directory: Path, manifest: dict[str, Any], device: torch.device, exact: bool):
        self.directory, self.manifest, self.device, self.exact = directory, manifest, device, exact
        self.built_on = _built_on(device)

    def save_manifest(self) -> None:
        write_json(self.manifest, self.directory / MANIFEST)

    def step(
        self,
        name: str,
        inputs: dict[str, _Built | str],
        train: Callable[[TrainingCheckpoint], tuple[dict[str, torch.Tensor], dict[str, Any]]],
    ) -> _Built:
        """Load model ``name`` if its file and inputs are unchanged, otherwise train and save it.

        ``inputs`` are the finished steps (and data checksums) the model is trained from, to which the training
        code's checksum is added; ``train(checkpoint)`` returns ``(tensors, record)``, the record (metrics, wall
        time) going into the manifest; its training loop saves to and resumes from ``checkpoint``, which is
        deleted once the model is saved.
        """
        entry = self.manifest["models"].get(name)
        file_name = name.replace("/", "-")
        path = self.directory / f"{file_name}.safetensors"
        depends_on = {k: v.content if isinstance(v, _Built) else v for k, v in inputs.items()}
        depends_on["code"] = _training_code()
        checkpoint = TrainingCheckpoint(
            self.directory / CHECKPOINTS_DIR / f"{file_name}.pt",
            key={
                "model": name,
                "config_hash": self.manifest["config_hash"],
                "depends_on": depends_on,
                "device": str(self.device),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "surgery_lib": __version__,
            },
        )
        reason = self._not_reusable_because(entry, depends_on, path) if entry else None
        if entry and reason is None:
            try:
                tensors, _ = load_tensors(path, expected_sha256=entry["sha256"])
                checkpoint.discard()  # left by a run killed between saving the model and deleting it
                return _Built(tensors, entry["content"])
            except CorruptFileError as exc:
                log.warning("zoo file %s; rebuilding it", exc.problem)
        elif entry:
            log.warning("rebuilding %s: %s", name, reason)
        started = time.perf_counter()
        tensors, record = train(checkpoint)
        sha = save_tensors(tensors, path, metadata={"model": name, "config_hash": self.manifest["config_hash"]})
        self.manifest["models"][name] = {
            "file": path.name,
            "sha256": sha,
            "content": content_checksum(path) or state_fingerprint(tensors),  # save_tensors recorded it in the header
            "depends_on": depends_on,
            "wall_time_s": round(checkpoint.earlier_s + time.perf_counter() - started, 2),  # with earlier runs'
            "built_on": self.built_on,
            **record,
        }
        self.manifest.update(machine=machine_record(), device=str(self.device))  # of the build, not of a later reader
        self.save_manifest()
        checkpoint.discard()
        return _Built(tensors, self.manifest["models"][name]["content"])

    def _not_reusable_because(self, entry: dict[str, Any], depends_on: dict[str, str], path: Path) -> str | None:
        """Why the finished model ``entry`` cannot be loaded as it is, or None when it can."""
        recorded = entry.get("depends_on")
        if not path.exists():
            return "its file is missing"
        if not isinstance(recorded, dict) or recorded.get("code") != depends_on["code"]:
            return f"it was trained by other training code or under other versions than these ({depends_on['code']})"
        if recorded != depends_on or not isinstance(entry.get("content"), str):
            return "the data or a model it was trained from changed"
        if self.exact and entry.get("built_on") != self.built_on:
            return (
                f"it was trained on {_described(entry.get('built_on'))} and this build runs on "
                f"{_described(self.built_on)}, where training sums in another order (exact=True, as the zoo command "
                "asks: other callers reuse it)"
            )
        return None


def _resumed(stats: TrainStats) -> dict[str, int]:
    """The manifest's note that a model was finished from a checkpoint (its wall time adds the earlier runs'
    seconds up to that checkpoint)."""
    return {"resumed_from_step": stats.resumed_from_step} if stats.resumed_from_step else {}


def clear_zoo(directory: Path) -> None:
    """Delete what a zoo build wrote in ``directory`` (its models, manifest, checkpoints, merges and embeddings) and
    nothing else.

    Raises:
        SurgeryBookError: ``directory`` holds files but no zoo manifest: it is not ours to delete.
    """
    if not directory.exists() or not any(directory.iterdir()):
        return
    try:
        manifest = read_json(directory / MANIFEST)
        files = [entry["file"] for entry in manifest["models"].values()]
    except (OSError, CorruptFileError, KeyError, TypeError, AttributeError):
        raise SurgeryBookError(
            f"{directory} is not a zoo directory (no readable {MANIFEST} listing its models); nothing was deleted",
            "pass an empty folder or one a zoo build created as --zoo-dir",
        ) from None
    for name in files:
        path = directory / Path(name).name  # only plain file names inside the folder: a manifest never points out of it
        path.unlink(missing_ok=True)  # a link is removed, never what it points to
    for folder, pattern in (
        (directory / "merges", "*.safetensors"),
        (directory / EMBEDDINGS_DIR, "*.safetensors"),
        (directory / CHECKPOINTS_DIR, "*.pt"),
    ):
        if folder.is_symlink():
            # A folder moved to another disk and linked back: deleting through the link would delete outside the
            # zoo. Its files are keyed by the zoo's weights (a checkpoint by its model's inputs), so a rebuilt
            # zoo never reuses them by mistake.
            log.warning("%s is a link; the files it points to are left in place", folder)
        elif folder.is_dir():
            for path in folder.glob(pattern):
                path.unlink()
    (directory / MANIFEST).unlink()


def build_offline_zoo(
    preset: str | Preset = "mini",
    *,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    zoo_dir: str | os.PathLike[str] | None = None,
    rebuild: bool = False,
    progress: bool = True,
    exact: bool = False,
) -> Zoo:
    """Build (or load) the zoo of ``preset``: pretrained encoder, heads, experts and the MTL baseline.

    Args:
        preset: preset name or object; its config hash names the zoo directory.
        device: ``"cpu"`` or ``"cuda"`` (default: the preset's default device).
        cache_dir: root of data and zoo caches (default ``$SURGERY_BOOK_CACHE`` or the user cache).
        zoo_dir: an explicit zoo directory (default ``<cache>/zoo/<preset>-<hash>``).
        rebuild: delete the zoo's own files in the directory (:func:`clear_zoo`) and train everything again.
        progress: show progress bars.
        exact: also retrain a model that another machine trained (another device, thread count or CPU
            instruction set: builds there agree with this machine's only to a tolerance, README), so that a cache
            restored on another machine ends up holding this machine's build. The ``zoo`` command asks for it;
            other callers (notebooks, tests, grid jobs, which run with one thread) reuse such a model. Either way a
            model trained from other data, other models, other training code or other torch and open_clip
            versions is retrained.

    Raises:
        SurgeryBookError: for an unknown preset, an unwritable cache, CUDA requested without a GPU, or
            an explicit ``zoo_dir`` that holds a zoo of another config (without ``rebuild``).
    """
    preset = get_preset(preset)
    if preset.suite is None or preset.recipe is None:
        raise SurgeryBookError(
            f"preset {preset.name!r} is not an offline preset", "build its zoo with surgery_lib.settings.build_zoo"
        )
    check_image_size(preset)
    check_tasks(preset.suite.tasks)
    device = resolve_device(device, preset.default_device)
    directory = Path(zoo_dir) if zoo_dir is not None else default_zoo_dir(preset, cache_dir)
    # One build per zoo at a time: a second run sharing the cache waits, then reuses what the first trained.
    with entry_lock(directory, f"the {preset.name} zoo in {directory}"):
        return _build_locked(preset, directory, device, cache_dir, rebuild, progress, exact)


def _build_locked(
    preset: Preset, directory: Path, device: torch.device, cache_dir: Any, rebuild: bool, progress: bool, exact: bool
) -> Zoo:
    if rebuild:
        clear_zoo(directory)
    directory.mkdir(parents=True, exist_ok=True)

    manifest: dict[str, Any] | None = None
    if (directory / MANIFEST).exists():
        try:
            manifest = read_json(directory / MANIFEST)
        except CorruptFileError as exc:
            log.warning("%s; starting the zoo afresh", exc.problem)
        if manifest is not None and not _well_formed(manifest):
            log.warning(
                "%s is not a zoo manifest (valid JSON of another shape); starting the zoo afresh", directory / MANIFEST
            )
            manifest = None
        if manifest is not None:
            _check_manifest(manifest, preset, directory)
    if manifest is None:
        manifest = {"format": ZOO_FORMAT, "preset": preset.name, "config_hash": zoo_config_hash(preset), "models": {}}
    manifest.update(
        config=preset.to_dict(),
        recipe_notes=list(preset.notes),
        versions=package_versions(),
    )
    started = time.perf_counter()
    suite = load_suite(preset, cache_dir=cache_dir, progress=progress)
    data = suite_fingerprint(suite)  # every model depends on the data: changed images or labels retrain them
    manifest["suite_content"] = data
    recipe, encoder_cfg = preset.recipe, preset.encoder
    builder = _Builder(directory, manifest, device, exact)
    seeds: dict[str, int] = {}

    # 1. Pretraining on the label-disjoint mix.
    seeds["pretrained"] = derive_seed(recipe.seed, "pretrained")

    def train_pretrained(checkpoint: TrainingCheckpoint):
        torch.manual_seed(seeds["pretrained"])
        encoder = build_encoder(encoder_cfg)
        stats = pretrain(
            encoder,
            suite.mix,
            epochs=recipe.pretrain_epochs,
            lr=recipe.pretrain_lr,
            weight_decay=recipe.pretrain_weight_decay,
            warmup_steps=recipe.pretrain_warmup_steps,
            batch_size=recipe.batch_size,
            translate_px=recipe.translate_px,
            seed=seeds["pretrained"],
            device=device,
            progress=progress,
            checkpoint=checkpoint,
        )
        return clone_state(encoder), {
            "steps": stats.steps,
            "images_seen": stats.images,
            "final_loss": round(stats.final_loss, 4),
            **_resumed(stats),
        }

    pretrained_step = builder.step("pretrained", {"suite": data}, train_pretrained)
    pretrained = pretrained_step.tensors
    pretrained_encoder = load_encoder(encoder_cfg, pretrained).to(device)

    # 2. Heads: linear probes on frozen pretrained embeddings (the stand-in for CLIP's zero-shot heads).
    seeds["heads"] = derive_seed(recipe.seed, "heads")

    def features(task: str, split: str, index: torch.Tensor | None = None) -> torch.Tensor:
        return task_features(pretrained_encoder, suite[task], split, index=index, device=device)[0]

    def train_heads(checkpoint: TrainingCheckpoint):  # seconds of full-batch fitting: nothing worth checkpointing
        tensors, accuracy = {}, {}
        for task in suite.task_names:
            seed = derive_seed(seeds["heads"], task)
            shots = suite[task].few_shot("train", recipe.probe_shots, seed)
            head = fit_probe(
                features(task, "train", shots),
                suite[task].labels["train"][shots],
                suite[task].num_classes,
                steps=recipe.probe_steps,
                lr=recipe.probe_lr,
                weight_decay=recipe.probe_weight_decay,
                seed=seed,
            )
            accuracy[task] = accuracy_from_features(features(task, "test"), head, suite[task].labels["test"])
            tensors.update({f"{task}.{k}": v for k, v in head.state_dict().items()})
        return tensors, {"test_accuracy": accuracy}

    heads_step = builder.step("heads", {"suite": data, "pretrained": pretrained_step}, train_heads)
    head_tensors = heads_step.tensors
    heads = {
        task: ClassificationHead.from_weights(
            head_tensors[f"{task}.linear.weight"], head_tensors[f"{task}.linear.bias"]
        )
        for task in suite.task_names
    }
    inputs = {"suite": data, "pretrained": pretrained_step, "heads": heads_step}

    # 3. Experts: the encoder fine-tuned per task through its frozen head (the recipe's expert_finetune mode).
    experts: dict[str, StateDict] = {}
    for task in suite.task_names:
        seeds[f"expert/{task}"] = derive_seed(recipe.seed, "expert", task)

        def train_expert(checkpoint: TrainingCheckpoint, task: str = task):
            stats, state = finetune(
                load_encoder(encoder_cfg, pretrained),
                [(suite[task], heads[task])],
                steps=recipe.expert_steps,
                batch_per_task=recipe.batch_size,
                lr=recipe.expert_lr,
                weight_decay=recipe.expert_weight_decay,
                warmup_fraction=recipe.expert_warmup_fraction,
                translate_px=recipe.translate_px,
                seed=seeds[f"expert/{task}"],
                device=device,
                progress=progress,
                desc=f"expert {task}",
                mode=recipe.expert_finetune,
                lora_rank=recipe.expert_lora_rank,
                checkpoint=checkpoint,
            )
            # Evaluated as every merge is: the plain encoder at the exported weights theta_0 + tau.
            accuracy = task_accuracy(load_encoder(encoder_cfg, state), heads[task], suite[task], device=device)
            record = {"steps": stats.steps, "final_loss": round(stats.final_loss, 4), "test_accuracy": accuracy}
            return state, {**record, **_resumed(stats)}

        experts[task] = builder.step(f"expert/{task}", inputs, train_expert).tensors

    # 4. Traditional multi-task learning: one encoder fine-tuned on all tasks jointly.
    seeds["mtl"] = derive_seed(recipe.seed, "mtl")

    def train_mtl(checkpoint: TrainingCheckpoint):
        encoder = load_encoder(encoder_cfg, pretrained)
        stats, _ = finetune(
            encoder,
            [(suite[t], heads[t]) for t in suite.task_names],
            steps=recipe.mtl_steps,
            batch_per_task=recipe.mtl_batch_per_task,
            lr=recipe.mtl_lr,
            weight_decay=recipe.expert_weight_decay,
            warmup_fraction=recipe.expert_warmup_fraction,
            translate_px=recipe.translate_px,
            seed=seeds["mtl"],
            device=device,
            progress=progress,
            desc="multi-task learning",
            checkpoint=checkpoint,
        )
        accuracy = {t: task_accuracy(encoder, heads[t], suite[t], device=device) for t in suite.task_names}
        return clone_state(encoder), {
            "steps": stats.steps,
            "final_loss": round(stats.final_loss, 4),
            "test_accuracy": accuracy,
            **_resumed(stats),
        }

    mtl = builder.step("mtl", inputs, train_mtl).tensors

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
    return Zoo(preset, directory, manifest, pretrained, heads, experts, mtl, suite, data_fingerprint=data)
