"""Figures in the style of the papers: bias bars, per-block bias curves, t-SNE, learning curves.

Every function returns a matplotlib ``Figure``; :func:`save_figure` writes it as PNG and PDF.
The t-SNE colours follow the Surgery paper: expert blue, merged red (and merged + surgery green).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

EXPERT_COLOUR, MERGED_COLOUR, SURGERY_COLOUR = "#1f5fbf", "#d62728", "#2ca02c"


def _pyplot():
    # No backend is forced: matplotlib picks Agg by itself where there is no display, and a user's
    # interactive or inline backend is left alone.
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Figure, stem: str | os.PathLike[str], dpi: int = 150) -> tuple[Path, Path]:
    """Write ``figure`` to ``<stem>.png`` and ``<stem>.pdf`` atomically; returns both paths."""
    from surgery_lib.storage import atomic_path

    stem = Path(stem)
    paths = []
    for suffix in (".png", ".pdf"):
        path = stem.with_suffix(suffix)
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format=suffix[1:], dpi=dpi, bbox_inches="tight")
        paths.append(path)
    return paths[0], paths[1]


def bias_bars(table: pd.DataFrame, title: str = "Representation bias per task", ylabel: str = "L1 bias") -> Figure:
    """Grouped bars: one group per task (columns), one bar per row (method, or before/after surgery)."""
    import seaborn as sns

    plt = _pyplot()
    long = table.rename_axis("method").reset_index().melt(id_vars="method", var_name="task", value_name="value")
    figure, axis = plt.subplots(figsize=(max(6.0, 0.9 * len(table.columns) + 2), 3.4))
    sns.barplot(data=long, x="task", y="value", hue="method", ax=axis)
    axis.set(xlabel="", ylabel=ylabel, title=title)
    axis.tick_params(axis="x", rotation=30)
    axis.legend(frameon=False, fontsize="small")
    figure.tight_layout()
    return figure


def block_bias_curves(curves: Mapping[str, torch.Tensor | np.ndarray], title: str = "Representation bias at every block") -> Figure:
    """One line per label over block index (1-based), e.g. merged vs merged + SurgeryV2."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 3.4))
    for label, values in curves.items():
        values = np.asarray(values, dtype=float)
        axis.plot(np.arange(1, len(values) + 1), values, marker="o", label=label)
    axis.set(xlabel="block", ylabel="L1 bias of token-means", title=title)
    axis.legend(frameon=False, fontsize="small")
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
    axis.legend(frameon=False, fontsize="small", markerscale=3)
    figure.tight_layout()
    return figure


def learning_curve(curves: Mapping[str, pd.Series], title: str = "Average accuracy during surgery") -> Figure:
    """Accuracy (%) against training step, one line per label; e.g. ``run.learning_curve()["average"]``."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 3.4))
    for label, series in curves.items():
        axis.plot(series.index, series.values, marker="o", label=label)
    axis.set(xlabel="step (per task)", ylabel="average accuracy (%)", title=title)
    axis.legend(frameon=False, fontsize="small")
    figure.tight_layout()
    return figure


def task_samples(suite, per_task: int = 10, split: str = "test") -> Figure:
    """A grid of ``per_task`` images from every task of ``suite`` (one row per task, class names as labels)."""
    plt = _pyplot()
    names = suite.task_names
    figure, axes = plt.subplots(len(names), per_task, figsize=(per_task * 0.75, len(names) * 0.85))
    axes = np.atleast_2d(axes)
    for row, task in enumerate(names):
        data = suite[task]
        # One image of each class first, so every row shows the label set.
        firsts = [int(torch.nonzero(data.labels[split] == c)[0]) for c in range(min(per_task, data.num_classes))]
        index = (firsts + list(range(per_task)))[:per_task]
        for column, i in enumerate(index):
            axis = axes[row, column]
            axis.imshow(data.images[split][i].permute(1, 2, 0).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(data.class_names[int(data.labels[split][i])][:10], fontsize=6, pad=2)
        axes[row, 0].set_ylabel(task, rotation=0, ha="right", va="center", fontsize=8)
    figure.tight_layout(pad=0.3)
    return figure
