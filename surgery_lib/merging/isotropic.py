"""Isotropic merging, Iso-C and Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind"). Data-free.

Task arithmetic's summed update of a layer, ``Delta = sum_t Delta_t = U S V^T``, has a few dominant
singular directions, and tasks whose directions fall in the weak part of the spectrum are left behind.

- **Iso-C** keeps the directions of the sum and flattens its spectrum: ``sigma_bar U V^T`` with
  ``sigma_bar`` the mean singular value, so every direction of the common subspace counts equally.
- **Iso-CTS** keeps the top directions of the sum as a common subspace and fills the rest of the rank with
  each task's own top directions after projecting the common subspace out of its update. As the official
  code splits it, every one of the ``r`` directions is used: the task-specific total is
  ``round((r - int(0.8 r)) / T) * T`` (Python's rounding), ``r / T``-th shares of it per task, and the common
  subspace takes the remaining ``r - T * per_task`` (:func:`iso_cts_split`). The combined bases are
  orthonormalised (as TSV-M does) and scaled by the mean of the **kept** spectrum: the common subspace's
  singular values of the sum and each task's kept residual singular values.

Then ``theta = theta_0 + alpha * update``. The official code selects ``alpha`` from {0.1, ..., 3.0} on
validation data, as the tuned twins ``iso_c_tuned`` and ``iso_cts_tuned`` do; without validation data it is 1
(pass ``--scale`` to set it). Non-matrix parameters get the
mean task vector, as in TSV-M (:func:`surgery_lib.merging.tsv.spectral_merge`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.merging.base import MergeMethod, register_method, run_at_scale
from surgery_lib.merging.options import SCALE
from surgery_lib.merging.tsv import apply_updates, nearest_orthonormal, spectral_merge, spectral_updates
from surgery_lib.merging.tuning import SCALES_TO_THREE, register_tuned
from surgery_lib.merging.vectors import StateDict, task_vectors

#: The scale of both isotropic merges without validation data (the official code searches it over
#: {0.1, ..., 3.0} on validation data: ``iso_c_tuned``, ``iso_cts_tuned``).
ISO_SCALE = 1.0
#: Iso-CTS: the fraction of the layer's rank given to the common subspace (the paper's default).
COMMON_FRACTION = 0.8


def iso_c_matrix(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Iso-C's update of one layer: the summed task matrices with a flat spectrum, ``mean(S) * U V^T``."""
    u, s, v_t = torch.linalg.svd(torch.stack([d.float() for d in deltas]).sum(0), full_matrices=False)
    return s.mean() * (u @ v_t)


def iso_cts_split(rank: int, tasks: int, common_fraction: float = COMMON_FRACTION) -> tuple[int, int]:
    """``(common, per_task)`` directions of a rank-``rank`` layer shared by ``tasks`` tasks, as the official
    code splits them: ``common + tasks * per_task == rank`` (every direction used).

    The task-specific total is ``(rank - int(common_fraction * rank)) / tasks`` rounded to the nearest
    integer (half to even, Python's ``round``) times ``tasks``; where that rounding would exceed the rank (a
    small ``common_fraction`` on a small layer, where the official code breaks), it is rounded down instead.
    """
    if not 0 < common_fraction <= 1:
        raise SurgeryBookError(
            f"Iso-CTS common fraction {common_fraction} is outside (0, 1]", "pass a fraction such as 0.8"
        )
    if rank < 1 or tasks < 1:
        raise SurgeryBookError(
            f"Iso-CTS needs a rank and a task count of at least 1, got {rank} and {tasks}", "merge at least one matrix"
        )
    spare = rank - int(common_fraction * rank)
    per_task = round(spare / tasks)
    if per_task * tasks > rank:
        per_task = spare // tasks
    return rank - per_task * tasks, per_task


def iso_cts_matrix(deltas: Sequence[torch.Tensor], common_fraction: float = COMMON_FRACTION) -> torch.Tensor:
    """Iso-CTS's update of one layer from the T task matrices ``deltas`` (each (rows, cols))."""
    total = torch.stack([d.float() for d in deltas]).sum(0)
    u, s, v_t = torch.linalg.svd(total, full_matrices=False)
    common, per_task = iso_cts_split(s.numel(), len(deltas), common_fraction)
    lefts, rights, kept = [u[:, :common]], [v_t[:common].T], [s[:common]]
    if per_task > 0:
        projector = u[:, :common] @ u[:, :common].T
        for delta in deltas:
            residual = delta.float() - projector @ delta.float()  # what the common subspace does not explain
            u_t, s_t, v_t_t = torch.linalg.svd(residual, full_matrices=False)
            lefts.append(u_t[:, :per_task])
            rights.append(v_t_t[:per_task].T)
            kept.append(s_t[:per_task])
    u_perp = nearest_orthonormal(torch.cat(lefts, dim=1))
    v_perp = nearest_orthonormal(torch.cat(rights, dim=1))
    return torch.cat(kept).mean() * (u_perp @ v_perp.T)


def iso_merging(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    *,
    task_specific: bool,
    scale: float = ISO_SCALE,
    common_fraction: float = COMMON_FRACTION,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Iso-C (``task_specific=False``) or Iso-CTS: ``theta_0 + scale * update``."""
    matrix, desc = _layer_merge(task_specific, common_fraction)
    return spectral_merge(pretrained, task_vectors(pretrained, experts), matrix, scale, device, progress, desc)


def _layer_merge(task_specific: bool, common_fraction: float):
    """``(update of one layer from its task matrices, progress label)`` of Iso-CTS or Iso-C."""
    if task_specific:
        return (lambda deltas: iso_cts_matrix(deltas, common_fraction)), "Iso-CTS"
    return iso_c_matrix, "Iso-C"


def _prepare(zoo, experts, options, device, progress, *, task_specific: bool):
    matrix, desc = _layer_merge(task_specific, COMMON_FRACTION)
    updates = spectral_updates(zoo.pretrained, task_vectors(zoo.pretrained, experts), matrix, device, progress, desc)
    details = {"common_fraction": COMMON_FRACTION} if task_specific else {}
    return lambda scale: (apply_updates(zoo.pretrained, updates, scale), {"scale": scale, **details})


# The official code searches alpha over {0.1, ..., 3.0} on validation data for both.
for _name, _label, _task_specific in (
    ("iso_c", "Iso-C (isotropic, common subspace)", False),
    ("iso_cts", "Iso-CTS (isotropic, common + task subspaces)", True),
):
    _prepared = functools.partial(_prepare, task_specific=_task_specific)
    register_tuned(
        register_method(
            MergeMethod(
                _name,
                _label,
                run_at_scale(_prepared, ISO_SCALE),
                options=(SCALE,),
                search=(("scale", SCALES_TO_THREE),),
                prepare=_prepared,
            )
        )
    )
