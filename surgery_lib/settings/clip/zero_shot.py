"""Zero-shot classification heads from CLIP's pretrained text tower, built once and cached.

For every class, every template is filled in and encoded; each text embedding is L2-normalised, the
template embeddings are averaged and normalised again, the class embeddings are stacked and multiplied
by ``logit_scale.exp()``; the bias is zero. That is how task_vectors built its ``head_<Task>.pt`` files
and how FusionBench builds its heads, so the same function serves both checkpoint families.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.openclip import import_open_clip
from surgery_lib.core.storage import (
    CorruptFileError,
    config_hash,
    load_tensors,
    save_tensors,
)
from surgery_lib.models import ClassificationHead


def zero_shot_head(
    clip_model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
) -> ClassificationHead:
    """A frozen :class:`ClassificationHead` whose weight rows are the scaled class text embeddings.

    Args:
        clip_model: an open_clip ``CLIP`` (``encode_text`` and ``logit_scale`` are used).
        tokenizer: open_clip's tokenizer for the model (``open_clip.get_tokenizer(name)``).
        class_names: C names; templates: K strings with one ``{}`` each.

    Returns:
        A head with weight (C, embed_dim) = ``logit_scale.exp()`` x unit class embeddings, bias 0.
    """
    if not class_names or not templates:
        raise SurgeryBookError("a zero-shot head needs at least one class name and one template", "pass both")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise SurgeryBookError(f"templates must contain exactly one '{{}}': {bad[:2]}", "fix the template strings")
    texts = [template.format(name) for name in class_names for template in templates]
    clip_model = clip_model.to(device).eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start : start + batch_size]).to(device)
            chunks.append(F.normalize(clip_model.encode_text(tokens).float(), dim=-1).cpu())
        per_template = torch.cat(chunks).view(len(class_names), len(templates), -1)
        classes = F.normalize(per_template.mean(dim=1), dim=-1)
        weight = classes * clip_model.logit_scale.exp().float().cpu()
    return ClassificationHead.from_weights(weight)


def head_cache_path(
    cache_dir: str | os.PathLike[str], model: str, task: str, class_names: Sequence[str], templates: Sequence[str]
) -> Path:
    """``<cache_dir>/<model>/<task>-<hash of names and templates>.safetensors``."""
    key = config_hash({"classes": list(class_names), "templates": list(templates)})
    return Path(cache_dir) / model / f"{task}-{key}.safetensors"


def cached_zero_shot_head(
    cache_dir: str | os.PathLike[str],
    model: str,
    task: str,
    class_names: Sequence[str],
    templates: Sequence[str],
    load_clip: Callable[[], tuple[nn.Module, Callable[[list[str]], torch.Tensor]]],
    *,
    device: torch.device | str = "cpu",
) -> ClassificationHead:
    """The head of :func:`zero_shot_head`, read from the cache or built (calling ``load_clip()`` for
    ``(clip_model, tokenizer)`` only then) and written atomically. A damaged cache file is rebuilt."""
    path = head_cache_path(cache_dir, model, task, class_names, templates)
    if path.is_file():
        try:
            state = load_tensors(path)[0]
            if all(torch.isfinite(value).all() for value in state.values()):  # NaN weights: rebuilt below
                return ClassificationHead.from_weights(state["linear.weight"], state["linear.bias"])
        except (CorruptFileError, KeyError, RuntimeError):
            pass  # rebuilt below
    clip_model, tokenizer = load_clip()
    head = zero_shot_head(clip_model, tokenizer, class_names, templates, device=device)
    save_tensors(head.state_dict(), path, metadata={"model": model, "task": task})
    return head


def openai_clip(
    model: str, device: torch.device | str = "cpu"
) -> tuple[nn.Module, Callable[[list[str]], torch.Tensor]]:
    """open_clip's ``<model>-quickgelu`` with OpenAI's weights (downloaded once by open_clip) and its tokenizer."""
    open_clip = import_open_clip()

    clip_model = open_clip.create_model(f"{model}-quickgelu", pretrained="openai", device=device)
    return clip_model, open_clip.get_tokenizer(f"{model}-quickgelu")
