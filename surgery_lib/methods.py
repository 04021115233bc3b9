"""Every merging method behind one name, run on a zoo: the layer the command line and notebooks use."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from surgery_lib import merging
from surgery_lib.errors import SurgeryBookError
from surgery_lib.evaluation import accuracy_from_features, evaluate_tasks, results_table
from surgery_lib.models import load_encoder, resolve_device
from surgery_lib.presets import config_hash

if TYPE_CHECKING:
    import pandas as pd

    from surgery_lib.zoo import Zoo

log = logging.getLogger(__name__)

#: Method name -> the label it gets in tables.
METHODS: dict[str, str] = {
    "weight_averaging": "weight averaging",
    "fisher": "Fisher merging",
    "regmean": "RegMean",
    "task_arithmetic": "task arithmetic",
    "ties": "TIES-merging (disjoint sum)",
    "ties_mean": "TIES-merging (disjoint mean)",
    "adamerging_task": "task-wise AdaMerging",
    "adamerging_layer": "layer-wise AdaMerging",
    "adamerging_plus_task": "task-wise AdaMerging++",
    "adamerging_plus": "layer-wise AdaMerging++",
}

#: Methods that trim task vectors the TIES way (their label names the kept fraction on real CLIP).
TRIMMING = ("ties", "ties_mean", "adamerging_plus_task", "adamerging_plus")

#: The rows of the papers' main table, in their order (plus the zoo's reference rows first).
MAIN_TABLE = (
    "weight_averaging", "fisher", "regmean", "task_arithmetic", "ties",
    "adamerging_task", "adamerging_layer", "adamerging_plus_task", "adamerging_plus",
)  # fmt: skip


#: The merges the papers repair with Surgery and SurgeryV2 (their main table's rows).
REPAIRED = (
    "weight_averaging", "task_arithmetic", "ties", "adamerging_task", "adamerging_layer", "adamerging_plus_task",
    "adamerging_plus",
)  # fmt: skip


@dataclass(frozen=True)
class MergeOptions:
    """Options of every method; ``None`` means the method's (or preset's) default."""

    scale: float | None = None  # task arithmetic 0.3; TIES: its operating point's scale
    keep_fraction: float = 0.2  # TIES / AdaMerging++: top-k fraction kept (of the image tower + text leftovers on real CLIP)
    steps: int | None = None  # AdaMerging: the preset's adamerging_steps
    batch_size: int | None = None  # AdaMerging: the preset's adamerging_batch_size
    batches_per_task: int = 2
    lr: float = 1e-3
    split: str = "test"  # unlabeled images for AdaMerging: "test" (the paper) or "adapt" (held out)
    samples: int = 256  # Fisher / RegMean: train images per task
    alpha: float = 0.95  # RegMean off-diagonal scale
    seed: int = 0
    precision: str | None = None  # AdaMerging on a GPU: the preset's (fp32 for real CLIP)


@dataclass
class MergeResult:
    """A merged state dict, how long it took, and method-specific details (e.g. AdaMerging coefficients)."""

    method: str
    state: dict[str, torch.Tensor]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def check_method(method: str) -> str:
    """Raise a clear error for an unknown method name."""
    if method not in METHODS:
        raise SurgeryBookError(f"unknown merging method {method!r}", f"use one of: {', '.join(METHODS)}")
    return method


def ties_zero_entries(zoo: Zoo) -> int:
    """The all-zero entries the official TIES trimmed together with this zoo's task vectors (real CLIP's text leftovers)."""
    return zoo.preset.clip.ties_text_entries if zoo.preset.clip is not None else 0


def method_label(zoo: Zoo, method: str, options: MergeOptions | None = None) -> str:
    """The table label of ``method`` on ``zoo``: on real CLIP the TIES-trimming methods say how much of the
    image tower their top-k keeps (the official scope includes the text leftovers)."""
    label = METHODS[check_method(method)]
    extra = ties_zero_entries(zoo)
    if method in TRIMMING and extra:
        keep = (options or MergeOptions()).keep_fraction
        entries = sum(v.numel() for k, v in zoo.pretrained.items() if v.is_floating_point())
        label += f" [top {keep:.0%} of tower + text leftovers = {100 * merging.kept_fraction(entries, keep, extra):.2f} % of the tower]"
    return label


def _subset(zoo: Zoo, task: str, count: int, seed: int) -> torch.Tensor:
    data = zoo.suite[task]
    index = torch.randperm(len(data.labels["train"]), generator=torch.Generator().manual_seed(seed))[:count]
    return data.normalized("train", index)


def merge(
    zoo: Zoo,
    method: str,
    options: MergeOptions | None = None,
    *,
    tasks: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> MergeResult:
    """Merge ``zoo``'s experts (all, or ``tasks``) with ``method``; see :data:`METHODS`."""
    check_method(method)
    options = options or MergeOptions()
    device = resolve_device(device, zoo.preset.default_device)
    names = list(tasks) if tasks is not None else list(zoo.tasks)
    experts = {t: zoo.experts[t] for t in names}
    started = time.perf_counter()
    details: dict[str, Any] = {}
    if method == "weight_averaging":
        state = merging.weight_averaging(zoo.pretrained, experts)
    elif method == "task_arithmetic":
        scale = 0.3 if options.scale is None else options.scale
        state, details["scale"] = merging.task_arithmetic(zoo.pretrained, experts, scale), scale
    elif method in ("ties", "ties_mean"):
        point = dict(merging.TIES_OPERATING_POINTS[method])
        if options.scale is not None:
            point["scale"] = options.scale
        state = merging.ties_merging(
            zoo.pretrained, experts, keep_fraction=options.keep_fraction, zero_entries=ties_zero_entries(zoo), **point  # type: ignore[arg-type]
        )
        details.update(point, keep_fraction=options.keep_fraction, zero_entries=ties_zero_entries(zoo))
    elif method == "fisher":
        from surgery_lib.fisher import diagonal_fisher, fisher_merging

        fishers = {
            t: diagonal_fisher(zoo.encoder(t), zoo.heads[t], _subset(zoo, t, options.samples, options.seed), device, progress)
            for t in names
        }
        state = fisher_merging(experts, fishers)
    elif method == "regmean":
        from surgery_lib.regmean import gram_matrices, regmean_merging

        grams = {t: gram_matrices(zoo.encoder(t), _subset(zoo, t, options.samples, options.seed), device=device) for t in names}
        state = regmean_merging(experts, grams, alpha=options.alpha)
    else:
        from surgery_lib.adamerging import adamerging

        vectors = merging.task_vectors(zoo.pretrained, experts)
        if method in ("adamerging_plus", "adamerging_plus_task"):
            trimmed = merging.ties_vectors(list(vectors.values()), options.keep_fraction, ties_zero_entries(zoo))
            vectors = dict(zip(vectors, trimmed))
        result = adamerging(
            zoo.encoder("pretrained"), zoo.pretrained, vectors, zoo.heads, {t: zoo.suite[t] for t in names},
            granularity="task" if method in ("adamerging_task", "adamerging_plus_task") else "layer", split=options.split,
            steps=options.steps if options.steps is not None else zoo.preset.adamerging_steps,
            batch_size=options.batch_size or zoo.preset.adamerging_batch_size,
            batches_per_task=options.batches_per_task, lr=options.lr, seed=options.seed, device=device,
            precision=options.precision or zoo.preset.precision, progress=progress,
        )  # fmt: skip
        state, details["adamerging"] = result.merged, result
    return MergeResult(method, state, time.perf_counter() - started, details)


