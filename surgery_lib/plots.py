"""Figures in the style of the papers: bias bars, per-block bias curves, t-SNE, learning curves.

Every function returns a matplotlib ``Figure``; :func:`save_figure` writes it as PNG and PDF.
The t-SNE colours follow the Surgery paper: expert blue, merged red (and merged + surgery green).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from surgery_lib.core.storage import atomic_path, stem_files
from surgery_lib.merging import METHODS, VERSION_NAMES, Row, row_of
from surgery_lib.merging.tuning import is_tuned
from surgery_lib.settings.base import EXPERT_ROW, ZERO_SHOT_ROW, ZOO_ROWS

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

EXPERT_COLOUR, MERGED_COLOUR, SURGERY_COLOUR = "#1f5fbf", "#d62728", "#2ca02c"
SURGERY_V2_COLOUR = "#1b7a3a"
ENTROPY_COLOUR = "0.35"
#: Colours of a merge alone and repaired (the papers': merged red, surgery green), shared by the grid figures.
VERSION_COLOURS = {0: MERGED_COLOUR, 1: SURGERY_COLOUR, 2: SURGERY_V2_COLOUR}

#: Rows that are bounds, not merges: the experts blue as in the papers, the rest in greys and purple.
REFERENCE_COLOURS = {
    EXPERT_ROW: EXPERT_COLOUR,
    ZOO_ROWS["pretrained"]: "0.55",
    ZERO_SHOT_ROW: "0.7",
    ZOO_ROWS["mtl"]: "#6a3d9a",
    "expert": EXPERT_COLOUR,
    "experts": EXPERT_COLOUR,
    "merged": MERGED_COLOUR,
    "merged + Surgery": SURGERY_COLOUR,
    "merged + SurgeryV2": SURGERY_V2_COLOUR,
}
# Merging methods take these in registration order, so a method keeps its colour in every chapter whichever
# other methods a figure shows. No blue or green: those mean "expert" and "repaired".
_METHOD_CYCLE = (
    "#d62728",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#e6ab02",
    "#9467bd",
    "#17becf",
    "#b8860b",
    "#a0522d",
    "#c71585",
    "#008b8b",
    "#ff6347",
    "#556b2f",
    "#4b0082",
    "#cd853f",
    "#a6761d",
    "#800000",
)
# The tuned twins (``<method>_tuned``) take these, in their order, so that adding them moved no method's colour.
_TUNED_CYCLE = ("#b22222", "#ff8c00", "#d2691e", "#db7093", "#808000", "#9932cc", "#bc8f8f", "#daa520")


#: Colours for labels that name no row: matplotlib's cycle without its blue and green, which mean expert and
#: repaired in every figure of the book.
SPARE_COLOURS = ("#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000")


#: The repaired greens by the versions' bare names, "+ Surgery" and "Surgery" alike.
_VERSION_LABEL_COLOURS = {
    name: VERSION_COLOURS[version]
    for version, full in VERSION_NAMES.items()
    if version
    for name in (full, full.removeprefix("+ "))
}


def colour_of(row: Row | str) -> str | None:
    """The fixed colour of a row (a :class:`~surgery_lib.merging.rows.Row`, or a label :func:`row_of` reads
    back into one): a reference row's, a merging method's (merged red for task arithmetic, the papers' usual
    merge; the others in registration order), + Surgery and + SurgeryV2 rows in the repaired greens, and so the
    bare version names ("Surgery"). A label with a note in brackets after the row ("... + Surgery (online)")
    takes the row's colour. ``None`` for a label that names no row and has no colour of its own."""
    if isinstance(row, str):
        label = row
        if label in REFERENCE_COLOURS:
            return REFERENCE_COLOURS[label]
        if label in _VERSION_LABEL_COLOURS:
            return _VERSION_LABEL_COLOURS[label]
        row = row_of(label)
        if row is None and label.endswith(")") and " (" in label:
            return colour_of(label.rsplit(" (", 1)[0])
        if row is None:
            return None
    if row.is_reference:
        return REFERENCE_COLOURS[row.label()]
    if row.version:
        return VERSION_COLOURS[row.version]
    if is_tuned(row.method):
        twins = [name for name in METHODS if is_tuned(name)]
        return _TUNED_CYCLE[twins.index(row.method) % len(_TUNED_CYCLE)]
    order = ["task_arithmetic"] + [name for name in METHODS if name != "task_arithmetic" and not is_tuned(name)]
    return _METHOD_CYCLE[order.index(row.method) % len(_METHOD_CYCLE)]


