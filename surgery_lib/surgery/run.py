"""Surgery on a zoo: merge -> cache features -> train modules -> accuracy and bias before and after."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from surgery_lib.bias import block_bias, representation_bias
from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.state_dict import state_fingerprint
from surgery_lib.core.storage import load_tensors, save_tensors
from surgery_lib.evaluation import accuracy_from_features, results_table
from surgery_lib.models import load_encoder, resolve_device
from surgery_lib.surgery.v1 import (
    SurgeryConfig,
    SurgeryHistory,
    TaskSurgery,
    as_surgery_config,
    task_seed,
    train_surgery,
)
from surgery_lib.surgery.v2 import DeepSurgery, train_deep_surgery

if TYPE_CHECKING:
    import pandas as pd

    from surgery_lib.core.taskdata import TaskData
    from surgery_lib.settings.base import Zoo


@dataclass
class SurgeryRun:
    """Everything one surgery run measured. Accuracies in %, biases as mean absolute differences."""

    version: int
    split: str
    config: SurgeryConfig
    tasks: tuple[str, ...]
    accuracy_before: dict[str, float]
    accuracy_after: dict[str, float]
    bias_before: dict[str, float]
    bias_after: dict[str, float]
    history: SurgeryHistory
    modules: TaskSurgery | DeepSurgery
    base_fingerprint: str
    block_bias_before: dict[str, torch.Tensor] = field(default_factory=dict)
    block_bias_after: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """Rows: accuracy and bias before and after surgery; columns: tasks and their average."""
        return results_table(
            {
                "accuracy before": self.accuracy_before,
                "accuracy after": self.accuracy_after,
                "bias before": self.bias_before,
                "bias after": self.bias_after,
            }
        )

    def average(self, which: str = "after") -> float:
        """Average test accuracy (%) over the tasks, ``"before"`` or ``"after"`` surgery."""
        values = self.accuracy_after if which == "after" else self.accuracy_before
        return sum(values.values()) / len(values)

    def mean_block_bias(self, which: str = "after") -> torch.Tensor:
        """Per-block bias averaged over the tasks, (blocks,); empty unless block biases were measured."""
        curves = self.block_bias_after if which == "after" else self.block_bias_before
        return torch.stack(list(curves.values())).mean(dim=0) if curves else torch.empty(0)

    def learning_curve(self) -> pd.DataFrame:
        """Test accuracy per task (and average) at every evaluated step."""
        return results_table(self.history.accuracy).rename_axis("step")


def run_surgery(
    zoo: Zoo,
    merged: Mapping[str, torch.Tensor],
    *,
    version: int = 1,
    config: SurgeryConfig | None = None,
    split: str = "test",
    tasks: Sequence[str] | None = None,
    block_bias_too: bool = False,
    adapt_limit: int | None = None,
    device: str | torch.device | None = None,
    precision: str | None = None,
    progress: bool = True,
) -> SurgeryRun:
    """Train Surgery (``version=1``) or SurgeryV2 (``version=2``) on a merged state dict of ``zoo``'s experts.

    Args:
        merged: the merged encoder weights (from any method in :mod:`surgery_lib.merging.api`).
        split: unlabeled adaptation images: ``"test"`` (the paper's transductive setting) or ``"adapt"``
            (a held-out split of the same task, never used for evaluation).
        config: the schedule (default: the official one, with the preset's SurgeryV2 rank for V2).
        block_bias_too: also measure the per-block bias before and after (always done for V2).
        adapt_limit: adapt on only this many images per task (a seeded random subset of ``split``), for
            the data-amount ablation. Evaluation always uses the whole test split.
        precision: of feature extraction and SurgeryV2's forward passes on a GPU (default: the preset's).

    Returns:
        A :class:`SurgeryRun` with accuracy and bias on the test split before and after.
    """
    config = _checked_config(zoo, version, config, split, adapt_limit)
    device = resolve_device(device, zoo.preset.default_device)
    precision = precision or zoo.preset.precision
    names = tuple(zoo.task_subset(tasks))
    encoder = load_encoder(zoo.preset.encoder, merged).to(device)
    with_blocks = version == 2 or block_bias_too
    started = time.perf_counter()
    fingerprint = state_fingerprint(merged)
    features = _Features.extract(zoo, encoder, fingerprint, names, version, split, with_blocks, device, precision)
    if adapt_limit is not None:
        features.limit_adaptation(adapt_limit, config.seed, version)
    timings = {"features_s": time.perf_counter() - started}

    started = time.perf_counter()
    labels = {t: zoo.suite[t].labels["test"] for t in names}
    train = _train_final if version == 1 else _train_blocks
    modules, history, after = train(zoo, encoder, features, labels, config, split, device, precision, progress)
    timings["training_s"] = time.perf_counter() - started
    return _surgery_run(
        zoo, version, split, config, names, features, after, labels, modules, history, fingerprint, timings
    )


def _train_final(zoo, encoder, features, labels, config, split, device, precision, progress):
    """Surgery (V1) on the final embeddings: ``(modules, history, after)``, ``after`` as ``(final, None)`` per task."""
    names = tuple(features.merged_test)
    evaluate = {t: (features.merged_test[t][0], labels[t], zoo.heads[t]) for t in names}
    targets = {t: features.expert_adapt[t][0] for t in names}
    modules, history = train_surgery(
        features.merged_adapt, targets, config, evaluate=evaluate, device=device, progress=progress
    )
    if config.online:  # each task as its own pass left it: what the official online log reports
        modules = TaskSurgery.from_modules({t: history.end_of_pass[t] for t in names})
    return modules, history, {t: (modules.apply_task(t, features.merged_test[t][0]).detach(), None) for t in names}


def _train_blocks(zoo, encoder, features, labels, config, split, device, precision, progress):
    """SurgeryV2 after every block: ``(modules on the CPU, history, after)``, ``after`` as ``(final, block means)``."""
    names = tuple(features.merged_test)
    after: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules, history = train_deep_surgery(
        encoder,
        features.unlabeled(zoo, split),
        dict(features.expert_adapt),
        config,
        split="limited" if features.adapt_index else split,
        evaluate={t: zoo.heads[t] for t in names},
        device=device,
        precision=precision,
        progress=progress,
        embeddings=after,  # the test embeddings after training, from its last checkpoint
    )
    return modules, history, after


def _checked_config(
    zoo: Zoo, version: int, config: SurgeryConfig | None, split: str, adapt_limit: int | None
) -> SurgeryConfig:
    """``config`` (default: the official schedule) with the preset's rank where it leaves the rank open;
    one-line errors for a version, split or limit that does not exist."""
    config = as_surgery_config(config).with_rank(zoo.preset.surgery_rank(version))
    check_surgery_request(version, split, config.online)
    if adapt_limit is not None and adapt_limit < 1:
        raise SurgeryBookError(f"adapt_limit={adapt_limit}", "limit the adaptation data to 1 image or more per task")
    return config


def check_surgery_request(version: int, split: str, online: bool) -> None:
    """One-line errors for a surgery version, adaptation split or online request that does not exist (before a
    zoo is built or a merge computed)."""
    if version not in (1, 2):
        raise SurgeryBookError(f"unknown surgery version {version!r}", "use 1 (Surgery) or 2 (SurgeryV2)")
    if split not in ("test", "adapt"):
        raise SurgeryBookError(f"unknown adaptation split {split!r}", "use 'test' (the paper) or 'adapt' (held out)")
    if version == 2 and online:
        raise SurgeryBookError("SurgeryV2 has no online variant here", "use --version 1 with --online")


@dataclass
class _Features:
    """What a surgery run compares, per task: ``(final, block means or None)`` of the merged and the expert
    model on the test split and on the adaptation data, and the adaptation subset when limited."""

    merged_test: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
    expert_test: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
    expert_adapt: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
    merged_adapt: dict[str, torch.Tensor]  # Surgery (V1) only: the merged final embeddings it adapts on
    adapt_index: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def extract(cls, zoo, encoder, fingerprint, names, version, split, with_blocks, device, precision) -> _Features:
        found = cls({}, {}, {}, {})

        def merged(task: str, split: str, blocks: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            return zoo.features(
                encoder, task, split, blocks=blocks, device=device, precision=precision, fingerprint=fingerprint
            )

        for task in names:
            found.expert_test[task] = zoo.expert_features(
                task, "test", blocks=with_blocks, device=device, precision=precision
            )
            found.expert_adapt[task] = (
                found.expert_test[task]
                if split == "test"
                else zoo.expert_features(task, split, blocks=version == 2, device=device, precision=precision)
            )
            found.merged_test[task] = merged(task, "test", with_blocks)
            if version == 1:
                found.merged_adapt[task] = (
                    found.merged_test[task][0] if split == "test" else merged(task, split, False)[0]
                )
        return found

    def limit_adaptation(self, limit: int, seed: int, version: int) -> None:
        """Keep a seeded random ``limit`` of each task's adaptation data (the data-amount ablation)."""
        for i, task in enumerate(self.expert_adapt):
            count = len(self.expert_adapt[task][0])
            generator = torch.Generator().manual_seed(task_seed(seed, i))
            keep = torch.randperm(count, generator=generator)[:limit]
            self.adapt_index[task] = keep
            final, blocks = self.expert_adapt[task]
            self.expert_adapt[task] = (final[keep], None if blocks is None else blocks[keep])
            if version == 1:
                self.merged_adapt[task] = self.merged_adapt[task][keep]

    def unlabeled(self, zoo: Zoo, split: str) -> dict[str, TaskData]:
        """SurgeryV2's adaptation images per task: ``split``, or its limited subset."""
        if not self.adapt_index:
            return {t: zoo.suite[t] for t in self.expert_adapt}
        return {t: zoo.suite[t].with_split("limited", split, self.adapt_index[t]) for t in self.expert_adapt}


def _surgery_run(zoo, version, split, config, names, features, after, labels, modules, history, fingerprint, timings):
    """The :class:`SurgeryRun` of a finished training: accuracy and bias before and after (per block too when
    the features have block means)."""
    before, experts = features.merged_test, features.expert_test
    run = SurgeryRun(
        version=version,
        split=split,
        config=config,
        tasks=names,
        accuracy_before={t: accuracy_from_features(before[t][0], zoo.heads[t], labels[t]) for t in names},
        accuracy_after={t: accuracy_from_features(after[t][0], zoo.heads[t], labels[t]) for t in names},
        bias_before={t: representation_bias(before[t][0], experts[t][0]) for t in names},
        bias_after={t: representation_bias(after[t][0], experts[t][0]) for t in names},
        history=history,
        modules=modules,
        base_fingerprint=fingerprint,
        seconds=timings,
    )
    if experts[names[0]][1] is not None:
        run.block_bias_before = {t: block_bias(before[t][1], experts[t][1]) for t in names}
        if version == 2:
            run.block_bias_after = {t: block_bias(after[t][1], experts[t][1]) for t in names}
        else:  # V1 leaves the blocks untouched: only the final embedding moves
            run.block_bias_after = dict(run.block_bias_before)
    return run


def task_embeddings(
    zoo: Zoo,
    model: str | Mapping[str, torch.Tensor],
    tasks: Sequence[str] | None = None,
    *,
    split: str = "test",
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Final embeddings ``{task: (N_t, d)}`` of each task's ``split`` images.

    ``model`` is a merged state dict, ``"pretrained"``, ``"mtl"`` or ``"expert"`` (each task through its
    own expert, the reference that representation bias is measured against).
    """
    device = resolve_device(device, zoo.preset.default_device)
    names = tuple(zoo.task_subset(tasks))
    if model == "expert":
        return {task: zoo.expert_features(task, split, device=device)[0] for task in names}
    if isinstance(model, str):
        shared, fingerprint = zoo.encoder(model), zoo.model_fingerprint(model)
    else:
        shared, fingerprint = load_encoder(zoo.preset.encoder, model), state_fingerprint(model)
    return {task: zoo.features(shared, task, split, device=device, fingerprint=fingerprint)[0] for task in names}


def bias_table(
    zoo: Zoo,
    merges: Mapping[str, Mapping[str, torch.Tensor]],
    tasks: Sequence[str] | None = None,
    *,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Representation bias of each merged model (rows, by label) on every task's test images (columns + average)."""
    expert = task_embeddings(zoo, "expert", tasks, device=device)
    rows = {}
    for label, state in merges.items():
        merged = task_embeddings(zoo, state, tasks, device=device)
        rows[label] = {t: representation_bias(merged[t], expert[t]) for t in expert}
    return results_table(rows)


def block_bias_table(
    zoo: Zoo,
    merges: Mapping[str, Mapping[str, torch.Tensor]],
    tasks: Sequence[str] | None = None,
    *,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Bias of the token-mean residual stream after every block, averaged over tasks: rows are merges
    (by label), columns blocks 1..L (the SurgeryV2 paper's layer-wise diagnosis)."""
    import pandas as pd

    device = resolve_device(device, zoo.preset.default_device)
    names = tuple(zoo.task_subset(tasks))
    experts = {task: zoo.expert_features(task, "test", blocks=True, device=device)[1] for task in names}
    rows = {}
    for label, state in merges.items():
        encoder, fingerprint = load_encoder(zoo.preset.encoder, state), state_fingerprint(state)
        per_task = []
        for task in names:
            means = zoo.features(encoder, task, "test", blocks=True, device=device, fingerprint=fingerprint)[1]
            per_task.append(block_bias(means, experts[task]))
        rows[label] = torch.stack(per_task).mean(dim=0).tolist()
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.columns = [f"block {i + 1}" for i in range(table.shape[1])]
    return table


def save_surgery(run: SurgeryRun, path: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> Path:
    """Save a run's trained modules as safetensors, tagged with the base merge they belong to."""
    metadata = {
        "version": str(run.version),
        "tasks": json.dumps(list(run.tasks)),
        "rank": str(run.modules.rank),
        "base_fingerprint": run.base_fingerprint,
        "extra": json.dumps(dict(extra or {})),
    }
    save_tensors(dict(run.modules.state_dict()), path, metadata)
    return Path(path)


def load_surgery(
    path: str | os.PathLike[str], merged: Mapping[str, torch.Tensor], encoder: torch.nn.Module
) -> TaskSurgery | DeepSurgery:
    """Load modules saved by :func:`save_surgery` for the base merge ``merged`` on ``encoder``'s architecture.

    Raises:
        SurgeryBookError: if the modules were trained on another base merge or for another width or depth.
    """
    if not Path(path).is_file():  # load_tensors would call it a damaged cache file, to be deleted and rebuilt
        raise SurgeryBookError(f"no surgery modules at {path}", "pass the file that `surgery --save` wrote")
    tensors, metadata = load_tensors(path)
    tasks, rank, version = _surgery_metadata(path, metadata)
    fingerprint = state_fingerprint(merged)
    if metadata["base_fingerprint"] != fingerprint:
        raise SurgeryBookError(
            f"the surgery modules in {path} were trained on another merged model "
            f"(fingerprint {metadata['base_fingerprint']}, this one {fingerprint})",
            "train surgery for this merge, or load the merge the modules were trained on",
        )
    if version == 1:
        modules: TaskSurgery | DeepSurgery = TaskSurgery(tasks, encoder.output_dim, rank)
    else:
        modules = DeepSurgery.for_encoder(encoder, tasks, rank)
    try:
        modules.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise SurgeryBookError(
            f"the surgery modules in {path} do not fit this encoder's width or depth ({str(exc).splitlines()[0]})",
            "load them on the architecture they were trained for",
        ) from None
    return modules


def _surgery_metadata(path: str | os.PathLike[str], metadata: Mapping[str, str]) -> tuple[list[str], int, int]:
    """``(tasks, rank, version)`` from what :func:`save_surgery` recorded, or a one-line error for a file it did
    not write (a KeyError, a JSONDecodeError, or "trained on another merged model" for a file without metadata)."""
    try:
        tasks, rank, version = json.loads(metadata["tasks"]), int(metadata["rank"]), int(metadata["version"])
        if "base_fingerprint" not in metadata:
            raise KeyError("base_fingerprint")
    except (KeyError, ValueError) as exc:
        detail = f"lacks {exc.args[0]!r}" if isinstance(exc, KeyError) else f"holds an unreadable value: {exc}"
        raise SurgeryBookError(
            f"{path} holds no surgery modules save_surgery wrote (its metadata {detail})",
            "pass the file that `surgery --save` (or save_surgery) wrote",
        ) from None
    if version not in (1, 2) or rank < 1 or not (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)):
        raise SurgeryBookError(
            f"{path} records surgery version {version}, rank {rank} and tasks {tasks!r}",
            "pass the file that `surgery --save` (or save_surgery) wrote",
        )
    return tasks, rank, version
