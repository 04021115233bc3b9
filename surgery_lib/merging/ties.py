"""TIES-merging (Yadav et al., NeurIPS 2023): trim each task vector to its largest entries, elect a sign
per entry, merge the agreeing entries disjointly. Data-free."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.merging.base import MergeMethod, register_method, ties_zero_entries
from surgery_lib.merging.options import KEEP_FRACTION, SCALE
from surgery_lib.merging.vectors import StateDict, task_vectors

#: The two TIES operating points in the literature; name the one you run.
TIES_OPERATING_POINTS: dict[str, dict[str, float | str]] = {
    # Surgery / AdaMerging code: disjoint *sum* of the elected entries, scaled by 0.3.
    "ties": {"combine": "sum", "scale": 0.3},
    # The TIES paper (Yadav et al., 2023): disjoint *mean*, scale about 1.
    "ties_mean": {"combine": "mean", "scale": 1.0},
}


def trim_threshold(vector: Mapping[str, torch.Tensor], keep_fraction: float, zero_entries: int = 0) -> float:
    """The magnitude at or above which TIES keeps an entry of ``vector`` (global over all its tensors).

    As in the official code, the vector is flattened together with ``zero_entries`` further entries that
    are exactly zero (the text-tower leftovers of the published CLIP checkpoints), ``d`` entries in all,
    and the ``int(keep_fraction * d) + 1`` largest magnitudes are kept (more on ties).
    """
    if not 0 < keep_fraction <= 1:
        raise SurgeryBookError(f"TIES keep fraction {keep_fraction} is outside (0, 1]", "pass a fraction such as 0.2")
    if zero_entries < 0:
        raise SurgeryBookError(f"{zero_entries} extra zero entries for TIES", "pass a count >= 0")
    magnitudes = torch.cat([t.detach().abs().flatten().float() for t in vector.values()])
    total = magnitudes.numel() + zero_entries
    position = max(1, total - int(total * keep_fraction)) - zero_entries  # k-th smallest of the real entries
    if position < 1:
        return 0.0
    return float(torch.kthvalue(magnitudes, position).values)


def kept_fraction(entries: int, keep_fraction: float, zero_entries: int = 0) -> float:
    """The fraction of a vector's ``entries`` that TIES keeps when ``zero_entries`` zeros are trimmed with it
    (0.2583 for ViT-B/32's image tower with its 25.6 M text leftovers; ignoring ties)."""
    total = entries + zero_entries
    return min(entries, int(total * keep_fraction) + 1) / entries


def ties_vectors(
    vectors: Sequence[Mapping[str, torch.Tensor]], keep_fraction: float = 0.2, zero_entries: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Trim each task vector to its top entries by magnitude (:func:`trim_threshold`), elect a sign per
    entry (the sign of the sum of the trimmed vectors; where that sum is exactly 0, the majority sign of
    all elected signs, as the official code resolves it) and zero every entry that disagrees with it.

    Returns one disjoint vector per task; summing them gives TIES' disjoint sum. Memory: one tensor of
    all tasks at a time, plus one flattened copy of a single task vector for the threshold.
    """
    thresholds = [trim_threshold(vector, keep_fraction, zero_entries) for vector in vectors]

    def trimmed(key: str) -> torch.Tensor:
        stacked = torch.stack([vector[key] for vector in vectors])
        limits = torch.tensor(thresholds, dtype=stacked.dtype, device=stacked.device).view(
            -1, *[1] * (stacked.dim() - 1)
        )
        return torch.where(stacked.abs() >= limits, stacked, torch.zeros_like(stacked))

    majority = torch.sign(sum(torch.sign(trimmed(key).sum(dim=0)).sum() for key in vectors[0]))
    out: list[dict[str, torch.Tensor]] = [{} for _ in vectors]
    for key in vectors[0]:
        kept = trimmed(key)
        elected = torch.sign(kept.sum(dim=0))
        elected = torch.where(elected == 0, majority.to(elected.dtype), elected)
        agreeing = torch.where(torch.where(elected > 0, kept > 0, kept < 0), kept, torch.zeros_like(kept))
        for task, value in enumerate(agreeing):
            out[task][key] = value
    return out


def ties_merging(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    *,
    keep_fraction: float = 0.2,
    scale: float = 0.3,
    combine: str = "sum",
    zero_entries: int = 0,
) -> dict[str, torch.Tensor]:
    """TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint merge, scale.

    ``combine="sum"`` with ``scale=0.3`` is what the Surgery and AdaMerging code run; ``combine="mean"``
    with ``scale`` about 1 is what the TIES paper recommends (see :data:`TIES_OPERATING_POINTS`).
    ``zero_entries``: all-zero entries the official code trimmed together with the vector (see
    :func:`trim_threshold`; the real-CLIP presets carry the count of their text leftovers).
    """
    if combine not in ("sum", "mean"):
        raise SurgeryBookError(f"unknown TIES combine mode {combine!r}", "use 'sum' or 'mean'")
    disjoint = ties_vectors(list(task_vectors(pretrained, experts).values()), keep_fraction, zero_entries)
    merged = {}
    for key, value in pretrained.items():
        if key not in disjoint[0]:
            merged[key] = value.clone()
            continue
        stacked = torch.stack([vector[key] for vector in disjoint])
        total = stacked.sum(dim=0)
        if combine == "mean":
            total = total / (stacked != 0).sum(dim=0).clamp(min=1)
        merged[key] = value + scale * total
    return merged


def _run(zoo, experts, options, device, progress, *, method: str):
    point = dict(TIES_OPERATING_POINTS[method])
    if options.scale is not None:
        point["scale"] = options.scale
    zeros = ties_zero_entries(zoo)
    state = ties_merging(zoo.pretrained, experts, keep_fraction=options.keep_fraction, zero_entries=zeros, **point)  # type: ignore[arg-type]
    return state, {**point, "keep_fraction": options.keep_fraction, "zero_entries": zeros}


register_method(
    MergeMethod(
        "ties",
        "TIES-merging (disjoint sum)",
        lambda *a: _run(*a, method="ties"),
        options=(SCALE, KEEP_FRACTION),
        trims=True,
    )
)
register_method(
    MergeMethod(
        "ties_mean",
        "TIES-merging (disjoint mean)",
        lambda *a: _run(*a, method="ties_mean"),
        options=(SCALE, KEEP_FRACTION),
        trims=True,
    )
)
