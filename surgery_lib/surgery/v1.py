"""Representation Surgery (Yang et al., ICML 2024): task-specific modules on the merged embedding.

For task t the module is ``S_t(z) = W_up ReLU(W_down z)`` and the corrected embedding is
``z_hat = z - S_t(z)`` (no biases, rank r = 16; ``W_down`` has torch's default Linear init and
``W_up`` starts at zero, so surgery starts as the identity). It is trained without labels to minimise
the L1 distance between ``z_hat`` of the merged model and ``z`` of task t's expert on the same images.

Because the merged encoder is frozen and preprocessing is deterministic, merged and expert embeddings
of every adaptation image are computed once; training then only touches (N, d) feature tensors. All
tasks train together: their weights are stacked ((T, r, d) and (T, d, r)) and one batched Adam step
updates every task from its own batch. Each task's loss depends only on its own slice and Adam is
elementwise, so this equals the official procedure (one optimiser step per task batch, under either
optimiser semantics of :mod:`surgery_lib.surgery.schedule`) given the same batches; ``tests/test_surgery.py``
checks that against a plain step-by-step replay with ``torch.optim.Adam``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery_lib.core.errors import MAX_SEED, SurgeryBookError, given_or_default, interval_text, whole_number
from surgery_lib.core.progress import tqdm
from surgery_lib.evaluation import accuracy_from_features
from surgery_lib.surgery.schedule import (
    ONLINE_CHECKPOINTS,
    Iteration,
    TaskAdam,
    check_adam,
    check_online_order,
    official_iterations,
    online_iterations,
    task_seed,
    train_on_schedule,
)

__all__ = [
    "SurgeryConfig",
    "SurgeryHistory",
    "SurgeryModule",
    "TaskSurgery",
    "l1_loss_per_task",
    "task_seed",
    "train_surgery",
]


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

    @classmethod
    def from_modules(cls, modules: Mapping[str, SurgeryModule]) -> TaskSurgery:
        """Stack standalone :class:`SurgeryModule` s (one per task, in the mapping's order)."""
        first = next(iter(modules.values()))
        stacked = cls(tuple(modules), first.down.in_features, first.down.out_features)
        with torch.no_grad():
            stacked.down.copy_(torch.stack([m.down.weight for m in modules.values()]))
            stacked.up.copy_(torch.stack([m.up.weight for m in modules.values()]))
        return stacked

    @property
    def rank(self) -> int:
        return self.down.shape[1]

    @property
    def dim(self) -> int:
        return self.down.shape[2]

    def forward(self, z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Correct ``z`` (T, ..., d); row t with task ``rows[t]``'s module (default: task t)."""
        down, up = (self.down, self.up) if rows is None else (self.down[rows], self.up[rows])
        shape = z.shape
        flat = z.reshape(shape[0], -1, shape[-1])
        hidden = F.relu(torch.bmm(flat, down.transpose(1, 2)))
        return (flat - torch.bmm(hidden, up.transpose(1, 2))).reshape(shape)

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


#: The papers' rank of every Surgery module where neither the caller nor a preset chooses one.
DEFAULT_RANK = 16


@dataclass
class SurgeryConfig:
    """Training schedule. Defaults are the official ones: Adam 1e-3, batch 16, 1000 steps per task
    (500 iterations x 2 batches per task, each iteration drawing from a fresh shuffle), one Adam over
    every task's modules stepped as the published runs stepped it (``adam="shared"``, see
    :mod:`surgery_lib.surgery.schedule`), evaluated every 200 steps (every 100 iterations)."""

    #: Rank of every module; None: the preset's for the version (:meth:`Preset.surgery_rank`: 16, SurgeryV2 on
    #: ViT-L/14 4), or :data:`DEFAULT_RANK` where no preset is known. An explicit 16 stays 16.
    rank: int | None = None
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    eval_every: int = 200
    online: bool = False  # batch 1, every adaptation image once, one step each
    adam: str = "shared"  # "shared" (the published runs, torch 1.10) or "per-task" (the same code under torch >= 2)
    batches_per_iteration: int = 2
    online_order: str = (
        "official"  # "official": each task's whole pass in turn; "interleaved": tasks between checkpoints
    )

    def __post_init__(self) -> None:
        check_adam(self.adam)
        check_online_order(self.online_order)
        # Whole numbers as ints (numpy's from an ablation's np.arange too): steps=1.5 failed inside the schedule,
        # rank=2.5 inside torch.empty, and batch_size=True trained with batches of one.
        examples = {"steps": 1000, "batch_size": 16, "seed": 0, "eval_every": 200, "batches_per_iteration": 2}
        for name, example in {**examples, "rank": DEFAULT_RANK}.items():
            value = getattr(self, name)
            if value is not None or name != "rank":
                fix = f"pass {name} as a whole number, e.g. {name}={example}"
                setattr(self, name, whole_number(value, f"SurgeryConfig {name}", fix))
        if isinstance(self.lr, bool) or not isinstance(self.lr, numbers.Real):
            raise SurgeryBookError(f"SurgeryConfig lr {self.lr!r} is not a number", "pass lr as a number, e.g. 1e-3")
        if not isinstance(self.online, bool):
            raise SurgeryBookError(f"SurgeryConfig online {self.online!r} is not True or False", "pass online=True")
        if not 0 <= self.seed <= MAX_SEED:
            raise SurgeryBookError(
                f"SurgeryConfig seed {self.seed} is outside {interval_text(0, MAX_SEED)}",
                f"pass a seed in {interval_text(0, MAX_SEED)}",
            )
        if (
            self.steps < 0
            or self.batch_size < 1
            or self.batches_per_iteration < 1
            or self.eval_every < 0
            or (self.rank is not None and self.rank < 1)
            or not math.isfinite(self.lr)
            or self.lr <= 0
        ):
            raise SurgeryBookError(
                f"invalid surgery schedule (rank {self.rank}, steps {self.steps}, batch {self.batch_size}, "
                f"batches per iteration {self.batches_per_iteration}, lr {self.lr}, eval every {self.eval_every})",
                "use rank >= 1, steps >= 0, batch size >= 1, batches per iteration >= 1, a positive finite learning "
                "rate and eval_every >= 0 (0: no accuracy checkpoints)",
            )

    def with_rank(self, rank: int) -> SurgeryConfig:
        """This schedule with ``rank`` where it leaves the rank to the caller (``rank=None``), else unchanged."""
        return self if self.rank is not None else dataclasses.replace(self, rank=rank)

    def iterations(self, sizes: Sequence[int]) -> Iterator[Iteration]:
        """The batches of every iteration for tasks with ``sizes`` adaptation images (see :mod:`surgery_lib.surgery.schedule`)."""
        if self.online:
            return online_iterations(sizes, seed=self.seed, order=self.online_order)
        return official_iterations(
            sizes,
            steps=self.steps,
            batch_size=self.batch_size,
            batches_per_iteration=self.batches_per_iteration,
            seed=self.seed,
            eval_every=self.eval_every,
        )

    def rounds(self, sizes: Sequence[int]) -> int:
        """How many batched steps the schedule takes (for progress bars)."""
        if self.online:
            return sum(sizes) if self.online_order == "official" else max(sizes)
        return self.steps


@dataclass
class SurgeryHistory:
    """Loss per batched step (mean over the tasks that stepped) and, at every checkpoint, test accuracy
    per task. Checkpoints count steps per task, or % of each task's images for the online run (``unit``).

    ``end_of_pass`` (online runs only): each task's module as its own pass left it, which is what the official
    online log evaluates; under shared Adam the tasks that finish early keep coasting through the later tasks'
    passes, so the modules at the end of the whole run differ from these."""

    loss: list[float] = field(default_factory=list)
    accuracy: dict[int, dict[str, float]] = field(default_factory=dict)
    unit: str = "step"
    end_of_pass: dict[str, SurgeryModule] = field(default_factory=dict)

    @torch.no_grad()
    def record(self, step: int, tasks: Sequence[str], accuracy: Callable[[str], float]) -> None:
        """Store ``accuracy(task)`` (test accuracy, %) of ``tasks`` at checkpoint ``step`` (other tasks' entries
        at that checkpoint, recorded earlier in the online pass, are kept)."""
        self.accuracy.setdefault(step, {}).update({task: accuracy(task) for task in tasks})


def l1_loss_per_task(corrected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over everything but the leading task axis: (T, ...) -> (T,)."""
    return (corrected - target).abs().flatten(1).mean(dim=1)


def as_surgery_config(config: Any) -> SurgeryConfig:
    """``config`` where it is a :class:`SurgeryConfig`, the official schedule for None.

    Raises:
        SurgeryBookError: for anything else; for a dict, with the call that builds the schedule from it.
    """
    return given_or_default(config, SurgeryConfig, "config", "SurgeryConfig(steps=1000)")


def train_surgery(
    merged: Mapping[str, torch.Tensor],
    expert: Mapping[str, torch.Tensor],
    config: SurgeryConfig | None = None,
    *,
    evaluate: Mapping[str, tuple[torch.Tensor, torch.Tensor, nn.Module]] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[TaskSurgery, SurgeryHistory]:
    """Train every task's surgery module on cached embeddings, on the official schedule.

    Every iteration, each task takes its batches (``config.batches_per_iteration`` from a fresh shuffle,
    or its next images one by one when ``config.online``); all tasks step together, and with
    ``config.adam == "shared"`` each module also coasts through the other tasks' steps as in the
    published runs.

    Args:
        merged: ``{task: (N_t, d)}`` merged-model embeddings of the adaptation images.
        expert: ``{task: (N_t, d)}`` the task expert's embeddings of the same images.
        config: the schedule (default: the official one).
        evaluate: optional ``{task: (test embeddings of the merged model, labels, head)}`` for the
            accuracy curve recorded at every checkpoint.

    Returns:
        The trained modules (on the CPU) as the last step left them, and the training history (for an
        online run with its ``end_of_pass`` modules, the ones the official log evaluates).
    """
    config = as_surgery_config(config)
    tasks = tuple(merged)
    if set(expert) != set(tasks):
        raise SurgeryBookError("merged and expert embeddings name different tasks", "give both for the same tasks")
    if not tasks:
        raise SurgeryBookError("no task to train surgery for", "give at least one task's embeddings")
    device = torch.device(device)
    dim = next(iter(merged.values())).shape[-1]
    for task in tasks:  # a mismatch was a RuntimeError from inside the first step (1-D: an IndexError)
        if merged[task].ndim != 2 or merged[task].shape != expert[task].shape or merged[task].shape[1] != dim:
            raise SurgeryBookError(
                f"task {task!r}: merged embeddings {tuple(merged[task].shape)}, expert {tuple(expert[task].shape)}",
                f"give (N_t, d) embeddings of the same images for both, with one width d for every task (here {dim})",
            )
    config = config.with_rank(DEFAULT_RANK)
    surgery = TaskSurgery(tasks, dim, config.rank, config.seed).to(device)
    optimizer = TaskAdam(surgery.parameters(), len(tasks), lr=config.lr, semantics=config.adam)
    sources = [merged[t].to(device) for t in tasks]
    targets = [expert[t].to(device) for t in tasks]
    sizes = [len(s) for s in sources]
    history = SurgeryHistory(unit="%" if config.online else "step")

    def accuracy(task: str) -> float:
        features, labels, head = evaluate[task]
        return accuracy_from_features(surgery.apply_task(task, features.to(device)).cpu(), head, labels)

    last = max(ONLINE_CHECKPOINTS)

    def checkpoint(step: int, indices: Sequence[int] | None = None) -> None:
        names = [tasks[i] for i in indices] if indices is not None else list(tasks)
        if evaluate:
            history.record(step, [t for t in names if t in evaluate], accuracy)
        if config.online and step == last:
            history.end_of_pass.update({t: surgery.module(t) for t in names})

    if evaluate:
        checkpoint(0)

    def task_losses(index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        index, weight = index.to(device), weight.to(device)
        z = torch.stack([s[i] for s, i in zip(sources, index)])
        target = torch.stack([s[i] for s, i in zip(targets, index)])
        return ((surgery(z) - target).abs().mean(dim=-1) * weight).sum(dim=1)

    with tqdm(
        total=config.rounds(sizes), desc="surgery" + (" (online)" if config.online else ""), disable=not progress
    ) as bar:
        train_on_schedule(
            config.iterations(sizes),
            optimizer,
            task_losses,
            losses=history.loss,
            bar=bar,
            checkpoint=checkpoint if evaluate or config.online else None,
        )
    return surgery.cpu(), history
