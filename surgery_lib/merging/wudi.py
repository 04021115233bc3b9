"""WUDI-Merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It"). Data-free.

For a linear layer ``y = W x``, the inputs a task's layer sees lie (approximately) in the span of the
rows of its task matrix ``tau_t``, so the interference the merged update ``tau_m`` causes on task t is
``(tau_m - tau_t) tau_t^T``. WUDI minimises, per layer,

    L(tau_m) = sum_t ||(tau_m - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2

with Adam from ``tau_m = sum_t tau_t`` for the paper's 300 steps, and merges ``theta = theta_0 + tau_m`` (no
scale). The objective is a convex quadratic, so the learning rate only decides how close 300 steps get to its
minimum (:func:`convergence_curve`; chapter 07 draws it): on the mini zoo's 16 block matrices, 300 steps at the
official 1e-5 leave a median 27 % of the gap to the closed-form minimum, at 1e-4 (the offline default) 1.9 %.
The gradient, ``2 (tau_m A - B)`` with ``A = sum_t w_t tau_t^T tau_t``
and ``B = sum_t w_t tau_t tau_t^T tau_t``, is formed once per layer, so a step costs one (out, in) x (in, in)
product: ViT-L/14's largest layer (4096 x 1024, 8 tasks) needs about 100 MB and 300 steps take seconds on a
GPU; the whole model fits one GPU with room to spare (it is done layer by layer).

Which tensors are optimised, and what the others get, is ``scope`` (:data:`WUDI_SCOPES`):

- ``official`` (default): what the authors' ViT code does. Only the four weight matrices of each block
  (attention's in and out projections, the MLP's two layers) are optimised; every other tensor stays at the
  pretrained value (no task vector is added there).
- ``fusionbench``: FusionBench's implementation. Every 2-D tensor is optimised as it is stored (the positional
  embedding and ``proj`` included); the others get the mean task vector.
- ``linear``: this project's earlier choice. Linear-layer weights and ``proj`` (used as ``x @ proj``, so
  optimised transposed, as the linear map it is) are optimised; the others get the mean task vector.

The learning rate is the official 1e-5 on the real-CLIP presets (FusionBench: 1e-5 too, for 400 steps) and
1e-4 on the offline presets, whose task-vector entries are larger (see above).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.progress import tqdm
from surgery_lib.merging.base import MergeMethod, register_method
from surgery_lib.merging.options import STEPS, Option
from surgery_lib.merging.vectors import StateDict, task_vectors

#: Adam steps per layer (the paper's) and the learning rate offline (see the module docstring for why 1e-4).
WUDI_STEPS = 300
WUDI_LR = 1e-4
#: The official learning rate, used on zoos of the published checkpoints (:attr:`Zoo.published`: real CLIP).
WUDI_OFFICIAL_LR = 1e-5
#: What each scope optimises; see the module docstring.
WUDI_SCOPES = ("official", "fusionbench", "linear")
WUDI_SCOPE = Option(
    "wudi_scope",
    str,
    "official",
    "WUDI: the tensors optimised: official (the authors' four matrices per block, the rest pretrained; "
    "default), fusionbench (every matrix, the mean task vector elsewhere), linear",
    choices=WUDI_SCOPES,
)
#: The official code's four matrices per block (open_clip / CLIP names).
BLOCK_MATRICES = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def interference_loss(merged: torch.Tensor, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """WUDI's objective for one layer: ``sum_t ||(merged - Delta_t) Delta_t^T||_F^2 / ||Delta_t||_F^2`` (a scalar)."""
    return sum(((merged - d) @ d.T).square().sum() / d.square().sum().clamp_min(1e-30) for d in deltas)


