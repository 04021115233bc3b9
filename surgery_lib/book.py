"""What the chapters need beyond the science: their parameters' checks, the preset banner, numbers glued into the
prose, figure style.

The notebooks run anywhere (Jupyter, Colab, papermill, the book build); nothing here is required for the
results. :func:`glue` records a value for the rendered book's ``{glue:text}`` roles through myst-nb when it
is installed (the ``book`` extra) and does nothing elsewhere, so a chapter's prose quotes the numbers of the
run that produced its outputs, whatever the preset.
"""

from __future__ import annotations

import argparse
import html
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from surgery_lib.core.errors import SurgeryBookError, number_list, use_one_of
from surgery_lib.grid import MAX_SEEDS, TUNE_CHOICES, check_seeds, parse_methods, parse_versions
from surgery_lib.merging.options import MAX_SEED
from surgery_lib.presets import get_preset

if TYPE_CHECKING:
    from surgery_lib.presets import Preset
    from surgery_lib.settings.base import Zoo

#: Figure resolution of the notebooks' inline figures: twice the screen's (sharp on high-DPI displays).
INLINE_FORMAT = "retina"


def book_style() -> None:
    """Sharp inline figures (PNG at twice the resolution) and the book's font sizes; call once per notebook."""
    import matplotlib as mpl

    mpl.rcParams.update(
        {"figure.dpi": 100, "savefig.dpi": 200, "font.size": 10, "axes.titlesize": 11, "legend.fontsize": 9}
    )
    try:
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # plain Python: figures are only saved, at savefig.dpi
        return
    set_matplotlib_formats(INLINE_FORMAT)


def glue(name: str, value: Any) -> Any:
    """Record ``value`` under ``name`` for the book's ``{glue:text}`name:.1f``` roles (numbers) or
    ``{glue:md}`name``` roles (strings); returns ``value``.

    Shows nothing in the notebook. Without myst-nb (Colab, a bare install) it only returns ``value``.
    """
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return value
    if isinstance(value, str):  # shown as text by the {glue:md} role (a plain str would keep its quotes)
        from IPython.display import Markdown

        myst_glue(name, Markdown(value), display=False)
        return value
    # numpy scalars print as "np.float64(...)", which the roles' number formats cannot parse.
    myst_glue(name, value.item() if hasattr(value, "item") else value, display=False)
    return value


class PresetBanner:
    """The preset a chapter's outputs come from, shown as a note at the top of the chapter."""

    def __init__(self, preset: Preset, device: str) -> None:
        self.name = preset.name
        self.description = preset.description
        self.offline = preset.setting == "offline"
        self.device = device
        self.tasks = len(preset.tasks)

    def text(self) -> str:
        kind = (
            "the offline benchmark (small image tasks, models trained here)"
            if self.offline
            else "real CLIP checkpoints"
        )
        return (
            f"These outputs were computed on the {self.name} preset: {kind}, {self.tasks} tasks, on {self.device}. "
            f"{self.description} Numbers in the text are this run's, except where they cite the papers."
        )

    def _repr_html_(self) -> str:
        return (
            '<div class="admonition note preset-banner"><p class="admonition-title">Preset: '
            f"{html.escape(self.name)}</p><p>{html.escape(self.text())}</p></div>"
        )

    def __repr__(self) -> str:
        return f"Preset {self.name}: {self.text()}"


def preset_banner(zoo: Zoo | str, device: str = "cpu") -> PresetBanner:
    """A note naming the preset (of ``zoo``, or by name) and the device, for the top of a chapter (display it
    as a cell's result)."""
    return PresetBanner(get_preset(zoo) if isinstance(zoo, str) else zoo.preset, device)


def shown_tasks(zoo: Zoo, requested: str, count: int = 2) -> list[str]:
    """The tasks a chapter shows one figure each for: those of ``requested`` (comma-separated names, a notebook
    parameter) that ``zoo`` has, in that order, then its other tasks in its order until there are ``count`` (or
    as many as it has). A preset without the chapter's default tasks (smoke has mnist and shapes; CLIP's are
    MNIST, GTSRB, ...) still gets its figures. A requested name the zoo lacks is said in a warning (a misspelt
    ``-p tsne_tasks mnsit`` showed other tasks without a word)."""
    names = list(zoo.tasks)
    requested_names = list(dict.fromkeys(t.strip() for t in requested.split(",") if t.strip()))
    chosen = [t for t in requested_names if t in names]
    shown = (chosen + [t for t in names if t not in chosen])[: max(count, len(chosen))]
    missing = [t for t in requested_names if t not in names]
    if missing:
        warnings.warn(
            f"no task {', '.join(missing)} in this zoo (its tasks: {', '.join(names)}); showing {', '.join(shown)}",
            stacklevel=2,
        )
    return shown


