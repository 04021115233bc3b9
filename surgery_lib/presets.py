"""Presets: the model, data and training recipe of each setting, as data.

The schema (the dataclasses below) and the registry live here; the preset instances are JSON files, one
``presets.json`` per setting folder (``settings/offline/presets.json``: ``smoke``, ``mini``, ``base``;
``settings/clip/presets.json``: ``clip-vit-b-32``, ``clip-vit-b-16``, ``clip-vit-l-14``), found by a scan
the first time a preset is looked up. Adding a CLIP backbone or an offline size is one JSON entry.
``$SURGERY_BOOK_PRESETS`` may name one more JSON file of presets (read at the same moment, so that notebook
kernels started by papermill see the custom presets of the command that started them).

A preset fixes everything that determines the model zoo, so its config hash names the zoo on disk.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery_lib.core import compat, storage
from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.registry import Registry
from surgery_lib.core.storage import CorruptFileError, read_json
from surgery_lib.finetuning import FINETUNING_MODES


@dataclass(frozen=True)
class EncoderConfig:
    """An open_clip ``VisionTransformer``. ``mean``/``std`` normalise images scaled to [0, 1]."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    mlp_ratio: float = 4.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    #: ``"gelu"`` or ``"quick_gelu"`` (OpenAI's CLIP weights were trained with QuickGELU).
    activation: str = "gelu"


@dataclass(frozen=True)
class SuiteConfig:
    """Sizes of the offline task suite. Counts are images per task (per class for the mix)."""

    tasks: tuple[str, ...]
    train_per_task: int
    adapt_per_task: int
    test_per_task: int
    mix_per_class: int
    seed: int = 0
    #: Labelled images per task held out for choosing merge hyper-parameters (``merge --tune validation``), never
    #: trained on; 0: the suite has no validation split. MNIST's are taken from its training digits.
    validation_per_task: int = 0


@dataclass(frozen=True)
class RecipeConfig:
    """How the zoo is trained. Learning rates are AdamW's; schedules are linear warm-up then cosine.

    ``probe_shots`` training images per class fit each task's head (0: the whole train split): the
    stand-in for CLIP's zero-shot heads, which are weak classifiers built without task training.
    """

    pretrain_epochs: int
    pretrain_lr: float
    pretrain_weight_decay: float
    pretrain_warmup_steps: int
    batch_size: int
    translate_px: int
    probe_shots: int
    probe_steps: int
    probe_lr: float
    probe_weight_decay: float
    expert_steps: int
    expert_lr: float
    expert_weight_decay: float
    expert_warmup_fraction: float
    mtl_steps: int
    mtl_batch_per_task: int
    mtl_lr: float
    seed: int = 0
    #: How experts are fine-tuned (:mod:`surgery_lib.finetuning`): ``full``, ``attention``, ``lora``, ``tangent``.
    expert_finetune: str = "full"
    #: The rank of every LoRA update when ``expert_finetune`` is ``lora``.
    expert_lora_rank: int = 4


@dataclass(frozen=True)
class Preset:
    """A named setting: encoder architecture, data sizes, training recipe and default device."""

    name: str
    description: str
    encoder: EncoderConfig
    suite: SuiteConfig | None
    recipe: RecipeConfig | None
    default_device: str = "cpu"
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: AdaMerging's schedule for this preset (the official one: 500 steps, batches of 16).
    adamerging_steps: int = 500
    adamerging_batch_size: int = 16
    #: The setting's own section as JSON data (the real-CLIP presets': which published model, where its weights
    #: and data come from; read and checked by ``settings/clip/config.py``). Generic code reads two keys of any
    #: setting's section: ``tasks`` (for a preset without a suite) and ``surgery_v2_rank``. None: no section.
    setting_config: dict[str, Any] | None = None
    #: Precision of feature extraction, AdaMerging and SurgeryV2 on a GPU (fp32, tf32, bf16, fp16; the CPU
    #: always runs fp32). The official code is fp32 throughout.
    precision: str = "fp32"
    #: The setting that provides this preset's zoo and data: a folder of :mod:`surgery_lib.settings`.
    setting: str = "offline"

    def surgery_rank(self, version: int) -> int:
        """The papers' default rank for Surgery ``version`` 1 or 2 on this preset: 16, except SurgeryV2 on a
        backbone whose setting section names another (the papers ran ViT-L/14 at 4)."""
        return int((self.setting_config or {}).get("surgery_v2_rank", 16)) if version == 2 else 16

    @property
    def tasks(self) -> tuple[str, ...]:
        """The preset's tasks, in table order: its suite's, else those its setting section names."""
        if self.suite is not None:
            return self.suite.tasks
        return tuple((self.setting_config or {}).get("tasks", ()))

    def __hash__(self) -> int:  # the setting section is a dict, which has no hash: hash the preset's JSON form
        return hash(storage.config_hash(self.to_dict()))

    def to_dict(self) -> dict[str, Any]:
        """The preset as JSON-compatible data."""
        return dataclasses.asdict(self)


