"""Task Singular Vectors merging, TSV-M (Gargiulo et al., CVPR 2025). Data-free.

Per weight matrix, each task's update ``Delta_t = U_t S_t V_t^T`` is cut to its top ``k = rank / T``
singular triplets (the paper's split of the layer's rank among the T tasks); the kept left vectors of all
tasks are concatenated, ``U = [U_1k ... U_Tk]`` (and likewise ``V`` and the singular values), and the
overlap between tasks' directions, the paper's measure of interference, is removed by replacing ``U`` and
``V`` with their nearest matrices with orthonormal columns (``P Q^T`` from ``U = P S Q^T``, the orthogonal
Procrustes solution, equal to whitening ``U (U^T U)^{-1/2}``). The merged update is ``U_perp S V_perp^T``
and ``theta = theta_0 + alpha * update``. Without validation data ``alpha = 1`` (FusionBench's fixed value); the
official code searches it over {0.1, ..., 3.0} on validation data, as the tuned twin ``tsv_tuned`` does.

Parameters that are not matrices (biases, norms, class token, the patch convolution) get the mean of the
task vectors, as in TSV's own treatment of non-matrix parameters (task arithmetic with ``1 / T``).
Memory: the T task vectors, one layer's T task matrices and their SVDs at a time (ViT-L/14: 8 x 4096 x 1024
floats), and the merged update of every parameter in float32 (one model's worth), which the tuned twin finishes
at each of its 30 scales instead of repeating the SVDs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.progress import tqdm
from surgery_lib.merging.base import MergeMethod, register_method, run_at_scale
from surgery_lib.merging.options import SCALE
from surgery_lib.merging.tuning import SCALES_TO_THREE, register_tuned
from surgery_lib.merging.vectors import StateDict, task_vectors

#: TSV-M's scale without validation data (FusionBench's; the official code searches it: ``tsv_tuned``).
TSV_SCALE = 1.0


def nearest_orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns nearest to ``matrix`` (n, m), n >= m, in Frobenius norm: ``P Q^T``
    from the thin SVD ``matrix = P S Q^T``. Shape (n, m)."""
    left, _, right_t = torch.linalg.svd(matrix, full_matrices=False)
    return left @ right_t


def per_task_rank(rows: int, cols: int, tasks: int) -> int:
    """TSV's share of a (rows, cols) layer's rank per task: ``min(rows, cols) // tasks``, at least 1."""
    return max(1, min(rows, cols) // tasks)


def tsv_matrix(deltas: Sequence[torch.Tensor], rank: int | None = None) -> torch.Tensor:
    """TSV-M's merged update of one layer from the T task matrices ``deltas`` (each (rows, cols)).

    ``rank`` triplets are kept per task (default :func:`per_task_rank`). Float32 throughout (SVD needs it).
    """
    if not deltas:
        raise SurgeryBookError("TSV-M got no task matrices", "merge at least one expert")
    rows, cols = deltas[0].shape
    k = rank if rank is not None else per_task_rank(rows, cols, len(deltas))
    if k * len(deltas) > min(rows, cols):
        raise SurgeryBookError(
            f"{len(deltas)} tasks x rank {k} exceed the layer's rank {min(rows, cols)}", "lower the rank per task"
        )
    lefts, values, rights = [], [], []
    for delta in deltas:
        u, s, v_t = torch.linalg.svd(delta.float(), full_matrices=False)
        lefts.append(u[:, :k])
        values.append(s[:k])
        rights.append(v_t[:k].T)
    u_perp = nearest_orthonormal(torch.cat(lefts, dim=1))
    v_perp = nearest_orthonormal(torch.cat(rights, dim=1))
    return (u_perp * torch.cat(values)) @ v_perp.T


def is_matrix(tensor: torch.Tensor) -> bool:
    """Whether the spectral merges treat a parameter as a layer matrix: two dimensions, both above 1."""
    return tensor.dim() == 2 and min(tensor.shape) > 1


def spectral_updates(
    pretrained: StateDict,
    vectors: Mapping[str, Mapping[str, torch.Tensor]],
    merge_matrix,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "merging",
) -> dict[str, torch.Tensor | None]:
    """Each parameter's unscaled update: ``merge_matrix([Delta_t])`` for a matrix (computed on ``device``), the
    mean of the task vectors for any other parameter, None for a key absent from the vectors (kept as it is)."""
    tasks = list(vectors.values())
    updates: dict[str, torch.Tensor | None] = {}
    for key, value in tqdm(pretrained.items(), desc=desc, disable=not progress, leave=False):
        if not tasks or key not in tasks[0]:
            updates[key] = None
            continue
        deltas = [vector[key] for vector in tasks]
        if is_matrix(value):
            updates[key] = merge_matrix([d.to(device) for d in deltas]).to(value.device)
        else:
            updates[key] = torch.stack([d.float() for d in deltas]).mean(0)
    return updates


def apply_updates(
    pretrained: StateDict, updates: Mapping[str, torch.Tensor | None], scale: float
) -> dict[str, torch.Tensor]:
    """``theta_0 + scale * update`` per parameter, in the parameter's dtype; a parameter without an update is
    copied."""
    return {
        key: value.clone() if updates[key] is None else value + (scale * updates[key]).to(value.dtype)
        for key, value in pretrained.items()
    }


def spectral_merge(
    pretrained: StateDict,
    vectors: Mapping[str, Mapping[str, torch.Tensor]],
    merge_matrix,
    scale: float,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "merging",
) -> dict[str, torch.Tensor]:
    """``theta_0 + scale * update`` where each matrix's update is ``merge_matrix([Delta_t])`` (computed on
    ``device``) and every other parameter's is the mean of the task vectors; keys absent from the vectors
    are copied. The shared frame of TSV-M and the isotropic merges (:func:`spectral_updates`, then
    :func:`apply_updates`)."""
    return apply_updates(pretrained, spectral_updates(pretrained, vectors, merge_matrix, device, progress, desc), scale)


def tsv_merging(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    scale: float = TSV_SCALE,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """TSV-M: ``theta_0 + scale * (per matrix: tsv_matrix; otherwise the mean task vector)``."""
    return spectral_merge(pretrained, task_vectors(pretrained, experts), tsv_matrix, scale, device, progress, "TSV-M")


def _prepare(zoo, experts, options, device, progress):
    vectors = task_vectors(zoo.pretrained, experts)
    updates = spectral_updates(zoo.pretrained, vectors, tsv_matrix, device, progress, "TSV-M")
    return lambda scale: (apply_updates(zoo.pretrained, updates, scale), {"scale": scale})


# The official code searches alpha over {0.1, ..., 3.0} on validation data (FusionBench fixes 1).
register_tuned(
    register_method(
        MergeMethod(
            "tsv",
            "TSV-M (task singular vectors)",
            run_at_scale(_prepare, TSV_SCALE),
            options=(SCALE,),
            search=(("scale", SCALES_TO_THREE),),
            prepare=_prepare,
        )
    )
)
