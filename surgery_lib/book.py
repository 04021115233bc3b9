"""What the chapters need beyond the science: the preset banner, numbers glued into the prose, figure style.

The notebooks run anywhere (Jupyter, Colab, papermill, the book build); nothing here is required for the
results. :func:`glue` records a value for the rendered book's ``{glue:text}`` roles through myst-nb when it
is installed (the ``book`` extra) and does nothing elsewhere, so a chapter's prose quotes the numbers of the
run that produced its outputs, whatever the preset.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

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
    MNIST, GTSRB, ...) still gets its figures."""
    names = list(zoo.tasks)
    chosen = list(dict.fromkeys(t.strip() for t in requested.split(",") if t.strip() in names))
    return (chosen + [t for t in names if t not in chosen])[: max(count, len(chosen))]
