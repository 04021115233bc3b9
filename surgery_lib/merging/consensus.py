"""Consensus merging with TALL masks (Wang et al., ICML 2024, "Localizing Task Information for Improved Model
Merging and Compression"). Data-free, or tuned on validation data as the official code runs it.

Each task's TALL mask marks the entries where its own vector dominates what the other tasks add:
``m_t = |tau_t| > lambda_t * |tau_MTL - tau_t|`` with ``tau_MTL`` the merged vector (strictly greater, as the
official code compares). Entries kept by fewer than ``k = 2`` masks are *selfish* (useful to one task only) or
*catastrophic* (useful to none) and are removed from the merged vector: ``tau = 1[sum_t m_t >= 2] * tau_MTL``.
Consensus is applied on top of a merge:

- ``consensus_ta``: ``tau_MTL = sum_t tau_t`` (task arithmetic), ``theta = theta_0 + 0.3 tau``;
- ``consensus_ties``: ``tau_MTL`` = TIES' disjoint sum of the trimmed, sign-elected vectors, scale 0.3.

The official code chooses both on validation data, and so do the tuned twins ``consensus_ta_tuned`` and
``consensus_ties_tuned``: first each task's ``lambda_t`` from {0.2, ..., 0.6}, the one whose TALL-masked model
``theta_0 + m_t * tau_MTL`` classifies that task's validation images best; then the scale of the consensus
merge from {0.1, ..., 1.0} by the mean normalized validation accuracy (:mod:`~surgery_lib.merging.tuning`).
Without validation data, ``lambda`` is the middle of that range, 0.4, for every task, and the scale the base
merge's usual 0.3 (``--scale``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence

import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.progress import tqdm
from surgery_lib.merging.base import MergeMethod, register_method, ties_zero_entries
from surgery_lib.merging.options import KEEP_FRACTION, SCALE
from surgery_lib.merging.ties import ties_vectors
from surgery_lib.merging.tuning import (
    SCALES_TO_ONE,
    check_validation_split,
    expert_validation_accuracy,
    normalized_score,
    register_tuned,
    search_grid,
    tuned_details,
    validation_accuracy,
)
from surgery_lib.merging.vectors import StateDict, add_vectors, task_vectors

#: Masks an entry must be in to survive (the paper's "general" weights: more than one task uses them).
CONSENSUS_K = 2
#: TALL masks' validation grid (the official code's), and its middle, used without validation data.
TALL_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)
TALL_LAMBDA = 0.4


def tall_masks(
    vectors: Sequence[Mapping[str, torch.Tensor]],
    merged: Mapping[str, torch.Tensor],
    lam: float | Sequence[float] = TALL_LAMBDA,
) -> list[dict[str, torch.Tensor]]:
    """One boolean mask per task and tensor: ``|tau_t| > lam_t * |merged - tau_t|``; ``lam`` is one lambda for
    every task or one per task."""
    lams = [lam] * len(vectors) if isinstance(lam, (int, float)) else list(lam)
    if len(lams) != len(vectors):
        raise SurgeryBookError(f"{len(lams)} TALL-mask lambdas for {len(vectors)} tasks", "pass one per task")
    if any(value < 0 for value in lams):
        raise SurgeryBookError(f"TALL-mask lambda {min(lams)} is negative", "pass a value such as 0.4")
    return [
        {k: v.abs() > value * (merged[k] - v).abs() for k, v in vector.items()} for vector, value in zip(vectors, lams)
    ]


def consensus_vector(
    vectors: Sequence[Mapping[str, torch.Tensor]],
    merged: Mapping[str, torch.Tensor],
    lam: float | Sequence[float] = TALL_LAMBDA,
    k: int = CONSENSUS_K,
) -> dict[str, torch.Tensor]:
    """``merged`` with every entry that fewer than ``k`` TALL masks keep set to zero."""
    masks = tall_masks(vectors, merged, lam)
    return {
        key: torch.where(sum(m[key].int() for m in masks) >= k, value, torch.zeros_like(value))
        for key, value in merged.items()
    }


def multi_task_vector(
    vectors: Sequence[Mapping[str, torch.Tensor]], base: str, keep_fraction: float = 0.2, zero_entries: int = 0
) -> dict[str, torch.Tensor]:
    """``tau_MTL``, unscaled: the sum of the task vectors (``base="task_arithmetic"``) or TIES' disjoint sum."""
    if base == "task_arithmetic":
        return {key: sum(v[key] for v in vectors) for key in vectors[0]}
    if base == "ties":
        disjoint = ties_vectors(vectors, keep_fraction, zero_entries)
        return {key: sum(v[key] for v in disjoint) for key in disjoint[0]}
    raise SurgeryBookError(f"unknown consensus base merge {base!r}", "use 'task_arithmetic' or 'ties'")


