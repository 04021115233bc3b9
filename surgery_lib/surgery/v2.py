"""SurgeryV2 (Yang et al., 2024): deep representation surgery after every residual block.

Each task gets a module of Surgery's form after every block of the merged encoder, acting on every
token of the residual stream (the corrected stream is what the next block receives), plus Surgery's
module on the final embedding. The loss is the unweighted sum of L1 terms: one per block between the
token-means of the corrected merged stream and of the expert's stream, plus the final-embedding term.

Depth and width come from the encoder, so the same code runs a 4-block tiny ViT, ViT-B (12 x 768) and
ViT-L/14 (24 x 1024). Expert targets are cached once; the merged forward cannot be (the modules change
it), so every step runs the frozen merged encoder on a batch holding every task's images, each routed
to its own task's modules, in the run's precision (fp32 like the official code unless told otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.progress import tqdm
from surgery_lib.core.taskdata import TaskData, normalize
from surgery_lib.evaluation import accuracy_from_features
from surgery_lib.models import autocast, forward_blocks
from surgery_lib.surgery.schedule import TaskAdam, train_on_schedule
from surgery_lib.surgery.v1 import DEFAULT_RANK, SurgeryConfig, SurgeryHistory, TaskSurgery, as_surgery_config


def _loss_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 for the loss (from bf16/fp16 under autocast), or float64 if it is float64 (the tests'
    exact comparisons with the official loop run there)."""
    return x if x.dtype == torch.float64 else x.float()


