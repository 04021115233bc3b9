"""Training loops for the zoo: pretraining, linear probes, and fine-tuning (experts and MTL).

An expert and the multi-task baseline are the same loop: the encoder is fine-tuned through frozen
heads, on one task (an expert) or on all tasks at once with a fixed number of images per task in
every batch (traditional multi-task learning). Every loop is seeded, so a rerun gives the same
weights on the same device and thread count.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from surgery_lib.core.progress import tqdm
from surgery_lib.core.taskdata import TaskData
from surgery_lib.finetuning import prepare_finetuning
from surgery_lib.models import ClassificationHead, StateDict, autocast
from surgery_lib.settings.offline.checkpoint import TrainingCheckpoint, resume_loop, save_loop

#: The zoo's own training (offline presets) runs in bf16 on a GPU; only reproduction paths follow the official fp32.
TRAINING_PRECISION = "bf16"


def derive_seed(base: int, *parts: str) -> int:
    """A stable 31-bit seed for one step of a recipe, e.g. ``derive_seed(0, "expert", "mnist")``."""
    return (base * 1_000_003 + zlib.crc32("/".join(parts).encode())) % (2**31)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def random_translate(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image (N, C, H, W) by its own random offset in [-max_shift, max_shift] pixels, zero-filled."""
    if max_shift <= 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def _batches(task: TaskData, split: str, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches of ``task``'s ``split``: a fresh seeded epoch each pass."""
    epoch = 0
    while True:
        yield from task.loader(split, batch_size=batch_size, shuffle=True, seed=seed + epoch, drop_last=True)
        epoch += 1


@dataclass
class TrainStats:
    """What a training loop reports: steps run, mean loss of the last 10 % of steps, images seen, and the step
    this process resumed at from a checkpoint (0: it ran from the start; the trained model is the same)."""

    steps: int
    final_loss: float
    images: int
    resumed_from_step: int = field(default=0, compare=False)


def pretrain(
    encoder: nn.Module,
    mix: TaskData,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    batch_size: int,
    translate_px: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
    checkpoint: TrainingCheckpoint | None = None,
) -> TrainStats:
    """Supervised pretraining on the label-disjoint mix through a throw-away linear head (AdamW).

    With ``checkpoint``, the loop's state is saved every ``checkpoint.every_s`` seconds and a saved state is
    resumed: the result equals an uninterrupted run's (:mod:`surgery_lib.settings.offline.checkpoint`).
    """
    torch.manual_seed(seed)
    head = nn.Linear(encoder.output_dim, mix.num_classes).to(device)
    encoder.to(device).train()
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * (len(mix.labels["train"]) // batch_size)
    schedule = warmup_cosine(optimizer, steps, warmup_steps)
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(mix, "train", batch_size, seed)
    done, losses = resume_loop(checkpoint, params, optimizer, schedule, generator, [batches], device)
    for step in tqdm(range(done, steps), desc="pretraining", disable=not progress, initial=done, total=steps):
        images, labels = next(batches)
        images = random_translate(images.to(device), translate_px, generator)
        with autocast(device, TRAINING_PRECISION):
            loss = F.cross_entropy(head(encoder(images)).float(), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        save_loop(checkpoint, step + 1, steps, params, optimizer, schedule, generator, losses, device)
    encoder.eval()
    tail = losses[-max(1, steps // 10) :]
    return TrainStats(steps=steps, final_loss=sum(tail) / len(tail), images=steps * batch_size, resumed_from_step=done)


def fit_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> ClassificationHead:
    """A :class:`ClassificationHead` fitted full-batch (AdamW) on frozen features (N, D) with labels (N,)."""
    torch.manual_seed(seed)
    head = ClassificationHead(features.shape[1], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(head(features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head.requires_grad_(False)
    return head.eval()


def finetune(
    encoder: nn.Module,
    tasks: Sequence[tuple[TaskData, ClassificationHead]],
    *,
    steps: int,
    batch_per_task: int,
    lr: float,
    weight_decay: float,
    warmup_fraction: float,
    translate_px: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
    desc: str = "fine-tuning",
    mode: str = "full",
    lora_rank: int = 4,
    checkpoint: TrainingCheckpoint | None = None,
) -> tuple[TrainStats, StateDict]:
    """Fine-tune ``encoder`` through frozen heads; the loss is the mean of the tasks' cross-entropies.

    With one task this trains an expert; with all tasks, the traditional multi-task baseline. The
    heads never change (their ``requires_grad`` is switched off here and checked by the tests).
    ``mode`` chooses which weights move and how (:mod:`surgery_lib.finetuning`: ``full``, ``attention``,
    ``lora`` with ``lora_rank``, ``tangent``). Returns the statistics and the trained encoder's full
    state dict (CPU), ``theta_0 + tau`` whatever the mode. ``checkpoint``: saved and resumed as in :func:`pretrain`.
    """
    torch.manual_seed(seed)
    encoder.to(device).train()
    tuning = prepare_finetuning(encoder, mode, lora_rank=lora_rank)
    heads = [head.to(device).requires_grad_(False).eval() for _, head in tasks]
    optimizer = torch.optim.AdamW(tuning.parameters, lr=lr, weight_decay=weight_decay)
    schedule = warmup_cosine(optimizer, steps, int(warmup_fraction * steps))
    generator = torch.Generator().manual_seed(seed)
    streams = [_batches(task, "train", batch_per_task, derive_seed(seed, task.name)) for task, _ in tasks]
    done, losses = resume_loop(checkpoint, tuning.parameters, optimizer, schedule, generator, streams, device)
    for step in tqdm(range(done, steps), desc=desc, disable=not progress, initial=done, total=steps):
        batch = [next(stream) for stream in streams]
        images = random_translate(torch.cat([x for x, _ in batch]).to(device), translate_px, generator)
        with autocast(device, TRAINING_PRECISION):
            embeddings = tuning.forward(images).float()
        loss = torch.stack(
            [
                F.cross_entropy(head(z), labels.to(device))
                for head, z, (_, labels) in zip(heads, embeddings.split(batch_per_task), batch)
            ]
        ).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        save_loop(checkpoint, step + 1, steps, tuning.parameters, optimizer, schedule, generator, losses, device)
    encoder.eval()
    tail = losses[-max(1, steps // 10) :]
    stats = TrainStats(
        steps=steps,
        final_loss=sum(tail) / len(tail),
        images=steps * batch_per_task * len(tasks),
        resumed_from_step=done,
    )
    return stats, tuning.export()
