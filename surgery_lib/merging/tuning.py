"""Hyper-parameters chosen on validation data, the way each method's official code chooses them.

The published numbers of task arithmetic, TSV-M, Iso-C/CTS, consensus merging and DARE come from a search on
a labelled validation split held out of the training data: every value of the method's grid is merged, the
merge is evaluated on every task's validation images, and the value with the highest mean *normalized*
accuracy (the merge's validation accuracy divided by the expert's, averaged over tasks) wins, the first one on a
tie. The fixed values this project uses elsewhere (scale 0.3, TSV-M's 1.0, ...) are one point of those grids.

A method declares its grid once (``MergeMethod(..., search=...)``, the option names and the values its authors'
code tries, in that order); :func:`register_tuned` then registers its twin ``<name>_tuned``, labelled
``"<label>, tuned"``, which reads every option of the method except the searched ones, runs the search, and
returns the merge at the chosen values with the search in ``details["tuned"]`` (chosen values, every
candidate's score, the merges evaluated, seconds). The merge cache keeps those details next to the weights.
Only the ``validation`` split is read (:data:`TUNING_SPLIT`); a zoo without one is refused with the fix.

A method whose search has more stages (consensus merging chooses each task's TALL-mask lambda first) registers
its own twin with the helpers here (:func:`validation_accuracy`, :func:`normalized_score`, :func:`search_grid`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.progress import tqdm
from surgery_lib.evaluation import accuracy_from_features
from surgery_lib.merging.base import MergeFunction, MergeMethod, get_method, register_method
from surgery_lib.merging.options import MergeOptions
from surgery_lib.models import load_encoder

if TYPE_CHECKING:
    from surgery_lib.settings.base import Zoo

#: The only split a tuned merge reads.
TUNING_SPLIT = "validation"
#: What a tuned method's name and label end with.
TUNED_SUFFIX, TUNED_LABEL = "_tuned", ", tuned"
#: The selection metric, in words (what ``details["tuned"]["metric"]`` says).
METRIC = "mean over tasks of validation accuracy / the expert's validation accuracy"


def grid_values(low: float, high: float, step: float) -> tuple[float, ...]:
    """``low, low + step, ..., high`` rounded to 6 decimals (the official ``np.linspace`` grids, written so that
    a chosen value passed back as ``--scale`` reproduces the merge exactly)."""
    count = round((high - low) / step)
    return tuple(round(low + i * step, 6) for i in range(count + 1))


#: The scale grid of task arithmetic and consensus merging (tall_masks' ``np.linspace(0, 1, 11)[1:]``).
SCALES_TO_ONE = grid_values(0.1, 1.0, 0.1)
#: The scale grid of TSV-M and Iso-C/CTS (``np.linspace(0, 3, 31)[1:]``).
SCALES_TO_THREE = grid_values(0.1, 3.0, 0.1)


def check_validation_split(zoo: Zoo, tasks: Sequence[str], method: str) -> None:
    """Raise a :class:`SurgeryBookError` with the fix when a task of ``zoo`` has no validation split."""
    missing = [t for t in tasks if TUNING_SPLIT not in zoo.suite[t].images]
    if missing:
        raise no_validation_split(method, zoo.preset.name, missing)


def no_validation_split(method: str, preset: str, missing: Sequence[str]) -> SurgeryBookError:
    """The error of a tuned ``method`` on a ``preset`` whose tasks ``missing`` have no validation split."""
    return SurgeryBookError(
        f"{method} chooses its hyper-parameters on labelled validation images, and the {preset} "
        f"preset's {', '.join(missing)} {'has' if len(missing) == 1 else 'have'} none",
        "offline presets: give the suite a validation split (suite.validation_per_task in a preset file, e.g. "
        "400, 10 % of train); real CLIP: pass --validation-images 5000 (task_vectors' held-out 10 %, at most "
        "5,000); or use the fixed-value method without the _tuned suffix",
    )


def validation_accuracy(
    zoo: Zoo,
    state: Mapping[str, torch.Tensor],
    tasks: Sequence[str],
    device: torch.device | str,
) -> dict[str, float]:
    """Accuracy (%) of the encoder with weights ``state`` on each of ``tasks``' validation images, through the
    task's head. Nothing is cached: a search evaluates each candidate once."""
    encoder = load_encoder(zoo.preset.encoder, state)
    out = {}
    for task in tasks:
        features = zoo.features(encoder, task, TUNING_SPLIT, device=device)[0]
        out[task] = accuracy_from_features(features, zoo.heads[task], zoo.suite[task].labels[TUNING_SPLIT])
    return out


def expert_validation_accuracy(zoo: Zoo, tasks: Sequence[str], device: torch.device | str) -> dict[str, float]:
    """Each expert's accuracy (%) on its own task's validation images: the denominators of the normalized score."""
    return {task: validation_accuracy(zoo, zoo.experts[task], [task], device)[task] for task in tasks}


def normalized_score(accuracy: Mapping[str, float], experts: Mapping[str, float]) -> float:
    """The mean over tasks of ``accuracy[t] / experts[t]`` (the official selection metric)."""
    for task, value in experts.items():
        if value <= 0:
            raise SurgeryBookError(
                f"the {task} expert classifies none of its validation images correctly",
                "check the zoo and its validation split (a normalized score needs a working expert)",
            )
    return sum(accuracy[t] / experts[t] for t in experts) / len(experts)