def merge_cache_path(zoo: Zoo, method: str, options: MergeOptions, tasks: Sequence[str]) -> Path:
    """Where :func:`cached_merge` keeps a merge: ``<zoo>/merges/<method>-<hash of options and tasks>.safetensors``."""
    key = config_hash({"method": method, "options": dataclasses.asdict(options), "tasks": list(tasks)})
    return Path(zoo.directory) / "merges" / f"{method}-{key}.safetensors"


def cached_merge(
    zoo: Zoo,
    method: str,
    options: MergeOptions | None = None,
    *,
    tasks: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> MergeResult:
    """:func:`merge`, stored next to the zoo and reused by later calls with the same method, options and tasks.

    AdaMerging takes about 30 s on the mini preset and minutes for CLIP, so the notebooks share their
    merges through this cache. A damaged cache file is recomputed, never trusted; writes are atomic.
    """
    from surgery_lib.storage import CorruptFileError, load_tensors, save_tensors

    check_method(method)
    options = options or MergeOptions()
    names = list(tasks) if tasks is not None else list(zoo.tasks)
    path = merge_cache_path(zoo, method, options, names)
    if path.exists():
        try:
            tensors, metadata = load_tensors(path)
            return _merge_from_cache(method, tensors, metadata)
        except (CorruptFileError, KeyError, ValueError) as exc:
            log.warning("recomputing the %s merge: the cached %s is unusable (%s)", method, path, exc)
    result = merge(zoo, method, options, tasks=names, device=device, progress=progress)
    tensors = {f"state/{k}": v for k, v in result.state.items()}
    metadata = {"method": method, "seconds": repr(result.seconds), "tasks": json.dumps(names)}
    if "adamerging" in result.details:
        found = result.details["adamerging"]
        tensors["adamerging/coefficients"] = found.coefficients
        metadata.update(keys=json.dumps(list(found.keys)), entropy=json.dumps(found.entropy))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, path, metadata)
    return result