def wudi_matrix(
    deltas: Sequence[torch.Tensor],
    steps: int = WUDI_STEPS,
    lr: float = WUDI_LR,
    trace: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """WUDI's merged update of one (out, in) linear layer from the task matrices ``deltas``: Adam on
    :func:`interference_loss` from their sum, with its gradient in closed form. ``trace(step, merged)``, if
    given, sees the iterate after every step (step 0: the sum)."""
    if steps < 0:
        raise SurgeryBookError(f"WUDI steps {steps} is negative", "pass a number of steps such as 300")
    deltas = [d.float() for d in deltas]
    weights = [1.0 / d.square().sum().clamp_min(1e-30) for d in deltas]
    grams = [d.T @ d for d in deltas]
    a = sum(w * g for w, g in zip(weights, grams))
    b = sum(w * d @ g for w, d, g in zip(weights, deltas, grams))
    merged = torch.stack(deltas).sum(0).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([merged], lr=lr)
    if trace is not None:
        trace(0, merged.detach())
    for step in range(1, steps + 1):
        optimiser.zero_grad(set_to_none=False)
        merged.grad = 2 * (merged.detach() @ a - b)
        optimiser.step()
        if trace is not None:
            trace(step, merged.detach())
    return merged.detach()


def interference_minimum(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """The minimiser of :func:`interference_loss` in closed form: ``tau_m A = B`` with ``A = sum_t w_t D_t^T D_t``,
    ``B = sum_t w_t D_t D_t^T D_t``, ``w_t = 1 / ||D_t||^2`` (least squares where A is singular). Float64."""
    deltas = [d.double() for d in deltas]
    weights = [1.0 / d.square().sum().clamp_min(1e-300) for d in deltas]
    a = sum(w * d.T @ d for w, d in zip(weights, deltas))
    b = sum(w * d @ d.T @ d for w, d in zip(weights, deltas))
    return torch.linalg.lstsq(a, b.T).solution.T  # A is symmetric: tau_m A = B  <=>  A tau_m^T = B^T


def convergence_curve(
    deltas: Sequence[torch.Tensor], lr: float, steps: int = WUDI_STEPS, every: int = 10
) -> list[tuple[int, float]]:
    """How far WUDI's Adam gets in ``steps``: ``[(step, gap)]`` every ``every`` steps, with ``gap`` the share of the
    loss gap that remains, ``(L(tau_m) - L*) / (L(sum_t D_t) - L*)`` (1 at the start, 0 at the minimum).

    The iterates are :func:`wudi_matrix`'s own; the loss is evaluated in float64.
    """
    exact = [d.double() for d in deltas]
    best = float(interference_loss(interference_minimum(deltas), exact))
    start = float(interference_loss(torch.stack(exact).sum(0), exact))
    span = max(start - best, 1e-300)
    points: list[tuple[int, float]] = []

    def record(step: int, merged: torch.Tensor) -> None:
        if step % every == 0 or step == steps:
            points.append((step, (float(interference_loss(merged.double(), exact)) - best) / span))

    wudi_matrix(deltas, steps, lr, trace=record)
    return points


def convergence_table(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    lrs: Sequence[float],
    steps: int = WUDI_STEPS,
    every: int = 25,
    scope: str = "official",
    layers: int | None = None,
):
    """:func:`convergence_curve` for every matrix ``scope`` optimises (or the first ``layers`` of them), at every
    learning rate in ``lrs``: a ``pandas.DataFrame`` with columns ``layer, lr, step, gap``. Cost: one WUDI run per
    layer and rate, plus a float64 loss every ``every`` steps."""
    import pandas as pd

    vectors = list(task_vectors(pretrained, experts).values())
    keys = [
        k
        for k, v in pretrained.items()
        if vectors and k in vectors[0] and _orientation(k, v, scope) in ("linear", "transposed")
    ]
    rows = []
    for key in keys[:layers]:
        deltas = [v[key].float() for v in vectors]
        if _orientation(key, pretrained[key], scope) == "transposed":
            deltas = [d.T for d in deltas]
        for lr in lrs:
            rows += [
                {"layer": key, "lr": lr, "step": step, "gap": gap}
                for step, gap in convergence_curve(deltas, lr, steps, every)
            ]
    return pd.DataFrame(rows)


def _orientation(key: str, value: torch.Tensor, scope: str) -> str:
    """How ``scope`` treats tensor ``key``: ``"linear"`` (optimise the (out, in) matrix), ``"transposed"`` (a
    projection used as ``x @ proj``), ``"pretrained"`` (keep theta_0) or ``"mean"`` (the mean task vector)."""
    if scope == "official":
        return "linear" if key.endswith(BLOCK_MATRICES) and value.dim() == 2 else "pretrained"
    if value.dim() != 2 or min(value.shape) < 2:
        return "mean"
    if scope == "fusionbench" or key.endswith("weight"):
        return "linear"
    if key == "proj" or key.endswith(".proj"):
        return "transposed"
    return "mean"


def wudi_merging(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    steps: int = WUDI_STEPS,
    lr: float = WUDI_LR,
    device: torch.device | str = "cpu",
    progress: bool = False,
    scope: str = "official",
) -> dict[str, torch.Tensor]:
    """WUDI-Merging: ``theta_0 + tau_m`` per optimised matrix (:func:`wudi_matrix`); the other tensors as ``scope`` says.

    Raises:
        SurgeryBookError: an unknown ``scope``.
    """
    if scope not in WUDI_SCOPES:
        raise SurgeryBookError(f"unknown WUDI scope {scope!r}", f"use one of: {', '.join(WUDI_SCOPES)}")
    tasks = list(task_vectors(pretrained, experts).values())
    merged = {}
    for key, value in tqdm(pretrained.items(), desc="WUDI", disable=not progress, leave=False):
        orientation = _orientation(key, value, scope)
        if not tasks or key not in tasks[0] or orientation == "pretrained":
            merged[key] = value.clone()
            continue
        deltas = [vector[key].to(device) for vector in tasks]
        if orientation == "linear":
            update = wudi_matrix(deltas, steps, lr)
        elif orientation == "transposed":
            update = wudi_matrix([d.T for d in deltas], steps, lr).T
        else:
            update = torch.stack([d.float() for d in deltas]).mean(0)
        merged[key] = value + update.to(value.device, value.dtype)
    return merged


def _run(zoo, experts, options, device, progress):
    steps = WUDI_STEPS if options.steps is None else options.steps
    lr = WUDI_OFFICIAL_LR if zoo.published else WUDI_LR
    state = wudi_merging(zoo.pretrained, experts, steps, lr, device, progress, scope=options.wudi_scope)
    return state, {"steps": steps, "lr": lr, "scope": options.wudi_scope}


register_method(MergeMethod("wudi", "WUDI-Merging", _run, options=(STEPS, WUDI_SCOPE)))
