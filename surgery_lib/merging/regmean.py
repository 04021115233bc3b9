"""RegMean (Jin et al., ICLR 2023): merge every linear map by least squares on its inputs.

For a linear map ``y = x W^T`` shared by experts with Gram matrices ``G_t = X_t^T X_t`` of their own
inputs, RegMean solves ``min_W sum_t ||X_t W^T - X_t W_t^T||^2``, i.e.
``W^T = (sum_t G_t)^-1 sum_t G_t W_t^T``, after scaling the off-diagonal entries of every ``G_t`` by
``alpha`` (0.95) to regularise towards plain averaging. Everything that is not a linear map
(LayerNorms, embeddings, biases, the patch convolution) is averaged.

In an open_clip ViT the linear maps are, per block, the fused q/k/v input projection
``attn.in_proj_weight`` (one linear map of the block's normalised input), ``attn.out_proj.weight``
(whose input is the multi-head attention output, recomputed here because
``nn.MultiheadAttention`` never calls ``out_proj`` as a module), ``mlp.c_fc`` and ``mlp.c_proj``;
and the final ``proj`` (applied as ``x @ proj``, so it is stored transposed).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from surgery_lib.merging.base import MergeMethod, register_method, train_subset
from surgery_lib.merging.options import SAMPLES, SEED, Option

ALPHA = Option(
    "alpha",
    float,
    0.95,
    "RegMean: the scale of the Gram matrices' off-diagonal entries (default 0.95, the official)",
    low=0,
    high=1,
)

#: For keys stored as (in, out) instead of nn.Linear's (out, in).
_TRANSPOSED = ("proj",)


def _attention_values(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The input of ``attn.out_proj``: concatenated per-head attention outputs for batch-first ``x`` (N, L, D)."""
    n, length, width = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(n, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(n, length, width)


def _hooks(encoder: nn.Module, grams: dict[str, torch.Tensor]) -> Iterator[torch.utils.hooks.RemovableHandle]:
    """Register hooks that add each linear map's input Gram matrix into ``grams`` (keyed by weight name)."""

    def accumulate(key: str, inputs: torch.Tensor) -> None:
        flat = inputs.detach().reshape(-1, inputs.shape[-1]).double()
        grams[key] = grams.get(key, 0) + flat.T @ flat

    for i, block in enumerate(encoder.transformer.resblocks):
        prefix = f"transformer.resblocks.{i}"

        def attn_hook(module, args, kwargs=None, prefix=prefix):
            x = args[0]
            accumulate(f"{prefix}.attn.in_proj_weight", x)
            accumulate(f"{prefix}.attn.out_proj.weight", _attention_values(module, x))

        yield block.attn.register_forward_pre_hook(attn_hook)
        yield block.mlp.c_fc.register_forward_pre_hook(lambda m, a, p=prefix: accumulate(f"{p}.mlp.c_fc.weight", a[0]))
        yield block.mlp.c_proj.register_forward_pre_hook(
            lambda m, a, p=prefix: accumulate(f"{p}.mlp.c_proj.weight", a[0])
        )

    def pooled_hook(module, args, output):
        accumulate("proj", output[:, 0])  # the CLS token after ln_post is what meets proj

    yield encoder.ln_post.register_forward_hook(pooled_hook)


@torch.inference_mode()
def gram_matrices(
    encoder: nn.Module, images: torch.Tensor, batch_size: int = 256, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Input Gram matrices ``X^T X`` (float64, (in, in)) of every linear map of an open_clip ViT over ``images``."""
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    grams: dict[str, torch.Tensor] = {}
    handles = list(_hooks(encoder, grams))
    try:
        for start in range(0, len(images), batch_size):
            encoder(images[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {k: v.cpu() for k, v in grams.items()}


def regmean_merging(
    experts: Mapping[str, Mapping[str, torch.Tensor]],
    grams: Mapping[str, Mapping[str, torch.Tensor]],
    alpha: float = 0.95,
) -> dict[str, torch.Tensor]:
    """RegMean: least-squares merge of every linear map with Gram statistics, mean of everything else.

    Args:
        experts: ``{task: state dict}``.
        grams: ``{task: {weight name: X^T X}}``; weights without a Gram matrix are averaged.
        alpha: off-diagonal scale of each Gram matrix (1.0: plain least squares; 0.0: plain averaging).
    """
    tasks = list(experts)
    merged = {}
    for key, reference in experts[tasks[0]].items():
        if key not in grams[tasks[0]]:
            merged[key] = torch.stack([experts[t][key].float() for t in tasks]).mean(0).to(reference.dtype)
            continue
        lhs, rhs = 0, 0
        for task in tasks:
            gram = grams[task][key].double()
            gram = alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))
            weight = experts[task][key].double()
            weight_t = weight if key in _TRANSPOSED else weight.T
            lhs = lhs + gram
            rhs = rhs + gram @ weight_t
        try:
            solution = torch.linalg.solve(lhs, rhs)
        except torch.linalg.LinAlgError:  # a rank-deficient Gram (too few samples): least-norm solution
            solution = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution
        merged[key] = (solution if key in _TRANSPOSED else solution.T).to(reference.dtype)
    return merged


def _run(zoo, experts, options, device, progress):
    grams = {
        task: gram_matrices(zoo.encoder(task), train_subset(zoo, task, options.samples, options.seed), device=device)
        for task in experts
    }
    return regmean_merging(experts, grams, alpha=options.alpha), {}


register_method(MergeMethod("regmean", "RegMean", _run, options=(SAMPLES, SEED, ALPHA), data="labeled"))
