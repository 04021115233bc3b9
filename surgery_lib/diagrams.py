"""Where the modules sit: the Surgery and SurgeryV2 diagrams of the book, drawn by code so they stay in sync.

Colours follow :mod:`surgery_lib.plots`: the merged model red, the experts blue, the trained modules green.
Solid boxes are what gets deployed; dashed grey-blue boxes are needed only while the modules adapt.

The chapters show them as vector graphics (:func:`as_svg`), sharp at any zoom on a phone; the background pages
include the same drawings from ``book/figures``, written by ``python -m surgery_lib.diagrams book/figures``.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from surgery_lib.plots import EXPERT_COLOUR, MERGED_COLOUR, SURGERY_COLOUR, _pyplot

if TYPE_CHECKING:
    from IPython.display import SVG
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_FROZEN = "#f4f4f4"


def _box(
    axis: Axes,
    x: float,
    y: float,
    width: float,
    height: float,
    text: str,
    edge: str,
    *,
    fill: str = _FROZEN,
    dashed: bool = False,
    size: float = 10,
) -> tuple[float, float, float, float]:
    from matplotlib.patches import FancyBboxPatch

    axis.add_patch(
        FancyBboxPatch(
            (x, y),
            width,
            height,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor=fill,
            edgecolor=edge,
            linewidth=1.6,
            linestyle="--" if dashed else "-",
        )
    )
    axis.text(x + width / 2, y + height / 2, text, ha="center", va="center", fontsize=size)
    return x, y, width, height


def _arrow(
    axis: Axes,
    start: tuple[float, float],
    end: tuple[float, float],
    *,
    colour: str = "0.25",
    style: str = "-|>",
    dashed: bool = False,
    label: str = "",
    label_offset: tuple[float, float] = (0.0, 0.12),
) -> None:
    axis.annotate(
        "",
        xy=end,
        xytext=start,
        arrowprops={
            "arrowstyle": style,
            "color": colour,
            "lw": 1.4,
            "linestyle": "--" if dashed else "-",
            "shrinkA": 0,
            "shrinkB": 0,
        },
    )
    if label:
        middle = ((start[0] + end[0]) / 2 + label_offset[0], (start[1] + end[1]) / 2 + label_offset[1])
        axis.text(*middle, label, ha="center", va="bottom", fontsize=9.5, color=colour)


def _canvas(width: float, height: float, title: str) -> tuple[Figure, Axes]:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(width, height))
    axis.set_xlim(0, width)
    axis.set_ylim(0, height)
    axis.set_axis_off()
    axis.set_title(title, fontsize=11)
    return figure, axis


def surgery_diagram() -> Figure:
    """Surgery (Yang et al., 2024): one module per task between the frozen merged encoder and the frozen
    head, on the final embedding, trained with an L1 loss towards the task expert's embedding."""
    figure, axis = _canvas(10.0, 3.6, "Surgery: one module per task, on the merged model's final embedding")
    axis.text(0.55, 2.45, "images of\ntask t", ha="center", va="center", fontsize=10)
    _box(axis, 1.3, 2.05, 2.0, 0.8, "merged encoder\n(frozen)", MERGED_COLOUR)
    _box(
        axis,
        4.35,
        1.95,
        2.5,
        1.0,
        "Surgery module of task t\n" + r"$\hat z_M = z_M - W_{up}\,\mathrm{ReLU}(W_{down}\,z_M)$",
        SURGERY_COLOUR,
        fill="#e6f4e6",
        size=9.5,
    )
    _box(axis, 7.85, 2.05, 1.3, 0.8, "head t\n(frozen)", "0.3")
    axis.text(9.6, 2.45, "class", ha="center", va="center", fontsize=10)
    _arrow(axis, (0.95, 2.45), (1.3, 2.45))
    _arrow(axis, (3.3, 2.45), (4.35, 2.45), label=r"merged $z_M$")
    _arrow(axis, (6.85, 2.45), (7.85, 2.45), label=r"repaired $\hat z_M$")
    _arrow(axis, (9.15, 2.45), (9.35, 2.45))
    # Adaptation only: the expert's embedding of the same unlabeled images is the target.
    _box(axis, 1.3, 0.35, 2.0, 0.8, "expert t\n(frozen)", EXPERT_COLOUR, dashed=True)
    axis.plot([0.55, 0.55], [2.1, 0.75], color="0.25", lw=1.4)
    _arrow(axis, (0.55, 0.75), (1.3, 0.75))
    _arrow(axis, (3.3, 0.75), (5.6, 0.75), colour=EXPERT_COLOUR, dashed=True, label=r"expert's $z_t$")
    _arrow(axis, (5.6, 0.75), (5.6, 1.95), colour=SURGERY_COLOUR, style="<|-|>", dashed=True)
    axis.text(
        5.7, 1.32, r"L1 loss $|\hat z_M - z_t|_1$" + "\n(no labels)", fontsize=9.5, color=SURGERY_COLOUR, va="center"
    )
    axis.text(
        7.85,
        0.95,
        "deployed: merged encoder,\nper task a head and a module\n(2dr parameters)",
        fontsize=9.5,
        va="center",
    )
    axis.text(7.85, 0.25, "dashed: adaptation only", fontsize=9.5, va="center", color=EXPERT_COLOUR)
    figure.tight_layout()
    return figure