def _merge_from_cache(method: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> MergeResult:
    from surgery_lib.adamerging import AdaMergingResult

    state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("state/")}
    if metadata.get("method") != method or not state:
        raise ValueError("the file holds another merge")
    details: dict[str, Any] = {}
    if "adamerging/coefficients" in tensors:
        details["adamerging"] = AdaMergingResult(
            tuple(json.loads(metadata["tasks"])), tuple(json.loads(metadata["keys"])),
            tensors["adamerging/coefficients"], state, json.loads(metadata["entropy"]),
        )  # fmt: skip
    return MergeResult(method, state, float(metadata["seconds"]), details)


def scale_sweep(
    zoo: Zoo,
    scales: Sequence[float],
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    with_entropy: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Task arithmetic at every scale lambda: test accuracy (%) per task and average, one row per scale.

    With ``with_entropy`` also the mean prediction entropy (nats) of each task's test images through its
    head: the quantity AdaMerging minimises, to check whether lower entropy means higher accuracy.
    """
    from surgery_lib.adamerging import prediction_entropy
    from surgery_lib.models import embed
    from surgery_lib.progress import tqdm

    device = resolve_device(device, zoo.preset.default_device)
    vectors = list(merging.task_vectors(zoo.pretrained, zoo.experts).values())
    accuracy, entropy = {}, {}
    for scale in tqdm(scales, desc="task arithmetic sweep", disable=not progress):
        encoder = load_encoder(zoo.preset.encoder, merging.add_vectors(zoo.pretrained, vectors, [float(scale)] * len(vectors)))
        accuracy[float(scale)], entropy[float(scale)] = {}, {}
        for task in zoo.tasks:
            data = zoo.suite[task]
            features = embed(encoder, data.images["test"], data.mean, data.std, device=device)
            accuracy[float(scale)][task] = accuracy_from_features(features, zoo.heads[task], data.labels["test"])
            with torch.inference_mode():
                entropy[float(scale)][task] = prediction_entropy(zoo.heads[task](features)).mean().item()
    accuracy_table = results_table(accuracy).rename_axis("scale")
    if not with_entropy:
        return accuracy_table
    return accuracy_table, results_table(entropy).rename_axis("scale")


def evaluate_merge(zoo: Zoo, result: MergeResult, device: str | torch.device | None = None) -> dict[str, float]:
    """Test accuracy (%) of a merged model on each of its tasks."""
    device = resolve_device(device, zoo.preset.default_device)
    encoder = load_encoder(zoo.preset.encoder, result.state)
    return evaluate_tasks(encoder, zoo.heads, {t: zoo.suite[t] for t in zoo.tasks}, device=device)


def main_table(
    zoo: Zoo,
    methods: Sequence[str] = MAIN_TABLE,
    options: MergeOptions | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    cache: bool = True,
) -> tuple[pd.DataFrame, dict[str, MergeResult]]:
    """The papers' main table for ``zoo``: reference rows, then one row per method (test accuracy, %).

    With ``cache`` the merges are reused from (and stored in) the zoo's merge cache (:func:`cached_merge`).
    """
    rows = zoo.reference_rows()
    results = {}
    for method in methods:
        run = cached_merge if cache else merge
        result = run(zoo, method, options, device=device, progress=progress)
        rows[method_label(zoo, method, options)] = evaluate_merge(zoo, result, device)
        results[method] = result
    return results_table(rows), results


def with_options(options: MergeOptions, **changes: Any) -> MergeOptions:
    """``options`` with ``changes`` applied, ignoring changes that are None."""
    return dataclasses.replace(options, **{k: v for k, v in changes.items() if v is not None})