def palette(labels: Sequence[str]) -> dict[str, str]:
    """``{label: colour}`` for a figure's labels: :func:`colour_of` where fixed and not yet taken in this figure
    (two Surgery runs of one merge get two colours), otherwise the next of :data:`SPARE_COLOURS`."""
    fixed_colours = {str(label): colour_of(label) for label in labels}
    spare = (colour for colour in SPARE_COLOURS * 4 if colour not in fixed_colours.values())
    colours: dict[str, str] = {}
    for label, fixed in fixed_colours.items():
        colours[label] = fixed if fixed is not None and fixed not in colours.values() else next(spare)
    return colours


def _legend_outside(axis, **options) -> None:
    """A legend to the right of the axes, where it cannot cover data."""
    axis.legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), **options)


def _pyplot():
    # No backend is forced: matplotlib picks Agg by itself where there is no display, and a user's
    # interactive or inline backend is left alone.
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Figure, stem: str | os.PathLike[str], dpi: int = 150) -> tuple[Path, Path]:
    """Write ``figure`` to ``<stem>.png`` and ``<stem>.pdf`` atomically; returns both paths."""
    png, pdf = stem_files(stem, (".png", ".pdf"))
    for path in (png, pdf):
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format=path.suffix[1:], dpi=dpi, bbox_inches="tight")
    return png, pdf


def bias_bars(table: pd.DataFrame, title: str = "Representation bias per task", ylabel: str = "L1 bias") -> Figure:
    """Grouped bars: one group per task (columns), one bar per row (method, or before/after surgery)."""
    import seaborn as sns

    plt = _pyplot()
    long = table.rename_axis("method").reset_index().melt(id_vars="method", var_name="task", value_name="value")
    figure, axis = plt.subplots(figsize=(max(6.0, 0.9 * len(table.columns) + 2), 3.4))
    sns.barplot(data=long, x="task", y="value", hue="method", ax=axis, palette=palette(table.index), saturation=1)
    axis.set(xlabel="", ylabel=ylabel, title=title)
    axis.tick_params(axis="x", rotation=30)
    _legend_outside(axis)
    figure.tight_layout()
    return figure