def surgery_v2_diagram(blocks: int = 2) -> Figure:
    """SurgeryV2 (Yang et al., 2024): a module after every block of the merged encoder, on every token,
    trained towards the expert's output of the same block (L1 between token means); the next block reads
    the repaired tokens, and Surgery's module repairs the final embedding as well."""
    if blocks < 2:
        raise ValueError("draw at least two blocks")
    width = 1.2 + blocks * 2.55 + 0.1 + 3.6
    figure, axis = _canvas(width, 3.8, "SurgeryV2: a module after every block, on every token")
    axis.text(0.55, 2.45, "tokens of\ntask t", ha="center", va="center", fontsize=10)
    axis.plot([0.55, 0.55], [2.1, 0.75], color="0.25", lw=1.4)
    x, previous, expert_previous = 1.2, 0.95, 0.55
    for block in range(1, blocks + 1):
        label = str(block) if block < blocks else "L"
        _arrow(axis, (previous, 2.45), (x, 2.45))
        _box(axis, x, 2.05, 1.05, 0.8, f"merged\nblock {label}", MERGED_COLOUR, size=10)
        _arrow(axis, (x + 1.05, 2.45), (x + 1.4, 2.45))
        _box(axis, x + 1.4, 2.1, 0.75, 0.7, rf"$S^{{{label}}}_t$", SURGERY_COLOUR, fill="#e6f4e6", size=10)
        _arrow(
            axis, (expert_previous, 0.75), (x, 0.75), colour=EXPERT_COLOUR if block > 1 else "0.25", dashed=block > 1
        )
        _box(axis, x, 0.35, 1.05, 0.8, f"expert t\nblock {label}", EXPERT_COLOUR, dashed=True, size=10)
        axis.plot([x + 1.05, x + 1.78], [0.75, 0.75], color=EXPERT_COLOUR, lw=1.4, linestyle="--")
        _arrow(axis, (x + 1.78, 0.75), (x + 1.78, 2.1), colour=SURGERY_COLOUR, style="<|-|>", dashed=True)
        axis.text(x + 1.85, 1.45, "L1", fontsize=10, color=SURGERY_COLOUR)
        previous, expert_previous, x = x + 2.15, x + 1.78, x + 2.55
        if block == blocks - 1:
            axis.text(x - 0.2, 2.45, "…", ha="center", va="center", fontsize=12)
            axis.text(x - 0.2, 0.75, "…", ha="center", va="center", fontsize=12, color=EXPERT_COLOUR)
            x += 0.1
    final = previous + 0.35
    _arrow(axis, (previous, 2.45), (final, 2.45), label="final\nembedding", label_offset=(0.55, 0.45))
    _box(axis, final, 2.1, 0.75, 0.7, r"$S_t$", SURGERY_COLOUR, fill="#e6f4e6", size=10)
    _arrow(axis, (final + 0.75, 2.45), (final + 1.1, 2.45))
    _box(axis, final + 1.1, 2.05, 1.0, 0.8, "head t\n(frozen)", "0.3", size=10)
    # Surgery's own loss on the final embedding: the expert's final embedding is its target.
    axis.plot([expert_previous, final + 0.375], [0.75, 0.75], color=EXPERT_COLOUR, lw=1.4, linestyle="--")
    _arrow(axis, (final + 0.375, 0.75), (final + 0.375, 2.1), colour=SURGERY_COLOUR, style="<|-|>", dashed=True)
    axis.text(final + 0.45, 1.45, "L1", fontsize=10, color=SURGERY_COLOUR)
    axis.text(
        final + 0.95,
        1.3,
        "every module acts on every\ntoken; the next block reads\nthe repaired tokens; $S_t$ is\n"
        "Surgery's module on the final\nembedding, with its own L1",
        fontsize=10,
        va="center",
    )
    axis.text(final + 0.95, 0.3, "dashed: adaptation only", fontsize=10, va="center", color=EXPERT_COLOUR)
    figure.tight_layout()
    return figure


def svg_text(figure: Figure) -> str:
    """``figure`` as an SVG document whose bytes depend only on the drawing and the matplotlib version
    (fixed id salt, no date), then closed so that an inline backend does not show it a second time."""
    import matplotlib as mpl

    buffer = io.StringIO()
    with mpl.rc_context({"svg.hashsalt": "surgery-book", "svg.fonttype": "path"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    _pyplot().close(figure)
    return buffer.getvalue()


def as_svg(figure: Figure) -> SVG:
    """``figure`` for a notebook as a vector graphic (readable at any zoom, unlike a PNG)."""
    from IPython.display import SVG

    return SVG(data=svg_text(figure))


#: The drawings the background pages include, by file name under ``book/figures``.
BOOK_FIGURES = {"surgery.svg": surgery_diagram, "surgery_v2.svg": surgery_v2_diagram}


def write_book_figures(folder: str | Path) -> list[Path]:
    """Write the diagrams the background pages include (:data:`BOOK_FIGURES`) into ``folder``, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, drawing in BOOK_FIGURES.items():
        path = folder / name
        partial = path.with_name(f".{name}.partial")
        partial.write_text(svg_text(drawing()), encoding="utf-8")
        partial.replace(path)
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m surgery_lib.diagrams FOLDER   (the book's is book/figures)")
    for written_path in write_book_figures(sys.argv[1]):
        print(written_path)
