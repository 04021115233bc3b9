"""The papers' eight image-classification tasks as data: sources, class names and prompt templates.

Names follow the task_vectors checkpoints (``SUN397 ... DTD``). ``hub`` names the Hugging Face dataset
that is the most reliable source today (the mirrors FusionBench evaluates on); ``fusionbench`` is the task's suffix in
FusionBench's expert repositories (``tanganke/clip-vit-base-patch32_<suffix>``).

Class names: digits for MNIST/SVHN, OpenAI's renamed EuroSAT classes and the descriptive GTSRB names
are fixed here, because the datasets only store numbers or terse folder names for them; the other tasks
take their names from the data (hub ``ClassLabel`` names or folder names, underscores as spaces).
Templates are OpenAI's CLIP prompts, as task_vectors uses them (SUN397 2, Cars 8, RESISC45 18,
EuroSAT 3, SVHN 1, GTSRB 3, MNIST 1, DTD 8).
"""

from __future__ import annotations

from dataclasses import dataclass

from surgery_lib.core.errors import SurgeryBookError, use_one_of


@dataclass(frozen=True)
class ClipTask:
    """One task of the real setting. ``test_size`` is the published test-split size."""

    name: str
    num_classes: int
    test_size: int
    hub: str
    fusionbench: str
    templates: tuple[str, ...]
    class_names: tuple[str, ...] | None = None  # None: read from the data
    hub_config: str | None = None


_DIGITS = tuple(str(d) for d in range(10))
_NUMBER = ('a photo of the number: "{}".',)
_ARTICLES = ("{}", "a {}", "the {}")

EUROSAT_FOLDERS = (
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
)
EUROSAT_CLASSES = (
    "annual crop land",
    "forest",
    "brushland or shrubland",
    "highway or road",
    "industrial buildings or commercial buildings",
    "pasture land",
    "permanent crop land",
    "residential buildings or homes or apartments",
    "river",
    "lake or sea",
)

GTSRB_CLASSES = tuple(
    [f"red and white circle {n} kph speed limit" for n in (20, 30, 50, 60, 70, 80)]
    + ["end / de-restriction of 80 kph speed limit"]
    + [f"red and white circle {n} kph speed limit" for n in (100, 120)]
    + [
        "red and white circle red car and black car no passing",
        "red and white circle red truck and black car no passing",
        "red and white triangle road intersection warning",
        "white and yellow diamond priority road",
        "red and white upside down triangle yield right-of-way",
        "stop",
        "empty red and white circle",
        "red and white circle no truck entry",
        "red circle with white horizonal stripe no entry",
        "red and white triangle with exclamation mark warning",
        "red and white triangle with black left curve approaching warning",
        "red and white triangle with black right curve approaching warning",
        "red and white triangle with black double curve approaching warning",
        "red and white triangle rough / bumpy road warning",
        "red and white triangle car skidding / slipping warning",
        "red and white triangle with merging / narrow lanes warning",
        "red and white triangle with person digging / construction / road work warning",
        "red and white triangle with traffic light approaching warning",
        "red and white triangle with person walking warning",
        "red and white triangle with child and person walking warning",
        "red and white triangle with bicyle warning",
        "red and white triangle with snowflake / ice warning",
        "red and white triangle with deer warning",
        "white circle with gray strike bar no speed limit",
        "blue circle with white right turn arrow mandatory",
        "blue circle with white left turn arrow mandatory",
        "blue circle with white forward arrow mandatory",
        "blue circle with white forward or right turn arrow mandatory",
        "blue circle with white forward or left turn arrow mandatory",
        "blue circle with white keep right arrow mandatory",
        "blue circle with white keep left arrow mandatory",
        "blue circle with white arrows indicating a traffic circle",
        "white circle with gray strike bar indicating no passing for cars has ended",
        "white circle with gray strike bar indicating no passing for trucks has ended",
    ]
)

CLIP_TASKS: dict[str, ClipTask] = {
    task.name: task
    for task in (
        ClipTask("SUN397", 397, 19887, "tanganke/sun397", "sun397", ("a photo of a {}.", "a photo of the {}.")),
        ClipTask(
            "Cars",
            196,
            8041,
            "tanganke/stanford_cars",
            "stanford-cars",
            (
                "a photo of a {}.",
                "a photo of the {}.",
                "a photo of my {}.",
                "i love my {}!",
                "a photo of my dirty {}.",
                "a photo of my clean {}.",
                "a photo of my new {}.",
                "a photo of my old {}.",
            ),
        ),
        ClipTask(
            "RESISC45",
            45,
            6300,
            "tanganke/resisc45",
            "resisc45",
            tuple(
                f"{kind} {what} of {a}."
                for a in _ARTICLES
                for kind, what in (
                    ("satellite", "imagery"),
                    ("aerial", "imagery"),
                    ("satellite", "photo"),
                    ("aerial", "photo"),
                    ("satellite", "view"),
                    ("aerial", "view"),
                )
            ),
        ),
        ClipTask(
            "EuroSAT",
            10,
            2700,
            "tanganke/eurosat",
            "eurosat",
            tuple(f"a centered satellite photo of {a}." for a in _ARTICLES),
            EUROSAT_CLASSES,
        ),
        ClipTask("SVHN", 10, 26032, "ufldl-stanford/svhn", "svhn", _NUMBER, _DIGITS, hub_config="cropped_digits"),
        ClipTask(
            "GTSRB",
            43,
            12630,
            "tanganke/gtsrb",
            "gtsrb",
            tuple(f'a {v} photo of a "{{}}" traffic sign.' for v in ("zoomed in", "centered", "close up")),
            GTSRB_CLASSES,
        ),
        ClipTask("MNIST", 10, 10000, "ylecun/mnist", "mnist", _NUMBER, _DIGITS),
        ClipTask(
            "DTD",
            47,
            1880,
            "tanganke/dtd",
            "dtd",
            tuple(f"a photo of {a} {{}} {k}." for a in ("a", "the") for k in ("texture", "pattern", "thing", "object")),
        ),
    )
}

#: The papers' order (the columns of every table).
CLIP_TASK_NAMES: tuple[str, ...] = tuple(CLIP_TASKS)


def get_clip_task(name: str) -> ClipTask:
    """The task called ``name`` (task_vectors spelling; case-insensitive).

    Raises:
        SurgeryBookError: for an unknown task, listing the eight.
    """
    for task in CLIP_TASKS.values():
        if task.name.lower() == name.lower():
            return task
    raise SurgeryBookError(f"unknown task {name!r} of the real setting", use_one_of(name, CLIP_TASK_NAMES))


def readable_class_name(raw: str) -> str:
    """A folder or label name as a prompt-ready class name: ``"airplane_cabin"`` -> ``"airplane cabin"``."""
    return raw.replace("_", " ").strip()


#: open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD: the eval transform of every OpenAI CLIP model.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def text_leftover_entries(text_width: int, embed_dim: int, vocabulary: int = 49408, context: int = 77) -> int:
    """Entries of the text leftovers in a published ``ImageEncoder``: token embedding, positional embedding,
    text projection, ``ln_final`` weight and bias, and ``logit_scale``."""
    return vocabulary * text_width + context * text_width + text_width * embed_dim + 2 * text_width + 1
