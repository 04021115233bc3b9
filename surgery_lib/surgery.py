"""Representation Surgery (Yang et al., ICML 2024): task-specific modules on the merged embedding.

For task t the module is ``S_t(z) = W_up ReLU(W_down z)`` and the corrected embedding is
``z_hat = z - S_t(z)`` (no biases, rank r = 16; ``W_down`` has torch's default Linear init and
``W_up`` starts at zero, so surgery starts as the identity). It is trained without labels to minimise
the L1 distance between ``z_hat`` of the merged model and ``z`` of task t's expert on the same images.

Because the merged encoder is frozen and preprocessing is deterministic, merged and expert embeddings
of every adaptation image are computed once; training then only touches (N, d) feature tensors. All
tasks train together: their weights are stacked ((T, r, d) and (T, d, r)) and one Adam step updates
every task from its own batch. Each task's loss depends only on its own slice, and Adam is
elementwise, so this equals the official procedure (one optimiser step per task batch) given the same
batches; ``tests/test_surgery.py`` checks that against a plain step-by-step implementation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from surgery_lib.errors import SurgeryBookError
from surgery_lib.progress import tqdm


class SurgeryModule(nn.Module):
    """One task's module: ``z -> z - W_up ReLU(W_down z)`` on embeddings (..., dim)."""

    def __init__(self, dim: int, rank: int = 16) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - self.up(F.relu(self.down(z)))


