"""Task vectors and data-free merging, as pure functions over state dicts.

Notation (ALGORITHMS.md): theta_0 the pretrained weights, theta_t expert t, tau_t = theta_t - theta_0.
Every function takes any number of experts and any architecture; nothing is truncated or dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from surgery_lib.errors import SurgeryBookError

StateDict = Mapping[str, torch.Tensor]


def check_compatible(pretrained: StateDict, experts: Mapping[str, StateDict]) -> None:
    """Raise a clear error unless every expert has exactly the pretrained model's keys and shapes."""
    if not experts:
        raise SurgeryBookError("no experts to merge", "pass at least one fine-tuned state dict")
    for name, expert in experts.items():
        missing, extra = set(pretrained) - set(expert), set(expert) - set(pretrained)
        if missing or extra:
            detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(extra)[:3]}"
            raise SurgeryBookError(
                f"expert {name!r} does not have the pretrained model's parameters ({detail})",
                "merge only experts fine-tuned from the same pretrained architecture",
            )
        for key, tensor in pretrained.items():
            if expert[key].shape != tensor.shape:
                raise SurgeryBookError(
                    f"expert {name!r} has shape {tuple(expert[key].shape)} for {key!r}, the pretrained "
                    f"model {tuple(tensor.shape)}",
                    "merge only experts fine-tuned from the same pretrained architecture",
                )


def task_vectors(pretrained: StateDict, experts: Mapping[str, StateDict]) -> dict[str, dict[str, torch.Tensor]]:
    """``{task: tau_t}`` with ``tau_t[k] = experts[task][k] - pretrained[k]`` for floating-point tensors."""
    check_compatible(pretrained, experts)
    return {
        task: {k: expert[k] - v for k, v in pretrained.items() if v.is_floating_point()}
        for task, expert in experts.items()
    }


def add_vectors(pretrained: StateDict, vectors: Sequence[Mapping[str, torch.Tensor]], coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
    """``theta_0 + sum_t coefficients[t] * vectors[t]``; keys absent from the vectors are copied."""
    if len(vectors) != len(coefficients):
        raise SurgeryBookError(
            f"{len(coefficients)} coefficients for {len(vectors)} task vectors", "give one coefficient per task"
        )
    merged = {}
    for key, value in pretrained.items():
        if vectors and key in vectors[0]:
            merged[key] = value + sum(c * vec[key] for c, vec in zip(coefficients, vectors))
        else:
            merged[key] = value.clone()
    return merged


def weight_averaging(pretrained: StateDict, experts: Mapping[str, StateDict]) -> dict[str, torch.Tensor]:
    """The mean of the experts, ``theta_0 + (1/T) sum_t tau_t``."""
    vectors = list(task_vectors(pretrained, experts).values())
    return add_vectors(pretrained, vectors, [1.0 / len(vectors)] * len(vectors))


def task_arithmetic(pretrained: StateDict, experts: Mapping[str, StateDict], scale: float = 0.3) -> dict[str, torch.Tensor]:
    """``theta_0 + scale * sum_t tau_t`` (Ilharco et al., 2023); the papers use ``scale = 0.3``."""
    vectors = list(task_vectors(pretrained, experts).values())
    return add_vectors(pretrained, vectors, [scale] * len(vectors))
