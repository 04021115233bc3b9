"""Fisher merging (Matena and Raffel, 2022): a per-weight average weighted by each expert's Fisher.

``theta*[k] = sum_t F_t[k] * theta_t[k] / sum_t F_t[k]`` with ``F_t`` the diagonal Fisher of expert t,
estimated from squared per-example gradients of the log-probability of the model's own prediction
on a few hundred unlabeled images of task t.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from surgery_lib.core.progress import tqdm
from surgery_lib.merging.base import MergeMethod, register_method, train_subset
from surgery_lib.merging.options import SAMPLES, SEED


def diagonal_fisher(
    encoder: nn.Module,
    head: nn.Module,
    images: torch.Tensor,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``head(encoder(x))`` over normalised ``images`` (N, 3, H, W), one example at a time.

    Uses the model's own most likely class as the label (the empirical Fisher of its predictions), so
    no labels are needed. Returns ``{parameter name: mean squared gradient}`` on the CPU.
    """
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    head = head.to(device).eval().requires_grad_(False)
    params = {name: p for name, p in encoder.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    for image in tqdm(images, desc="Fisher", disable=not progress):
        log_probs = head(encoder(image[None].to(device))).log_softmax(dim=-1)
        grads = torch.autograd.grad(log_probs[0, log_probs.argmax()], list(params.values()))
        for name, grad in zip(params, grads):
            fisher[name] += grad.detach() ** 2
    return {name: (value / len(images)).cpu() for name, value in fisher.items()}


def fisher_merging(
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    fishers: Mapping[str, Mapping[str, torch.Tensor]],
    epsilon: float = 1e-10,
) -> dict[str, torch.Tensor]:
    """Fisher-weighted average of ``experts``; entries with no Fisher mass fall back to the plain mean."""
    tasks = list(experts)
    merged = {}
    for key, reference in experts[tasks[0]].items():
        stacked = torch.stack([experts[t][key] for t in tasks]).float()
        if key not in fishers[tasks[0]]:
            merged[key] = stacked.mean(0).to(reference.dtype)
            continue
        weights = torch.stack([fishers[t][key] for t in tasks]).float() + epsilon
        merged[key] = ((weights * stacked).sum(0) / weights.sum(0)).to(reference.dtype)
    return merged


def _run(zoo, experts, options, device, progress):
    fishers = {
        task: diagonal_fisher(
            zoo.encoder(task), zoo.heads[task], train_subset(zoo, task, options.samples, options.seed), device, progress
        )
        for task in experts
    }
    return fisher_merging(experts, fishers), {}


register_method(MergeMethod("fisher", "Fisher merging", _run, options=(SAMPLES, SEED), data="labeled"))