class DeepSurgery(nn.Module):
    """SurgeryV2's modules for T tasks: per block ``down`` (T, blocks, r, width), ``up`` (T, blocks, width, r),
    and a final :class:`TaskSurgery` on the output embedding. All start as the identity."""

    def __init__(self, tasks: Sequence[str], blocks: int, width: int, dim: int, rank: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        generator = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(width)
        self.block_down = nn.Parameter(
            torch.empty(len(tasks), blocks, rank, width).uniform_(-bound, bound, generator=generator)
        )
        self.block_up = nn.Parameter(torch.zeros(len(tasks), blocks, width, rank))
        self.final = TaskSurgery(tasks, dim, rank, seed + 1)

    @classmethod
    def for_encoder(cls, encoder: nn.Module, tasks: Sequence[str], rank: int = 16, seed: int = 0) -> DeepSurgery:
        """Modules sized from an open_clip ``VisionTransformer`` (its depth, width and output width)."""
        blocks = len(encoder.transformer.resblocks)
        return cls(tasks, blocks, encoder.transformer.width, encoder.output_dim, rank, seed)

    @property
    def blocks(self) -> int:
        return self.block_down.shape[1]

    @property
    def rank(self) -> int:
        return self.block_down.shape[2]

    def parameters_per_task(self) -> int:
        """``blocks * 2 * width * r + 2 * dim * r`` (311,296 for ViT-B/32 at r = 16)."""
        return self.block_down[0].numel() + self.block_up[0].numel() + self.final.parameters_per_task()

    def correct_block(self, block: int, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Correct stream ``x`` (T, n, tokens, width) leaving ``block``; row t uses task ``rows[t]`` (default t)."""
        down = self.block_down[:, block] if rows is None else self.block_down[rows, block]
        up = self.block_up[:, block] if rows is None else self.block_up[rows, block]
        hidden = F.relu(torch.einsum("tnlw,trw->tnlr", x, down.to(x.dtype)))
        return x - torch.einsum("tnlr,twr->tnlw", hidden, up.to(x.dtype))

    def forward_tasks(
        self, encoder: nn.Module, images: torch.Tensor, rows: torch.Tensor | None = None, *, stacked: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged forward with surgery: images (T, n, 3, H, W) -> final (T, n, dim), block means (T, n, blocks, width).

        Row t of ``images`` uses task ``rows[t]``'s modules (default: task t). ``stacked`` corrects the final
        embedding with the stacked product that training without ``rows`` uses (a pass over some tasks then
        computes what the pass over all computes for them), else task by task."""
        groups, per_group = images.shape[:2]

        def after_block(i: int, x: torch.Tensor) -> torch.Tensor:
            grouped = x.reshape(groups, per_group, *x.shape[1:])
            return self.correct_block(i, grouped, rows).reshape(x.shape)

        final, means = forward_blocks(encoder, images.flatten(0, 1), after_block)
        final = _loss_precision(final).reshape(groups, per_group, -1)
        if rows is None:
            final = self.final(final)
        elif stacked:
            final = self.final(final, rows)
        else:
            final = torch.stack([self.final.apply_task(self.tasks[r], f) for r, f in zip(rows.tolist(), final)])
        return final, means.reshape(groups, per_group, *means.shape[1:])

    @torch.no_grad()
    def embed(
        self,
        encoder: nn.Module,
        task: str,
        data: TaskData,
        split: str = "test",
        batch_size: int = 512,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrected final embeddings (N, dim) and block means (N, blocks, width) of ``task``'s ``split``."""
        device = torch.device(device)
        rows = torch.tensor([self.final.index(task)], device=device)
        finals, blocks = [], []
        for start in range(0, len(data.labels[split]), batch_size):
            images = data.normalized(split, slice(start, start + batch_size)).to(device)
            with autocast(device, precision):
                final, means = self.forward_tasks(encoder, images[None], rows)
            finals.append(final[0].float().cpu())
            blocks.append(means[0].float().cpu())
        return torch.cat(finals), torch.cat(blocks)


def train_deep_surgery(
    encoder: nn.Module,
    unlabeled: Mapping[str, TaskData],
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    config: SurgeryConfig | None = None,
    *,
    split: str = "test",
    evaluate: Mapping[str, nn.Module] | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = True,
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    tasks_per_pass: int | None = None,
) -> tuple[DeepSurgery, SurgeryHistory]:
    """Train SurgeryV2's modules on a frozen merged ``encoder``.

    Args:
        encoder: the merged open_clip ``VisionTransformer`` (kept frozen).
        unlabeled: ``{task: TaskData}``; the ``split`` images are used without labels.
        targets: ``{task: (expert final embeddings (N, dim), expert block means (N, blocks, width))}``
            of the same images, e.g. from :func:`surgery_lib.models.embed_blocks`.
        config: the schedule (default: the official one); ``online`` is not supported for V2.
        evaluate: optional ``{task: head}``; test accuracy is recorded every ``config.eval_every`` steps.
        precision: of the merged forward passes on a GPU (:data:`surgery_lib.models.PRECISIONS`).
        embeddings: a dict to fill with each evaluated task's corrected test embeddings after training
            (:meth:`DeepSurgery.embed`), taken from the last checkpoint when it is the end of training: a caller
            that needs them (accuracy and block bias after) then saves one pass over every test set.
        tasks_per_pass: run each step as passes over this many tasks' batches (None: all tasks in one pass, as
            their batches are stacked), each with its own backward pass: the same gradients in less memory (the
            activations autograd keeps grow with the images of a pass: about 350 MiB per image on ViT-L/14 in
            fp32, ``bench/gpu/v2_memory.py --saved-only``). A step that runs out of GPU memory is run again with half
            as many tasks per pass, down to one, and training goes on so.
    """
    config = as_surgery_config(config)
    if config.online:
        raise SurgeryBookError("SurgeryV2 has no online variant here", "use --version 1 with --online")
    if tasks_per_pass is not None and (isinstance(tasks_per_pass, bool) or tasks_per_pass < 1):
        raise SurgeryBookError(
            f"tasks_per_pass={tasks_per_pass!r}: a pass takes at least one task",
            "pass 1 or more (None: every task in one pass)",
        )
    device = torch.device(device)
    tasks = tuple(unlabeled)
    encoder = encoder.to(device).eval().requires_grad_(False)
    encoder_dtype = next(encoder.parameters()).dtype
    config = config.with_rank(DEFAULT_RANK)
    surgery = DeepSurgery.for_encoder(encoder, tasks, config.rank, config.seed).to(device)
    optimizer = TaskAdam(surgery.parameters(), len(tasks), lr=config.lr, semantics=config.adam)
    images = [unlabeled[t].images[split] for t in tasks]
    final_targets = [targets[t][0].to(device) for t in tasks]
    block_targets = [targets[t][1].to(device) for t in tasks]
    history = SurgeryHistory()

    sizes = [len(x) for x in images]
    total_rounds = config.rounds(sizes)

    def accuracy(task: str) -> float:
        embedded = surgery.embed(encoder, task, unlabeled[task], device=device, precision=precision)
        if embeddings is not None and len(history.loss) == total_rounds:  # the modules are final: keep them
            embeddings[task] = embedded
        return accuracy_from_features(embedded[0], evaluate[task], unlabeled[task].labels["test"])

    def checkpoint(step: int, indices: Sequence[int] | None = None) -> None:
        names = list(evaluate) if indices is None else [tasks[i] for i in indices]
        history.record(step, [t for t in names if t in evaluate], accuracy)

    if evaluate:
        checkpoint(0)
    data0 = unlabeled[tasks[0]]

    def task_losses(index: torch.Tensor, weight: torch.Tensor, some: slice | None = None) -> torch.Tensor:
        chosen = range(len(tasks)) if some is None else range(len(tasks))[some]
        part = slice(None) if some is None else some
        index, weight = index[part], weight[part]
        batch = torch.stack([images[t][i] for t, i in zip(chosen, index)])
        batch = normalize(batch.to(device), data0.mean, data0.std).to(encoder_dtype)  # float32 unless a test's float64
        index, weight = index.to(device), weight.to(device)
        rows = None if some is None else torch.tensor(list(chosen), device=device)
        with autocast(device, precision):
            final, means = surgery.forward_tasks(encoder, batch, rows, stacked=True)
        final_target = torch.stack([final_targets[t][i] for t, i in zip(chosen, index)])
        block_target = torch.stack([block_targets[t][i] for t, i in zip(chosen, index)])
        block_losses = (
            (_loss_precision(means) - _loss_precision(block_target)).abs().mean(dim=-1).sum(dim=-1)
        )  # (T, n): every block's term
        final_losses = (_loss_precision(final) - final_target).abs().mean(dim=-1)
        return ((block_losses + final_losses) * weight).sum(dim=1)

    with tqdm(total=total_rounds, desc="SurgeryV2", disable=not progress) as bar:
        train_on_schedule(
            config.iterations(sizes),
            optimizer,
            task_losses,
            losses=history.loss,
            bar=bar,
            checkpoint=checkpoint if evaluate else None,
            tasks_per_pass=tasks_per_pass,
            shrink_on_out_of_memory=True,
        )
    if embeddings is not None:
        for task in evaluate or {}:
            if task not in embeddings:  # no checkpoint at the last step
                embeddings[task] = surgery.embed(encoder, task, unlabeled[task], device=device, precision=precision)
    return surgery.cpu(), history
