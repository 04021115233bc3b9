"""Read the task_vectors checkpoints (``zeroshot.pt``, ``<Task>/finetuned.pt``, ``head_<Task>.pt``) safely.

Those files are whole pickled Python objects from open_clip 2.0.2 and the authors' ``src`` package, so
``torch.load`` needs both installed (and executes whatever the pickle names). Here the pickle is read by an
unpickler that resolves **only** an allow-list of the globals such files reference, each to an inert
stand-in that merely records its state; tensors are rebuilt by torch's own helpers. Any other global (say
``os.system``) stops the load with :class:`UnsafeCheckpointError` before anything runs. The tensors are then
loaded strictly into a fresh open_clip ``VisionTransformer`` with QuickGELU, as the experts were trained.

Both file kinds exist in the published folder: torch zip archives and, for at least one file, a raw pickle
(``torch.load`` fails on it with "Invalid magic number"); both work here.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import re
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.progress import tqdm
from surgery_lib.core.state_dict import check_compatible
from surgery_lib.core.storage import atomic_directory, load_tensors, read_json, save_tensors, write_json
from surgery_lib.models import ClassificationHead
from surgery_lib.settings.clip.tasks import CLIP_TASK_NAMES, get_clip_task

#: Modules whose classes become inert stand-ins (nothing of theirs is imported or run).
STAND_IN_MODULES = (
    "src.modeling",
    "open_clip.model",
    "open_clip.transformer",
    "open_clip.transform",
    "open_clip.modified_resnet",
    "torch.nn.modules.",
    "torchvision.transforms.",
)
# What torch itself needs to rebuild tensors and parameters (no code from the file runs through these).
_TORCH_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Size"),
    ("torch", "device"),
}
# Plain data types (nn.Module keeps a set of non-persistent buffer names); no callables beyond constructors.
_SAFE_BUILTINS = {
    "set",
    "frozenset",
    "list",
    "dict",
    "tuple",
    "bytes",
    "str",
    "int",
    "float",
    "bool",
    "complex",
    "slice",
}
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafeCheckpointError(SurgeryBookError):
    """The pickle names a global outside the allow-list; nothing from it was executed."""


class StandIn:
    """An inert object standing for a class of the pickle: it keeps its constructor arguments and state."""

    _qualified_name = "StandIn"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_stand_in_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_stand_in_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in for {self._qualified_name}>"


@functools.cache
def _stand_in(module: str, name: str) -> type:
    return type(name, (StandIn,), {"_qualified_name": f"{module}.{name}", "__module__": __name__})


def _load_storage_from_bytes(data: bytes) -> Any:
    # Tensors in a plain pickle carry their storage as a nested legacy torch file; torch's weights-only
    # loader reads it without resolving any global beyond tensors.
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(text, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"the pickle asks for the {encoding!r} codec", "load only task_vectors checkpoints")
    return text.encode("latin1")


class SafeUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """A pickle reader that resolves only the allow-listed globals (see the module docstring).

    It is the pure-Python unpickler on purpose: its memo is a dictionary, so a hostile ``LONG_BINPUT``
    index cannot make it allocate a memo table of gigabytes as the C implementation would, and every
    length the file declares goes through the (bounded) file's ``read``. The pickles here are small (the
    tensors live in storages), so speed does not matter."""

    source = "<stream>"

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _TORCH_GLOBALS:
            return super().find_class(module, name)
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return super().find_class("builtins", name)
        if module == "_codecs" and name == "encode":
            return _latin1_bytes
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch.storage" and name == "_load_from_bytes":
            return _load_storage_from_bytes
        if module.startswith(STAND_IN_MODULES):
            return _stand_in(module, name)
        raise UnsafeCheckpointError(
            f"{self.source} refers to {module}.{name}, which a model checkpoint has no reason to contain; "
            "nothing from the file was executed",
            "only load checkpoints from a source you trust; this loader reads the task_vectors files",
        )


def _pickle_module(source: str) -> types.SimpleNamespace:
    class Unpickler(SafeUnpickler):
        pass

    Unpickler.source = source

    def load(file: Any, **kwargs: Any) -> Any:
        return Unpickler(file, **kwargs).load()

    return types.SimpleNamespace(Unpickler=Unpickler, load=load, __name__="surgery_lib.settings.clip.checkpoints")


def read_pickled_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Unpickle a task_vectors ``.pt`` file (torch zip archive, legacy torch file or raw pickle) safely.

    Returns the root object as a tree of :class:`StandIn` objects holding real tensors.

    Raises:
        UnsafeCheckpointError: the pickle names a global outside the allow-list.
        SurgeryBookError: the file is missing, truncated or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise SurgeryBookError(
            f"no checkpoint at {path}", "check the path (task_vectors layout: <root>/<model>/<Task>/finetuned.pt)"
        )
    module = _pickle_module(str(path))
    try:
        if zipfile.is_zipfile(path):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
                return torch.load(path, map_location="cpu", pickle_module=module, weights_only=False)
        with path.open("rb") as raw:
            handle = _BoundedFile(raw, path.stat().st_size)
            if _is_legacy_torch_file(path):
                with warnings.catch_warnings():  # legacy files compare stored class sources; stand-ins have none
                    warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
                    return torch.load(handle, map_location="cpu", pickle_module=module, weights_only=False)  # type: ignore[arg-type]
            return module.Unpickler(handle).load()
    except UnsafeCheckpointError:
        raise
    except (Exception, RecursionError) as exc:  # noqa: BLE001  (any failure on a hostile file is the same one-line error)
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: BaseException) -> SurgeryBookError:
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return SurgeryBookError(
        f"{path} is truncated, damaged or not a checkpoint ({type(exc).__name__}: {detail[:200]})",
        "download the file again (one published file was once corrupted and re-uploaded)",
    )


class _BoundedFile:
    """A read-only file that refuses to read past its end: a pickle that declares a 1 TiB ``bytes`` object
    in a small file fails at once instead of asking for the memory first."""

    def __init__(self, handle: Any, size: int):
        self._handle, self._size = handle, size

    def _check(self, count: int) -> None:
        remaining = self._size - self._handle.tell()
        if count > remaining:
            raise pickle.UnpicklingError(f"the pickle declares {count:,} bytes where the file has {remaining:,} left")

    def read(self, count: int | None = -1) -> bytes:
        if count is not None and count >= 0:
            self._check(count)
        return self._handle.read(count)

    def readinto(self, buffer: Any) -> int:
        self._check(len(buffer))
        return self._handle.readinto(buffer)

    def readline(self, limit: int = -1) -> bytes:
        return self._handle.readline(limit)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


def _is_legacy_torch_file(path: Path) -> bool:
    # torch's pre-1.6 format starts with a pickled magic number; compare bytes rather than unpickle.
    magic = pickle.dumps(_TORCH_LEGACY_MAGIC, protocol=2)
    with path.open("rb") as handle:
        return handle.read(len(magic)) == magic


#: Deepest module nesting a checkpoint may have (a CLIP model nests about 6 levels).
MAX_MODULE_DEPTH = 64


def _checked_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor``, refused if its view claims more memory than its storage holds (a stride-0 view
    of a few bytes can describe gigabytes that copying would allocate) or is not a plain dense tensor."""
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_complex():
        raise SurgeryBookError(f"tensor {name} is not a dense real tensor", "load only task_vectors checkpoints")
    needed = tensor.numel() * tensor.element_size()
    available = tensor.untyped_storage().nbytes()
    if needed > available or any(stride == 0 for stride, size in zip(tensor.stride(), tensor.shape) if size > 1):
        raise SurgeryBookError(
            f"tensor {name} describes {needed:,} bytes over a storage of {available:,} (an overlapping or expanded view)",
            "load only task_vectors checkpoints",
        )
    return tensor.detach().clone()


