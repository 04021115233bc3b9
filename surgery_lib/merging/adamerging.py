"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by entropy minimisation.

The merged weights are ``theta_0 + sum_t clamp(lambda_t[k], 0, 1) * tau_t[k]`` with one coefficient per
task (task-wise) or one per task per parameter tensor ``k`` (layer-wise). As in the official code the
clamp sits inside the merge: the parameter itself is never clamped, so a coefficient pushed past 0 or 1
gets zero gradient and stays there. The coefficients start at 0.3 and minimise, with Adam, the sum over
tasks and over each task's batches of the batch-mean Shannon entropy of that task's predictions
(through its own head) on unlabeled images; every step draws its batches from a fresh shuffle.

Scaling: the stacked task vectors live on the device (T x model size; 2.8 GB for 8 ViT-B/32 experts),
the merge runs there every step, and each task's loss is back-propagated before the next task's
forward pass, so activation memory is that of one batch whatever the number of tasks.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.progress import tqdm
from surgery_lib.core.taskdata import TaskData
from surgery_lib.merging.base import MergeMethod, register_method, ties_zero_entries
from surgery_lib.merging.options import KEEP_FRACTION, PRECISION, SEED, STEPS, Option
from surgery_lib.merging.ties import ties_vectors
from surgery_lib.merging.vectors import task_vectors
from surgery_lib.models import autocast


