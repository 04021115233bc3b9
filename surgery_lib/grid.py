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

from surgery_lib.benchmark import peak_memory
from surgery_lib.core.errors import SurgeryBookError, refuse_text
from surgery_lib.core.progress import tqdm
from surgery_lib.merging import (
    MAIN_TABLE,
    MERGE_METHODS,
    REPAIRED,
    MergeOptions,
    cached_merge,
    check_method,
    evaluate_merge,
    get_method,
    method_label,  # noqa: F401  (0.1 re-exported it here)
)
from surgery_lib.merging.options import MAX_SEED, as_merge_options
from surgery_lib.merging.rows import VERSION_SUFFIX, Row
from surgery_lib.merging.tuning import is_tuned, tuned_name
from surgery_lib.surgery.run import SurgeryRun, bias_table, run_surgery
from surgery_lib.surgery.v1 import SurgeryConfig, as_surgery_config

if TYPE_CHECKING:
    import pandas as pd

    from surgery_lib.settings.base import Zoo


#: The most seeds per row: every seed is one more run of every surgery row (minutes each on the mini preset, hours
#: on CLIP; the papers report 3), so a thousand is beyond any study and keeps a grid's plan and folder bounded
#: (a mistyped --seeds 1000000000 would otherwise build a billion-cell plan until memory runs out).
MAX_SEEDS = 1000


def check_seeds(first_seed: int, seeds: int, names: tuple[str, str] = ("--seed", "--seeds")) -> None:
    """A one-line :class:`SurgeryBookError` unless the seeds ``first_seed``, ..., ``first_seed + seeds - 1`` are
    1 to :data:`MAX_SEEDS` valid seeds (0 to :data:`~surgery_lib.merging.options.MAX_SEED`), before any work.
    ``names`` are what the error calls the two (a chapter's parameters: ``("seed", "seeds")``)."""
    seed_name, seeds_name = names
    if seeds < 1:
        raise SurgeryBookError(f"{seeds} seeds", f"pass {seeds_name} 1 or more")
    if seeds > MAX_SEEDS:
        raise SurgeryBookError(
            f"{seeds_name} {seeds} asks for {seeds:,} runs of every row that draws from a seed",
            f"pass {seeds_name} {MAX_SEEDS} or fewer (the papers report 3)",
        )
    if first_seed < 0 or first_seed + seeds - 1 > MAX_SEED:
        last = first_seed + seeds - 1
        raise SurgeryBookError(
            f"{seed_name} {first_seed} with {seeds_name} {seeds} uses the seeds {first_seed} to {last}, "
            f"outside [0, {MAX_SEED}]",
            f"pass a {seed_name} from 0 to {MAX_SEED - seeds + 1}, or fewer {seeds_name}",
        )


def parse_methods(text: str, tune: str = "none") -> tuple[str, ...]:
    """``"papers"`` (the papers' main-table rows), ``"all"`` (every registered method but the tuned twins) or a
    comma-separated list of registered names (repeats dropped, order kept). With ``tune="validation"`` each
    method with a validation search is followed by its tuned twin (``tsv`` -> ``tsv, tsv_tuned``), so that
    fixed and tuned rows sit side by side.

    Raises:
        SurgeryBookError: for a name that is not registered (the error lists the registered ones), or an
            unknown ``tune``.
    """
    if tune not in TUNE_CHOICES:
        raise SurgeryBookError(f"--tune {tune!r}", f"use one of: {', '.join(TUNE_CHOICES)}")
    if text == "papers":
        methods: tuple[str, ...] = MAIN_TABLE
    elif text == "all":
        methods = tuple(name for name in MERGE_METHODS if not is_tuned(name))
    else:
        methods = tuple(dict.fromkeys(check_method(name.strip()) for name in text.split(",")))
    if tune == "none":
        return methods
    twins = [[name, tuned_name(name)] if tuned_name(name) in MERGE_METHODS else [name] for name in methods]
    return tuple(dict.fromkeys(name for pair in twins for name in pair))


#: ``--tune`` values: ``none`` (the methods' fixed values) or ``validation`` (add the tuned twins).
TUNE_CHOICES = ("none", "validation")


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