def module_tensors(root: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a pickled ``nn.Module`` tree (stand-ins) into a state dict: parameters and buffers by dotted name.

    The walk visits every object once (a module graph that shares children has exponentially many
    paths, and one with a cycle infinitely many) and stops at :data:`MAX_MODULE_DEPTH` levels.
    """
    state: dict[str, torch.Tensor] = {}
    visited: set[int] = set()
    stack = [(root, prefix, 0)]
    while stack:
        node, path, depth = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if depth > MAX_MODULE_DEPTH:
            raise SurgeryBookError(
                f"the checkpoint nests modules deeper than {MAX_MODULE_DEPTH} levels",
                "load only task_vectors checkpoints",
            )
        attributes = getattr(node, "__dict__", {})
        for kind in ("_parameters", "_buffers"):
            entries = attributes.get(kind) or {}
            for name, tensor in entries.items() if isinstance(entries, Mapping) else ():
                if isinstance(tensor, torch.Tensor):
                    state[path + str(name)] = _checked_tensor(path + str(name), tensor)
        children = attributes.get("_modules") or {}
        for name, child in reversed(list(children.items()) if isinstance(children, Mapping) else []):
            if child is not None:
                stack.append((child, f"{path}{name}.", depth + 1))
    return state


def _checkpoint_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """:func:`module_tensors` of a checkpoint file; whatever goes wrong on a hostile file is one clear error."""
    try:
        return module_tensors(read_pickled_checkpoint(path))
    except SurgeryBookError:
        raise
    except (Exception, RecursionError) as exc:  # noqa: BLE001
        raise _unreadable(Path(path), exc) from None


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


#: The eight tasks of the papers, as task_vectors names its folders and heads.
#: task_vectors' folder names of the eight tasks: the papers' table order.
TASK_VECTORS_TASKS = CLIP_TASK_NAMES
CONVERTED_FORMAT = 1


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


def _check_output_folder(target: Path) -> None:
    # Before minutes of reading checkpoints: the folder the conversion will replace must be one.
    for path in (target, *target.parents):
        if path.exists() and not path.is_dir():
            raise SurgeryBookError(
                f"cannot write the conversion into {target}: {path} is a file", "pass another --out folder"
            )


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
