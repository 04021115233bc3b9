"""A safe reader of the task_vectors pickles (``zeroshot.pt``, ``<Task>/finetuned.pt``, ``head_<Task>.pt``).

Those files are whole pickled Python objects from open_clip 2.0.2 and the authors' ``src`` package, so
``torch.load`` needs both installed (and executes whatever the pickle names). Here the pickle is read by an
unpickler that resolves **only** an allow-list of the globals such files reference, each to an inert
stand-in that merely records its state; tensors are rebuilt by torch's own helpers. Any other global (say
``os.system``) stops the load with :class:`UnsafeCheckpointError` before anything runs.

Both file kinds exist in the published folder: torch zip archives and, for at least one file, a raw pickle
(``torch.load`` fails on it with "Invalid magic number"); both work here.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from surgery_lib.core.errors import SurgeryBookError

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