def grid_axes(methods: Sequence[str], versions: Sequence[int]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """A grid's ``methods`` and ``versions`` with each given once, in their order, after checking them.

    A name given twice would compute its cells twice and count the copies as more seeds: a std of 0 where
    there is one seed.

    Raises:
        SurgeryBookError: a string instead of a list (read letter by letter), no method or no version, an
            unknown method, or a version other than 0 (alone), 1 (+ Surgery) and 2 (+ SurgeryV2).
    """
    for name, value in (("methods", methods), ("versions", versions)):
        refuse_text(name, value, f"pass a list, or parse the text with parse_{name}")
    methods, versions = tuple(dict.fromkeys(methods)), tuple(dict.fromkeys(versions))
    if not methods or not versions:
        raise SurgeryBookError(
            f"an empty grid: methods {list(methods)}, versions {list(versions)}",
            "name at least one method (--methods all) and one version (--surgery none,1,2)",
        )
    for method in methods:
        get_method(method)
    unknown = [v for v in versions if v not in VERSION_SUFFIX]
    if unknown:
        raise SurgeryBookError(f"unknown surgery versions {unknown}", "use 0 (none: the merge alone), 1 and 2")
    return methods, versions


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
    first_seed: int = 0,
    repaired: Sequence[str] | None = REPAIRED,
    options: MergeOptions | None = None,
    config: SurgeryConfig | None = None,
    reference_rows: bool = True,
    device: Any = None,
    progress: bool = True,
) -> GridResult:
    """Every method of ``methods`` alone (version 0), + Surgery (1) and + SurgeryV2 (2), surgery over ``seeds`` seeds.

    Each (method, version, seed) cell is computed by :func:`compute_cell`, the engine the ``grid`` command's
    jobs use too, and the rows summarised by :func:`cell_table`: the same cell gives the same numbers here
    and in ``surgery-book grid``. A merge alone is one cell, or one per seed for a method that draws from
    its seed (DARE).

    Args:
        repaired: the methods that get surgery rows (default: the papers' :data:`~surgery_lib.merging.api.REPAIRED`;
            ``None``: every method).
        first_seed: the cells' seeds are ``first_seed``, ..., ``first_seed + seeds - 1`` (surgery, and the
            merge of a method that draws from its seed), as ``surgery-book grid --seed S --seeds N`` plans them.
        config: the surgery schedule (its seed is replaced by each cell's; a rank left at ``None`` is the
            preset's for each version, an explicit one is kept).
        options: merge options (merges are cached next to the zoo, so a second grid reuses them).

    Returns:
        A :class:`GridResult`; accuracies in %, biases as mean absolute differences.
    """
    import pandas as pd

    methods, versions = grid_axes(methods, versions)
    check_seeds(first_seed, seeds)
    started = time.perf_counter()
    rows: dict[str, dict[str, float]] = {}
    if reference_rows:
        for label, values in zoo.reference_rows().items():
            rows[label] = {**values, "average": sum(values.values()) / len(values), "std": math.nan, "bias": math.nan}
    runs: dict[str, list[SurgeryRun]] = {}
    cells = [
        (method, version, seed)
        for method in methods
        for version in versions
        if version == 0 or repaired is None or method in repaired
        for seed in range(first_seed, first_seed + (seeds if version != 0 or "seed" in get_method(method).reads else 1))
    ]
    records = []
    for method, version, seed in tqdm(cells, desc="grid", disable=not progress):
        record, run = compute_cell(zoo, method, version, seed, options=options, config=config, device=device)
        records.append({"preset": zoo.preset.name, **record})
        if run is not None:
            runs.setdefault(record["label"], []).append(run)
    if records:
        summary = cell_table(records).loc[zoo.preset.name]
        for label, row in summary.iterrows():
            rows[label] = {
                **{t: row[t] for t in zoo.tasks},
                "average": row["average"],
                "std": row["std"],
                "bias": row["bias"],
            }
    table = pd.DataFrame.from_dict(rows, orient="index")
    return GridResult(table, runs, time.perf_counter() - started)


