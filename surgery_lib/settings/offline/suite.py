"""The offline task suite: generated once, cached atomically, loaded as tensors and DataLoaders.

Each task is cached as one safetensors file named by a hash of everything that determines its pixels
(generator version, seed, split sizes), so a change to any of them regenerates the file and two
presets with the same sizes share it. Images stay uint8 (N, 3, 32, 32) in memory; they are
normalised per batch, which keeps even the GPU preset's 400k images at 1.2 GB.
"""

from __future__ import annotations

import functools
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import surgery_lib.settings.offline.generators as gen
from surgery_lib.core.errors import SurgeryBookError, use_one_of
from surgery_lib.core.progress import tqdm
from surgery_lib.core.storage import (
    CorruptFileError,
    cache_root,
    config_hash,
    content_checksum,
    entry_lock,
    load_tensors,
    save_tensors,
    sha256_file,
)
from surgery_lib.core.taskdata import Suite, TaskData
from surgery_lib.core.workers import worker_pool
from surgery_lib.presets import EncoderConfig, Preset, SuiteConfig, get_preset

if TYPE_CHECKING:
    import pandas as pd
    import torch

log = logging.getLogger(__name__)

#: The eight offline tasks, in the order of the paper's tables (SUN397 ... DTD have stand-ins here).
OFFLINE_TASKS: tuple[str, ...] = (
    "photo_patches",
    "shapes",
    "landcover",
    "signs",
    "street_digits",
    "mnist",
    "letters",
    "textures",
)

#: Images rendered per worker job; fixed so that results never depend on the number of workers.
CHUNK = 500
MIX_NAME = gen.MIX.name


def check_image_size(preset: Preset) -> None:
    """Refuse an offline preset whose encoder expects images of another size than the suite's (before any
    data is generated or model trained).

    Raises:
        SurgeryBookError: naming both sizes.
    """
    if preset.encoder.image_size != gen.SIZE:
        raise SurgeryBookError(
            f"preset {preset.name!r}: encoder.image_size = {preset.encoder.image_size}, but the offline suite's images are {gen.SIZE} x {gen.SIZE}",
            f"use encoder.image_size {gen.SIZE} (and a patch size that divides it) for an offline preset",
        )


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """Validate task names against the offline suite.

    Raises:
        SurgeryBookError: naming the unknown task and listing the known ones.
    """
    for task in tasks:
        if task not in gen.TASKS:
            raise SurgeryBookError(f"unknown task {task!r}", use_one_of(task, gen.TASKS))
    if len(set(tasks)) != len(tasks):
        raise SurgeryBookError(f"task list {list(tasks)} repeats a task", "name every task once")
    return tuple(tasks)


def split_sizes(task: str, config: SuiteConfig) -> dict[str, int]:
    """Images per split for ``task`` (``validation`` only where the suite has one); MNIST's train split is
    capped by the 5,000 real digits available, less those its other splits take."""
    if task == MIX_NAME:
        return {"train": config.mix_per_class * len(gen.MIX_CLASSES)}
    sizes = {"train": config.train_per_task, "adapt": config.adapt_per_task, "test": config.test_per_task}
    if config.validation_per_task:
        sizes["validation"] = config.validation_per_task
    if task == "mnist":
        available = gen.MNIST_POOL_SIZE - sum(count for split, count in sizes.items() if split != "train")
        if available < 1:
            raise SurgeryBookError(
                f"the MNIST task's adapt, test and validation splits ask for {gen.MNIST_POOL_SIZE - available} of "
                f"its {gen.MNIST_POOL_SIZE} real digits and leave none to train on",
                "lower suite.adapt_per_task, suite.test_per_task or suite.validation_per_task",
            )
        sizes["train"] = min(sizes["train"], available)
    return sizes


def _task_key(task: str, config: SuiteConfig) -> str:
    sizes = (
        {"mix_per_class": config.mix_per_class}
        if task == MIX_NAME
        else {k: getattr(config, k) for k in ("train_per_task", "adapt_per_task", "test_per_task")}
    )
    if task != MIX_NAME and config.validation_per_task:  # absent otherwise: the files of suites without one stay
        sizes["validation_per_task"] = config.validation_per_task
    return config_hash({"generator": gen.GENERATOR_VERSION, "task": task, "seed": config.seed, **sizes})