def whole_numbers(value: str | int) -> tuple[int, ...]:
    """A chapter's list parameter, ``"50,200,1000"`` -> ``(50, 200, 1000)`` (ranks, unlabeled images per task):
    whole numbers of at least 1, each kept once in the order given; a bare number is a list of one.

    Raises:
        SurgeryBookError: empty text, a fraction, a word, a number below 1.
    """
    problem = f"{value!r} is not a comma-separated list of whole numbers of at least 1"
    fix = "give whole numbers of at least 1, comma-separated, e.g. 50,200,1000"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise SurgeryBookError(problem, fix)
    try:
        numbers = number_list(int, minimum=1)(str(value))
    except argparse.ArgumentTypeError:
        raise SurgeryBookError(problem, fix) from None
    return tuple(dict.fromkeys(numbers))


@dataclass(frozen=True)
class ChapterParameter:
    """What one chapter parameter takes, declared once: a chapter checks its values with it before its first
    computation (:func:`check_parameters`), and ``reproduce`` checks every ``-p`` value with it before the first
    kernel starts, so a mistyped value fails in a second instead of in the fifth notebook, an hour in.

    Attributes:
        valid: the valid values in words (completes "... is not").
        example: a valid value as it is typed after ``-p NAME``.
        accepts: whether a value is valid; it may raise :class:`SurgeryBookError` to say why not in its own words
            (the parsers of method and version lists name the unknown entry).
        is_path: a file or folder: ``reproduce`` makes a relative one absolute against the folder it is run from,
            since its kernels run in the notebooks' folder.
        names_tasks: ``"one"`` (a task, or ``auto``) or ``"several"`` (comma-separated tasks) where the value
            names tasks, which only a preset or a zoo can check (:func:`check_task_parameter`); else ``""``.
    """

    valid: str
    example: str
    accepts: Callable[[Any], bool]
    is_path: bool = False
    names_tasks: str = ""


def _whole(low: int, *, example: int, high: int | None = None) -> ChapterParameter:
    def accepts(value: Any) -> bool:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and low <= value <= (math.inf if high is None else high)
        )

    valid = f"a whole number of at least {low}" if high is None else f"a whole number in [{low}, {high}]"
    return ChapterParameter(valid, str(example), accepts)


def _optional(parameter: ChapterParameter) -> ChapterParameter:
    return ChapterParameter(
        f"None or {parameter.valid}", parameter.example, lambda value: value is None or parameter.accepts(value)
    )


def _choice(*choices: str) -> ChapterParameter:
    return ChapterParameter(f"one of {', '.join(choices)}", choices[0], lambda value: value in choices)


def _parses(parse: Callable[[Any], Any], value: Any) -> bool:
    try:
        parse(value)
    except SurgeryBookError:
        return False
    return True


def _task(*, several: bool, example: str) -> ChapterParameter:
    if several:  # empty: the chapter's own choice of tasks
        return ChapterParameter(
            "comma-separated task names", example, lambda v: isinstance(v, str), names_tasks="several"
        )
    return ChapterParameter("auto or a task name", example, lambda v: isinstance(v, str) and v != "", names_tasks="one")


def _counts(example: str) -> ChapterParameter:
    return ChapterParameter(
        "a comma-separated list of whole numbers of at least 1", example, lambda value: _parses(whole_numbers, value)
    )


