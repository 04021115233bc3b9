"""Every registered merging method run on a zoo, by name: merge, the merge cache, evaluation and the main
table. This is the layer the command line and the notebooks use."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from surgery_lib.core.errors import SurgeryBookError, refuse_text
from surgery_lib.core.progress import tqdm
from surgery_lib.core.state_dict import state_fingerprint
from surgery_lib.core.storage import (
    CorruptFileError,
    config_hash,
    entry_lock,
    load_tensors,
    save_tensors,
    source_checksum,
)
from surgery_lib.evaluation import accuracy_from_features, results_table
from surgery_lib.merging.adamerging import AdaMergingResult, prediction_entropy
from surgery_lib.merging.base import (
    MAIN_TABLE,
    MergeOptions,
    MergeResult,
    get_method,
    ties_zero_entries,
)
from surgery_lib.merging.options import as_merge_options
from surgery_lib.merging.ties import kept_fraction
from surgery_lib.merging.vectors import add_vectors, task_vectors
from surgery_lib.models import load_encoder, resolve_device

if TYPE_CHECKING:
    import pandas as pd

    from surgery_lib.settings.base import Zoo

log = logging.getLogger(__name__)


def method_label(zoo: Zoo, method: str, options: MergeOptions | None = None) -> str:
    """The table label of ``method`` on ``zoo``: on real CLIP the TIES-trimming methods say how much of the
    image tower their top-k keeps (the official scope includes the text leftovers)."""
    spec = get_method(method)
    extra = ties_zero_entries(zoo)
    if not (spec.trims and extra):
        return spec.label
    keep = as_merge_options(options).keep_fraction
    entries = sum(v.numel() for v in zoo.pretrained.values() if v.is_floating_point())
    return (
        spec.label
        + f" [top {keep:.0%} of tower + text leftovers = {100 * kept_fraction(entries, keep, extra):.2f} % of the tower]"
    )


def merge(
    zoo: Zoo,
    method: str,
    options: MergeOptions | None = None,
    *,
    tasks: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> MergeResult:
    """Merge ``zoo``'s experts (all, or ``tasks``) with the registered ``method`` (see :data:`~surgery_lib.merging.base.METHODS`)."""
    spec = get_method(method)
    options = as_merge_options(options)
    device = resolve_device(device, zoo.preset.default_device)
    experts = {t: zoo.experts[t] for t in zoo.task_subset(tasks)}
    started = time.perf_counter()
    state, details = spec.run(zoo, experts, options, device, progress)
    broken = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise SurgeryBookError(
            f"the {method} merge produced NaN or infinite weights ({len(broken)} tensors, e.g. {broken[0]!r})",
            f"check the options it reads ({', '.join(spec.reads) or 'none'}): a value this large overflows",
        )
    return MergeResult(method, state, time.perf_counter() - started, details)


def merge_cache_path(zoo: Zoo, method: str, options: MergeOptions, tasks: Sequence[str]) -> Path:
    """Where :func:`cached_merge` keeps a merge: ``<zoo>/merges/<method>-<hash>.safetensors``, the hash of the
    options the method reads (:attr:`~surgery_lib.merging.base.MergeMethod.reads`), the tasks, and what else
    decides the merged weights: the zoo's data checksum (the images data-driven merges read), the merging code
    and torch version (:func:`_merging_code`) and torch's thread count (learned merges differ in the last bits
    between thread counts). The zoo's weights are checked apart, from the file's metadata."""
    key = config_hash(
        {
            "method": method,
            "options": get_method(method).key_options(options),
            "tasks": list(tasks),
            "data": zoo.data_fingerprint,
            "code": _merging_code(),
            "threads": torch.get_num_threads(),
        }
    )
    return Path(zoo.directory) / "merges" / f"{method}-{key}.safetensors"


@functools.cache
def _merging_code() -> str:
    """A checksum of the code a merge runs, this package and the encoder module, with the torch version: after
    an edit there, or under another torch, cached merges are computed afresh instead of reused."""
    source = source_checksum([*Path(__file__).parent.glob("*.py"), inspect.getfile(load_encoder)])
    return f"{source}/torch {torch.__version__}"


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
    get_method(method)
    options = as_merge_options(options)
    names = zoo.task_subset(tasks)
    path = merge_cache_path(zoo, method, options, names)
    if path.exists():
        try:
            tensors, metadata = load_tensors(path)
            if metadata.get("zoo") != zoo.weights_fingerprint():
                raise ValueError("it was merged from other weights: the zoo was rebuilt since")
            return _merge_from_cache(method, tensors, metadata)
        except (CorruptFileError, KeyError, ValueError) as exc:
            log.warning("recomputing the %s merge: the cached %s is unusable (%s)", method, path, exc)
    with entry_lock(path, f"the {method} merge"):  # a concurrent run computing the same merge: wait and reuse it
        if path.exists():
            with contextlib.suppress(CorruptFileError, KeyError, ValueError):
                tensors, metadata = load_tensors(path)
                if metadata.get("zoo") == zoo.weights_fingerprint():
                    return _merge_from_cache(method, tensors, metadata)
        return _compute_and_cache(zoo, method, options, names, path, device, progress)


