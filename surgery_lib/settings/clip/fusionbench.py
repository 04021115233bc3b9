"""FusionBench's experts on the Hugging Face hub (``tanganke/clip-vit-base-patch32_<task>``): snapshots read
as stored (safetensors or a plain ``pytorch_model.bin`` state dict, never through ``from_pretrained``), the
transformers CLIP vision tower mapped onto open_clip's names, and converted once into the
:mod:`~surgery_lib.settings.clip.converted` format."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.progress import tqdm
from surgery_lib.core.storage import load_tensors, read_json
from surgery_lib.settings.clip.converted import _check_output_folder, _write_converted, check_weights
from surgery_lib.settings.clip.task_vectors import TASK_VECTORS_TASKS
from surgery_lib.settings.clip.tasks import get_clip_task

#: open_clip architecture -> the transformers id of OpenAI's CLIP (FusionBench's experts are named after it).
FUSIONBENCH_MODELS = {
    "ViT-B-32": "openai/clip-vit-base-patch32",
    "ViT-B-16": "openai/clip-vit-base-patch16",
    "ViT-L-14": "openai/clip-vit-large-patch14",
}


#: The hub account that publishes FusionBench's CLIP experts (a preset may name another: ``ClipConfig.fusionbench_owner``).
FUSIONBENCH_OWNER = "tanganke"


def fusionbench_sources(
    model: str, source: str, tasks: tuple[str, ...], owner: str = FUSIONBENCH_OWNER
) -> dict[str, str]:
    """Where each model of the FusionBench family comes from: hub ids (``source="hub"``; experts
    ``<owner>/clip-vit-base-patch32_<task>``) or folders of ``save_pretrained`` snapshots under ``source``
    named like the hub repositories (``clip-vit-base-patch32/``, ``clip-vit-base-patch32_<task>/``).

    Raises:
        SurgeryBookError: unknown model or task, or missing local folders (all listed at once).
    """
    if model not in FUSIONBENCH_MODELS:
        raise SurgeryBookError(
            f"no FusionBench checkpoints for {model!r}", f"use one of: {', '.join(FUSIONBENCH_MODELS)}"
        )
    base = FUSIONBENCH_MODELS[model]
    ids = {"pretrained": base}
    for task in tasks:
        ids[f"expert/{get_clip_task(task).name}"] = f"{owner}/{base.split('/')[-1]}_{get_clip_task(task).fusionbench}"
    if source == "hub":
        return ids
    local = {key: str(Path(source) / hub_id.split("/")[-1]) for key, hub_id in ids.items()}
    missing = [p for p in local.values() if not Path(p).is_dir()]
    if missing:
        raise SurgeryBookError(
            f"{len(missing)} FusionBench snapshot folder(s) missing, e.g. {missing[:2]}",
            "pass --source hub, or save each model with save_pretrained into a folder named like its hub repository",
        )
    return local


#: Files a transformers ``save_pretrained`` folder may keep its weights in, in the order they are preferred.
SNAPSHOT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def snapshot_state(folder: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and ``config.json`` of a transformers ``save_pretrained`` folder, read as stored.

    No model is built, so nothing is initialised or cast: a key missing from the file stays missing and is
    refused by the key mapping (transformers' ``from_pretrained`` would fill it with random values).
    Reads ``model.safetensors``, a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin`` (with
    ``torch.load(weights_only=True)``); every tensor must be floating point and finite (:func:`check_weights`).

    Raises:
        SurgeryBookError: no ``config.json``, no weights file, or an unreadable, truncated or invalid one
            (naming the file).
    """
    folder = Path(folder)
    try:
        config = read_json(folder / "config.json")
    except FileNotFoundError:
        raise SurgeryBookError(
            f"{folder} has no config.json", "save each model with save_pretrained, which writes it"
        ) from None
    except (OSError, SurgeryBookError) as exc:
        raise SurgeryBookError(
            f"{folder / 'config.json'} is unreadable ({exc})", "save the model again with save_pretrained"
        ) from None
    if not isinstance(config, dict):
        raise SurgeryBookError(
            f"{folder / 'config.json'} is not a transformers config", "save the model again with save_pretrained"
        )
    name = next((n for n in SNAPSHOT_WEIGHTS if (folder / n).is_file()), None)
    if name is None:
        raise SurgeryBookError(
            f"{folder} holds no weights ({', '.join(SNAPSHOT_WEIGHTS)})", "save each model with save_pretrained"
        )
    if name == "model.safetensors.index.json":
        index = read_json(folder / name)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and "/" not in f for f in weight_map.values()
        ):
            raise SurgeryBookError(
                f"{folder / name} is not a safetensors index", "save the model again with save_pretrained"
            )
        files = sorted(set(weight_map.values()))
    else:
        files = [name]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        path = folder / file
        try:
            if file.endswith(".bin"):
                loaded = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
                    raise ValueError("not a flat mapping of tensors")
            else:
                loaded = load_tensors(path)[0]
        except (Exception, RecursionError) as exc:  # noqa: BLE001  (safetensors and torch raise many types)
            raise SurgeryBookError(
                f"cannot read {path}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}",
                "download or save the model again; the file is truncated or not a checkpoint",
            ) from None
        check_weights(loaded, str(path))
        state.update({key: tensor.float() for key, tensor in loaded.items()})
    return state, config