def _task_seed(task: str) -> int:
    # Stable across processes and Python versions (unlike hash()), and independent of task order.
    return zlib.crc32(task.encode())


def _spec(task: str) -> gen.TaskSpec:
    return gen.MIX if task == MIX_NAME else gen.TASKS[task]


def _render_job(task: str, split: str, labels: np.ndarray, seed: tuple[int, ...]) -> np.ndarray:
    return gen.render_batch(_spec(task), labels, split, seed)


def _render_star(job: tuple[str, str, int, np.ndarray, tuple[int, ...], str]) -> np.ndarray:
    task, _, _, labels, seed, render_as = job
    return _render_job(task, render_as, labels, seed)


def data_cards(config: SuiteConfig) -> pd.DataFrame:
    """Data cards for ``config``'s tasks and the pretraining mix, as a DataFrame indexed by task."""
    import pandas as pd

    rows = []
    for task in (*config.tasks, MIX_NAME):
        spec = _spec(task)
        sizes = split_sizes(task, config)
        rows.append(
            {
                "task": task,
                "stands in for": spec.stands_in_for,
                "classes": spec.num_classes,
                "train": sizes.get("train", 0),
                "adapt": sizes.get("adapt", 0),
                "test": sizes.get("test", 0),
                **({"validation": sizes.get("validation", 0)} if config.validation_per_task else {}),
                "source": spec.source,
                "licence": spec.licence,
            }
        )
    return pd.DataFrame(rows).set_index("task")


def _suite_dir(root: Path) -> Path:
    return root / "data" / f"v{gen.GENERATOR_VERSION}"


