"""Ways to fine-tune an expert: which weights move, and in which space. Each way is registered by name.

- ``full``       every weight of the encoder (the papers' experts and the published CLIP checkpoints)
- ``attention``  only the attention projections, Q/K/V and output, weights and biases (Jin et al., ICLR 2025:
                 their task vectors interfere less when merged)
- ``lora``       a rank-``r`` update ``(alpha / r) * B @ A`` on every attention and MLP weight matrix, B
                 starting at zero (Hu et al., ICLR 2022); exported merged into the weights, so a task vector
                 is low-rank in every matrix
- ``tangent``    fine-tuning the linearised model ``f(x; theta_0) + J_theta f(x; theta_0) (theta - theta_0)``
                 (Ortiz-Jimenez et al., NeurIPS 2023: tangent-space task vectors are more disentangled)

Every way exports what the rest of the library consumes: the encoder's full state dict ``theta_0 + tau``,
so merging, Surgery and the tables need not know how an expert was trained. A ``tangent`` expert is
exported as its weights; evaluated through the ordinary (non-linear) encoder it is the "post-hoc" use of a
linearly fine-tuned task vector, and :class:`LinearizedEncoder` evaluates it in tangent space.

Usage (any ``nn.Module`` encoder, offline or CLIP)::

    tuning = prepare_finetuning(encoder, "lora", lora_rank=4)
    optimizer = torch.optim.AdamW(tuning.parameters, lr=1e-4)
    loss = criterion(head(tuning.forward(images)), labels)   # ... train ...
    expert_state = tuning.export()                            # {name: tensor}, theta_0 + tau
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.registry import Registry

StateDict = dict[str, torch.Tensor]

#: Parameters of an open_clip / CLIP residual attention block that belong to attention (substring match).
ATTENTION_KEYS = (".attn.",)
#: Weight matrices a LoRA update is put on: attention's fused Q/K/V and output, the MLP's two layers.
LORA_KEYS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def attention_parameter(name: str) -> bool:
    """Whether parameter ``name`` belongs to an attention module (``transformer.resblocks.3.attn.in_proj_weight``)."""
    return any(key in name for key in ATTENTION_KEYS)


@dataclass
class FineTuning:
    """One encoder prepared for fine-tuning one way.

    Attributes:
        mode: the registered name (``"full"``, ``"attention"``, ``"lora"``, ``"tangent"``).
        parameters: the tensors the optimiser updates (nothing else changes).
        forward: images (N, 3, H, W) -> embeddings (N, D), the function to train through.
        export: the trained encoder as a full state dict (CPU copies), ``theta_0 + tau``.
    """

    mode: str
    parameters: list[nn.Parameter]
    forward: Callable[[torch.Tensor], torch.Tensor]
    export: Callable[[], StateDict]


FINETUNING_MODES: Registry[Callable[..., FineTuning]] = Registry("fine-tuning mode")


def prepare_finetuning(
    encoder: nn.Module, mode: str = "full", *, lora_rank: int = 4, lora_alpha: float | None = None
) -> FineTuning:
    """Prepare ``encoder`` (modified in place: frozen weights, LoRA parametrisations) for fine-tuning ``mode``.

    Args:
        encoder: the pretrained encoder, already on its device.
        mode: one of :data:`FINETUNING_MODES`.
        lora_rank: rank ``r`` of every LoRA update (``lora`` only), at least 1.
        lora_alpha: LoRA's scale numerator (default ``r``, so the update is ``B @ A``).

    Raises:
        SurgeryBookError: an unknown mode, a rank below 1, or an encoder with no parameter the mode trains.
    """
    build = FINETUNING_MODES[mode]
    if mode == "lora":
        if not isinstance(lora_rank, int) or lora_rank < 1:
            raise SurgeryBookError(
                f"LoRA rank {lora_rank!r} is not a positive integer", "pass lora_rank=4 (or any integer >= 1)"
            )
        tuning = build(encoder, rank=lora_rank, alpha=float(lora_rank if lora_alpha is None else lora_alpha))
    else:
        tuning = build(encoder)
    if not tuning.parameters:
        raise SurgeryBookError(
            f"fine-tuning mode {mode!r} finds no parameter to train in this {type(encoder).__name__}",
            "use mode 'full', or an encoder with attention blocks named like open_clip's (resblocks.N.attn.*)",
        )
    return tuning


def _state(encoder: nn.Module) -> StateDict:
    return {name: tensor.detach().cpu().clone() for name, tensor in encoder.state_dict().items()}


def _full(encoder: nn.Module) -> FineTuning:
    encoder.requires_grad_(True)
    return FineTuning("full", list(encoder.parameters()), encoder, lambda: _state(encoder))


def _attention(encoder: nn.Module) -> FineTuning:
    trained = []
    for name, parameter in encoder.named_parameters():
        parameter.requires_grad_(attention_parameter(name))
        if parameter.requires_grad:
            trained.append(parameter)
    return FineTuning("attention", trained, encoder, lambda: _state(encoder))


class LowRankUpdate(nn.Module):
    """A parametrisation ``W -> W + (alpha / r) * B @ A`` with A (r, in) small random, B (out, r) zero."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        out_features, in_features = weight.shape
        if rank > min(out_features, in_features):
            raise SurgeryBookError(
                f"LoRA rank {rank} exceeds the smaller side of a {out_features}x{in_features} weight",
                f"pass lora_rank <= {min(out_features, in_features)}",
            )
        self.scale = alpha / rank
        # A as in LoRA's reference initialisation (Kaiming-uniform rows); B zero, so training starts at theta_0.
        self.A = nn.Parameter(torch.empty(rank, in_features, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.A, a=5**0.5)
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=weight.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A)