#: Upper bounds of the numeric fields, far above every published model (ViT-bigG/14: width 1664, 48 blocks,
#: 256 tokens at 224) and data set, so that a typo (a width of 16,384, an image size of 100,000) is refused
#: before anything allocates gigabytes. Sizes of the offline suite are images per task.
UPPER_BOUNDS = {
    "width": 4096,
    "layers": 128,
    "heads": 256,
    "output_dim": 8192,
    "image_size": 1024,
    "patch_size": 1024,
    "mlp_ratio": 16.0,
    "train_per_task": 200_000,
    "adapt_per_task": 200_000,
    "test_per_task": 200_000,
    "validation_per_task": 200_000,
    "mix_per_class": 10_000,
    "batch_size": 65_536,
    "mtl_batch_per_task": 65_536,
    "adamerging_batch_size": 65_536,
    "probe_shots": 100_000,
    "surgery_v2_rank": 4096,
    "expert_lora_rank": 4096,
}
#: The most image tokens an encoder may see ((image_size / patch_size)^2; ViT-L/14 at 336: 576).
MAX_TOKENS = 4096
#: The most parameters an encoder may have (ViT-bigG/14's image tower: 1.8 G).
MAX_PARAMETERS = 4_000_000_000
#: The longest preset name: it names cache folders (``<name>-<hash>``), whose components file systems cap at 255 bytes.
MAX_NAME_LENGTH = 64
#: The largest preset file read (the built-in ones are a few KB; /dev/zero would be read for ever).
MAX_PRESET_FILE_BYTES = 1_000_000


def encoder_parameters(config: EncoderConfig) -> int:
    """The number of parameters of the open_clip ``VisionTransformer`` ``config`` describes (exact for
    open_clip's default layout: patch embedding without bias, class token, positional embedding, ln_pre,
    ``layers`` blocks of attention and MLP with biases and two LayerNorms, ln_post and the projection)."""
    width, hidden = config.width, int(config.width * config.mlp_ratio)
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    block = 4 * width * width + 4 * width + 2 * width * hidden + hidden + width + 4 * width
    return (
        3 * config.patch_size**2 * width
        + width
        + tokens * width
        + 2 * width
        + config.layers * block
        + 2 * width
        + width * config.output_dim
    )


#: Numeric fields that may be 0 (every other int must be >= 1, every other float finite and > 0).
MAY_BE_ZERO = {
    "seed",
    "probe_shots",
    "pretrain_warmup_steps",
    "translate_px",
    "ties_text_entries",
    "adapt_per_task",
    "validation_per_task",
    "pretrain_weight_decay",
    "probe_weight_decay",
    "expert_weight_decay",
    "expert_warmup_fraction",
}


