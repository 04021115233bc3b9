"""Representation bias: how far a merged model's representations are from each expert's.

``bias_t = (1 / (N_t d)) sum_i ||z_merged(x_i) - z_expert(x_i)||_1`` over task t's test images: the mean
absolute difference of the unnormalised final embeddings, the same quantity Surgery's loss minimises.
The per-block analogue compares the token-mean of the residual stream after every block (SurgeryV2).
"""

from __future__ import annotations

import torch

from surgery_lib.core.errors import SurgeryBookError


def representation_bias(merged: torch.Tensor, expert: torch.Tensor) -> float:
    """Mean absolute difference of two embedding matrices of the same images: (N, d), (N, d) -> scalar."""
    if merged.shape != expert.shape:
        raise SurgeryBookError(
            f"embeddings of different shapes: {tuple(merged.shape)} vs {tuple(expert.shape)}",
            "compare the two models' embeddings of the same images",
        )
    _check_some_images(merged)
    return float((merged.float() - expert.float()).abs().mean())


def block_bias(merged: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Per-block bias of token-means (N, blocks, width) x 2 -> (blocks,)."""
    if merged.shape != expert.shape:
        raise SurgeryBookError(
            f"block means of different shapes: {tuple(merged.shape)} vs {tuple(expert.shape)}",
            "compare the two models' block means of the same images, from encoders of one depth and width",
        )
    _check_some_images(merged)
    return (merged.float() - expert.float()).abs().mean(dim=(0, 2))


def _check_some_images(embeddings: torch.Tensor) -> None:
    """A mean over no images is NaN, which a table shows as a bias like any other."""
    if embeddings.numel() == 0:
        raise SurgeryBookError(
            f"no images to compare (embeddings of shape {tuple(embeddings.shape)})",
            "embed at least one image of the task with both models",
        )
