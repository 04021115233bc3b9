"""DARE (Yu et al., ICML 2024, "Language Models are Super Mario"): drop each task-vector entry with
probability ``p`` and rescale the survivors by ``1 / (1 - p)``, so every entry keeps its expected value;
then merge the sparse vectors with task arithmetic (``dare_task_arithmetic``) or TIES (``dare_ties``).
Data-free; random, so seeded. MergeLM searches ``p`` over {0.1, 0.3, 0.5, 0.7, 0.9} and the scale over
{0.1, ..., 1.0} on validation data, as the tuned twins ``dare_task_arithmetic_tuned`` and ``dare_ties_tuned`` do
(scored, as the vision methods' searches are, by the mean normalized validation accuracy: MergeLM's own scores
are its language benchmarks'); without validation data ``p = 0.5`` and the scale 0.3.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.merging.base import MergeMethod, register_method, run_at_scale, ties_zero_entries
from surgery_lib.merging.options import KEEP_FRACTION, SCALE, SEED, Option
from surgery_lib.merging.ties import ties_vectors
from surgery_lib.merging.tuning import SCALES_TO_ONE, register_tuned
from surgery_lib.merging.vectors import add_vectors, task_vectors

DROP_RATE = Option(
    "drop_rate",
    float,
    0.5,
    "DARE: the probability of dropping each task-vector entry (the rest rescaled by 1/(1-p); default 0.5)",
    low=0,
    high=1,
    high_open=True,
)


def drop_and_rescale(
    vector: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor], drop_rate: float
) -> dict[str, torch.Tensor]:
    """``keep * vector / (1 - drop_rate)`` per tensor; ``keep`` holds one boolean mask per tensor (True: kept)."""
    return {
        key: torch.where(keep[key], value / (1 - drop_rate), torch.zeros_like(value)) for key, value in vector.items()
    }


def dare_vectors(
    vectors: Sequence[Mapping[str, torch.Tensor]], drop_rate: float = 0.5, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """DARE applied to each task vector: masks drawn from one CPU generator seeded with ``seed``, task by
    task and tensor by tensor in order, so a merge is reproducible on any device."""
    if not 0 <= drop_rate < 1:
        raise SurgeryBookError(f"DARE drop rate {drop_rate} is outside [0, 1)", "pass a probability such as 0.5")
    generator = torch.Generator().manual_seed(seed)
    out = []
    for vector in vectors:
        keep = {
            key: (torch.rand(value.shape, generator=generator) >= drop_rate).to(value.device)
            for key, value in vector.items()
        }
        out.append(drop_and_rescale(vector, keep, drop_rate))
    return out


def _sparse_vectors(zoo, experts, options):
    return dare_vectors(list(task_vectors(zoo.pretrained, experts).values()), options.drop_rate, options.seed)


def _prepare_task_arithmetic(zoo, experts, options, device, progress):
    vectors = _sparse_vectors(zoo, experts, options)
    details = {"drop_rate": options.drop_rate}
    return lambda scale: (add_vectors(zoo.pretrained, vectors, [scale] * len(vectors)), {"scale": scale, **details})


def _prepare_ties(zoo, experts, options, device, progress):
    disjoint = ties_vectors(_sparse_vectors(zoo, experts, options), options.keep_fraction, ties_zero_entries(zoo))
    details = {"drop_rate": options.drop_rate, "keep_fraction": options.keep_fraction}
    return lambda scale: (add_vectors(zoo.pretrained, disjoint, [scale] * len(disjoint)), {"scale": scale, **details})


#: The scale of both DARE merges without validation data (task arithmetic's usual 0.3).
DARE_SCALE = 0.3
#: MergeLM's search on validation data: the drop rate, then the scale for each.
DARE_SEARCH = (("drop_rate", (0.1, 0.3, 0.5, 0.7, 0.9)), ("scale", SCALES_TO_ONE))

register_tuned(
    register_method(
        MergeMethod(
            "dare_task_arithmetic",
            "DARE + task arithmetic",
            run_at_scale(_prepare_task_arithmetic, DARE_SCALE),
            options=(SCALE, DROP_RATE, SEED),
            search=DARE_SEARCH,
            prepare=_prepare_task_arithmetic,
        )
    )
)
register_tuned(
    register_method(
        MergeMethod(
            "dare_ties",
            "DARE + TIES-merging",
            run_at_scale(_prepare_ties, DARE_SCALE),
            options=(SCALE, DROP_RATE, SEED, KEEP_FRACTION),
            trims=True,
            search=DARE_SEARCH,
            prepare=_prepare_ties,
        )
    )
)
