"""Task vectors (Ilharco et al., ICLR 2023), the arithmetic every merging family builds on: pure functions
over state dicts.

Notation: theta_0 the pretrained weights, theta_t expert t, tau_t = theta_t - theta_0. Every function takes
any number of experts and any architecture; nothing is truncated or dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.state_dict import StateDict, check_compatible


def task_vectors(pretrained: StateDict, experts: Mapping[str, StateDict]) -> dict[str, dict[str, torch.Tensor]]:
    """``{task: tau_t}`` with ``tau_t[k] = experts[task][k] - pretrained[k]`` for floating-point tensors."""
    check_compatible(pretrained, experts)
    return {
        task: {k: expert[k] - v for k, v in pretrained.items() if v.is_floating_point()}
        for task, expert in experts.items()
    }


def flatten_vector(vector: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All entries of a task vector as one float32 vector (in key order)."""
    return torch.cat([vector[k].detach().flatten().float() for k in sorted(vector)])


def cosine_similarities(vectors: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Cosine similarity between every pair of flattened task vectors: T vectors -> (T, T).

    Near-zero similarities (the usual case for CLIP experts) mean the vectors point in unrelated
    directions; merging still interferes because they overlap in *which* weights they move.
    Memory: one flattened vector per task at a time for the norms, T of them for the Gram matrix.
    """
    flat = torch.stack([flatten_vector(v) for v in vectors.values()])
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return flat @ flat.T


def add_vectors(
    pretrained: StateDict, vectors: Sequence[Mapping[str, torch.Tensor]], coefficients: Sequence[float]
) -> dict[str, torch.Tensor]:
    """``theta_0 + sum_t coefficients[t] * vectors[t]``; keys absent from the vectors are copied."""
    if len(vectors) != len(coefficients):
        raise SurgeryBookError(
            f"{len(coefficients)} coefficients for {len(vectors)} task vectors", "give one coefficient per task"
        )
    if not all(math.isfinite(float(c)) for c in coefficients):
        raise SurgeryBookError(
            f"merging coefficients {list(coefficients)} contain NaN or infinity", "pass finite numbers"
        )
    merged = {}
    for key, value in pretrained.items():
        if vectors and key in vectors[0]:
            merged[key] = value + sum(c * vec[key] for c, vec in zip(coefficients, vectors))
        else:
            merged[key] = value.clone()
    return merged