def check_fields(obj: Any, prefix: str, fail: Callable[[str, Any, str], None]) -> None:
    """Check every field of the dataclass ``obj`` (and of the dataclasses it holds) against its declared type:
    integers, finite numbers, positive where :data:`MAY_BE_ZERO` does not allow 0, under :data:`UPPER_BOUNDS`.
    ``fail(path, value, expected)`` raises for the first field that is wrong (``path`` starts with ``prefix``)."""
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), f"{prefix}{f.name}"
        kind = str(f.type)
        if dataclasses.is_dataclass(value):
            check_fields(value, path + ".", fail)
        elif kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
            fail(path, value, "an integer")
        elif kind == "int" and value < (0 if f.name in MAY_BE_ZERO else 1):
            fail(path, value, "a value >= 0" if f.name in MAY_BE_ZERO else "a value >= 1")
        elif kind == "float" and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ):
            fail(path, value, "a finite number")
        elif kind == "float" and (value < 0 or (value == 0 and f.name not in MAY_BE_ZERO)):
            fail(path, value, "a positive number")
        elif kind == "str" and not isinstance(value, str):
            fail(path, value, "a string")
        elif kind.startswith("tuple[float") and not (
            isinstance(value, tuple)
            and len(value) == 3
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
        ):
            fail(path, value, "three finite numbers")
        elif kind.startswith("tuple[str") and not (isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
            fail(path, value, "a list of names")
        elif f.name in UPPER_BOUNDS and kind in ("int", "float") and value > UPPER_BOUNDS[f.name]:
            fail(path, value, f"at most {UPPER_BOUNDS[f.name]:,}")


def check_preset(preset: Preset) -> Preset:
    """Check every field of ``preset`` against the schema: types, positive sizes, finite rates, known names.

    A setting's own section (``setting_config``) is checked here only where generic code reads it (``tasks``,
    ``surgery_v2_rank``); the setting checks the rest when it loads the preset (:meth:`Setting.check_preset`).

    Raises:
        SurgeryBookError: naming the preset, the field and the value.
    """

    def fail(path: str, value: Any, expected: str) -> None:
        raise SurgeryBookError(f"preset {preset.name!r}: {path} = {value!r} is invalid", f"use {expected}")

    if not isinstance(preset.name, str):
        raise SurgeryBookError(
            f"preset name {preset.name!r} is not a string", "name the preset with letters, digits, '-' and '_'"
        )
    if len(preset.name) > MAX_NAME_LENGTH:
        raise SurgeryBookError(
            f"preset name {preset.name[:20]!r}... has {len(preset.name)} characters (it names cache folders)",
            f"use at most {MAX_NAME_LENGTH}",
        )
    check_fields(preset, "", fail)
    _check_sections(preset, fail)
    if preset.encoder.width % preset.encoder.heads:
        fail("encoder.heads", preset.encoder.heads, f"a divisor of encoder.width ({preset.encoder.width})")
    if preset.encoder.image_size % preset.encoder.patch_size:
        fail(
            "encoder.patch_size",
            preset.encoder.patch_size,
            f"a divisor of encoder.image_size ({preset.encoder.image_size})",
        )
    if preset.encoder.activation not in ("gelu", "quick_gelu"):
        fail("encoder.activation", preset.encoder.activation, "'gelu' or 'quick_gelu'")
    if preset.precision not in ("fp32", "tf32", "bf16", "fp16"):
        fail("precision", preset.precision, "fp32, tf32, bf16 or fp16")
    if preset.recipe is not None:
        if preset.recipe.expert_finetune not in FINETUNING_MODES:
            fail("recipe.expert_finetune", preset.recipe.expert_finetune, f"one of {', '.join(FINETUNING_MODES)}")
    tokens = (preset.encoder.image_size // preset.encoder.patch_size) ** 2
    if tokens > MAX_TOKENS:
        fail(
            "encoder.patch_size",
            preset.encoder.patch_size,
            f"a patch size that gives at most {MAX_TOKENS} tokens "
            f"at image size {preset.encoder.image_size} (this one: {tokens:,})",
        )
    parameters = encoder_parameters(preset.encoder)
    if parameters > MAX_PARAMETERS:
        fail(
            "encoder",
            f"{parameters:,} parameters",
            f"an encoder of at most {MAX_PARAMETERS:,} parameters (smaller width or layers)",
        )
    return preset


def _check_sections(preset: Preset, fail: Any) -> None:
    """The fields checked against each other: a known setting, a suite and a recipe together or neither, the
    setting section's generic keys, and a non-empty task list without repeats (from the suite or the section)."""
    settings = sorted(
        p.name for p in SETTINGS_DIR.iterdir() if (p / "__init__.py").is_file() and p.name != "__pycache__"
    )
    if preset.setting not in settings:
        fail("setting", preset.setting, f"one of {', '.join(settings)}")
    if (preset.suite is None) != (preset.recipe is None):
        fail(
            "suite" if preset.suite is None else "recipe",
            None,
            "a suite and a recipe section together (a zoo trained here) or neither (a zoo of published checkpoints)",
        )
    section = preset.setting_config
    if section is not None and not isinstance(section, dict):
        fail("setting_config", section, "a JSON object (the setting's own section) or null")
    if preset.suite is None and section is None:
        fail(
            "setting_config",
            None,
            f"a suite and a recipe, or a section of the {preset.setting} setting that names the tasks "
            "(setting_config.tasks; a real-CLIP preset: model, hub_model, tasks)",
        )
    rank = (section or {}).get("surgery_v2_rank", 16)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= UPPER_BOUNDS["surgery_v2_rank"]:
        fail("setting_config.surgery_v2_rank", rank, f"an integer from 1 to {UPPER_BOUNDS['surgery_v2_rank']:,}")
    where = "suite.tasks" if preset.suite is not None else "setting_config.tasks"
    tasks = preset.suite.tasks if preset.suite is not None else (section or {}).get("tasks", ())
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
        fail(where, tasks, "a list of names")
    if not tasks:
        fail(where, list(tasks), "at least one task")
    if len(set(tasks)) != len(tasks):
        fail(where, list(tasks), "each task once")


def preset_hash(preset: Preset) -> str:
    """The hash of every field of ``preset``: a grid cell records it, and is reused only under the same preset.

    Hashed in the layout the committed cells were computed under, in which the setting's section was the field
    ``clip`` (real-CLIP presets' only): renaming a field changes no number, so it does not invalidate a cell.
    """
    data = preset.to_dict()
    data["clip"] = data.pop("setting_config")
    if data["suite"] is not None:
        data["suite"] = suite_identity(preset.suite)
    return storage.config_hash(data)


#: Suite fields added after zoos and grid cells were first hashed, with the value that means "as before".
SUITE_FIELDS_ADDED = {"validation_per_task": 0}


def suite_identity(suite: SuiteConfig) -> dict[str, Any]:
    """``suite`` as the data its hashes cover: a field added later is left out while it has the value that
    means "as before" (a suite without a validation split hashes as it did before the field existed)."""
    data = dataclasses.asdict(suite)
    for name, default in SUITE_FIELDS_ADDED.items():
        if data.get(name) == default:
            del data[name]
    return data


PRESETS: Registry[Preset] = Registry("preset", load=lambda: _load_presets())


def register_preset(preset: Preset, *, replace: bool = False) -> Preset:
    """Add ``preset`` to the registry and return it.

    Raises:
        SurgeryBookError: a preset of that name exists (pass ``replace=True`` to replace it on purpose).
    """
    return PRESETS.register(preset.name, check_preset(preset), replace=replace)


def get_preset(name: str | Preset) -> Preset:
    """Look a preset up by name; a :class:`Preset` is returned unchanged.

    Raises:
        SurgeryBookError: for an unknown name, listing the known ones.
    """
    return name if isinstance(name, Preset) else PRESETS[name]


def preset_from_dict(data: dict[str, Any]) -> Preset:
    """The inverse of :meth:`Preset.to_dict` (lists become tuples again).

    Raises:
        SurgeryBookError: a missing or unknown field, naming it.
    """

    def build(kind: type, fields: dict[str, Any] | None) -> Any:
        if fields is None:
            return None
        return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    try:
        parts = {
            "encoder": build(EncoderConfig, data["encoder"]),
            "suite": build(SuiteConfig, data.get("suite")),
            "recipe": build(RecipeConfig, data.get("recipe")),
        }
        rest = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k not in parts}
        if "clip" in rest:  # 0.2's files named the real-CLIP section after its setting
            rest["setting_config"] = rest.pop("clip")
        return Preset(**rest, **parts)
    except (KeyError, TypeError, AttributeError) as exc:
        raise SurgeryBookError(
            f"invalid preset description ({exc})", "start from `surgery-book presets --json` output"
        ) from None


def register_presets_from_file(path: str | os.PathLike[str], *, replace: bool = False) -> list[Preset]:
    """Register every preset in a JSON file (one ``to_dict()`` object, or a list of them).

    Raises:
        SurgeryBookError: ``path`` is not a regular file (a FIFO or ``/dev/zero`` would be read for ever) or
            is larger than :data:`MAX_PRESET_FILE_BYTES`, is not JSON, or describes an invalid preset.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise SurgeryBookError(
            f"cannot read presets from {path} ({exc})", "point SURGERY_BOOK_PRESETS at a JSON file"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise SurgeryBookError(
            f"cannot read presets from {path}: not a regular file", "point SURGERY_BOOK_PRESETS at a JSON file"
        )
    if info.st_size > MAX_PRESET_FILE_BYTES:
        raise SurgeryBookError(
            f"cannot read presets from {path}: {info.st_size:,} bytes (at most {MAX_PRESET_FILE_BYTES:,})",
            "point SURGERY_BOOK_PRESETS at a JSON file of presets",
        )
    try:
        data = read_json(path)
    except (OSError, CorruptFileError) as exc:
        raise SurgeryBookError(
            f"cannot read presets from {path} ({exc})", "point SURGERY_BOOK_PRESETS at a JSON file"
        ) from None
    return [
        register_preset(preset_from_dict(item), replace=replace)
        for item in (data if isinstance(data, list) else [data])
    ]


#: The folder whose subfolders are the settings; each may hold a ``presets.json``.
SETTINGS_DIR = Path(__file__).resolve().parent / "settings"
USER_PRESETS_ENV = "SURGERY_BOOK_PRESETS"


def _load_presets() -> None:
    """Register the presets of every setting folder, then those of ``$SURGERY_BOOK_PRESETS`` (which may
    replace a built-in one of the same name)."""
    for path in sorted(
        SETTINGS_DIR.glob("*/presets.json"), key=lambda p: (p.parent.name != "offline", p.parent.name)
    ):  # offline first
        register_presets_from_file(path)
    if os.environ.get(USER_PRESETS_ENV):
        register_presets_from_file(os.environ[USER_PRESETS_ENV], replace=True)


def __getattr__(name: str) -> Any:
    # 0.1 names that moved to their setting (config_hash to core.storage): kept for one release.
    if name in compat.MOVED_NAMES["presets"]:
        return compat.moved_name("presets", name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