def _lora(encoder: nn.Module, *, rank: int, alpha: float) -> FineTuning:
    encoder.requires_grad_(False)
    targets = [name for name, _ in encoder.named_parameters() if name.endswith(LORA_KEYS)]
    updates = []
    for name in targets:
        module_name, _, attribute = name.rpartition(".")
        module = encoder.get_submodule(module_name)
        update = LowRankUpdate(getattr(module, attribute), rank, alpha)
        parametrize.register_parametrization(module, attribute, update)
        updates.append((module, attribute, update))

    def export() -> StateDict:
        # The merged weights under the plain names, without changing the encoder being trained.
        state = {}
        for name, tensor in encoder.state_dict().items():
            if ".parametrizations." in name:
                continue
            state[name] = tensor.detach().cpu().clone()
        for (module, attribute, _), name in zip(updates, targets):
            state[name] = getattr(module, attribute).detach().cpu().clone()
        return state

    parameters = [p for _, _, update in updates for p in (update.A, update.B)]
    return FineTuning("lora", parameters, encoder, export)


@contextlib.contextmanager
def _forward_ad_attention() -> Iterator[None]:
    """Attention as plain ops: the fused kernels (scaled-dot-product flash attention, and the fused
    multi-head attention an ``nn.MultiheadAttention`` in eval mode takes) have no forward-mode AD."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


class LinearizedEncoder(nn.Module):
    """``f_lin(x) = f(x; theta_0) + J_theta f(x; theta_0) . (theta - theta_0)``: the first-order Taylor model.

    ``delta`` (``theta - theta_0``, one tensor per parameter, trainable) starts at zero, so the linearised
    model equals the encoder at initialisation. One forward costs a forward plus a Jacobian-vector product
    (about 3-4x a plain forward on CPU). Input (N, 3, H, W); output (N, D).
    """

    def __init__(self, encoder: nn.Module, delta: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.theta0 = {name: p.detach() for name, p in encoder.named_parameters()}
        self.delta = nn.ParameterDict(
            {
                name.replace(".", "__"): nn.Parameter(
                    (delta[name].to(p) if delta is not None and name in delta else torch.zeros_like(p)).clone()
                )
                for name, p in self.theta0.items()
            }
        )

    def tangent(self) -> dict[str, torch.Tensor]:
        """``theta - theta_0`` under the encoder's parameter names."""
        return {name: self.delta[name.replace(".", "__")] for name in self.theta0}  # jvp wants theta_0's key order

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, jvp

        def f(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(self.encoder, params, (images,))

        with _forward_ad_attention():
            output, change = jvp(f, (self.theta0,), (self.tangent(),))
        return output + change


def _tangent(encoder: nn.Module) -> FineTuning:
    linearized = LinearizedEncoder(encoder)

    def export() -> StateDict:
        state = _state(encoder)
        for name, value in linearized.tangent().items():
            state[name] = state[name] + value.detach().cpu()
        return state

    return FineTuning("tangent", list(linearized.delta.values()), linearized, export)


FINETUNING_MODES.register("full", _full)
FINETUNING_MODES.register("attention", _attention)
FINETUNING_MODES.register("lora", _lora)
FINETUNING_MODES.register("tangent", _tangent)
