"""Consensus merging with TALL masks (Wang et al., ICML 2024, "Localizing Task Information for Improved Model
Merging and Compression"). Data-free.

Each task's TALL mask marks the entries where its own vector dominates what the other tasks add:
``m_t = |tau_t| >= lambda * |tau_MTL - tau_t|`` with ``tau_MTL`` the merged vector. Entries kept by fewer than
``k = 2`` masks are *selfish* (useful to one task only) or *catastrophic* (useful to none) and are removed
from the merged vector: ``tau = 1[sum_t m_t >= 2] * tau_MTL``. Consensus is applied on top of a merge:

- ``consensus_ta``: ``tau_MTL = sum_t tau_t`` (task arithmetic), ``theta = theta_0 + 0.3 tau``;
- ``consensus_ties``: ``tau_MTL`` = TIES' disjoint sum of the trimmed, sign-elected vectors, scale 0.3.

The paper selects ``lambda`` per task on validation data from {0.2, ..., 0.6}; without validation data the
default here is the middle of that range, 0.4. The scale is the base merge's usual 0.3 (``--scale``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.merging.base import MergeMethod, register_method, ties_zero_entries
from surgery_lib.merging.options import KEEP_FRACTION, SCALE
from surgery_lib.merging.ties import ties_vectors
from surgery_lib.merging.vectors import StateDict, add_vectors, task_vectors

#: Masks an entry must be in to survive (the paper's "general" weights: more than one task uses them).
CONSENSUS_K = 2
#: TALL masks' lambda: the middle of the paper's validation grid {0.2, 0.3, 0.4, 0.5, 0.6}.
TALL_LAMBDA = 0.4


def tall_masks(
    vectors: Sequence[Mapping[str, torch.Tensor]], merged: Mapping[str, torch.Tensor], lam: float = TALL_LAMBDA
) -> list[dict[str, torch.Tensor]]:
    """One boolean mask per task and tensor: ``|tau_t| >= lam * |merged - tau_t|``."""
    if lam < 0:
        raise SurgeryBookError(f"TALL-mask lambda {lam} is negative", "pass a value such as 0.4")
    return [{k: v.abs() >= lam * (merged[k] - v).abs() for k, v in vector.items()} for vector in vectors]


def consensus_vector(
    vectors: Sequence[Mapping[str, torch.Tensor]],
    merged: Mapping[str, torch.Tensor],
    lam: float = TALL_LAMBDA,
    k: int = CONSENSUS_K,
) -> dict[str, torch.Tensor]:
    """``merged`` with every entry that fewer than ``k`` TALL masks keep set to zero."""
    masks = tall_masks(vectors, merged, lam)
    return {
        key: torch.where(sum(m[key].int() for m in masks) >= k, value, torch.zeros_like(value))
        for key, value in merged.items()
    }


def consensus_merging(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    *,
    base: str = "task_arithmetic",
    scale: float = 0.3,
    keep_fraction: float = 0.2,
    zero_entries: int = 0,
    lam: float = TALL_LAMBDA,
    k: int = CONSENSUS_K,
) -> dict[str, torch.Tensor]:
    """``theta_0 + scale * consensus(tau_MTL)`` with ``tau_MTL`` the task-arithmetic sum or TIES' disjoint sum."""
    vectors = list(task_vectors(pretrained, experts).values())
    if base == "task_arithmetic":
        summed = {key: sum(v[key] for v in vectors) for key in vectors[0]}
    elif base == "ties":
        disjoint = ties_vectors(vectors, keep_fraction, zero_entries)
        summed = {key: sum(v[key] for v in disjoint) for key in disjoint[0]}
    else:
        raise SurgeryBookError(f"unknown consensus base merge {base!r}", "use 'task_arithmetic' or 'ties'")
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


register_method(
    MergeMethod(
        "consensus_ta",
        "consensus task arithmetic (TALL masks)",
        lambda *a: _run(*a, base="task_arithmetic"),
        options=(SCALE,),
    )
)
register_method(
    MergeMethod(
        "consensus_ties",
        "consensus TIES (TALL masks)",
        lambda *a: _run(*a, base="ties"),
        options=(SCALE, KEEP_FRACTION),
        trims=True,
    )
)