@dataclass
class AdaMergingResult:
    """Learned coefficients (tasks x groups; groups = 1 task-wise, = parameter tensors layer-wise).

    ``coefficients`` are the ones the merge uses (clamped to [0, 1]); ``raw_coefficients`` the optimised
    parameter, which may lie outside (when a run records it)."""

    tasks: tuple[str, ...]
    keys: tuple[str, ...]
    coefficients: torch.Tensor
    merged: dict[str, torch.Tensor]
    entropy: list[float] = field(default_factory=list)
    raw_coefficients: torch.Tensor | None = None

    def coefficient_table(self):  # -> pandas.DataFrame
        """Coefficients as a DataFrame: rows are tasks, columns parameter tensors (or ``all``)."""
        import pandas as pd

        columns = list(self.keys) if self.coefficients.shape[1] == len(self.keys) else ["all"]
        return pd.DataFrame(self.coefficients.numpy(), index=list(self.tasks), columns=columns)

    def block_table(self):  # -> pandas.DataFrame
        """Layer-wise coefficients averaged over the tensors of each block: tasks x (block 1..L, then the
        tensors outside the blocks: embeddings, layer norms, projection)."""
        table = self.coefficient_table()
        if list(table.columns) == ["all"]:
            raise SurgeryBookError("task-wise coefficients have no blocks", "use a layer-wise AdaMerging result")
        block = table.columns.str.extract(r"resblocks\.(\d+)\.", expand=False)
        numbers = sorted({int(b) for b in block.dropna()})
        labels = [f"block {int(b) + 1}" if isinstance(b, str) else "embeddings, ln, proj" for b in block]
        grouped = table.T.groupby(labels).mean().T
        return grouped[[f"block {n + 1}" for n in numbers] + (["embeddings, ln, proj"] if block.isna().any() else [])]


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` per row: (N, C) -> (N,)."""
    log_probs = logits.float().log_softmax(dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def merge_with_coefficients(
    pretrained: Mapping[str, torch.Tensor],
    stacked: Mapping[str, torch.Tensor],
    coefficients: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """``theta_0[k] + sum_t clamp(coefficients[t, j(k)], 0, 1) * stacked[k][t]``; differentiable in ``coefficients``
    (zero gradient where a coefficient lies outside [0, 1], as in the official code).

    ``stacked[k]`` is (T, *shape); ``coefficients`` is (T, 1) or (T, K) with K = len(stacked).
    """
    merged = {}
    clamped = coefficients.clamp(0.0, 1.0)
    for j, (key, vectors) in enumerate(stacked.items()):
        column = clamped[:, j if clamped.shape[1] > 1 else 0]
        merged[key] = pretrained[key] + torch.tensordot(column.to(vectors.dtype), vectors, dims=1)
    return merged


def adamerging(
    encoder: nn.Module,
    pretrained: Mapping[str, torch.Tensor],
    vectors: Mapping[str, Mapping[str, torch.Tensor]],
    heads: Mapping[str, nn.Module],
    unlabeled: Mapping[str, TaskData],
    *,
    granularity: str = "layer",
    split: str = "test",
    steps: int = 500,
    batch_size: int = 16,
    batches_per_task: int = 2,
    lr: float = 1e-3,
    init: float = 0.3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = True,
) -> AdaMergingResult:
    """Learn merging coefficients by entropy minimisation (defaults: the official schedule).

    Args:
        encoder: a module of the merged architecture (its own weights are not used).
        pretrained: theta_0.
        vectors: ``{task: tau_t}`` (plain task vectors, or TIES-processed ones for AdaMerging++).
        heads: the frozen head of every task.
        unlabeled: task data whose ``split`` images are used without labels (the paper: ``"test"``).
        granularity: ``"task"`` (one coefficient per task) or ``"layer"`` (one per task per tensor).
        steps, batch_size, batches_per_task, lr, init: the optimisation (500, 16, 2, 1e-3, 0.3).
        seed: seeds the choice of batches (every step: a fresh shuffle per task, its first batches).
        precision: of the forward passes on a GPU (:data:`surgery_lib.models.PRECISIONS`; official: fp32).

    Returns:
        The coefficients as learned (on the CPU; the merge uses them clamped to [0, 1]), the merged
        state dict and the mean entropy per batch at every step.
    """
    if granularity not in ("task", "layer"):
        raise SurgeryBookError(f"unknown AdaMerging granularity {granularity!r}", "use 'task' or 'layer'")
    tasks = tuple(vectors)
    missing = [t for t in tasks if t not in heads or t not in unlabeled]
    if missing:
        raise SurgeryBookError(f"no head or data for task(s) {missing}", "give a head and data for every merged task")
    device = torch.device(device)
    keys = tuple(vectors[tasks[0]])
    base = {k: v.to(device) for k, v in pretrained.items()}
    stacked = {k: torch.stack([vectors[t][k] for t in tasks]).to(device) for k in keys}
    groups = len(keys) if granularity == "layer" else 1
    coefficients = torch.full((len(tasks), groups), init, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=lr)
    encoder = encoder.to(device).eval()
    for head in heads.values():
        head.to(device).requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []

    for _ in tqdm(range(steps), desc=f"AdaMerging ({granularity}-wise)", disable=not progress):
        optimizer.zero_grad(set_to_none=True)
        params = merge_with_coefficients(base, stacked, coefficients)
        total, batches = 0.0, 0
        for task in tasks:
            data = unlabeled[task]
            order = torch.randperm(len(data.labels[split]), generator=generator)
            for start in range(0, min(len(order), batches_per_task * batch_size), batch_size):
                images = data.normalized(split, order[start : start + batch_size]).to(device)
                with autocast(device, precision):
                    embedding = functional_call(encoder, params, (images,))
                loss = prediction_entropy(heads[task](embedding.float())).mean()
                # Back-propagate each batch now (the gradients add up to those of the official summed
                # loss): only this batch's activations are ever held.
                loss.backward(retain_graph=True)
                total += loss.item()
                batches += 1
        optimizer.step()
        if not torch.isfinite(coefficients).all():
            raise SurgeryBookError(
                "AdaMerging coefficients became NaN or infinite", "lower the learning rate or check the task vectors"
            )
        history.append(total / batches)

    final = coefficients.detach()
    with torch.no_grad():  # the merge clamps the coefficients itself
        merged = {k: v.detach().cpu() for k, v in merge_with_coefficients(base, stacked, final).items()}
    merged = {**{k: v.clone() for k, v in pretrained.items()}, **merged}
    return AdaMergingResult(tasks, keys, final.clamp(0.0, 1.0).cpu(), merged, history, final.cpu())


def _run(zoo, experts, options, device, progress, *, granularity: str, trimmed: bool):
    vectors = task_vectors(zoo.pretrained, experts)
    if trimmed:  # AdaMerging++: the coefficients scale TIES-trimmed task vectors
        vectors = dict(
            zip(vectors, ties_vectors(list(vectors.values()), options.keep_fraction, ties_zero_entries(zoo)))
        )
    result = adamerging(
        zoo.encoder("pretrained"),
        zoo.pretrained,
        vectors,
        zoo.heads,
        {t: zoo.suite[t] for t in experts},
        granularity=granularity,
        split=options.split,
        steps=options.steps if options.steps is not None else zoo.preset.adamerging_steps,
        batch_size=options.batch_size or zoo.preset.adamerging_batch_size,
        batches_per_task=options.batches_per_task,
        lr=options.lr,
        seed=options.seed,
        device=device,
        precision=options.precision or zoo.preset.precision,
        progress=progress,
    )
    return result.merged, {"adamerging": result}


BATCH_SIZE = Option(
    "batch_size", int, None, "AdaMerging: unlabeled images per task and step (default: the preset's)", low=1
)
BATCHES_PER_TASK = Option(
    "batches_per_task", int, 2, "AdaMerging: batches per task and step, drawn afresh each step (default 2)", low=1
)
LR = Option(
    "lr",
    float,
    1e-3,
    "AdaMerging: Adam's learning rate on the merging coefficients (default 1e-3, the official)",
    low=0,
    low_open=True,
    flag="adamerging-lr",
)
SPLIT = Option(
    "split",
    str,
    "test",
    "the unlabeled images AdaMerging adapts on: the test split as in the paper (default), or the held-out adapt split",
    choices=("test", "adapt"),
    flag="data",
)
_OPTIONS = (STEPS, BATCH_SIZE, BATCHES_PER_TASK, LR, SPLIT, SEED, PRECISION)
for _name, _label, _granularity, _trimmed in (
    ("adamerging_task", "task-wise AdaMerging", "task", False),
    ("adamerging_layer", "layer-wise AdaMerging", "layer", False),
    ("adamerging_plus_task", "task-wise AdaMerging++", "task", True),
    ("adamerging_plus", "layer-wise AdaMerging++", "layer", True),
):
    register_method(
        MergeMethod(
            _name,
            _label,
            functools.partial(_run, granularity=_granularity, trimmed=_trimmed),
            options=_OPTIONS + ((KEEP_FRACTION,) if _trimmed else ()),
            trims=_trimmed,
            data="unlabeled",
        )
    )