def _compute_and_cache(
    zoo: Zoo,
    method: str,
    options: MergeOptions,
    names: list[str],
    path: Path,
    device: str | torch.device | None,
    progress: bool,
) -> MergeResult:
    result = merge(zoo, method, options, tasks=names, device=device, progress=progress)
    tensors = {f"state/{k}": v for k, v in result.state.items()}
    metadata = {
        "method": method,
        "seconds": repr(result.seconds),
        "tasks": json.dumps(names),
        "zoo": zoo.weights_fingerprint(),
    }
    if "tuned" in result.details:  # what a search chose, and from what: kept with the weights
        metadata["tuned"] = json.dumps(result.details["tuned"])
    if "adamerging" in result.details:
        found = result.details["adamerging"]
        tensors["adamerging/coefficients"] = found.coefficients
        metadata.update(keys=json.dumps(list(found.keys)), entropy=json.dumps(found.entropy))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, path, metadata)
    return result


def _merge_from_cache(method: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> MergeResult:
    state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("state/")}
    if metadata.get("method") != method or not state:
        raise ValueError("the file holds another merge")
    details: dict[str, Any] = {}
    if "tuned" in metadata:
        details["tuned"] = json.loads(metadata["tuned"])
    if "adamerging/coefficients" in tensors:
        details["adamerging"] = AdaMergingResult(
            tuple(json.loads(metadata["tasks"])),
            tuple(json.loads(metadata["keys"])),
            tensors["adamerging/coefficients"],
            state,
            json.loads(metadata["entropy"]),
        )
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
    refuse_text("scales", scales, "pass a list of numbers, e.g. scales=[0.1, 0.3, 0.5]")
    device = resolve_device(device, zoo.preset.default_device)
    vectors = list(task_vectors(zoo.pretrained, zoo.experts).values())
    accuracy, entropy = {}, {}
    for scale in tqdm(scales, desc="task arithmetic sweep", disable=not progress):
        state = add_vectors(zoo.pretrained, vectors, [float(scale)] * len(vectors))
        encoder, fingerprint = load_encoder(zoo.preset.encoder, state), state_fingerprint(state)
        accuracy[float(scale)], entropy[float(scale)] = {}, {}
        for task in zoo.tasks:
            features = zoo.features(encoder, task, "test", device=device, fingerprint=fingerprint)[0]
            accuracy[float(scale)][task] = accuracy_from_features(
                features, zoo.heads[task], zoo.suite[task].labels["test"]
            )
            with torch.inference_mode():
                entropy[float(scale)][task] = prediction_entropy(zoo.heads[task](features)).mean().item()
    accuracy_table = results_table(accuracy).rename_axis("scale")
    if not with_entropy:
        return accuracy_table
    return accuracy_table, results_table(entropy).rename_axis("scale")


def evaluate_merge(
    zoo: Zoo, result: MergeResult, device: str | torch.device | None = None, *, tasks: Sequence[str] | None = None
) -> dict[str, float]:
    """Test accuracy (%) of a merged model on each of ``tasks`` (default: every task of the zoo; pass the
    subset a merge of fewer tasks was computed from)."""
    names = zoo.task_subset(tasks)
    device = resolve_device(device, zoo.preset.default_device)
    encoder, fingerprint = load_encoder(zoo.preset.encoder, result.state), state_fingerprint(result.state)
    return {
        task: accuracy_from_features(
            zoo.features(encoder, task, "test", device=device, fingerprint=fingerprint)[0],
            zoo.heads[task],
            zoo.suite[task].labels["test"],
        )
        for task in names
    }


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
    refuse_text("methods", methods, f"pass methods=[{methods!r}]")
    rows = zoo.reference_rows()
    results = {}
    for method in dict.fromkeys(methods):  # a method named twice is one row
        run = cached_merge if cache else merge
        result = run(zoo, method, options, device=device, progress=progress)
        rows[method_label(zoo, method, options)] = evaluate_merge(zoo, result, device)
        results[method] = result
    return results_table(rows), results
