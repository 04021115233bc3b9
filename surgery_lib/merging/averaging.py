"""Weight averaging (Wortsman et al., ICML 2022, "model soups"): the plain mean of the experts. Data-free."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from surgery_lib.merging.base import MergeMethod, register_method
from surgery_lib.merging.vectors import StateDict, add_vectors, task_vectors


def weight_averaging(pretrained: StateDict, experts: Mapping[str, StateDict]) -> dict[str, torch.Tensor]:
    """The mean of the experts, ``theta_0 + (1/T) sum_t tau_t``."""
    vectors = list(task_vectors(pretrained, experts).values())
    return add_vectors(pretrained, vectors, [1.0 / len(vectors)] * len(vectors))


def _run(zoo, experts, options, device, progress):
    return weight_averaging(zoo.pretrained, experts), {}


register_method(MergeMethod("weight_averaging", "weight averaging", _run))
