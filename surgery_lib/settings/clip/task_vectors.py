"""The task_vectors folder (Ilharco et al.'s checkpoints, which the Surgery code reads): the image encoders and
heads read through :mod:`~surgery_lib.settings.clip.safe_pickle`, loaded strictly into a fresh open_clip
``VisionTransformer`` with QuickGELU (as the experts were trained), and converted once into the
:mod:`~surgery_lib.settings.clip.converted` format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.progress import tqdm
from surgery_lib.models import ClassificationHead
from surgery_lib.settings.clip.converted import _check_output_folder, _write_converted
from surgery_lib.settings.clip.safe_pickle import _checkpoint_tensors
from surgery_lib.settings.clip.tasks import CLIP_TASK_NAMES

VISUAL_PREFIX = "model.visual."


def load_image_encoder_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The image tower's weights from ``zeroshot.pt`` / ``finetuned.pt``, with open_clip's visual key names.

    Raises:
        SurgeryBookError: if the file holds no CLIP image tower (``model.visual.*``).
    """
    state = _checkpoint_tensors(path)
    visual = {k[len(VISUAL_PREFIX) :]: v for k, v in state.items() if k.startswith(VISUAL_PREFIX)}
    if not visual:
        raise SurgeryBookError(
            f"{path} holds no CLIP image encoder (no model.visual.* tensors; found {sorted(state)[:3]})",
            "pass a task_vectors zeroshot.pt or <Task>/finetuned.pt file",
        )
    return visual


def load_head(path: str | os.PathLike[str]) -> ClassificationHead:
    """A task_vectors ``head_<Task>.pt`` as this library's :class:`ClassificationHead` (same maths: it
    L2-normalises the embedding, then applies weight = scaled class text embeddings, bias 0)."""
    state = _checkpoint_tensors(path)
    if set(state) != {"weight", "bias"}:
        raise SurgeryBookError(
            f"{path} is not a classification head (tensors {sorted(state)})", "pass a head_<Task>.pt file"
        )
    return ClassificationHead.from_weights(state["weight"], state["bias"])


#: The eight tasks of the papers, as task_vectors names its folders and heads.
#: task_vectors' folder names of the eight tasks: the papers' table order.
TASK_VECTORS_TASKS = CLIP_TASK_NAMES


def task_vectors_files(
    source: str | os.PathLike[str], model: str, tasks: tuple[str, ...] = TASK_VECTORS_TASKS
) -> dict[str, Path]:
    """The files of ``model`` in a task_vectors folder: ``pretrained``, ``expert/<Task>`` and ``head/<Task>``.

    Raises:
        SurgeryBookError: listing every missing file at once, before anything is read.
    """
    root = Path(source) / model
    files = {"pretrained": root / "zeroshot.pt"}
    for task in tasks:
        files[f"expert/{task}"] = root / task / "finetuned.pt"
        files[f"head/{task}"] = root / f"head_{task}.pt"
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SurgeryBookError(
            f"{len(missing)} task_vectors file(s) missing, e.g. {missing[:3]}",
            f"download the {model} folder (zeroshot.pt, <Task>/finetuned.pt, head_<Task>.pt) into {Path(source)}",
        )
    return files


def convert_task_vectors(
    source: str | os.PathLike[str],
    model: str,
    out: str | os.PathLike[str],
    tasks: tuple[str, ...] = TASK_VECTORS_TASKS,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert a task_vectors folder once into safetensors plus ``manifest.json`` under ``out/<model>/``.

    The conversion is written into a temporary folder and swapped in when complete, so an interrupted or
    failed one leaves ``out/<model>/`` as it was. Returns the manifest (paths, SHA-256 and the architecture).

    Raises:
        SurgeryBookError: missing files, unsafe or damaged pickles, experts whose architecture differs
            from the pretrained model's, non-float or non-finite weights, or ``out/<model>`` a file.
    """
    _check_output_folder(Path(out) / model)
    files = task_vectors_files(source, model, tasks)
    pretrained = load_image_encoder_state(files["pretrained"])
    experts = (
        (task, load_image_encoder_state(files[f"expert/{task}"]), load_head(files[f"head/{task}"]))
        for task in tqdm(tasks, desc=f"converting {model}", disable=not progress)
    )
    return _write_converted(
        Path(out) / model, "task_vectors", model, pretrained, experts, {k: str(v) for k, v in files.items()}
    )