class TaskSurgery(nn.Module):
    """The surgery modules of T tasks with stacked weights: ``down`` (T, r, d), ``up`` (T, d, r).

    ``forward(z)`` takes z (T, ..., d), row t belonging to task t, and returns the corrected (T, ..., d).
    """

    def __init__(self, tasks: Sequence[str], dim: int, rank: int = 16, seed: int = 0) -> None:
        super().__init__()
        if rank < 1 or dim < 1:
            raise SurgeryBookError(f"surgery rank {rank} and width {dim} must be positive", "pass --rank 1 or more")
        self.tasks = tuple(tasks)
        generator = torch.Generator().manual_seed(seed)
        down = torch.empty(len(tasks), rank, dim)
        bound = 1 / math.sqrt(dim)  # torch's default Linear init: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(d), 1/sqrt(d))
        down.uniform_(-bound, bound, generator=generator)
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(torch.zeros(len(tasks), dim, rank))

    @property
    def rank(self) -> int:
        return self.down.shape[1]

    @property
    def dim(self) -> int:
        return self.down.shape[2]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        shape = z.shape
        flat = z.reshape(shape[0], -1, shape[-1])
        hidden = F.relu(torch.bmm(flat, self.down.transpose(1, 2)))
        return (flat - torch.bmm(hidden, self.up.transpose(1, 2))).reshape(shape)

    def apply_task(self, task: str, z: torch.Tensor) -> torch.Tensor:
        """Correct embeddings ``z`` (N, d) of a single ``task``."""
        t = self.index(task)
        return z - F.relu(z @ self.down[t].T) @ self.up[t].T

    def index(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise SurgeryBookError(
                f"no surgery module for task {task!r}", f"use one of: {', '.join(self.tasks)}"
            ) from None

    def module(self, task: str) -> SurgeryModule:
        """A standalone :class:`SurgeryModule` holding a copy of ``task``'s weights."""
        t = self.index(task)
        module = SurgeryModule(self.dim, self.rank)
        with torch.no_grad():
            module.down.weight.copy_(self.down[t])
            module.up.weight.copy_(self.up[t])
        return module

    def parameters_per_task(self) -> int:
        return 2 * self.dim * self.rank


def batch_stream(count: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of indices into ``count`` items: seeded shuffled epochs, incomplete batches dropped
    (with fewer than ``batch_size`` items, one batch spans several epochs, so every batch is full).

    The same stream feeds the batched trainer and the step-by-step reference, so both see the same batches.
    """
    generator = torch.Generator().manual_seed(seed)
    if count < batch_size:  # fewer images than a batch: consecutive epochs fill it (tasks stay batch-aligned)
        buffer = torch.empty(0, dtype=torch.int64)
        while True:
            while len(buffer) < batch_size:
                buffer = torch.cat([buffer, torch.randperm(count, generator=generator)])
            yield buffer[:batch_size]
            buffer = buffer[batch_size:]
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def task_seed(seed: int, task_index: int) -> int:
    """The batch-stream seed of the ``task_index``-th task."""
    return seed * 1009 + task_index


@dataclass
class SurgeryConfig:
    """Training schedule. Defaults are the official ones: Adam 1e-3, batch 16, 1000 steps per task
    (500 iterations x 2 batches per task), evaluated every 200 steps (every 100 iterations)."""

    rank: int = 16
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    eval_every: int = 200
    online: bool = False  # batch 1, every adaptation image once, one step each

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or not math.isfinite(self.lr) or self.lr <= 0:
            raise SurgeryBookError(
                f"invalid surgery schedule (steps {self.steps}, batch {self.batch_size}, lr {self.lr})",
                "use steps >= 0, batch size >= 1 and a positive learning rate",
            )


@dataclass
class SurgeryHistory:
    """Loss per step (mean over tasks) and, every ``eval_every`` steps, test accuracy per task."""

    loss: list[float] = field(default_factory=list)
    accuracy: dict[int, dict[str, float]] = field(default_factory=dict)


def l1_loss_per_task(corrected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over everything but the leading task axis: (T, ...) -> (T,)."""
    return (corrected - target).abs().flatten(1).mean(dim=1)


def train_surgery(
    merged: Mapping[str, torch.Tensor],
    expert: Mapping[str, torch.Tensor],
    config: SurgeryConfig | None = None,
    *,
    evaluate: Mapping[str, tuple[torch.Tensor, torch.Tensor, nn.Module]] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[TaskSurgery, SurgeryHistory]:
    """Train every task's surgery module on cached embeddings.

    Args:
        merged: ``{task: (N_t, d)}`` merged-model embeddings of the adaptation images.
        expert: ``{task: (N_t, d)}`` the task expert's embeddings of the same images.
        config: the schedule (default: the official one).
        evaluate: optional ``{task: (test embeddings of the merged model, labels, head)}`` for the
            accuracy curve recorded every ``config.eval_every`` steps.

    Returns:
        The trained modules (on the CPU) and the training history.
    """
    config = config or SurgeryConfig()
    tasks = tuple(merged)
    if set(expert) != set(tasks):
        raise SurgeryBookError("merged and expert embeddings name different tasks", "give both for the same tasks")
    if config.online:
        return _train_online(merged, expert, config, evaluate, device, progress)
    device = torch.device(device)
    dim = next(iter(merged.values())).shape[1]
    surgery = TaskSurgery(tasks, dim, config.rank, config.seed).to(device)
    optimizer = torch.optim.Adam(surgery.parameters(), lr=config.lr)
    sources = {t: merged[t].to(device) for t in tasks}
    targets = {t: expert[t].to(device) for t in tasks}
    streams = [batch_stream(len(sources[t]), config.batch_size, task_seed(config.seed, i)) for i, t in enumerate(tasks)]
    history = SurgeryHistory()
    _record(surgery, evaluate, history, 0, device)
    for step in tqdm(range(1, config.steps + 1), desc="surgery", disable=not progress):
        index = [next(stream) for stream in streams]
        z = torch.stack([sources[t][i] for t, i in zip(tasks, index)])
        target = torch.stack([targets[t][i] for t, i in zip(tasks, index)])
        losses = l1_loss_per_task(surgery(z), target)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # task t's gradient is exactly that of its own loss
        optimizer.step()
        history.loss.append(losses.mean().item())
        if config.eval_every and step % config.eval_every == 0:
            _record(surgery, evaluate, history, step, device)
    return surgery.cpu(), history


def _train_online(merged, expert, config, evaluate, device, progress):
    """Online surgery: each task's images once in a seeded order, batch 1, one Adam step per image."""
    tasks = tuple(merged)
    stacked = TaskSurgery(tasks, next(iter(merged.values())).shape[1], config.rank, config.seed)
    history = SurgeryHistory()
    _record(stacked, evaluate, history, 0, "cpu")
    for i, task in enumerate(tasks):
        order = torch.randperm(len(merged[task]), generator=torch.Generator().manual_seed(task_seed(config.seed, i)))
        single = TaskSurgery((task,), stacked.dim, config.rank)
        with torch.no_grad():
            single.down.copy_(stacked.down[i : i + 1])
        single.to(device)
        optimizer = torch.optim.Adam(single.parameters(), lr=config.lr)
        sources, targets = merged[task][order].to(device), expert[task][order].to(device)
        for j in tqdm(range(len(order)), desc=f"online surgery {task}", disable=not progress):
            loss = l1_loss_per_task(single(sources[None, j : j + 1]), targets[None, j : j + 1])
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
            history.loss.append(loss.item())
        with torch.no_grad():
            stacked.down[i].copy_(single.down[0].cpu())
            stacked.up[i].copy_(single.up[0].cpu())
    _record(stacked, evaluate, history, len(history.loss), "cpu")
    return stacked, history


@torch.no_grad()
def _record(surgery: TaskSurgery, evaluate, history: SurgeryHistory, step: int, device) -> None:
    if not evaluate:
        return
    from surgery_lib.evaluation import accuracy_from_features

    history.accuracy[step] = {
        task: accuracy_from_features(surgery.apply_task(task, z.to(device)).cpu(), head, labels)
        for task, (z, labels, head) in evaluate.items()
    }
