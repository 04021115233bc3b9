"""The converted format every CLIP source is turned into once: ``pretrained.safetensors``,
``experts/<Task>.safetensors``, ``heads/<Task>.safetensors`` and a ``manifest.json`` (SHA-256 of each file, the
architecture, the sources), written into a temporary folder and swapped in whole; and the open_clip
``VisionTransformer`` those weights describe."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.openclip import import_open_clip
from surgery_lib.core.state_dict import check_compatible
from surgery_lib.core.storage import atomic_directory, load_tensors, read_json, save_tensors, write_json
from surgery_lib.models import ClassificationHead


def visual_architecture(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Image size, patch size, width, depth, heads and output width read from a visual state dict."""
    width, _, patch, _ = state["conv1.weight"].shape
    tokens = state["positional_embedding"].shape[0]
    layers = len({int(m.group(1)) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    return {
        "image_size": int(round((tokens - 1) ** 0.5)) * patch,
        "patch_size": patch,
        "width": width,
        "layers": layers,
        "heads": max(1, width // 64),  # CLIP's head width is 64
        "mlp_ratio": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        "output_dim": state["proj"].shape[1],
    }


def build_clip_visual(state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A fresh open_clip ``VisionTransformer`` with QuickGELU (as open_clip 2.0.2 built OpenAI models),
    shaped from ``state``, with ``state`` loaded strictly.

    Raises:
        SurgeryBookError: if any key or shape does not fit.
    """
    import_open_clip()  # first: skips transformers, freezes the imports (core/openclip.py)
    from open_clip.transformer import QuickGELU, VisionTransformer

    try:
        encoder = VisionTransformer(**visual_architecture(state), act_layer=QuickGELU)
        encoder.load_state_dict(dict(state), strict=True)
    except (KeyError, RuntimeError) as exc:
        raise SurgeryBookError(
            f"the checkpoint's image encoder does not fit an open_clip ViT ({str(exc).strip().splitlines()[0]})",
            "pass a ViT-B-32, ViT-B-16 or ViT-L-14 checkpoint of the task_vectors family",
        ) from None
    return encoder.eval()


CONVERTED_FORMAT = 1


def check_weights(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights a conversion must not store: a non-float tensor (int8, bool: casting would invent
    values) or a NaN or infinite entry, naming ``source`` (the file) and the key.

    Raises:
        SurgeryBookError: the first such tensor.
    """
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise SurgeryBookError(
                f"{source}: tensor {key!r} is {tensor.dtype}, not a floating-point weight",
                "convert the original checkpoint, not a quantised or edited copy",
            )
        if not torch.isfinite(tensor).all():
            raise SurgeryBookError(
                f"{source}: tensor {key!r} holds NaN or infinite values",
                "download the checkpoint again; a fine-tune that diverged cannot be merged",
            )


def _write_converted(
    target: Path,
    family: str,
    model: str,
    pretrained: Mapping[str, torch.Tensor],
    experts: Iterable[tuple[str, Mapping[str, torch.Tensor], ClassificationHead | None]],
    sources: Mapping[str, str],
) -> dict[str, Any]:
    """Write ``pretrained.safetensors``, ``experts/<T>``, ``heads/<T>`` and ``manifest.json`` into a temporary
    folder and swap it in for ``target`` only when all are written: a conversion that fails on its fifth
    expert leaves an earlier good conversion in ``target`` as it was."""
    architecture = visual_architecture(pretrained)
    check_weights(pretrained, sources.get("pretrained", "the pretrained model"))
    with atomic_directory(target) as folder:
        written = {
            "pretrained": {
                "file": "pretrained.safetensors",
                "sha256": save_tensors(pretrained, folder / "pretrained.safetensors"),
            }
        }
        tasks = []
        for task, expert, head in experts:
            source = sources.get(f"expert/{task}", f"the {task} expert")
            try:
                check_compatible(pretrained, {task: expert})
            except SurgeryBookError as exc:
                raise SurgeryBookError(f"{source}: {exc.problem}", exc.fix) from None
            check_weights(expert, source)
            tasks.append(task)
            written[f"expert/{task}"] = {
                "file": f"experts/{task}.safetensors",
                "sha256": save_tensors(expert, folder / "experts" / f"{task}.safetensors"),
            }
            if head is not None:
                if head.linear.in_features != architecture["output_dim"]:
                    raise SurgeryBookError(
                        f"the {task} head expects {head.linear.in_features}-d embeddings, the encoder gives {architecture['output_dim']}",
                        f"use the heads of the {model} folder",
                    )
                check_weights(head.state_dict(), sources.get(f"head/{task}", f"the {task} head"))
                written[f"head/{task}"] = {
                    "file": f"heads/{task}.safetensors",
                    "sha256": save_tensors(head.state_dict(), folder / "heads" / f"{task}.safetensors"),
                }
        manifest = {
            "format": CONVERTED_FORMAT,
            "family": family,
            "model": model,
            "tasks": tasks,
            "architecture": architecture,
            "sources": dict(sources),
            "files": written,
        }
        write_json(manifest, folder / "manifest.json")
    return manifest


def _check_output_folder(target: Path) -> None:
    # Before minutes of reading checkpoints: the folder the conversion will replace must be one.
    for path in (target, *target.parents):
        if path.exists() and not path.is_dir():
            raise SurgeryBookError(
                f"cannot write the conversion into {target}: {path} is a file", "pass another --out folder"
            )


def load_converted(
    directory: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], dict[str, ClassificationHead], dict[str, Any]]:
    """Load a folder written by a ``convert_*`` function: ``(pretrained, experts, heads, manifest)``;
    ``heads`` is empty for the FusionBench family.

    Every file is checked against its SHA-256 in the manifest.

    Raises:
        SurgeryBookError: no manifest (convert first), or a damaged file (convert again).
    """
    directory = Path(directory)
    if not (directory / "manifest.json").is_file():
        raise SurgeryBookError(f"no converted checkpoints in {directory}", "run `surgery-book convert` first")
    manifest = read_json(directory / "manifest.json")
    if not (
        isinstance(manifest, dict)
        and isinstance(manifest.get("files"), dict)
        and isinstance(manifest.get("tasks"), list)
    ):
        raise SurgeryBookError(
            f"{directory / 'manifest.json'} is not a converted-checkpoint manifest (no files or tasks)",
            "convert the checkpoints again with `surgery-book convert`",
        )

    root = directory.resolve()

    def tensors(key: str) -> dict[str, torch.Tensor]:
        entry = manifest["files"].get(key)
        if not (
            isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)
        ):
            raise SurgeryBookError(
                f"{directory / 'manifest.json'} has no usable entry for {key}",
                "convert the checkpoints again with `surgery-book convert`",
            )
        path = (directory / entry["file"]).resolve()
        if not path.is_relative_to(root):  # a manifest may only name files inside its folder
            raise SurgeryBookError(
                f"{directory / 'manifest.json'} names {entry['file']!r}, outside its folder",
                "convert the checkpoints again with `surgery-book convert`",
            )
        if not path.is_file():  # a folder copied in part: a bare FileNotFoundError from the checksum before
            raise SurgeryBookError(
                f"{directory / 'manifest.json'} names {entry['file']!r}, which is not in the folder",
                "copy the whole converted folder, or convert the checkpoints again with `surgery-book convert`",
            )
        return load_tensors(path, expected_sha256=entry["sha256"])[0]

    pretrained = tensors("pretrained")
    experts = {task: tensors(f"expert/{task}") for task in manifest["tasks"]}
    heads = {}
    for task in manifest["tasks"]:
        if f"head/{task}" not in manifest["files"]:
            continue  # FusionBench ships no heads: zero-shot heads are built from the text tower
        state = tensors(f"head/{task}")
        heads[task] = ClassificationHead.from_weights(state["linear.weight"], state["linear.bias"])
    return pretrained, experts, heads, manifest