#: Every chapter parameter but preset, device and output_dir (which building the zoo and writing the outputs
#: check), by name: a parameter of the same name means the same in every chapter that declares it.
CHAPTER_PARAMETERS: dict[str, ChapterParameter] = {
    "seed": _whole(0, example=0, high=MAX_SEED),
    "seeds": _whole(1, example=3, high=MAX_SEEDS),
    "samples_per_task": _whole(1, example=10, high=50),  # images per row of one figure, 0.75 inch each
    "kept_share_subsets": _whole(1, example=3),
    "scale_max": ChapterParameter(
        "a number above 0",
        "1.0",
        lambda value: isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf,
    ),
    "scale_points": _whole(2, example=11),
    "sweep_points": _whole(2, example=11),
    "adamerging_steps": _whole(0, example=500),
    "tsne_tasks": _task(several=True, example="mnist,signs"),
    "tsne_points": _whole(2, example=400),
    "tsne_task": _task(several=False, example="auto"),
    "surgery_steps": _whole(1, example=1000),
    "deep_surgery_steps": _whole(1, example=1000),
    "rank": _whole(0, example=16),
    "ranks": _counts("4,16,64"),
    "adapt_counts": _counts("50,200,1000"),
    "data_sizes": _counts("50,200,1000"),
    "adam": _choice("shared", "per-task"),
    "grid_dir": ChapterParameter(
        "None or a folder path",
        "grids/mini",
        lambda value: value is None or (isinstance(value, str) and value != ""),
        is_path=True,
    ),
    "another_zoo": _choice("reference", "compute"),
    "methods": ChapterParameter(
        "all, papers or a comma-separated list of merging methods",
        "papers",
        lambda value: isinstance(value, str) and bool(parse_methods(value)),
    ),
    "tune": _choice("auto", *TUNE_CHOICES),
    "surgery": ChapterParameter(
        "a comma-separated list of none, 1 and 2",
        "none,1,2",
        lambda value: isinstance(value, str) and bool(parse_versions(value)),
    ),
    "wudi_curve_layers": _optional(_whole(1, example=16)),
}


def check_parameter(name: str, value: Any, given_as: str | None = None) -> Any:
    """``value`` if it is valid for the chapter parameter ``name`` (:data:`CHAPTER_PARAMETERS`).

    Args:
        given_as: how the error names the value (default ``"the parameter NAME"``; ``reproduce``: ``"-p NAME"``).

    Raises:
        SurgeryBookError: an invalid value (naming the valid ones and an example), or a name with no declaration.
    """
    parameter = CHAPTER_PARAMETERS.get(name)
    if parameter is None:
        raise SurgeryBookError(
            f"no chapter parameter {name!r} is declared", "declare it in surgery_lib.book.CHAPTER_PARAMETERS"
        )
    named = given_as or f"the parameter {name}"
    try:
        valid = parameter.accepts(value)
    except SurgeryBookError as exc:
        raise SurgeryBookError(f"{named} {value!r}: {exc.problem}", exc.fix) from None
    if not valid:
        raise SurgeryBookError(
            f"{named} {value!r} is not {parameter.valid}", f"give {name} {parameter.valid}, e.g. {parameter.example}"
        )
    return value


def check_task_parameter(name: str, value: Any, tasks: Sequence[str], given_as: str | None = None) -> Any:
    """``value`` if every task the chapter parameter ``name`` names is one of ``tasks`` (a preset's or a zoo's);
    a parameter that names no tasks passes as it is.

    Raises:
        SurgeryBookError: naming the unknown tasks and the valid ones (``-p tsne_task mnsit`` failed inside
            chapter 04, after its merges, and on another preset's task names).
    """
    check_parameter(name, value, given_as)
    parameter = CHAPTER_PARAMETERS[name]
    if not parameter.names_tasks:
        return value
    names = [value] if parameter.names_tasks == "one" else [t.strip() for t in value.split(",") if t.strip()]
    choices = ["auto", *tasks] if parameter.names_tasks == "one" else list(tasks)
    unknown = [t for t in dict.fromkeys(names) if t not in choices]
    if unknown:
        raise SurgeryBookError(
            f"{given_as or f'the parameter {name}'} {value!r} names no task {', '.join(unknown)} of this preset "
            f"(its tasks: {', '.join(tasks)})",
            f"for {name}, {use_one_of(unknown[0], choices)}",
        )
    return value


def check_task_parameters(tasks: Sequence[str], **values: Any) -> None:
    """Check a chapter's parameters that name tasks against its zoo's ``tasks``, right after it builds the zoo
    (what :func:`check_parameters` cannot know before). Raises as :func:`check_task_parameter`."""
    for name, value in values.items():
        check_task_parameter(name, value, tasks)


def check_parameters(**values: Any) -> None:
    """Check a chapter's parameters before it computes anything; its first code cell calls this with every
    parameter it declares but preset, device and output_dir (``tests/test_notebooks.py`` checks that it does).

    Raises:
        SurgeryBookError: naming the first invalid value (:func:`check_parameter`), or a ``seed`` whose ``seeds``
            run past the largest seed (seed, seed + 1, ..., seed + seeds - 1 must all be valid).
    """
    for name, value in values.items():
        check_parameter(name, value)
    if "seed" in values and "seeds" in values:
        check_seeds(values["seed"], values["seeds"], names=("seed", "seeds"))
