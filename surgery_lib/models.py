"""Encoders and heads: open_clip vision transformers and CLIP-style classification heads.

The encoder is a plain :class:`open_clip.transformer.VisionTransformer`; its output is the
unnormalised image embedding (CLS token after ``ln_post`` and ``proj``), which is what Surgery acts
on. A :class:`ClassificationHead` L2-normalises that embedding first, exactly like the zero-shot heads
of the papers, so the offline heads and the real CLIP heads are interchangeable.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.openclip import import_open_clip
from surgery_lib.core.taskdata import TaskData, normalize
from surgery_lib.presets import EncoderConfig, encoder_parameters

StateDict = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


def check_fits(config: EncoderConfig, copies: int = 1) -> None:
    """Refuse, before allocating, ``copies`` fp32 encoders of ``config`` that this machine's free memory
    cannot hold (a preset's width or depth mistyped by a factor of ten asks for tens of gigabytes).

    Raises:
        SurgeryBookError: naming the size needed and the memory free.
    """
    import psutil

    needed = encoder_parameters(config) * 4 * copies
    free = psutil.virtual_memory().available
    if needed > free:
        raise SurgeryBookError(
            f"an encoder of {encoder_parameters(config):,} parameters needs {needed / 2**30:.1f} GiB, this machine has {free / 2**30:.1f} GiB free",
            "use a preset with a smaller encoder (width, layers), or a machine with more memory",
        )


def build_encoder(config: EncoderConfig) -> nn.Module:
    """A randomly initialised open_clip ``VisionTransformer`` for ``config``.

    Input: float (N, 3, image_size, image_size), normalised. Output: float (N, output_dim).
    """
    import_open_clip()  # first: skips transformers, freezes the imports (core/openclip.py)
    from open_clip.transformer import QuickGELU, VisionTransformer

    activations = {"gelu": nn.GELU, "quick_gelu": QuickGELU}
    if config.activation not in activations:
        raise SurgeryBookError(f"unknown activation {config.activation!r}", f"use one of: {', '.join(activations)}")
    check_fits(config)
    return VisionTransformer(
        act_layer=activations[config.activation],
        image_size=config.image_size,
        patch_size=config.patch_size,
        width=config.width,
        layers=config.layers,
        heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        output_dim=config.output_dim,
    )


def load_encoder(config: EncoderConfig, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Build an encoder for ``config`` and load ``state`` strictly (every key, every shape).

    The encoder is allocated without its random initialisation (every weight is overwritten by ``state``): a
    ViT-L/14 loads in about 0.2 s instead of 1.5-2 s, which a search evaluating 30 merges pays 30 times, and
    loading draws nothing from torch's global random generator.

    Raises:
        SurgeryBookError: if ``state`` belongs to another architecture, or holds a value that is not a
            floating-point tensor where the encoder has one (integer weights were cast to float and evaluated
            without a word; an array failed inside torch).
    """
    encoder = _uninitialised_encoder(config)
    own = encoder.state_dict()
    for key, value in state.items():
        if key in own and own[key].is_floating_point():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise SurgeryBookError(
                    f"weight {key!r} is {kind}, not a floating-point tensor",
                    "pass the state as float tensors (a state dict of the preset's encoder, e.g. a merge's .state)",
                )
    try:
        encoder.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SurgeryBookError(
            f"weights do not fit the encoder architecture {config} ({first})",
            "load them with the preset they were trained for",
        ) from None
    return encoder


def _uninitialised_encoder(config: EncoderConfig) -> nn.Module:
    """:func:`build_encoder`'s module with its tensors allocated on the CPU but not initialised, for a caller that
    overwrites every one of them (a strict ``load_state_dict``). A module with a non-persistent buffer, which
    a state dict does not hold, is built and initialised as usual."""
    import_open_clip()  # outside the meta context: a tensor made at import time must be a real one
    with torch.device("meta"):  # the module's structure without its tensors, so no random initialisation
        encoder = build_encoder(config)
    if {name for name, _ in encoder.named_buffers()} - set(encoder.state_dict()):
        return build_encoder(config)
    return encoder.to_empty(device="cpu")


def clone_state(module: nn.Module) -> StateDict:
    """A detached CPU copy of ``module``'s state dict."""
    return {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}


class ClassificationHead(nn.Module):
    """``logits = normalize(z) @ weight.T + bias``: a linear classifier on the unit sphere.

    Shapes: z (N, embed_dim) -> logits (N, num_classes). For real CLIP the weight rows are the
    class text embeddings times ``logit_scale.exp()`` and the bias is zero.
    """

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(embed_dim, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(F.normalize(z, dim=-1))

    @property
    def num_classes(self) -> int:
        return self.linear.out_features

    @classmethod
    def from_weights(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> ClassificationHead:
        """A frozen head (eval mode) with ``weight`` (num_classes, embed_dim) and ``bias`` (num_classes,; zero if None)."""
        head = cls(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            head.linear.weight.copy_(weight)
            head.linear.bias.copy_(bias if bias is not None else torch.zeros(weight.shape[0]))
        return head.requires_grad_(False).eval()


#: The device types the library runs on (the official code ran on CUDA; the CPU runs everything here).
DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(device: str | torch.device | None, default: str = "cpu", *, here: bool = True) -> torch.device:
    """``device`` (or ``default``) as a torch device, checking that CUDA is really there (with ``here=False``,
    only the name: for work that runs on another machine, such as a Slurm job).

    Raises:
        SurgeryBookError: a device type other than cpu and cuda (tpu, meta, mps, typos), or CUDA requested
            but unavailable (``here`` only).
    """
    try:
        resolved = torch.device(device if device is not None else default)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in DEVICE_TYPES:
        raise SurgeryBookError(f"unsupported device {device!r}", f"use one of: {', '.join(DEVICE_TYPES)} (e.g. cuda:1)")
    if here and resolved.type == "cuda" and not torch.cuda.is_available():
        raise SurgeryBookError(
            "CUDA was requested but this torch build sees no GPU",
            "pass --device cpu (or device='cpu'), or install a CUDA build of torch on a GPU machine",
        )
    return resolved


#: Numeric precisions of the GPU paths. ``fp32`` is the official code's (no autocast); ``tf32`` is fp32 with
#: TensorFloat-32 matmuls, what torch 1.10 (the official pin) did by default on Ampere and newer GPUs
#: (torch 1.12 turned it off); ``bf16``/``fp16`` autocast the forward passes.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision a run really uses on ``device``: always ``fp32`` on the CPU; ``bf16`` becomes ``fp16``
    (with a one-line notice) on a GPU without native bf16, such as Colab's T4.

    Raises:
        SurgeryBookError: for an unknown precision name.
    """
    if precision not in PRECISIONS:
        raise SurgeryBookError(f"unknown precision {precision!r}", f"use one of: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    if precision == "bf16" and torch.cuda.get_device_capability(device) < (8, 0):
        if device not in _BF16_NOTICE_GIVEN:
            _BF16_NOTICE_GIVEN.add(device)
            log.warning("%s has no native bf16: running in fp16 instead", torch.cuda.get_device_name(device))
        return "fp16"
    return precision


_BF16_NOTICE_GIVEN: set[torch.device] = set()


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str = "fp32") -> Iterator[None]:
    """Run the block in ``precision`` (:data:`PRECISIONS`, resolved by :func:`resolve_precision`) on ``device``."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    if precision in ("bf16", "fp16"):
        with torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16):
            yield
    elif precision == "tf32":
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on CUDA
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)
    else:
        yield


def _encode_batches(
    encoder: nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int,
    device: torch.device | str,
    precision: str,
    forward: Callable[[nn.Module, torch.Tensor], Any],
) -> list[Any]:
    """``forward(encoder, batch)`` on every normalised batch of uint8 ``images``, under inference mode and autocast."""
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = normalize(images[start : start + batch_size].to(device, non_blocking=True), mean, std)
            with autocast(device, precision):
                outputs.append(forward(encoder, batch))
    return outputs


def embed(
    encoder: nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> torch.Tensor:
    """Embeddings of uint8 ``images`` (N, 3, H, W): float32 (N, output_dim) on the CPU.

    Runs under ``torch.inference_mode`` in ``precision`` (:data:`PRECISIONS`; the CPU always runs fp32);
    the result is an ordinary tensor, usable in autograd later.
    """
    outputs = _encode_batches(
        encoder, images, mean, std, batch_size, device, precision, lambda e, x: e(x).float().cpu()
    )
    return torch.cat(outputs).clone() if outputs else torch.empty(0, encoder.output_dim)


def task_features(
    encoder: nn.Module,
    data: TaskData,
    split: str = "test",
    *,
    blocks: bool = False,
    index: torch.Tensor | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``encoder``'s features of ``data``'s ``split`` images (or of the rows ``index`` of it): the one place a
    task's images meet a model (normalised by the task's ``mean`` / ``std``, batched, in ``precision``).

    Returns:
        ``(final, means)``: float32 final embeddings (N, output_dim) on the CPU, and with ``blocks`` the per-block
        token means (N, blocks, width), else ``None``. :meth:`~surgery_lib.settings.base.Zoo.features` is the
        same for a zoo's task by name.
    """
    if split not in data.images:
        raise SurgeryBookError(f"task {data.name!r} has no split {split!r}", f"use one of: {', '.join(data.splits)}")
    images = data.images[split] if index is None else data.images[split][index]
    if blocks:
        return embed_blocks(encoder, images, data.mean, data.std, batch_size or 512, device=device, precision=precision)
    return embed(encoder, images, data.mean, data.std, batch_size or 1024, device, precision), None


def forward_blocks(
    encoder: nn.Module,
    images: torch.Tensor,
    after_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an open_clip ``VisionTransformer`` block by block.

    ``after_block(i, x)`` may replace the residual stream x (N, tokens, width) leaving block i; what it
    returns is what block i + 1 receives (SurgeryV2 inserts its modules here).

    Returns:
        The final embedding (N, output_dim) and the token-mean of the (possibly corrected) stream after
        every block, (N, blocks, width): the quantity SurgeryV2's loss and the per-block bias compare.
    """
    x = encoder._embeds(images)
    transformer = encoder.transformer
    if not getattr(transformer, "batch_first", True):
        raise SurgeryBookError(
            "this open_clip transformer is sequence-first", "use open_clip 3.x, whose transformers are batch-first"
        )
    means = []
    for i, block in enumerate(transformer.resblocks):
        x = block(x)
        if after_block is not None:
            x = after_block(i, x)
        means.append(x.mean(dim=1))
    pooled, _ = encoder._pool(x)
    if encoder.proj is not None:
        pooled = pooled @ encoder.proj
    return pooled, torch.stack(means, dim=1)


def embed_blocks(
    encoder: nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final embeddings (N, output_dim) and per-block token-means (N, blocks, width) of uint8 ``images``, on the CPU.

    ``dtype=torch.float16`` halves the memory of the block means (24 x 1024 values per image for ViT-L/14).
    """

    def forward(encoder: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        final, means = forward_blocks(encoder, batch)
        return final.float().cpu(), means.to(dtype).cpu()

    outputs = _encode_batches(encoder, images, mean, std, batch_size, device, precision, forward)
    return torch.cat([f for f, _ in outputs]).clone(), torch.cat([m for _, m in outputs]).clone()