def task_file(task: str, config: SuiteConfig, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``task``'s cached images live for ``config``."""
    return _task_path(cache_root(cache_dir), task, config)


def _task_path(root: Path, task: str, config: SuiteConfig) -> Path:
    return _suite_dir(root) / f"{task}-{_task_key(task, config)}.safetensors"


def _generate(
    tasks: Sequence[str], config: SuiteConfig, workers: int, progress: bool
) -> dict[str, dict[str, np.ndarray]]:
    """Render every split of ``tasks``; returns ``{task: {"<split>_images": ..., "<split>_labels": ...}}``."""

    arrays: dict[str, dict[str, np.ndarray]] = {}
    jobs: list[tuple[str, str, int, np.ndarray, tuple[int, ...], str]] = []
    for task in tasks:
        spec, sizes = _spec(task), split_sizes(task, config)
        arrays[task] = {}
        if spec.render is None:  # a real pool: gather the split's digits directly
            pool_images, pool_labels = gen.mnist_pool()
            for split, index in gen.mnist_split_indices(config.seed, sizes).items():
                arrays[task][f"{split}_images"] = np.stack([gen.render_mnist_digit(d) for d in pool_images[index]])
                arrays[task][f"{split}_labels"] = pool_labels[index]
            continue
        for split, count in sizes.items():
            split_id = gen.SPLITS.index(split)  # seeds by the split's name, not its place: adding one moves none
            labels = gen.balanced_labels(spec.num_classes, count, (config.seed, _task_seed(task), split_id))
            arrays[task][f"{split}_labels"] = labels
            arrays[task][f"{split}_images"] = np.empty((count, gen.SIZE, gen.SIZE, 3), np.uint8)
            for start in range(0, count, CHUNK):
                seed = (config.seed, _task_seed(task), split_id, start)
                render_as = gen.render_split(split, "validation" in sizes)
                jobs.append((task, split, start, labels[start : start + CHUNK], seed, render_as))

    bar = tqdm(total=sum(len(j[3]) for j in jobs), desc="generating images", unit="img", disable=not progress)
    with bar:
        if workers <= 1 or len(jobs) <= 1:
            for task, split, start, labels, seed, render_as in jobs:
                images = _render_job(task, render_as, labels, seed)
                arrays[task][f"{split}_images"][start : start + len(labels)] = images
                bar.update(len(labels))
        else:
            with worker_pool(workers) as pool:
                for (task, split, start, labels, _, _), images in zip(jobs, pool.imap(_render_star, jobs)):
                    arrays[task][f"{split}_images"][start : start + len(labels)] = images
                    bar.update(len(labels))
    return arrays


def _to_task_data(task: str, tensors: dict[str, torch.Tensor], encoder: EncoderConfig | None) -> TaskData:
    spec = _spec(task)
    splits = sorted({name.rsplit("_", 1)[0] for name in tensors}, key=lambda s: gen.SPLITS.index(s))
    kwargs = {"mean": encoder.mean, "std": encoder.std} if encoder else {}
    return TaskData(
        name=task,
        class_names=spec.class_names,
        images={s: tensors[f"{s}_images"] for s in splits},
        labels={s: tensors[f"{s}_labels"] for s in splits},
        **kwargs,
    )


def _read_cached(path: Path, task: str, config: SuiteConfig) -> dict[str, torch.Tensor] | None:
    """The cached tensors of ``task``, or None if missing or unusable (with a warning saying why)."""
    if not path.exists():
        return None
    try:
        tensors, metadata = load_tensors(path)
        if metadata.get("key") != _task_key(task, config):
            raise CorruptFileError(path, "its metadata names another configuration")
        for split, count in split_sizes(task, config).items():
            if tuple(tensors[f"{split}_images"].shape) != (count, 3, gen.SIZE, gen.SIZE):
                raise CorruptFileError(path, f"{split} split has the wrong shape")
    except (CorruptFileError, KeyError) as exc:
        log.warning("%s; regenerating it", exc.problem if isinstance(exc, CorruptFileError) else exc)
        return None
    return tensors


def load_suite(
    preset: str | Preset | SuiteConfig = "mini",
    *,
    tasks: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Suite:
    """Load the offline suite of ``preset``, generating and caching any task that is not cached yet.

    Args:
        preset: a preset name, a :class:`Preset`, or a bare :class:`SuiteConfig`.
        tasks: a subset of the preset's tasks (default: all of them).
        cache_dir: overrides ``$SURGERY_BOOK_CACHE`` and the user cache directory.
        workers: processes used to render images (default: all cores, at most 8).
        progress: show a progress bar while generating.

    Returns:
        A :class:`Suite` whose images are uint8 (N, 3, 32, 32) tensors, normalised on access with the
        preset encoder's mean and std.
    """

    encoder = None
    if isinstance(preset, SuiteConfig):
        config = preset
    else:
        resolved = get_preset(preset)
        config, encoder = resolved.suite, resolved.encoder
        if config is None:
            raise SurgeryBookError(
                f"preset {resolved.name!r} has no offline task suite",
                "load its data with surgery_lib.settings.load_suite",
            )
        check_image_size(resolved)
    names = check_tasks(tasks if tasks is not None else config.tasks)
    root = cache_root(cache_dir)
    _suite_dir(root).mkdir(parents=True, exist_ok=True)
    files = {task: _task_path(root, task, config) for task in (*names, MIX_NAME)}

    with entry_lock(_suite_dir(root), "the offline task data"):  # two runs sharing a cache generate it once
        loaded = _load_or_generate(files, config, workers, progress)
    task_data = {task: _to_task_data(task, loaded[task], encoder) for task in names}  # type: ignore[arg-type]
    mix = _to_task_data(MIX_NAME, loaded[MIX_NAME], encoder)  # type: ignore[arg-type]
    return Suite(config=config, tasks=task_data, mix=mix, files=files, describe=functools.partial(data_cards, config))


def suite_fingerprint(suite: Suite) -> str:
    """A checksum of every image and label of ``suite`` (tasks and mix), read from its files' headers.

    The zoo records it with each model, so a suite whose content changed retrains the models built on it.
    """
    return config_hash(
        {task: content_checksum(path) or sha256_file(path) for task, path in sorted(suite.files.items())}
    )


def _load_or_generate(
    files: dict[str, Path], config: SuiteConfig, workers: int | None, progress: bool
) -> dict[str, dict[str, torch.Tensor]]:
    import torch

    loaded = {task: _read_cached(path, task, config) for task, path in files.items()}
    missing = [task for task, tensors in loaded.items() if tensors is None]
    if missing:
        workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
        generated = _generate(missing, config, workers, progress)
        for task in missing:
            tensors = {}
            for name, array in generated[task].items():
                tensor = torch.from_numpy(np.ascontiguousarray(array))
                tensors[name] = tensor.permute(0, 3, 1, 2).contiguous() if name.endswith("_images") else tensor
            save_tensors(tensors, files[task], metadata={"key": _task_key(task, config), "task": task})
            loaded[task] = tensors
    return loaded  # type: ignore[return-value]
