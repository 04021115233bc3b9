"""How the official Surgery runs fed batches to their optimiser, and an Adam that replays it batched.

The official scripts keep ONE ``torch.optim.Adam`` over every task's modules. Each of their iterations
visits the tasks in a fixed order; for each task it draws a fresh shuffle of that task's images, takes
the first two batches, and for each batch calls ``optimizer.zero_grad()``, back-propagates that task's
loss and calls ``optimizer.step()``. What ``zero_grad()`` does decides what the other tasks' modules
experience during that step:

- ``"shared"`` (the published runs, torch 1.10): ``zero_grad()`` fills gradients with zeros, and Adam
  steps every parameter whose gradient is not ``None``. Once a task has had its first batch, every
  later step also moves its module on its own Adam moments ("coasting": ``m <- b1 m``,
  ``v <- b2 v``, the step counter advances, the weights keep moving by ``lr m_hat / (sqrt(v_hat) + eps)``).
- ``"per-task"`` (the same script under torch >= 2, where ``zero_grad()`` sets gradients to ``None``):
  a step moves only the module whose task's batch it was.

A task's trajectory depends only on its own gradients and on how many foreign steps pass between its
own, and a coasting step is a deterministic function of its own moments. So every task can take its
real steps together with the others in one batched step, and the coasting steps in between are
applied in closed form: :class:`TaskAdam` does both on parameters with a leading task axis, and
:func:`official_iterations` says, iteration by iteration, which batches each task takes and how
many foreign steps pass before and after them. ``tests/test_surgery.py`` checks the result against a
plain step-by-step replay with ``torch.optim.Adam``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from surgery_lib.core.errors import SurgeryBookError

log = logging.getLogger(__name__)

#: The two optimiser semantics: the published runs (torch 1.10) and the same code under torch >= 2.
ADAM_SEMANTICS = ("shared", "per-task")

#: Accuracy checkpoints of the online run, in % of each task's images seen (the official log's).
ONLINE_CHECKPOINTS = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)

#: Orders of the online pass: the official script's (each task's whole pass, then the next task's) and the
#: tasks interleaved between checkpoints (this project's earlier order; equal to the official one under per-task
#: Adam, not under shared Adam, where every step also moves the tasks that have started).
ONLINE_ORDERS = ("official", "interleaved")


def _one_of(value: str, choices: Sequence[str], what: str, fix: str) -> str:
    """``value`` if it is one of ``choices``, else a one-line error naming ``what`` was unknown and ``fix``."""
    if value not in choices:
        raise SurgeryBookError(f"unknown {what} {value!r}", fix)
    return value


def check_adam(adam: str) -> str:
    """Raise a clear error unless ``adam`` names one of :data:`ADAM_SEMANTICS`."""
    return _one_of(
        adam,
        ADAM_SEMANTICS,
        "optimiser semantics",
        "use 'shared' (the published runs: one Adam, zero-filled gradients) or 'per-task' (torch >= 2)",
    )


def check_online_order(order: str) -> str:
    """Raise a clear error unless ``order`` names one of :data:`ONLINE_ORDERS`."""
    return _one_of(
        order,
        ONLINE_ORDERS,
        "online order",
        "use 'official' (each task's whole pass in turn, as the official online script) or 'interleaved'",
    )


def task_seed(seed: int, task_index: int) -> int:
    """The batch-drawing seed of the ``task_index``-th task."""
    return seed * 1009 + task_index


@dataclass
class Iteration:
    """One official iteration: ``batches[t]`` are task t's index batches, taken in the official order
    (task 0's batches, then task 1's, ...), one optimiser step each.

    ``before[t]`` is how many steps of other tasks run in this iteration before task t's first batch,
    ``after[t]`` how many after its last one. ``checkpoint`` labels an evaluation due after the iteration,
    of the tasks ``checkpoint_tasks`` (indices; ``None``: every task).
    """

    batches: list[list[torch.Tensor]]
    checkpoint: int | None = None
    checkpoint_tasks: tuple[int, ...] | None = None

    @property
    def counts(self) -> list[int]:
        return [len(b) for b in self.batches]

    @property
    def before(self) -> list[int]:
        counts = self.counts
        return [sum(counts[:t]) for t in range(len(counts))]

    @property
    def after(self) -> list[int]:
        counts, total = self.counts, sum(self.counts)
        return [total - before - own for before, own in zip(self.before, counts)]

    @property
    def rounds(self) -> int:
        return max(self.counts, default=0)


def official_iterations(
    sizes: Sequence[int],
    *,
    steps: int,
    batch_size: int,
    batches_per_iteration: int = 2,
    seed: int = 0,
    eval_every: int = 0,
) -> Iterator[Iteration]:
    """The official batches: every iteration each task draws a fresh shuffle of its ``sizes[t]`` images and
    takes its first ``batches_per_iteration`` batches of ``batch_size`` (the last one may be short, as a
    ``DataLoader`` without ``drop_last`` gives it; a task with fewer images takes fewer batches).

    Iterations continue until ``steps`` batch rounds ran (the last iteration may take fewer batches);
    an iteration after which the round count reaches a multiple of ``eval_every`` carries that count as
    its ``checkpoint``.
    """
    if min(sizes, default=0) < 1:
        raise SurgeryBookError("a task has no adaptation images", "give every task at least one image")
    generators = [torch.Generator().manual_seed(task_seed(seed, t)) for t in range(len(sizes))]
    done = 0
    while done < steps:
        take = min(batches_per_iteration, steps - done)
        batches = []
        for size, generator in zip(sizes, generators):
            order = torch.randperm(size, generator=generator)
            batches.append(
                [order[start : start + batch_size] for start in range(0, min(size, take * batch_size), batch_size)]
            )
        previous, done = done, done + take
        due = eval_every and done // eval_every > previous // eval_every
        yield Iteration(batches, done if due else None)


def online_iterations(
    sizes: Sequence[int], *, seed: int = 0, checkpoints: Sequence[int] = ONLINE_CHECKPOINTS, order: str = "official"
) -> Iterator[Iteration]:
    """The online run: every image of every task once, batch 1, in a seeded order per task.

    ``order="official"`` is the official online script's: each task makes its whole pass, in the official task
    order, before the next task starts (one Adam over every task's modules, so under shared semantics the tasks
    that finished keep coasting through the later passes). Each task's pass is cut at ``checkpoints`` (% of its
    images), and an iteration ends at each cut with an evaluation of that task alone, as the official log
    reports it. ``order="interleaved"`` instead advances every task to the next cut in turn and evaluates all
    of them there.
    """
    check_online_order(order)
    if min(sizes, default=0) < 1:
        raise SurgeryBookError("a task has no adaptation images", "give every task at least one image")
    orders = [
        torch.randperm(size, generator=torch.Generator().manual_seed(task_seed(seed, t)))
        for t, size in enumerate(sizes)
    ]
    cuts = [[max(1, size * percent // 100) for percent in checkpoints] for size in sizes]
    if order == "interleaved":
        seen = [0] * len(sizes)
        for k, percent in enumerate(checkpoints):
            upto = [task_cuts[k] for task_cuts in cuts]
            batches = [[o[i : i + 1] for i in range(start, end)] for o, start, end in zip(orders, seen, upto)]
            seen = upto
            yield Iteration(batches, percent)
        return
    for t in range(len(sizes)):
        seen = 0
        for percent, upto in zip(checkpoints, cuts[t]):
            batches: list[list[torch.Tensor]] = [[] for _ in sizes]
            batches[t] = [orders[t][i : i + 1] for i in range(seen, upto)]
            seen = upto
            yield Iteration(batches, percent, checkpoint_tasks=(t,))


class TaskAdam:
    """``torch.optim.Adam`` (no weight decay, no amsgrad) over parameters whose first axis is the task.

    Task t's rows form what the official code had as task t's module. :meth:`step` applies one Adam step
    to the rows of the tasks in ``active`` (from their ``.grad``), each with its own step counter;
    :meth:`coast` records, and :meth:`flush` applies in closed form, the zero-gradient steps that
    ``"shared"`` semantics give a task's module while other tasks step (flush before each forward pass). Coasting is only ever applied to tasks that have taken a
    real step (before that, their gradient is ``None`` and Adam skips them, in torch 1.10 too).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        tasks: int,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        semantics: str = "shared",
    ) -> None:
        self.params = list(params)
        if any(p.shape[0] != tasks for p in self.params):
            raise SurgeryBookError(
                "TaskAdam needs parameters whose first axis is the task", f"stack {tasks} tasks' weights"
            )
        self.tasks, self.lr, self.betas, self.eps = tasks, lr, betas, eps
        self.semantics = check_adam(semantics)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = [0] * tasks  # each task's Adam step counter
        self.pending = [0] * tasks  # coasting steps owed, applied before the task's next real step

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _per_task(self, values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *[1] * (like.dim() - 1))

    @torch.no_grad()
    def step(self, active: Sequence[bool] | None = None) -> None:
        """One Adam step for every task in ``active`` (default: all), from each parameter's ``.grad``.

        The gradients must have been computed after :meth:`flush` (on the weights the owed coasting
        steps lead to), as the official loop computed them."""
        active = [True] * self.tasks if active is None else list(active)
        if any(self.pending):
            raise RuntimeError("TaskAdam.step: flush() the owed coasting steps before computing the gradients")
        b1, b2 = self.betas
        for t, on in enumerate(active):
            self.steps[t] += int(on)
        counts = {s for s, on in zip(self.steps, active) if on}
        if all(active) and len(counts) == 1:  # the usual case: every task at the same step, plain scalars
            (count,) = counts
            step_size: float | list[float] = self.lr / (1 - b1**count)
            correction: float | list[float] = math.sqrt(1 - b2**count)
        else:
            step_size = [self.lr / (1 - b1**s) if on else 0.0 for s, on in zip(self.steps, active)]
            correction = [math.sqrt(1 - b2**s) if on else 1.0 for s, on in zip(self.steps, active)]
        rows = None if all(active) else torch.tensor(active, device=self.params[0].device)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if rows is None:
                m.lerp_(grad, 1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            else:
                mask = rows.view(-1, *[1] * (p.dim() - 1))
                m.copy_(torch.where(mask, m.lerp(grad, 1 - b1), m))
                v.copy_(torch.where(mask, v.mul(b2).addcmul_(grad, grad, value=1 - b2), v))
            if isinstance(step_size, float):
                p.addcdiv_(m, v.sqrt().div_(correction).add_(self.eps), value=-step_size)
            else:
                denom = v.sqrt().div_(self._per_task(correction, p)).add_(self.eps)
                p.sub_(m.div(denom).mul_(self._per_task(step_size, p)))

    def coast(self, counts: Sequence[int]) -> None:
        """Owe task t ``counts[t]`` zero-gradient steps (``"shared"`` semantics, started tasks only);
        :meth:`flush` applies them, in closed form."""
        if self.semantics != "shared":
            return
        for t, count in enumerate(counts):
            if self.steps[t] > 0:
                self.pending[t] += int(count)

    @torch.no_grad()
    def flush(self) -> None:
        """Apply every owed coasting step. For a task at step s owing n steps the weights move by
        ``-sum_j lr a_j m / (b_j sqrt(v) + eps)``, j = 1..n, with ``a_j = b1^j / (1 - b1^(s+j))`` and
        ``b_j = sqrt(b2^j / (1 - b2^(s+j)))``; then ``m <- b1^n m``, ``v <- b2^n v``, ``s <- s + n``."""
        longest = max(self.pending)
        if longest == 0:
            return
        b1, b2 = self.betas
        j = torch.arange(1, longest + 1, dtype=torch.float64)[:, None]  # (J, 1)
        s = torch.tensor(self.steps, dtype=torch.float64)[None]  # (1, T)
        owed = j <= torch.tensor(self.pending, dtype=torch.float64)[None]
        a = torch.where(owed, b1**j / (1 - b1 ** (s + j)), 0.0)
        b = torch.where(owed, (b2**j / (1 - b2 ** (s + j))).sqrt(), 1.0)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            shape = (longest, self.tasks, *[1] * (p.dim() - 1))
            coef_a, coef_b = a.to(p.device, p.dtype).view(shape), b.to(p.device, p.dtype).view(shape)
            root = v.sqrt()
            # Chunks over j bound the temporary memory to a few copies of the parameters.
            chunk = max(1, int(4e7 // max(1, p.numel())))
            for start in range(0, longest, chunk):
                part = slice(start, start + chunk)
                p.sub_((self.lr * coef_a[part] * m / (coef_b[part] * root + self.eps)).sum(dim=0))
            m.mul_(self._per_task([b1**n for n in self.pending], p))
            v.mul_(self._per_task([b2**n for n in self.pending], p))
        self.steps = [s + n for s, n in zip(self.steps, self.pending)]
        self.pending = [0] * self.tasks


def gather_batches(
    batches: Sequence[Sequence[torch.Tensor]], round_index: int
) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """The ``round_index``-th batch of every task, stacked for one batched step.

    Returns indices (T, n) (short batches padded by repeating their first index), row weights (T, n)
    that average each task's real rows (zero on padding, and for tasks with no batch this round), and
    which tasks take a step this round.
    """
    chosen = [b[round_index] if round_index < len(b) else None for b in batches]
    width = max(len(c) for c in chosen if c is not None)
    index = torch.zeros(len(chosen), width, dtype=torch.int64)
    weight = torch.zeros(len(chosen), width)
    for t, c in enumerate(chosen):
        if c is not None:
            index[t, : len(c)], index[t, len(c) :] = c, c[0]
            weight[t, : len(c)] = 1.0 / len(c)
    return index, weight, [c is not None for c in chosen]


def train_on_schedule(
    iterations: Iterable[Iteration],
    optimizer: TaskAdam,
    task_losses: Callable[..., torch.Tensor],
    *,
    losses: list[float],
    checkpoint: Callable[[int], None] | None = None,
    bar: Any = None,
    tasks_per_pass: int | None = None,
    shrink_on_out_of_memory: bool = False,
) -> None:
    """Run the official schedule: every round, the batches of every task in one batched step.

    ``task_losses(index, weight)`` gets the round's indices (T, n) and row weights (T, n) (see
    :func:`gather_batches`) and returns each task's loss (T,), task t's depending only on task t's
    parameters. The mean loss of the tasks that stepped is appended to ``losses``; ``checkpoint(label, tasks)``
    runs after every iteration that carries one (``tasks``: the task indices to evaluate, ``None`` for all), with
    every owed coasting step applied.

    ``tasks_per_pass`` (None: all) runs each round as passes over groups of that many tasks, each with its own
    backward pass, through ``task_losses(index, weight, tasks)`` (``tasks`` a slice of the task axis; it returns
    those tasks' losses): the same gradients, since task t's loss depends only on task t's parameters, in a
    fraction of the activation memory. With ``shrink_on_out_of_memory``, a round that runs out of accelerator
    memory is run again with half as many tasks per pass, down to one.
    """
    for iteration in iterations:
        optimizer.coast(iteration.before)
        for round_index in range(iteration.rounds):
            optimizer.flush()  # the owed coasting steps move the weights this batch's gradient is taken at
            index, weight, active = gather_batches(iteration.batches, round_index)
            while True:
                optimizer.zero_grad()
                try:
                    per_task = _losses_and_gradients(task_losses, index, weight, tasks_per_pass)
                    break
                except torch.cuda.OutOfMemoryError:
                    per_pass = tasks_per_pass or len(index)
                    if not shrink_on_out_of_memory or per_pass == 1:
                        raise
                    tasks_per_pass = (per_pass + 1) // 2
                    torch.cuda.empty_cache()
                    log.warning(
                        "the accelerator ran out of memory with %d tasks per pass: %d per pass from now on "
                        "(the same gradients, more passes)",
                        per_pass,
                        tasks_per_pass,
                    )
            optimizer.step(active)
            losses.append(per_task[torch.tensor(active, device=per_task.device)].mean().item())
            if not math.isfinite(losses[-1]):
                raise SurgeryBookError(
                    f"the surgery loss became {losses[-1]} at step {len(losses)}: training diverged",
                    "lower the learning rate (--lr; the papers use 1e-3) or check the merged model's weights",
                )
            if bar is not None:
                bar.update()
        optimizer.coast(iteration.after)
        if iteration.checkpoint is not None and checkpoint is not None:
            optimizer.flush()
            checkpoint(iteration.checkpoint, iteration.checkpoint_tasks)
    optimizer.flush()


def _losses_and_gradients(
    task_losses: Callable[..., torch.Tensor], index: torch.Tensor, weight: torch.Tensor, tasks_per_pass: int | None
) -> torch.Tensor:
    """Every task's loss (T,), detached, with its gradient accumulated: in one pass, or in passes over groups of
    ``tasks_per_pass`` tasks."""
    count = len(index)
    if tasks_per_pass is None or tasks_per_pass >= count:
        per_task = task_losses(index, weight)
        per_task.sum().backward()  # task t's gradient is exactly that of its own loss
        return per_task.detach()
    parts = []
    for start in range(0, count, tasks_per_pass):
        part = task_losses(index, weight, slice(start, start + tasks_per_pass))
        part.sum().backward()
        parts.append(part.detach())
    return torch.cat(parts)