def compute_cell(
    zoo: Zoo,
    method: str,
    version: int,
    seed: int = 0,
    *,
    options: MergeOptions | None = None,
    config: SurgeryConfig | None = None,
    device: Any = None,
) -> tuple[dict[str, Any], SurgeryRun | None]:
    """One cell of the papers' grid: ``method``'s merge alone (``version`` 0) or repaired by Surgery (1) or
    SurgeryV2 (2) with surgery seed ``seed``. The one engine behind ``surgery-book table`` and the jobs of
    ``surgery-book grid``.

    A method that draws from its seed (DARE) merges with ``seed`` too, so each seed is its own merge. The
    schedule is ``config`` (default: the official one) with ``seed``, no intermediate evaluation and, where
    it leaves the rank open, the preset's rank for ``version``.

    Returns:
        ``(record, run)``: the record holds ``method``, ``version``, ``seed``, ``label``, ``accuracy`` (% per
        task), ``average``, ``bias`` (after surgery on surgery cells), on surgery cells ``accuracy_before``,
        ``bias_before``, ``steps`` and ``rank``, on cells of a tuned method ``tuned`` (the values its validation
        search chose, the merges it evaluated and its seconds), and ``seconds``, ``peak_rss_mib`` and
        ``peak_gpu_gib``; ``run`` is the :class:`SurgeryRun` (None for a merge alone).
    """
    import torch

    device = device or zoo.preset.default_device
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    options = as_merge_options(options)
    if "seed" in get_method(method).reads:
        options = options.replace(seed=seed)
    merged = cached_merge(zoo, method, options, device=device, progress=False)
    record: dict[str, Any] = {
        "method": method,
        "version": version,
        "seed": seed,
        "label": Row(method, version).label(zoo, options),
    }
    if "tuned" in merged.details:  # what the validation search chose, and what it cost
        search = merged.details["tuned"]
        record["tuned"] = {key: search[key] for key in ("chosen", "merges_evaluated", "seconds")}
    run = None
    if version == 0:
        accuracy = evaluate_merge(zoo, merged, device)
        record.update(accuracy=accuracy, bias=merge_bias(zoo, merged.state, device))
    else:
        schedule = dataclasses.replace(as_surgery_config(config), seed=seed, eval_every=0)
        schedule = schedule.with_rank(zoo.preset.surgery_rank(version))
        run = run_surgery(zoo, merged.state, version=version, config=schedule, device=device, progress=False)
        accuracy = dict(run.accuracy_after)
        record.update(
            accuracy=accuracy,
            bias=sum(run.bias_after.values()) / len(run.tasks),
            accuracy_before=dict(run.accuracy_before),
            bias_before=sum(run.bias_before.values()) / len(run.tasks),
            steps=schedule.steps,
            rank=schedule.rank,
        )
    memory = peak_memory(device)
    record.update(
        average=sum(accuracy.values()) / len(accuracy),
        seconds=round(time.perf_counter() - started, 2),
        peak_rss_mib=memory["rss_mib"],
        peak_gpu_gib=memory["gpu_gib"],
    )
    return record, run