def block_bias_curves(
    curves: Mapping[str, torch.Tensor | np.ndarray], title: str = "Representation bias at every block"
) -> Figure:
    """One line per label over block index (1-based), e.g. merged vs merged + SurgeryV2.

    Each line has its own dash pattern and marker, drawn thinner than the one below it, so a curve that
    coincides with another over some blocks (Surgery V1 leaves every block but the last as the merge had it)
    stays visible instead of hiding under it. The x axis has one tick per block."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.0, 3.4))
    styles = [("-", "o", 2.6), ("--", "s", 1.8), (":", "^", 1.2), ("-.", "D", 1.0)]
    blocks = 0
    colours = palette(list(curves))
    for (label, values), (dash, marker, width) in zip(curves.items(), styles * (len(curves) // len(styles) + 1)):
        values = np.asarray(values, dtype=float)
        blocks = max(blocks, len(values))
        axis.plot(
            np.arange(1, len(values) + 1),
            values,
            linestyle=dash,
            marker=marker,
            linewidth=width,
            markersize=3 + width,
            label=label,
            color=colours[str(label)],
        )
    axis.set_xticks(np.arange(1, blocks + 1))
    axis.set(xlabel="block", ylabel="L1 bias of token-means", title=title)
    _legend_outside(axis)
    figure.tight_layout()
    return figure


def tsne_embeddings(
    expert: torch.Tensor,
    merged: torch.Tensor,
    surgery: torch.Tensor | None = None,
    *,
    title: str = "",
    seed: int = 0,
    max_points: int = 500,
) -> Figure:
    """t-SNE of expert (blue) vs merged (red) [vs merged + surgery (green)] embeddings of the same images.

    All sets are embedded jointly (scikit-learn's TSNE, PCA init, seeded), so distances are comparable.
    """
    from sklearn.manifold import TSNE

    plt = _pyplot()
    sets = [("expert", expert, EXPERT_COLOUR), ("merged", merged, MERGED_COLOUR)]
    if surgery is not None:
        sets.append(("merged + surgery", surgery, SURGERY_COLOUR))
    count = min(max_points, len(expert))
    stacked = np.concatenate([np.asarray(z[:count], dtype=np.float32) for _, z, _ in sets])
    points = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, count - 1)).fit_transform(stacked)
    figure, axis = plt.subplots(figsize=(4.2, 4.0))
    for i, (label, _, colour) in enumerate(sets):
        part = points[i * count : (i + 1) * count]
        axis.scatter(part[:, 0], part[:, 1], s=5, alpha=0.6, color=colour, label=label)
    axis.set(xticks=[], yticks=[], title=title)
    _legend_outside(axis, markerscale=3)
    figure.tight_layout()
    return figure


def tsne_panels(
    expert: torch.Tensor,
    merged: torch.Tensor,
    repaired: torch.Tensor,
    *,
    repaired_label: str = "merged + Surgery",
    title: str = "",
    seed: int = 0,
    max_points: int = 500,
) -> Figure:
    """Two t-SNE panels of the same images: expert vs merged (left), expert vs repaired (right).

    One t-SNE of all three sets (scikit-learn, PCA init, seeded) places both panels in the same
    coordinates, so the expert's points sit in the same place in both and no set hides another.
    """
    from sklearn.manifold import TSNE

    plt = _pyplot()
    count = min(max_points, len(expert))
    stacked = np.concatenate([np.asarray(z[:count], dtype=np.float32) for z in (expert, merged, repaired)])
    points = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, count - 1)).fit_transform(stacked)
    expert_points, merged_points, repaired_points = points[:count], points[count : 2 * count], points[2 * count :]
    figure, axes = plt.subplots(1, 2, figsize=(8.0, 3.9), sharex=True, sharey=True)
    for axis, (label, part, colour) in zip(
        axes, [("merged", merged_points, MERGED_COLOUR), (repaired_label, repaired_points, SURGERY_COLOUR)]
    ):
        axis.scatter(expert_points[:, 0], expert_points[:, 1], s=6, alpha=0.5, color=EXPERT_COLOUR, label="expert")
        axis.scatter(part[:, 0], part[:, 1], s=6, alpha=0.5, color=colour, label=label, marker="^")
        axis.set(xticks=[], yticks=[], title=f"expert vs {label}")
        axis.legend(
            frameon=False, fontsize="small", markerscale=2.5, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncols=2
        )
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def learning_curve(series: Mapping[str, pd.Series], title: str = "Average accuracy during surgery") -> Figure:
    """Accuracy (%) against training step, one line per label; e.g. ``run.learning_curve()["average"]``."""
    return curves(series, xlabel="step (per task)", ylabel="average accuracy (%)", title=title)


def task_samples(suite, per_task: int = 10, split: str = "test") -> Figure:
    """A grid of ``per_task`` images from every task of ``suite`` (one row per task, class names as labels)."""
    plt = _pyplot()
    names = suite.task_names
    figure, axes = plt.subplots(len(names), per_task, figsize=(per_task * 0.75, len(names) * 0.85))
    axes = np.atleast_2d(axes)
    for row, task in enumerate(names):
        data = suite[task]
        # One image of each class present first, so every row shows the label set.
        labels = data.labels[split]
        firsts = [int(torch.nonzero(labels == c)[0]) for c in labels.unique().tolist()[:per_task]]
        index = (firsts + [i for i in range(min(len(labels), 2 * per_task)) if i not in firsts])[:per_task]
        for column in range(len(index), per_task):  # a split smaller than the grid
            axes[row, column].axis("off")
        for column, i in enumerate(index):
            axis = axes[row, column]
            axis.imshow(data.images[split][i].permute(1, 2, 0).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(data.class_names[int(data.labels[split][i])][:10], fontsize=6, pad=2)
        axes[row, 0].set_ylabel(task, rotation=0, ha="right", va="center", fontsize=8)
    figure.tight_layout(pad=0.3)
    return figure


def heatmap(
    table: pd.DataFrame,
    title: str = "",
    *,
    cmap: str = "viridis",
    annotate: bool = True,
    fmt: str = ".2f",
    label: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """A labelled heat map of ``table`` (rows x columns), e.g. task-vector cosine similarities."""
    import seaborn as sns

    plt = _pyplot()
    rows, columns = table.shape
    figure, axis = plt.subplots(figsize=(min(14.0, 1.2 + 0.62 * columns), 0.9 + 0.45 * rows))
    sns.heatmap(
        table.astype(float),
        ax=axis,
        cmap=cmap,
        annot=annotate and columns <= 16,
        fmt=fmt,
        vmin=vmin,
        vmax=vmax,
        cbar_kws={"label": label},
        annot_kws={"fontsize": 7},
    )
    axis.set(title=title, xlabel="", ylabel="")
    figure.tight_layout()
    return figure


def _model_order(name: str) -> tuple[int, int, str]:
    """Sort key: patch and position embeddings, then blocks by number (2 before 10), then the output head."""
    import re

    block = re.search(r"resblocks\.(\d+)\.", name)
    if block:
        return (1, int(block.group(1)), name)
    return (2 if name.startswith(("ln_post", "proj")) else 0, 0, name)


def _short_parameter_name(name: str) -> str:
    return name.replace("transformer.resblocks.", "").replace("_weight", ".w").replace("_bias", ".b")


def coefficient_heatmap(
    table: pd.DataFrame, title: str = "Layer-wise AdaMerging coefficients", start: float = 0.3
) -> Figure:
    """Tasks (rows) x parameter tensors (columns, in model order) of learned merging coefficients.

    The colour scale is diverging and centred on ``start`` (AdaMerging's initial 0.3), spanning just the
    learned range, so coefficients that moved a little still show (on [0, 1] everything would be one colour);
    the x axis is labelled by block (embeddings, block 0 ... N-1, head) with a line between blocks, which
    stays readable for ViT-B/32's 158 tensors as for the mini encoder's 56.
    """
    import seaborn as sns

    plt = _pyplot()
    columns = sorted(table.columns, key=_model_order)
    shown = table[columns].astype(float)
    span = max(float((shown - start).abs().max().max()), 0.005)
    figure, axis = plt.subplots(figsize=(min(16.0, 4.0 + 0.08 * len(columns)), 1.4 + 0.32 * len(shown)))
    sns.heatmap(
        shown,
        ax=axis,
        cmap="RdBu_r",
        center=start,
        vmin=start - span,
        vmax=start + span,
        xticklabels=False,
        cbar_kws={"label": f"coefficient (started at {start:g})"},
    )
    groups: dict[tuple[int, int], list[int]] = {}
    for position, name in enumerate(columns):
        groups.setdefault(_model_order(name)[:2], []).append(position)
    names = {0: "embed", 2: "head"}
    axis.set_xticks(
        [sum(p) / len(p) + 0.5 for p in groups.values()],
        [names.get(kind, f"block {block}") for kind, block in groups],
        rotation=90,
        fontsize=7,
    )
    for positions in list(groups.values())[1:]:
        axis.axvline(positions[0], color="white", linewidth=1)
    axis.tick_params(axis="y", rotation=0, labelsize=8)
    axis.set(title=title, xlabel="parameter tensors, grouped by block (input side left)", ylabel="")
    figure.tight_layout()
    return figure


def scale_sweep(
    table: pd.DataFrame,
    references: Mapping[str, float] | None = None,
    title: str = "Task arithmetic: average accuracy against the scale",
) -> Figure:
    """Average accuracy (%) against the task-arithmetic scale (the index of ``table``), with dashed reference lines."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.0, 3.4))
    axis.plot(table.index, table["average"], marker="o", color=MERGED_COLOUR, label="task arithmetic")
    for (label, value), style in zip((references or {}).items(), ("--", ":", "-.", (0, (1, 3)))):
        colour = EXPERT_COLOUR if "expert" in label else colour_of(label) or "0.35"
        axis.axhline(value, linestyle=style, color=colour, linewidth=1.2, label=label)
    axis.set(xlabel="scale λ", ylabel="average accuracy (%)", title=title)
    _legend_outside(axis)
    figure.tight_layout()
    return figure


def curves(
    series: Mapping[str, pd.Series | Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    smooth: int = 0,
) -> Figure:
    """Plain line plot, one line per label (an AdaMerging entropy curve, an ablation against rank or data).

    ``smooth`` > 1 draws each raw series faintly and its moving average over ``smooth`` points on top
    (per-batch objectives are noisy; the trend is what the text asks the reader to watch)."""
    import pandas as pd

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.0, 3.4))
    colours = palette(list(series))
    for label, values in series.items():
        values = values if isinstance(values, pd.Series) else pd.Series(list(values))
        colour = colours[str(label)]
        if smooth > 1:
            axis.plot(values.index, values.values, linewidth=0.7, alpha=0.3, color=colour)
            trend = values.rolling(smooth, min_periods=1).mean()
            axis.plot(trend.index, trend.values, color=colour, linewidth=2, label=f"{label} ({smooth}-step mean)")
            continue
        axis.plot(values.index, values.values, marker="o" if len(values) <= 30 else None, label=label, color=colour)
    if logx:  # log spacing, labelled with the values themselves (not powers of 2)
        axis.set_xscale("log", base=2)
        ticks = sorted({float(x) for line in axis.get_lines() for x in line.get_xdata()})
        axis.set_xticks(ticks, [f"{x:g}" for x in ticks])
        axis.minorticks_off()
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if len(series) > 1:
        _legend_outside(axis)
    figure.tight_layout()
    return figure


def bias_accuracy_scatter(points: pd.DataFrame, title: str = "Bias against accuracy, per task and merge") -> Figure:
    """One marker per (merge, task): representation bias against normalised accuracy (%).

    ``points`` has columns ``merge``, ``task``, ``bias`` and ``normalised accuracy (%)``.
    """
    import seaborn as sns

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    sns.scatterplot(
        data=points,
        x="bias",
        y="normalised accuracy (%)",
        hue="merge",
        style="merge",
        ax=axis,
        palette=palette(points["merge"].unique()),
    )
    axis.set_title(title)
    _legend_outside(axis)
    figure.tight_layout()
    return figure


def accuracy_and_entropy(
    accuracy: pd.Series, entropy: pd.Series, xlabel: str = "scale λ", title: str = "Is lower entropy higher accuracy?"
) -> Figure:
    """Average accuracy (%, left axis) and mean prediction entropy (nats, right axis) over a shared x."""
    plt = _pyplot()
    figure, left = plt.subplots(figsize=(5.5, 3.4))
    # Both lines describe the merged model: its accuracy in the merged red, its entropy in grey, dashed.
    left.plot(accuracy.index, accuracy.values, marker="o", color=MERGED_COLOUR, label="accuracy")
    left.set(xlabel=xlabel, ylabel="average accuracy (%)", title=title)
    left.yaxis.label.set_color(MERGED_COLOUR)
    right = left.twinx()
    right.plot(entropy.index, entropy.values, marker="s", linestyle="--", color=ENTROPY_COLOUR, label="entropy")
    right.set_ylabel("mean prediction entropy (nats)", color=ENTROPY_COLOUR)
    figure.tight_layout()
    return figure


def main_table_bars(average: pd.Series, title: str = "Average accuracy over the tasks") -> Figure:
    """Horizontal bars of a main table's ``average`` column (rows in table order), coloured by kind:
    reference rows grey, merges red, merges + Surgery green, merges + SurgeryV2 dark green."""
    plt = _pyplot()

    def colour(label: str) -> str:
        row = row_of(label)
        if label in REFERENCE_COLOURS or (row is not None and (row.version or row.is_reference)):
            return colour_of(label)
        return MERGED_COLOUR

    figure, axis = plt.subplots(figsize=(6.5, 0.32 * len(average) + 1.0))
    positions = np.arange(len(average))[::-1]
    axis.barh(positions, average.values, color=[colour(str(label)) for label in average.index])
    axis.set_yticks(positions, [str(label) for label in average.index], fontsize=8)
    for y, value in zip(positions, average.values):
        axis.text(value + 0.5, y, f"{value:.1f}", va="center", fontsize=7)
    axis.set(xlabel="average test accuracy (%)", title=title, xlim=(0, max(100.0, float(average.max()) + 8)))
    axis.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    return figure


def grid_dots(table: pd.DataFrame, title: str = "Every merge alone and repaired") -> Figure:
    """One row per merging method (``table``'s order, top to bottom): a dot per surgery version in
    :data:`VERSION_COLOURS` joined by a line from the merge alone to its best repair, with the standard
    deviation over seeds as error bars. Dots rather than bars, so the axis can start near the data.

    ``table`` has columns ``label`` (the method's row label), ``version``, ``average`` and ``std``.
    """
    plt = _pyplot()
    labels = list(dict.fromkeys(table["label"]))
    positions = dict(zip(labels, np.arange(len(labels))[::-1]))
    figure, axis = plt.subplots(figsize=(6.8, 0.3 * len(labels) + 1.3))
    for label, rows in table.groupby("label", sort=False):
        axis.plot(
            [rows["average"].min(), rows["average"].max()], [positions[label]] * 2, color="0.8", linewidth=1, zorder=1
        )
    for version in sorted(table["version"].unique()):
        rows = table[table["version"] == version]
        axis.errorbar(
            rows["average"],
            [positions[label] for label in rows["label"]],
            xerr=rows["std"].fillna(0),
            fmt="o",
            markersize=5,
            color=VERSION_COLOURS[version],
            label=VERSION_NAMES[version],
            zorder=2,
            elinewidth=0.8,
            capsize=2,
        )
    axis.set_yticks(list(positions.values()), labels, fontsize=8)
    axis.set(xlabel="average test accuracy (%)", title=title)
    axis.grid(axis="x", color="0.92")
    axis.spines[["top", "right"]].set_visible(False)
    axis.legend(
        frameon=False, fontsize="small", ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.1 - 1.0 / len(labels))
    )
    figure.tight_layout()
    return figure