def search_grid(
    grid: Sequence[tuple[str, Sequence[Any]]],
    merge_at: Callable[[dict[str, Any]], tuple[dict[str, torch.Tensor], dict[str, Any]]],
    score: Callable[[dict[str, torch.Tensor]], tuple[float, dict[str, float]]],
    *,
    desc: str,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any], list[dict[str, Any]]]:
    """Every combination of ``grid`` (the first option varies slowest) merged by ``merge_at`` and scored by
    ``score``; the first best one wins.

    Returns:
        ``(chosen values, its merged state, its merge details, one record per candidate)``; a record holds the
        candidate's values, ``score`` and validation ``accuracy`` per task.
    """
    names = [name for name, _ in grid]
    best: tuple[float, dict[str, Any], dict[str, torch.Tensor], dict[str, Any]] | None = None
    records = []
    combinations = list(itertools.product(*(values for _, values in grid)))
    for combination in tqdm(combinations, desc=desc, disable=not progress):
        values = dict(zip(names, combination))
        state, details = merge_at(values)
        value, accuracy = score(state)
        records.append({**values, "score": round(value, 6), "accuracy": {t: round(a, 4) for t, a in accuracy.items()}})
        if best is None or value > best[0]:
            best = (value, values, state, details)
    assert best is not None  # a grid has at least one combination
    return best[1], best[2], best[3], records


def tuned_details(
    chosen: Mapping[str, Any],
    grid: Sequence[tuple[str, Sequence[Any]]],
    records: Sequence[dict[str, Any]],
    started: float,
    **extra: Any,
) -> dict[str, Any]:
    """``details["tuned"]`` of a tuned merge: what was chosen, from which grid, how, and at what cost."""
    return {
        "split": TUNING_SPLIT,
        "metric": METRIC,
        "chosen": dict(chosen),
        "grid": {name: list(values) for name, values in grid},
        "candidates": records,
        "merges_evaluated": len(records) + extra.pop("extra_merges", 0),
        "seconds": round(time.perf_counter() - started, 2),
        **extra,
    }


def _tuned_run(base: str) -> MergeFunction:
    def run(zoo, experts, options: MergeOptions, device, progress):
        method = get_method(base)
        tasks = list(experts)
        check_validation_split(zoo, tasks, base + TUNED_SUFFIX)
        started = time.perf_counter()
        expert_accuracy = expert_validation_accuracy(zoo, tasks, device)

        def score(state):
            accuracy = validation_accuracy(zoo, state, tasks, device)
            return normalized_score(accuracy, expert_accuracy), accuracy

        merge_at, prepared = candidate_merges(method, zoo, experts, options, device)
        chosen, state, details, records = search_grid(
            method.search, merge_at, score, desc=f"tuning {base} on validation", progress=progress
        )
        details = dict(details)
        details["tuned"] = tuned_details(
            chosen, method.search, records, started, expert_accuracy=expert_accuracy, **prepared
        )
        return state, details

    return run


def candidate_merges(
    method: MergeMethod,
    zoo: Zoo,
    experts: dict[str, Mapping[str, torch.Tensor]],
    options: MergeOptions,
    device: torch.device | str,
) -> tuple[Callable[[dict[str, Any]], tuple[dict[str, torch.Tensor], dict[str, Any]]], dict[str, int]]:
    """``(merge_at, counts)``: ``merge_at(values)`` is ``method``'s merge with the searched ``values``.

    For a method with :attr:`~surgery_lib.merging.base.MergeMethod.prepare`, the scale-free part is computed once
    per value of the other searched options and kept while the scale varies (the grids vary it fastest, so one
    preparation is held at a time); ``counts["preparations"]`` then counts them as the search goes. Every
    candidate equals ``method.run`` at its values bit for bit: ``run`` is the same preparation finished at one
    scale. The held preparation (TSV-M's updates: one model's worth; DARE's sparse vectors: one per task) stays
    below the peak of preparing it (DARE draws its masks with every task vector alive: two per task).
    """
    if method.prepare is None or "scale" not in dict(method.search):
        return lambda values: method.run(zoo, experts, options.replace(**values), device, False), {}
    counts = {"preparations": 0}
    held: dict[tuple[tuple[str, Any], ...], Callable[[float], Any]] = {}

    def merge_at(values: dict[str, Any]):
        others = {name: value for name, value in values.items() if name != "scale"}
        key = tuple(sorted(others.items()))
        if key not in held:
            held.clear()  # release the last preparation (a model's worth of updates) before the next
            held[key] = method.prepare(zoo, experts, options.replace(**others), device, False)
            counts["preparations"] += 1
        return held[key](values["scale"])

    return merge_at, counts


def tuned_name(method: str) -> str:
    """The name of ``method``'s tuned twin (``"tsv"`` -> ``"tsv_tuned"``)."""
    return method + TUNED_SUFFIX


def is_tuned(method: str) -> bool:
    """Whether ``method`` is a tuned twin."""
    return method.endswith(TUNED_SUFFIX)


def register_tuned(method: MergeMethod, run: MergeFunction | None = None) -> MergeMethod:
    """Register ``method``'s tuned twin: the grid search over ``method.search`` (or ``run``, a search of its own
    with more stages), reading the options ``method`` reads except the searched ones."""
    if not method.search:
        raise SurgeryBookError(f"{method.name} declares no search grid", "pass search=(('scale', (...)),) to it")
    searched = {name for name, _ in method.search}
    return register_method(
        MergeMethod(
            tuned_name(method.name),
            method.label + TUNED_LABEL,
            run or _tuned_run(method.name),
            options=tuple(option for option in method.options if option.name not in searched),
            trims=method.trims,
            data="validation",
        )
    )