def cell_table(cells: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per preset, method and version of cell records (:func:`compute_cell` plus ``preset``):
    per-task accuracy and ``average`` (means over seeds), ``std`` of the average over seeds (NaN for one),
    ``bias``, for surgery rows ``gain`` (average minus the merge alone's) and ``bias_before``; ``seconds``
    (all seeds) and ``peak_rss_mib`` / ``peak_gpu_gib``. Indexed by (preset, row label)."""
    import pandas as pd

    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for record in cells:
        groups.setdefault((record["preset"], record["method"], record["version"]), []).append(record)
    rows = []
    alone = {(p, m): sum(r["average"] for r in rs) / len(rs) for (p, m, v), rs in groups.items() if v == 0}
    for (preset, method, version), records in groups.items():
        averages = [r["average"] for r in records]
        mean = sum(averages) / len(averages)
        row: dict[str, Any] = {
            "preset": preset,
            "method": method,
            "version": version,
            "row": records[0]["label"],
            "data": MERGE_METHODS[method].data if method in MERGE_METHODS else "",
            "seeds": len(records),
            "average": mean,
            "std": math.sqrt(sum((a - mean) ** 2 for a in averages) / (len(averages) - 1))
            if len(averages) > 1
            else math.nan,
            "bias": sum(r["bias"] for r in records) / len(records),
        }
        if version:
            row["bias_before"] = sum(r["bias_before"] for r in records) / len(records)
            row["gain"] = mean - alone[(preset, method)] if (preset, method) in alone else math.nan
        row["seconds"] = sum(r["seconds"] for r in records)
        row["peak_rss_mib"] = max(r["peak_rss_mib"] or 0 for r in records)
        row["peak_gpu_gib"] = max((r["peak_gpu_gib"] or 0 for r in records), default=0)
        for task in records[0]["accuracy"]:
            row[task] = sum(r["accuracy"][task] for r in records) / len(records)
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.set_index(["preset", "row"]) if len(table) else table


#: How :func:`fixed_and_tuned` names searched options.
_SEARCHED_NAMES = {"scale": "scale", "drop_rate": "p", "lambda": "λ"}


def _chosen_text(chosen: dict[str, Any]) -> str:
    parts = []
    for name, value in chosen.items():
        short = _SEARCHED_NAMES.get(name, name)
        if isinstance(value, dict):  # one value per task (consensus merging's lambdas)
            low, high = min(value.values()), max(value.values())
            parts.append(f"{short} {low:g}" if low == high else f"{short} {low:g}–{high:g} per task")
        else:
            parts.append(f"{short} {value:g}")
    return ", ".join(parts)


def fixed_and_tuned(table: pd.DataFrame, cells: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Every method of a one-preset grid that has its tuned twin there, side by side: the average accuracy of
    the merge alone and of each surgery version at the method's fixed values and tuned on validation data, what
    the search chose (on the first seed's cell), how many merges it evaluated and its minutes (merge-alone
    cells, all seeds).

    Args:
        table: a :func:`cell_table` of one preset (indexed by row label, with ``method`` and ``version``).
        cells: the grid's cell records (:func:`compute_cell`), whose tuned ones carry what was chosen.

    Returns:
        One row per method (its label), columns ``"<version>: fixed"`` / ``"<version>: tuned"`` for each version
        present, ``chosen``, ``merges evaluated`` and ``tuning minutes``.
    """
    import pandas as pd

    average = {(m, v): a for m, v, a in zip(table["method"], table["version"], table["average"])}
    versions = sorted({v for _, v in average})
    rows = {}
    for method in dict.fromkeys(table["method"]):
        twin = tuned_name(method)
        if is_tuned(method) or (twin, 0) not in average:
            continue
        row: dict[str, Any] = {}
        for version in versions:
            name = "alone" if version == 0 else VERSION_SUFFIX[version].strip()
            row[f"{name}: fixed"] = average.get((method, version), math.nan)
            row[f"{name}: tuned"] = average.get((twin, version), math.nan)
        searches = sorted(
            (c for c in cells if c["method"] == twin and c["version"] == 0 and "tuned" in c), key=lambda c: c["seed"]
        )
        row["chosen"] = _chosen_text(searches[0]["tuned"]["chosen"]) if searches else ""
        row["merges evaluated"] = sum(c["tuned"]["merges_evaluated"] for c in searches)
        row["tuning minutes"] = sum(c["tuned"]["seconds"] for c in searches) / 60
        rows[MERGE_METHODS[method].label] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def merge_bias(zoo: Zoo, state: Any, device: Any) -> float:
    """The representation bias of a merged state, averaged over the zoo's tasks (test split)."""
    return float(bias_table(zoo, {"merge": state}, device=device).loc["merge", "average"])


def readable_grid(table: pd.DataFrame, per_task: bool = False) -> pd.DataFrame:
    """The grid for reading, for ``table`` and ``grid`` alike: ``average ± std`` (one decimal; the mean alone for
    one seed), then whichever of ``gain``, ``bias`` (``before → after`` on surgery rows) and ``seconds`` the
    table has, then the per-task columns if ``per_task``. A (preset, row) index is kept."""
    import pandas as pd

    index_columns = [name for name in table.index.names if name] if isinstance(table.index, pd.MultiIndex) else []
    source = table.reset_index() if index_columns else table
    shown = source[index_columns].copy() if index_columns else pd.DataFrame(index=table.index)
    missing = pd.Series(math.nan, index=source.index)
    std = source["std"].astype(float) if "std" in source else missing
    shown["average"] = [
        f"{a:.1f}" if not math.isfinite(s) else f"{a:.1f} ± {s:.1f}" for a, s in zip(source["average"], std)
    ]
    if "gain" in source:
        shown["gain"] = [f"{g:+.1f}" if math.isfinite(g) else "" for g in source["gain"].astype(float)]
    if "bias" in source:
        before = source["bias_before"].astype(float) if "bias_before" in source else missing
        shown["bias"] = [
            "" if not math.isfinite(b) else f"{f:.3f} → {b:.3f}" if math.isfinite(f) else f"{b:.3f}"
            for b, f in zip(source["bias"].astype(float), before)
        ]
    if "seconds" in source:
        shown["seconds"] = source["seconds"].round(0).astype(int)
    if per_task:
        summary = {"average", "std", "bias", "bias_before", "gain", "seconds", "peak_rss_mib", "peak_gpu_gib"}
        summary |= {"method", "version", "data", "seeds", *index_columns}
        for column in source.columns:
            if column not in summary:
                shown[column] = source[column].round(1)
    return shown.set_index(index_columns) if index_columns else shown


#: The 0.1 name of :func:`readable_grid` (the ``table`` command's formatter).
format_grid = readable_grid