def gain_scatter(points: pd.DataFrame, x: str, xlabel: str, title: str) -> Figure:
    """The gain of Surgery and SurgeryV2 (points above 0: surgery helped) against ``x``, one marker per
    merging method, a least-squares line per version. ``points`` has ``x``, ``gain`` and ``version``."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.8, 3.8))
    for version in sorted(points["version"].unique()):
        rows = points[points["version"] == version]
        axis.scatter(rows[x], rows["gain"], color=VERSION_COLOURS[version], label=VERSION_NAMES[version], s=22)
        if len(rows) > 2:
            slope, intercept = np.polyfit(rows[x].astype(float), rows["gain"].astype(float), 1)
            span = np.linspace(float(rows[x].min()), float(rows[x].max()), 20)
            axis.plot(span, slope * span + intercept, color=VERSION_COLOURS[version], linewidth=1, alpha=0.7)
    axis.axhline(0, color="0.6", linewidth=0.8)
    axis.set(xlabel=xlabel, ylabel="gain over the merge alone (points)", title=title)
    axis.spines[["top", "right"]].set_visible(False)
    axis.legend(frameon=False, fontsize="small")
    figure.tight_layout()
    return figure


def kept_share_curve(
    summary: pd.DataFrame,
    references: Mapping[str, tuple[float, float]] | None = None,
    title: str = "What task arithmetic keeps as more tasks are merged",
) -> Figure:
    """Two panels against the number of tasks merged (the index of ``summary``, from
    :func:`surgery_lib.disentanglement.summarize_curve`): the kept share of the experts' gain (mean and the
    range over subsets, the task vector's share alone as a dashed line, ``references`` as ``{label: (tasks,
    share)}`` stars), and the disentanglement error (share of test predictions the other tasks change)."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    sizes = summary.index.to_numpy()
    left.fill_between(sizes, summary["kept_share_min"], summary["kept_share_max"], color=MERGED_COLOUR, alpha=0.15)
    left.plot(sizes, summary["kept_share"], marker="o", color=MERGED_COLOUR, label="merged (mean, range over subsets)")
    left.plot(sizes, summary["alone_share"], linestyle="--", color="0.35", label="its task vector alone")
    for (label, (tasks, share)), marker in zip((references or {}).items(), ("*", "P", "X")):
        left.plot([tasks], [share], marker=marker, markersize=13, linestyle="none", color=EXPERT_COLOUR, label=label)
    left.axhline(0, color="0.6", linewidth=0.8)
    left.set(xlabel="tasks merged", ylabel="share of the experts' gain kept", xticks=sizes)
    left.legend(fontsize=8, loc="lower left")
    right.fill_between(
        sizes,
        summary["disentanglement_error_min"],
        summary["disentanglement_error_max"],
        color=MERGED_COLOUR,
        alpha=0.15,
    )
    right.plot(sizes, summary["disentanglement_error"], marker="o", color=MERGED_COLOUR)
    right.set(xlabel="tasks merged", ylabel="predictions changed by the others", xticks=sizes, ylim=(0, None))
    figure.suptitle(title)
    figure.tight_layout()
    return figure