def consensus_merging(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    *,
    base: str = "task_arithmetic",
    scale: float = 0.3,
    keep_fraction: float = 0.2,
    zero_entries: int = 0,
    lam: float | Sequence[float] = TALL_LAMBDA,
    k: int = CONSENSUS_K,
) -> dict[str, torch.Tensor]:
    """``theta_0 + scale * consensus(tau_MTL)`` with ``tau_MTL`` the task-arithmetic sum or TIES' disjoint sum;
    ``lam`` is one TALL-mask lambda or one per expert, in ``experts``' order."""
    vectors = list(task_vectors(pretrained, experts).values())
    summed = multi_task_vector(vectors, base, keep_fraction, zero_entries)
    return add_vectors(pretrained, [consensus_vector(vectors, summed, lam, k)], [scale])


def _run(zoo, experts, options, device, progress, *, base: str):
    scale = 0.3 if options.scale is None else options.scale
    zeros = ties_zero_entries(zoo) if base == "ties" else 0
    state = consensus_merging(
        zoo.pretrained, experts, base=base, scale=scale, keep_fraction=options.keep_fraction, zero_entries=zeros
    )
    details = {
        "scale": scale,
        "lambda": TALL_LAMBDA,
        "k": CONSENSUS_K,
        **({"keep_fraction": options.keep_fraction} if base == "ties" else {}),
    }
    return state, details


def _run_tuned(zoo, experts, options, device, progress, *, base: str):
    """The official two-stage search: each task's lambda on its own validation images, then the scale."""
    tasks = list(experts)
    name = f"consensus_{'ta' if base == 'task_arithmetic' else 'ties'}_tuned"
    check_validation_split(zoo, tasks, name)
    started = time.perf_counter()
    vectors = list(task_vectors(zoo.pretrained, experts).values())
    zeros = ties_zero_entries(zoo) if base == "ties" else 0
    summed = multi_task_vector(vectors, base, options.keep_fraction, zeros)
    # Stage 1: the TALL-masked model of task t, theta_0 + m_t * tau_MTL, on task t's validation images.
    lambda_accuracy: dict[float, dict[str, float]] = {}
    for lam in tqdm(TALL_LAMBDAS, desc=f"{name}: TALL-mask lambdas", disable=not progress):
        masks = tall_masks(vectors, summed, lam)
        lambda_accuracy[lam] = {}
        for task, mask in zip(tasks, masks):
            masked = {key: value * mask[key] for key, value in summed.items()}
            state = add_vectors(zoo.pretrained, [masked], [1.0])
            lambda_accuracy[lam][task] = validation_accuracy(zoo, state, [task], device)[task]
    lams = [max(TALL_LAMBDAS, key=lambda lam: lambda_accuracy[lam][task]) for task in tasks]  # the first best
    # Stage 2: the consensus merge with those masks, at every scale.
    consensus = consensus_vector(vectors, summed, lams, CONSENSUS_K)
    expert_accuracy = expert_validation_accuracy(zoo, tasks, device)

    def score(state):
        accuracy = validation_accuracy(zoo, state, tasks, device)
        return normalized_score(accuracy, expert_accuracy), accuracy

    grid = (("scale", SCALES_TO_ONE),)
    chosen, state, _, records = search_grid(
        grid,
        lambda values: (add_vectors(zoo.pretrained, [consensus], [values["scale"]]), {}),
        score,
        desc=f"{name}: scale",
        progress=progress,
    )
    details = {
        "scale": chosen["scale"],
        "lambda": dict(zip(tasks, lams)),
        "k": CONSENSUS_K,
        **({"keep_fraction": options.keep_fraction} if base == "ties" else {}),
    }
    details["tuned"] = tuned_details(
        {"lambda": dict(zip(tasks, lams)), **chosen},
        (("lambda", TALL_LAMBDAS), *grid),
        records,
        started,
        extra_merges=len(TALL_LAMBDAS) * len(tasks),
        lambda_accuracy={str(lam): values for lam, values in lambda_accuracy.items()},
        expert_accuracy=expert_accuracy,
    )
    return state, details


for _base, _name, _label, _options in (
    ("task_arithmetic", "consensus_ta", "consensus task arithmetic (TALL masks)", (SCALE,)),
    ("ties", "consensus_ties", "consensus TIES (TALL masks)", (SCALE, KEEP_FRACTION)),
):
    register_tuned(
        register_method(
            MergeMethod(
                _name,
                _label,
                functools.partial(_run, base=_base),
                options=_options,
                trims=_base == "ties",
                # lambda is chosen per task before the scale: the twin runs its own search (_run_tuned).
                search=(("scale", SCALES_TO_ONE),),
            )
        ),
        functools.partial(_run_tuned, base=_base),
    )
