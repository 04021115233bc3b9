"""How much of the experts' gain a merge keeps as more tasks are merged, and why: the kept-share curve and the
weight-disentanglement error (Ortiz-Jimenez et al., NeurIPS 2023).

For a set S of tasks merged by task arithmetic at scale lambda, ``theta_S = theta_0 + lambda * sum_{t in S} tau_t``:

- kept share of task t: ``(acc_t(theta_S) - acc_t(theta_0)) / (acc_t(theta_t) - acc_t(theta_0))``, 1 when the
  merge is as good as the expert on t, 0 when it is no better than the pretrained model, negative when worse;
- alone share of task t: the same with ``theta_0 + lambda * tau_t`` (the task vector alone at the merge's scale):
  what the scale alone costs, before any other task interferes;
- disentanglement error of task t: the share of t's test images whose prediction under ``theta_S`` differs
  from the one under ``theta_0 + lambda * tau_t``, the prediction-disagreement distance of Ortiz-Jimenez et al.:
  0 when the other task vectors leave t's predictions alone.

On CLIP ViT-B/32 task arithmetic keeps about half of the gain over eight tasks; a small model's task vectors,
though nearly orthogonal as weights, all rewrite the same small embedding, so what they keep falls with the
number of tasks. :func:`kept_share_curve` measures that fall on any zoo.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.progress import tqdm
from surgery_lib.core.state_dict import state_fingerprint
from surgery_lib.core.taskdata import TaskData
from surgery_lib.merging.vectors import add_vectors, task_vectors
from surgery_lib.models import StateDict, load_encoder, task_features

if TYPE_CHECKING:
    import pandas as pd


def task_subsets(tasks: Sequence[str], size: int, count: int, seed: int = 0) -> list[tuple[str, ...]]:
    """Up to ``count`` distinct subsets of ``size`` tasks, seeded; every subset when there are at most ``count``.

    Raises:
        SurgeryBookError: ``size`` is not between 1 and ``len(tasks)``, or ``count`` < 1.
    """
    if not 1 <= size <= len(tasks):
        raise SurgeryBookError(f"cannot merge {size} of {len(tasks)} tasks", f"pass sizes between 1 and {len(tasks)}")
    if count < 1:
        raise SurgeryBookError(f"{count} subsets per size requested", "pass subsets >= 1")
    every = list(itertools.combinations(tasks, size))
    if len(every) <= count:
        return every
    return sorted(random.Random(f"{seed}/{size}").sample(every, count), key=every.index)


#: ``(weights, task) -> `` the final test-set embeddings (N, D) of the encoder with those weights on ``task``.
Embedder = Callable[[StateDict, str], torch.Tensor]


@torch.inference_mode()
def _predictions(features: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return head.to(features.device)(features).argmax(dim=-1).cpu()


def kept_share_curve(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    heads: Mapping[str, nn.Module],
    tasks: Mapping[str, TaskData],
    load: Callable[[StateDict], nn.Module],
    *,
    sizes: Sequence[int] = (2, 3, 4, 6, 8),
    subsets: int = 4,
    scale: float = 0.3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    embed: Embedder | None = None,
) -> pd.DataFrame:
    """Task arithmetic's kept share and disentanglement error for subsets of ``sizes`` tasks: one row per task per subset.

    Args:
        pretrained: theta_0. experts: ``{task: theta_t}`` with the same keys.
        heads: ``{task: head}`` (frozen). tasks: ``{task: TaskData}`` with a ``test`` split.
        load: state dict -> encoder module (for example ``lambda s: load_encoder(preset.encoder, s)``).
        sizes: numbers of tasks merged (each at most ``len(experts)``). subsets: subsets per size (seeded).
        scale: task arithmetic's lambda (0.3, the papers' choice).
        embed: how a model's test embeddings are obtained (default: ``load`` it and embed ``tasks``' test split;
            :func:`zoo_kept_share` reads the ones the zoo keeps on disk). It is called with the same weights
            object for every task of a subset.

    Returns:
        A ``pandas.DataFrame`` with columns ``size, subset, task, pretrained, expert, alone, merged`` (accuracies,
        %), ``kept_share``, ``alone_share`` and ``disentanglement_error`` (a fraction of test images). Cost:
        ``len(experts)`` * 3 + sum(size * subsets) evaluations of one task's test split.
    """
    import pandas as pd

    names = list(experts)
    missing = [t for t in names if t not in heads or t not in tasks]
    if missing:
        raise SurgeryBookError(f"no head or test data for task(s) {missing}", "pass heads and tasks for every expert")
    vectors = task_vectors(pretrained, experts)
    sizes = tuple(dict.fromkeys(sizes))  # a size given twice would count its subsets twice
    plan = [(size, subset) for size in sizes for subset in task_subsets(names, size, subsets, seed)]
    bar = tqdm(total=3 * len(names) + sum(size for size, _ in plan), desc="kept share", disable=not progress)

    loaded: dict[str, object] = {}

    def default_embed(state: StateDict, task: str) -> torch.Tensor:
        if loaded.get("state") is not state:  # one encoder per subset, not per task
            loaded.update(state=state, encoder=load(state))
        return task_features(loaded["encoder"], tasks[task], "test", device=device)[0]

    embedding = embed or default_embed

    def predict(state: StateDict, task: str) -> torch.Tensor:
        bar.update(1)
        return _predictions(embedding(state, task), heads[task])

    labels = {t: tasks[t].labels["test"].cpu() for t in names}
    accuracy = lambda p, t: 100.0 * (p == labels[t]).float().mean().item()  # noqa: E731
    reference: dict[str, dict[str, float]] = {}
    alone_predictions: dict[str, torch.Tensor] = {}
    for task in names:
        alone_predictions[task] = predict(add_vectors(pretrained, [vectors[task]], [scale]), task)
        reference[task] = {
            "pretrained": accuracy(predict(pretrained, task), task),
            "expert": accuracy(predict(experts[task], task), task),
            "alone": accuracy(alone_predictions[task], task),
        }
    rows = []
    for size, subset in plan:
        merged = add_vectors(pretrained, [vectors[t] for t in subset], [scale] * len(subset))
        for task in subset:
            prediction = predict(merged, task)
            ref = reference[task]
            gain = ref["expert"] - ref["pretrained"]
            rows.append(
                {
                    "size": size,
                    "subset": "+".join(subset),
                    "task": task,
                    **ref,
                    "merged": accuracy(prediction, task),
                    "kept_share": (accuracy(prediction, task) - ref["pretrained"]) / gain if gain > 0 else float("nan"),
                    "alone_share": (ref["alone"] - ref["pretrained"]) / gain if gain > 0 else float("nan"),
                    "disentanglement_error": (prediction != alone_predictions[task]).float().mean().item(),
                }
            )
    bar.close()
    return pd.DataFrame(rows)


def summarize_curve(rows: pd.DataFrame) -> pd.DataFrame:
    """Per number of tasks merged: mean kept share, alone share and disentanglement error (a subset's tasks
    averaged first, then the subsets), with the number of subsets."""
    per_subset = rows.groupby(["size", "subset"])[["kept_share", "alone_share", "disentanglement_error"]].mean()
    summary = per_subset.groupby("size").agg(["mean", "min", "max"])
    summary.columns = [f"{a}_{b}" if b != "mean" else a for a, b in summary.columns]
    summary["subsets"] = per_subset.groupby("size").size()
    return summary


def zoo_kept_share(zoo, **options) -> pd.DataFrame:
    """:func:`kept_share_curve` on a zoo's pretrained model, experts, heads and test splits (any setting);
    ``sizes`` larger than the zoo's task count are dropped. ``options`` go to :func:`kept_share_curve`."""
    asked = options.pop("sizes", (2, 3, 4, 6, 8))
    sizes = [size for size in asked if size <= len(zoo.tasks)]
    if not sizes:  # an empty table came back
        raise SurgeryBookError(
            f"no size of {list(asked)} fits the {len(zoo.tasks)} tasks of the {zoo.preset.name} zoo",
            f"pass sizes from 1 to {len(zoo.tasks)}",
        )
    device = options.get("device", "cpu")
    loaded: dict[str, object] = {}

    def embed(state: StateDict, task: str) -> torch.Tensor:  # through the zoo: embeddings other runs stored
        if loaded.get("state") is not state:
            loaded.update(
                state=state, encoder=load_encoder(zoo.preset.encoder, state), weights=state_fingerprint(state)
            )
        return zoo.features(loaded["encoder"], task, "test", device=device, fingerprint=loaded["weights"])[0]

    return kept_share_curve(
        zoo.pretrained,
        zoo.experts,
        zoo.heads,
        {t: zoo.suite[t] for t in zoo.tasks},
        lambda state: load_encoder(zoo.preset.encoder, state),
        sizes=sizes,
        embed=embed,
        **options,
    )
