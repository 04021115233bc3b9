"""Task arithmetic (Ilharco et al., ICLR 2023): add the scaled sum of the task vectors. Data-free.

The papers' 0.3 came from a search on validation data; ``task_arithmetic_tuned`` runs that search (tall_masks'
grid {0.1, ..., 1.0}) on the zoo's validation split.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from surgery_lib.merging.base import MergeMethod, register_method, run_at_scale
from surgery_lib.merging.options import SCALE
from surgery_lib.merging.tuning import SCALES_TO_ONE, register_tuned
from surgery_lib.merging.vectors import StateDict, add_vectors, task_vectors


def task_arithmetic(
    pretrained: StateDict, experts: Mapping[str, StateDict], scale: float = 0.3
) -> dict[str, torch.Tensor]:
    """``theta_0 + scale * sum_t tau_t`` (Ilharco et al., 2023); the papers use ``scale = 0.3``."""
    vectors = list(task_vectors(pretrained, experts).values())
    return add_vectors(pretrained, vectors, [scale] * len(vectors))


def _prepare(zoo, experts, options, device, progress):
    vectors = list(task_vectors(zoo.pretrained, experts).values())
    return lambda scale: (add_vectors(zoo.pretrained, vectors, [scale] * len(vectors)), {"scale": scale})


# tall_masks' search of task arithmetic's scale (its "sum" method), on validation data.
register_tuned(
    register_method(
        MergeMethod(
            "task_arithmetic",
            "task arithmetic",
            run_at_scale(_prepare, 0.3),
            options=(SCALE,),
            search=(("scale", SCALES_TO_ONE),),
            prepare=_prepare,
        )
    )
)
