"""The papers' whole experiment grid on one zoo: every merge alone, + Surgery and + SurgeryV2, over seeds.

One row per merge and surgery version; Surgery rows are means over seeds, with the standard deviation
of the task-average next to them (the official code is unseeded, and its runs of one configuration
vary by about 0.8 points, so a reader needs the spread to tell which differences are real).
Representation bias (mean absolute difference to the experts' embeddings, averaged over tasks) is
reported before surgery on the merge rows and after it on the surgery rows.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.progress import tqdm
from surgery_lib.merging import (
    MAIN_TABLE,
    REPAIRED,
    MergeOptions,
    cached_merge,
    evaluate_merge,
    method_label,
)
from surgery_lib.surgery.run import SurgeryRun, bias_table, run_surgery
from surgery_lib.surgery.v1 import SurgeryConfig

if TYPE_CHECKING:
    import pandas as pd

    from surgery_lib.settings.base import Zoo

#: Surgery versions of the grid: 0 is the merge alone.
VERSION_SUFFIX = {0: "", 1: " + Surgery", 2: " + SurgeryV2"}


def parse_versions(text: str) -> tuple[int, ...]:
    """``"none,1,2"`` -> ``(0, 1, 2)``.

    Raises:
        SurgeryBookError: for anything but ``none``, ``1`` and ``2``.
    """
    names = {"none": 0, "0": 0, "1": 1, "2": 2}
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or any(p not in names for p in parts):
        raise SurgeryBookError(
            f"unknown surgery versions {text!r}", "use a comma-separated list of none, 1 and 2 (e.g. none,1,2)"
        )
    return tuple(dict.fromkeys(names[p] for p in parts))


@dataclass
class GridResult:
    """The grid's accuracy table and the runs behind it.

    ``table`` rows are ``"<merge label>[ + Surgery| + SurgeryV2]"``; columns the tasks, ``average``,
    ``std`` (of the task-average over seeds; NaN with one seed or no training) and ``bias``.
    """

    table: pd.DataFrame
    runs: dict[str, list[SurgeryRun]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, dict[str, float | None]]:
        """The table as ``{row: {column: value}}`` with NaN as ``None`` (standard JSON)."""
        return {
            row: {
                k: None if isinstance(v, float) and not math.isfinite(v) else round(float(v), 4)
                for k, v in values.items()
            }
            for row, values in self.table.to_dict(orient="index").items()
        }


def surgery_grid(
    zoo: Zoo,
    methods: Sequence[str] = MAIN_TABLE,
    versions: Sequence[int] = (0, 1, 2),
    seeds: int = 1,
    *,
    repaired: Sequence[str] | None = REPAIRED,
    options: MergeOptions | None = None,
    config: SurgeryConfig | None = None,
    reference_rows: bool = True,
    device: Any = None,
    progress: bool = True,
) -> GridResult:
    """Every method of ``methods`` alone (version 0), + Surgery (1) and + SurgeryV2 (2), surgery over ``seeds`` seeds.

    Args:
        repaired: the methods that get surgery rows (default: the papers' :data:`~surgery_lib.merging.api.REPAIRED`;
            ``None``: every method).
        config: the surgery schedule (its seed is replaced by 0..seeds-1; a rank left at ``None`` is the
            preset's for each version, an explicit one is kept).
        options: merge options (merges are cached next to the zoo, so a second grid reuses them).

    Returns:
        A :class:`GridResult`; accuracies in %, biases as mean absolute differences.
    """
    import pandas as pd

    if seeds < 1:
        raise SurgeryBookError(f"{seeds} seeds", "pass --seeds 1 or more")
    started = time.perf_counter()
    config = config or SurgeryConfig()
    rows: dict[str, dict[str, float]] = {}
    if reference_rows:
        for label, values in zoo.reference_rows().items():
            rows[label] = {**values, "average": sum(values.values()) / len(values), "std": math.nan, "bias": math.nan}
    runs: dict[str, list[SurgeryRun]] = {}
    cells = [(m, v) for m in methods for v in versions if v == 0 or repaired is None or m in repaired]
    for method, version in tqdm(cells, desc="grid", disable=not progress):
        merged = cached_merge(zoo, method, options, device=device, progress=False)
        label = method_label(zoo, method, options) + VERSION_SUFFIX[version]
        if version == 0:
            accuracy = evaluate_merge(zoo, merged, device)
            bias = merge_bias(zoo, merged.state, device)
            rows[label] = {**accuracy, "average": sum(accuracy.values()) / len(accuracy), "std": math.nan, "bias": bias}
            continue
        runs[label] = [  # a rank left at None becomes the preset's for the version inside run_surgery
            run_surgery(
                zoo,
                merged.state,
                version=version,
                config=dataclasses.replace(config, seed=seed),
                device=device,
                progress=False,
            )
            for seed in range(seeds)
        ]
        rows[label] = _summarise(runs[label])
    table = pd.DataFrame.from_dict(rows, orient="index")
    return GridResult(table, runs, time.perf_counter() - started)


def _summarise(runs: Sequence[SurgeryRun]) -> dict[str, float]:
    tasks = runs[0].tasks
    averages = [run.average("after") for run in runs]
    mean = sum(averages) / len(averages)
    spread = math.sqrt(sum((a - mean) ** 2 for a in averages) / (len(averages) - 1)) if len(averages) > 1 else math.nan
    row = {t: sum(run.accuracy_after[t] for run in runs) / len(runs) for t in tasks}
    bias = sum(sum(run.bias_after.values()) / len(tasks) for run in runs) / len(runs)
    return {**row, "average": mean, "std": spread, "bias": bias}


def merge_bias(zoo: Zoo, state: Any, device: Any) -> float:
    """The representation bias of a merged state, averaged over the zoo's tasks (test split)."""
    return float(bias_table(zoo, {"merge": state}, device=device).loc["merge", "average"])


def format_grid(table: pd.DataFrame, per_task: bool = False) -> pd.DataFrame:
    """The grid for reading: ``average ± std`` first (one decimal), bias, then per-task columns if asked."""
    import pandas as pd

    shown = pd.DataFrame(index=table.index)
    shown["average"] = [
        f"{a:.1f}" if not math.isfinite(s) else f"{a:.1f} ± {s:.1f}" for a, s in zip(table["average"], table["std"])
    ]
    shown["bias"] = [f"{b:.3f}" if math.isfinite(b) else "" for b in table["bias"]]
    if per_task:
        for column in table.columns.drop(["average", "std", "bias"]):
            shown[column] = table[column].round(1)
    return shown
