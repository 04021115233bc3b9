"""Evaluation: accuracy of an encoder through each task's head, and results tables."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.storage import atomic_path, stem_files, to_json
from surgery_lib.core.taskdata import TaskData
from surgery_lib.models import embed, task_features  # noqa: F401  (embed: 0.1 re-exported it here)

if TYPE_CHECKING:
    import pandas as pd


@torch.inference_mode()
def accuracy_from_features(features: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent of ``head`` on precomputed embeddings (N, D) with labels (N,)."""
    if features.ndim != 2 or labels.shape != (len(features),):  # (1,) labels would broadcast: a wrong number
        raise SurgeryBookError(
            f"{tuple(labels.shape)} labels for embeddings of shape {tuple(features.shape)}",
            "pass (N, D) embeddings and the N labels of the same images",
        )
    head = head.to(features.device)
    predictions = head(features).argmax(dim=-1)
    return 100.0 * (predictions.cpu() == labels.cpu()).float().mean().item()


def task_accuracy(
    encoder: nn.Module,
    head: nn.Module,
    task: TaskData,
    split: str = "test",
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> float:
    """Top-1 accuracy in percent of ``encoder`` + ``head`` on ``task``'s ``split``."""
    features = task_features(encoder, task, split, batch_size=batch_size, device=device)[0]
    return accuracy_from_features(features, head, task.labels[split])


def evaluate_tasks(
    encoder: nn.Module,
    heads: Mapping[str, nn.Module],
    tasks: Mapping[str, TaskData],
    split: str = "test",
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Accuracy (%) of one (merged) encoder on every task in ``tasks``, each through its own head."""
    missing = [task for task in tasks if task not in heads]
    if missing:
        raise SurgeryBookError(f"no head for task(s) {missing}", "pass a head for every evaluated task")
    return {task: task_accuracy(encoder, heads[task], data, split, device=device) for task, data in tasks.items()}


def results_table(rows: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """Per-task accuracies ``{method: {task: %}}`` as a DataFrame with an ``average`` column."""
    import pandas as pd

    table = pd.DataFrame.from_dict({name: dict(values) for name, values in rows.items()}, orient="index")
    table["average"] = table.mean(axis=1)
    return table


def normalized_accuracy(table: pd.DataFrame, experts: Mapping[str, float]) -> pd.DataFrame:
    """Each accuracy divided by the task's expert accuracy, in % (the papers' "normalised accuracy")."""
    import pandas as pd

    tasks = [column for column in table.columns if column != "average"]
    missing = [task for task in tasks if task not in experts]
    if missing:  # a KeyError from pandas before
        raise SurgeryBookError(
            f"no expert accuracy for task(s) {missing}", "pass the experts' accuracy of every task in the table"
        )
    reference = pd.Series(dict(experts), dtype=float)[tasks]
    impossible = reference[(reference < 0) | (reference > 100)]
    if len(impossible):
        raise SurgeryBookError(
            f"expert accuracy {impossible.iloc[0]} for task {impossible.index[0]!r} is outside [0, 100]",
            "pass each expert's test accuracy in %",
        )
    undefined = list(reference.index[~(reference > 0)])  # 0 or NaN: a share of nothing (it was inf)
    if undefined:
        warnings.warn(
            "no normalised accuracy where the expert's accuracy is 0 or NaN ("
            + ", ".join(f"{t}: {reference[t]}" for t in undefined)
            + "); those shares and the average are NaN",
            stacklevel=2,
        )
    normalized = table[tasks].div(reference.where(reference > 0), axis=1) * 100
    normalized["average"] = normalized.mean(axis=1, skipna=False)  # not an average over fewer tasks
    return normalized


def write_table(
    table: pd.DataFrame,
    stem: str | os.PathLike[str],
    *,
    decimals: int = 2,
    markdown: pd.DataFrame | None = None,
    records: bool = False,
) -> tuple[Path, ...]:
    """Write ``table`` as ``<stem>.csv`` and ``<stem>.md``, and with ``records`` as ``<stem>.json`` (one object
    per row, NaN as null), each atomically; the one writer of every table the library saves.

    Args:
        decimals: of the CSV and of the Markdown's numbers.
        markdown: what the Markdown shows instead of ``table`` (e.g. a readable ``average ± std`` view), without
            its index.
    Returns:
        the paths written: CSV, Markdown (and JSON).
    """
    paths = stem_files(stem, [".csv", ".md"] + ([".json"] if records else []))
    with atomic_path(paths[0]) as tmp:
        table.round(decimals).to_csv(tmp, float_format=f"%.{decimals}f")
    with atomic_path(paths[1]) as tmp:
        shown = table.to_markdown(floatfmt=f".{decimals}f") if markdown is None else markdown.to_markdown(index=False)
        tmp.write_text(shown + "\n")
    if records:
        with atomic_path(paths[2]) as tmp:
            tmp.write_text(to_json(table.reset_index().to_dict(orient="records"), indent=1) + "\n")
    return tuple(paths)


def partial_rank_correlation(x: pd.Series, y: pd.Series, control: pd.Series) -> float:
    """Spearman correlation of ``x`` and ``y`` with the linear effect of ``control`` removed from both ranks.

    Answers "does x still go with y once z is held fixed?": e.g. the representation bias of a merge and the gain
    surgery brings it, controlling for the merge's accuracy. Equal-length series (aligned by position); NaN
    when a residual has no variance (``control`` explains ``x`` or ``y`` exactly).
    """
    import numpy as np

    ranks = [np.asarray(s.rank(), dtype=float) for s in (x, y, control)]
    design = np.column_stack([ranks[2], np.ones(len(ranks[2]))])
    residuals = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in ranks[:2]]
    if min(float(np.std(r)) for r in residuals) < 1e-12:
        return float("nan")
    return float(np.corrcoef(residuals[0], residuals[1])[0, 1])