def _vision_layers(config: Mapping[str, Any], path: Path) -> int:
    vision = config.get("vision_config", config)
    layers = vision.get("num_hidden_layers") if isinstance(vision, Mapping) else None
    if not isinstance(layers, int) or isinstance(layers, bool) or not 0 < layers <= 1000:
        raise SurgeryBookError(
            f"{path / 'config.json'} names no vision num_hidden_layers", "save the model again with save_pretrained"
        )
    return layers


#: Keys of a transformers ``CLIPModel`` outside its vision tower (ignored when the pretrained model is read).
CLIP_TEXT_KEYS = ("text_model.", "text_projection.", "logit_scale")


def _fusionbench_vision(folder: Path, projection: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One snapshot as open_clip visual weights, and the projection it was mapped with (the pretrained
    ``CLIPModel``'s own ``visual_projection`` when ``projection`` is None)."""
    state, config = snapshot_state(folder)
    if projection is None:
        if "visual_projection.weight" not in state:
            raise SurgeryBookError(
                f"{folder} is not a CLIPModel snapshot (no visual_projection.weight)",
                "pass the pretrained openai/clip-vit-* snapshot",
            )
        projection = state.pop("visual_projection.weight")
        state = {k: v for k, v in state.items() if not k.startswith(CLIP_TEXT_KEYS)}
    try:
        converted = open_clip_state_from_transformers(state, projection)
    except SurgeryBookError as exc:
        raise SurgeryBookError(f"{folder}: {exc.problem}", exc.fix) from None
    found = len({k.split(".")[2] for k in converted if k.startswith("transformer.resblocks.")})
    expected = _vision_layers(config, folder)
    if found != expected:
        raise SurgeryBookError(
            f"{folder} holds {found} vision blocks, its config.json {expected}",
            "download or save the model again; its weights are incomplete",
        )
    return converted, projection


def _snapshot_folder(source: str) -> Path:
    """A local snapshot folder, or the hub repository ``source`` downloaded (weights and config only)."""
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SurgeryBookError(
            "downloading FusionBench checkpoints needs huggingface_hub", "pip install 'surgery-book[hub]'"
        ) from None
    patterns = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
    try:
        folder = Path(snapshot_download(source, allow_patterns=patterns))
        if not any((folder / name).is_file() for name in SNAPSHOT_WEIGHTS):  # an older repository: pickled weights only
            folder = Path(snapshot_download(source, allow_patterns=["config.json", "pytorch_model.bin"]))
    except Exception as exc:  # noqa: BLE001  (network, authentication and missing-repository errors)
        raise SurgeryBookError(
            f"cannot download {source} from the hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
            "check the network and the repository name, or pass --source with local save_pretrained folders",
        ) from None
    return folder


def convert_fusionbench(
    source: str,
    model: str,
    out: str | os.PathLike[str],
    tasks: tuple[str, ...] = TASK_VECTORS_TASKS,
    progress: bool = True,
    owner: str = FUSIONBENCH_OWNER,
) -> dict[str, Any]:
    """Convert FusionBench's transformers checkpoints once into the same layout as :func:`convert_task_vectors`.

    Each snapshot's weights are read as stored (:func:`snapshot_state`; no model is built, so nothing is
    initialised at random or cast), the pretrained ``CLIPModel``'s vision tower and ``visual_projection``
    and each expert ``CLIPVisionModel`` mapped onto open_clip keys (:func:`open_clip_state_from_transformers`),
    missing, unexpected, non-float and non-finite weights refused. The family ships no heads: zero-shot heads
    are built from the text tower (:mod:`surgery_lib.settings.clip.zero_shot`). Written like
    :func:`convert_task_vectors`: swapped in when complete.

    Raises:
        SurgeryBookError: huggingface_hub missing (hub source), unknown model, missing snapshots or
            ``config.json``, unreadable weights, missing or unexpected keys, non-float or non-finite
            weights, mismatched experts, or ``out/<model>`` a file.
    """
    _check_output_folder(Path(out) / model)
    names = tuple(get_clip_task(t).name for t in tasks)
    sources = fusionbench_sources(model, source, names, owner)
    pretrained, projection = _fusionbench_vision(_snapshot_folder(sources["pretrained"]), None)

    def experts() -> Iterator[tuple[str, dict[str, torch.Tensor], None]]:
        for task in tqdm(names, desc=f"converting {model}", disable=not progress):
            yield task, _fusionbench_vision(_snapshot_folder(sources[f"expert/{task}"]), projection)[0], None

    return _write_converted(Path(out) / model, "fusionbench", model, pretrained, experts(), sources)


def open_clip_state_from_transformers(
    vision: Mapping[str, torch.Tensor], projection: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Map a transformers ``CLIPVisionModel`` state dict (FusionBench's experts) onto open_clip's visual keys.

    Args:
        vision: the vision tower's weights, with or without the ``vision_model.`` prefix (transformers 4
            saves it, transformers 5 flattened ``CLIPVisionModel``); ``position_ids`` is ignored.
        projection: ``visual_projection.weight`` (output_dim, width) of the pretrained ``CLIPModel``: the
            experts are ``CLIPVisionModel``s without it, and it was frozen during their fine-tuning.

    Returns:
        open_clip ``VisionTransformer`` weights: q/k/v concatenated into ``in_proj_*``, ``fc1``/``fc2`` as
        ``c_fc``/``c_proj``, ``layer_norm1/2`` as ``ln_1/2``, ``pre_layrnorm`` as ``ln_pre``, and
        ``proj = projection.T``.
    """
    hf = {k.removeprefix("vision_model."): v for k, v in vision.items() if not k.endswith("position_ids")}
    try:
        state = {
            "class_embedding": hf.pop("embeddings.class_embedding"),
            "conv1.weight": hf.pop("embeddings.patch_embedding.weight"),
            "positional_embedding": hf.pop("embeddings.position_embedding.weight"),
            "ln_pre.weight": hf.pop("pre_layrnorm.weight"),
            "ln_pre.bias": hf.pop("pre_layrnorm.bias"),
            "ln_post.weight": hf.pop("post_layernorm.weight"),
            "ln_post.bias": hf.pop("post_layernorm.bias"),
            "proj": projection.T.contiguous(),
        }
        layers = sorted({int(m.group(1)) for k in hf if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
        for i in layers:
            src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                state[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                    [hf.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
                )
                for theirs, ours in (
                    ("self_attn.out_proj", "attn.out_proj"),
                    ("layer_norm1", "ln_1"),
                    ("layer_norm2", "ln_2"),
                    ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"),
                ):
                    state[f"{dst}{ours}.{kind}"] = hf.pop(f"{src}{theirs}.{kind}")
    except KeyError as exc:
        raise SurgeryBookError(
            f"missing weight {exc.args[0]!r}: not a complete transformers CLIP vision state dict",
            "pass CLIPVisionModel weights, e.g. tanganke/clip-vit-base-patch32_<task>",
        ) from None
    if hf:
        raise SurgeryBookError(
            f"unexpected transformers keys {sorted(hf)[:3]}", "pass the weights of a CLIPVisionModel"
        )
    return state
