"""State dicts (``{parameter name: tensor}``): the compatibility check every merge starts with, and a fingerprint."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from surgery_lib.core.errors import SurgeryBookError

StateDict = Mapping[str, torch.Tensor]


def check_compatible(pretrained: StateDict, experts: Mapping[str, StateDict]) -> None:
    """Raise a clear error unless every expert has exactly the pretrained model's keys and shapes, and a
    floating-point tensor wherever the pretrained model has one (float precisions may differ)."""
    if not experts:
        raise SurgeryBookError("no experts to merge", "pass at least one fine-tuned state dict")
    for name, expert in experts.items():
        missing, extra = set(pretrained) - set(expert), set(expert) - set(pretrained)
        if missing or extra:
            detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(extra)[:3]}"
            raise SurgeryBookError(
                f"expert {name!r} does not have the pretrained model's parameters ({detail})",
                "merge only experts fine-tuned from the same pretrained architecture",
            )
        for key, tensor in pretrained.items():
            if expert[key].shape != tensor.shape:
                raise SurgeryBookError(
                    f"expert {name!r} has shape {tuple(expert[key].shape)} for {key!r}, the pretrained "
                    f"model {tuple(tensor.shape)}",
                    "merge only experts fine-tuned from the same pretrained architecture",
                )
            if expert[key].dtype != tensor.dtype and not (
                expert[key].is_floating_point() and tensor.is_floating_point()
            ):
                # An integer expert would be merged as its truncated values, a bool one as 0/1: garbage, silently.
                raise SurgeryBookError(
                    f"expert {name!r} has dtype {expert[key].dtype} for {key!r}, the pretrained model {tensor.dtype}",
                    "pass the experts' weights as floating-point tensors, as fine-tuning saved them",
                )


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (first 16 hex digits) of a state dict's names, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]
