"""Evaluation: accuracy of an encoder through each task's head."""

from __future__ import annotations

import torch
from torch import nn

from surgery_lib.data import TaskData
from surgery_lib.models import embed


@torch.inference_mode()
def accuracy_from_features(features: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent of ``head`` on precomputed embeddings (N, D) with labels (N,)."""
    head = head.to(features.device)
    predictions = head(features).argmax(dim=-1)
    return 100.0 * (predictions.cpu() == labels.cpu()).float().mean().item()


def task_accuracy(
    encoder: nn.Module,
    head: nn.Module,
    task: TaskData,
    split: str = "test",
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> float:
    """Top-1 accuracy in percent of ``encoder`` + ``head`` on ``task``'s ``split``."""
    features = embed(encoder, task.images[split], task.mean, task.std, batch_size, device)
    return accuracy_from_features(features, head, task.labels[split])
