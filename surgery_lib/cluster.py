"""The whole grid, presets x merging methods x {merge alone, + Surgery, + SurgeryV2} x seeds, as jobs.

Each *cell* (one preset, method, surgery version and seed) is computed by :func:`run_cells` and written
to ``<out>/cells/<cell>.json`` atomically, under a lock, with its accuracies, representation bias, wall
time and peak memory. :func:`run_grid` plans the cells that have no file yet, hands them to submitit
(local processes on one machine, a Slurm job array on a cluster, or this process), waits, and collects
every cell file into one table (CSV, Markdown, JSON) with the mean and standard deviation over seeds.
Interrupting a run loses at most the cells in flight; running the same command again resumes.

A folder holds one grid: its settings are recorded in ``<out>/grid.json`` and a run with other settings
is refused, so a table never mixes cells computed under different schedules. A cell file is reused only if
it vouches for itself: it records its cell, the grid settings, the preset's hash, the zoo's folder and weights
checksum, and a digest of all of it with its numbers; a file that was edited, copied over another cell's name,
or computed from another zoo, preset or schedule is computed again (so deleting ``grid.json`` changes nothing).

Jobs also record the zoo they computed on (``<out>/zoos/``: identity and reference rows). On a machine whose
processor builds the same recipe into other weights, :func:`chapter_grid` can then show a committed grid whole as
that reference build's results, and recompute a sample here to compare, instead of recomputing every cell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import re
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.progress import tqdm
from surgery_lib.core.storage import (
    CorruptFileError,
    config_hash,
    entry_lock,
    read_json,
    write_json,
)
from surgery_lib.evaluation import write_table
from surgery_lib.grid import (
    cell_table,
    check_seeds,
    compute_cell,
    grid_axes,
    parse_methods,
    parse_versions,
    readable_grid,
)
from surgery_lib.merging import get_method
from surgery_lib.merging.tuning import TUNING_SPLIT, is_tuned, no_validation_split
from surgery_lib.models import resolve_device
from surgery_lib.presets import get_preset, preset_hash
from surgery_lib.settings import build_zoo
from surgery_lib.surgery.schedule import check_adam
from surgery_lib.surgery.v1 import SurgeryConfig

if TYPE_CHECKING:
    from collections.abc import Mapping

    import pandas as pd

    from surgery_lib.settings.base import Zoo

#: Where the jobs run: subprocesses here or a Slurm job array (both through submitit), or this process.
EXECUTORS = ("local", "slurm", "inline")
GRID_FORMAT = 1


@dataclass(frozen=True)
class GridSpec:
    """What every cell of a grid shares. ``None`` steps: the official 1000 (SurgeryV2: ``surgery_steps``)."""

    presets: tuple[str, ...]
    methods: tuple[str, ...]
    versions: tuple[int, ...] = (0, 1, 2)
    seeds: int = 1
    surgery_steps: int = 1000
    deep_surgery_steps: int | None = None
    device: str | None = None
    cache_dir: str | None = None
    threads: int | None = None  # torch threads per job (None: torch's default)
    first_seed: int = 0  # surgery seeds are first_seed, ..., first_seed + seeds - 1
    adam: str = "shared"  # the optimiser semantics of the surgery cells (SurgeryConfig.adam)
    #: Setting name -> its options object (real CLIP: where the checkpoints and datasets are).
    setting_options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        # A name given twice would run its cells twice and count them as more seeds (a smaller std): once each.
        object.__setattr__(self, "presets", tuple(dict.fromkeys(self.presets)))
        if not self.presets:
            raise SurgeryBookError("invalid grid: presets []", "name at least one preset (--presets mini)")
        methods, versions = grid_axes(self.methods, self.versions)
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "versions", versions)
        tuned = [m for m in self.methods if is_tuned(m)]
        for preset in map(get_preset, self.presets):
            # Known before any job starts where the preset's suite is data (real CLIP: from the zoo, in the job).
            if tuned and preset.suite is not None and not preset.suite.validation_per_task:
                raise no_validation_split(tuned[0], preset.name, preset.tasks)
        check_seeds(self.first_seed, self.seeds)
        if self.surgery_steps < 1 or (self.deep_surgery_steps is not None and self.deep_surgery_steps < 1):
            raise SurgeryBookError(
                f"invalid grid: surgery steps {self.surgery_steps}/{self.deep_surgery_steps}",
                "pass --surgery-steps and --deep-surgery-steps of 1 or more",
            )
        check_adam(self.adam)

    def settings(self) -> dict[str, Any]:
        """What decides a cell's numbers (not where or how it runs): the folder's identity."""
        schedule = SurgeryConfig()
        return {
            "format": GRID_FORMAT,
            "surgery_steps": self.surgery_steps,
            "deep_surgery_steps": self.steps(2),
            "batch_size": schedule.batch_size,
            "lr": schedule.lr,
            "adam": self.adam,
        }

    def steps(self, version: int) -> int:
        return self.surgery_steps if version != 2 or self.deep_surgery_steps is None else self.deep_surgery_steps


@dataclass(frozen=True)
class Cell:
    """One entry of the grid; ``version`` 0 is the merge alone."""

    preset: str
    method: str
    version: int
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.preset}__{self.method}__v{self.version}__s{self.seed}"


def plan_cells(spec: GridSpec) -> list[Cell]:
    """Every cell of ``spec``: surgery versions over ``seeds`` seeds; a merge alone once, or once per seed
    when the method itself is random (it reads ``seed``, as DARE does)."""
    cells = []
    for preset in spec.presets:
        for method in spec.methods:
            for version in spec.versions:
                seeded = version != 0 or "seed" in get_method(method).reads
                seeds = range(spec.first_seed, spec.first_seed + (spec.seeds if seeded else 1))
                cells += [Cell(preset, method, version, seed) for seed in seeds]
    return cells


def cell_path(out: Path, cell: Cell) -> Path:
    return Path(out) / "cells" / f"{cell.name}.json"


def zoo_identity(zoo: Zoo) -> dict[str, str]:
    """What a cell computed on ``zoo`` depends on besides the grid settings: the preset's hash (its surgery
    ranks, schedules and zoo recipe), the zoo's folder name (on real CLIP: checkpoint family and data sources)
    and its weights checksum (:meth:`Zoo.weights_fingerprint`)."""
    return {
        "preset_hash": preset_hash(zoo.preset),
        "zoo_folder": zoo.directory.name,
        "zoo": zoo.weights_fingerprint(),
    }


def cell_identity(cell: Cell, spec: GridSpec, zoo: Mapping[str, str]) -> dict[str, Any]:
    """Every field a cell file must carry, with these values, to be reused for ``cell`` of ``spec`` on ``zoo``
    (a :func:`zoo_identity`)."""
    return {**dataclasses.asdict(cell), "settings": spec.settings(), **zoo}


def _digest(record: Mapping[str, Any]) -> str:
    return config_hash({k: v for k, v in record.items() if k != "digest"})


def _sealed(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "digest": _digest(record)}


def _sealed_record(path: Path, identity: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON object in ``path`` if its digest matches its content and it carries every field of ``identity``
    with that value; ``None`` for a missing, unreadable, edited or foreign file."""
    try:
        record = read_json(path)
    except (OSError, CorruptFileError):
        return None
    if not isinstance(record, dict) or record.get("digest") != _digest(record):
        return None
    if any(record.get(key) != value for key, value in identity.items()):
        return None
    return record


def vouched_record(path: Path, identity: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cell record in ``path`` if it carries exactly ``identity`` (a :func:`cell_identity`), a finite
    ``average`` and a digest that matches its content; ``None`` for a missing, unreadable, edited or foreign file."""
    record = _sealed_record(path, identity)
    if record is None:
        return None
    average = record.get("average")
    if not isinstance(average, float) or not math.isfinite(average):
        return None
    return record


def finished(out: Path, cell: Cell, spec: GridSpec, zoo: Mapping[str, str]) -> bool:
    """Whether ``out`` holds a result for ``cell`` that was computed with ``spec``'s settings on ``zoo`` (a
    :func:`zoo_identity`)."""
    return vouched_record(cell_path(out, cell), cell_identity(cell, spec, zoo)) is not None


def adopt_cells(
    spec: GridSpec, source: str | os.PathLike[str], out: str | os.PathLike[str], zoos: Mapping[str, Mapping[str, str]]
) -> int:
    """Copy into ``out`` the cells of ``spec`` that the grid folder ``source`` holds and ``out`` lacks, where they
    are ones this machine would compute: each was computed with ``spec``'s settings on the zoo that ``zoos``
    (preset -> :func:`zoo_identity`) names, and is unedited.

    A chapter reads the committed grid this way and computes only what it cannot vouch for (another zoo, other
    settings, a missing or unreadable cell); ``source`` itself is never written. Returns the cells copied.
    """
    source, out = Path(source), Path(out)
    adopted = 0
    for cell in plan_cells(spec):
        if cell.preset not in zoos or finished(out, cell, spec, zoos[cell.preset]):
            continue
        record = vouched_record(cell_path(source, cell), cell_identity(cell, spec, zoos[cell.preset]))
        if record is None:
            continue
        cell_path(out, cell).parent.mkdir(parents=True, exist_ok=True)
        write_json(record, cell_path(out, cell))
        adopted += 1
    return adopted


def zoo_record_path(out: str | os.PathLike[str], identity: Mapping[str, str], preset: str) -> Path:
    """``<out>/zoos/<preset>__<weights checksum>.json``: one file per zoo a grid folder's cells were computed on."""
    return Path(out) / "zoos" / f"{preset}__{identity['zoo']}.json"


def record_zoo(zoo: Zoo, out: str | os.PathLike[str]) -> Path:
    """Write what a reader of ``out``'s cells needs to know about the zoo they were computed on: its
    :func:`zoo_identity`, tasks, reference rows (pretrained, experts, MTL; accuracy in %), library versions and
    machine, sealed with a digest like a cell. Jobs write it beside their cells, so a committed grid can be
    shown whole, with its own reference rows, on a machine whose zoo came out otherwise
    (:func:`reference_build`). Returns the path."""
    identity = zoo_identity(zoo)
    path = zoo_record_path(out, identity, zoo.preset.name)
    record = {
        "preset": zoo.preset.name,
        **identity,
        "tasks": list(zoo.tasks),
        "reference_rows": zoo.reference_rows(),
        "versions": zoo.manifest.get("versions"),
        "machine": zoo.manifest.get("machine"),
    }
    if _vouched_zoo_record(path, identity) is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(_sealed(record), path)
    return path


def _vouched_zoo_record(path: Path, identity: Mapping[str, str]) -> dict[str, Any] | None:
    record = _sealed_record(path, identity)
    return record if record is not None and isinstance(record.get("reference_rows"), dict) else None


@dataclass
class ReferenceBuild:
    """A grid folder's cells computed with the same preset hash, zoo recipe and settings as this machine would
    use, on another build of the zoo (its weights checksum ``zoo`` differs: CPU kernels of another instruction
    set reduce in another order, and a trained zoo inherits the difference). Shown as what they are, the
    reference build's results, never adopted as this zoo's (:func:`adopt_cells` refuses them)."""

    source: Path
    zoo: str
    cells: list[dict[str, Any]]
    #: The reference zoo's record (:func:`record_zoo`): reference rows, versions, machine.
    record: dict[str, Any]

    @property
    def table(self) -> pd.DataFrame:
        return cell_table(self.cells)


def reference_build(
    spec: GridSpec, source: str | os.PathLike[str], zoos: Mapping[str, Mapping[str, str]]
) -> ReferenceBuild | None:
    """The cells of ``spec`` in the grid folder ``source`` if every one of them is there, unedited, computed
    with ``spec``'s settings for the preset hash and zoo folder (recipe) that ``zoos`` (preset ->
    :func:`zoo_identity`) names, all on one other build of the zoo (weights checksum). ``None`` otherwise:
    a missing or edited cell, other settings or recipe, cells from several builds, or cells of this very zoo
    (those :func:`adopt_cells` copies), or no zoo record (:func:`record_zoo`) for that build. ``spec`` has
    one preset."""
    if len(spec.presets) != 1 or spec.presets[0] not in zoos:
        return None
    source = Path(source)
    preset = spec.presets[0]
    recipe = {key: value for key, value in zoos[preset].items() if key != "zoo"}
    cells = []
    for cell in plan_cells(spec):
        record = vouched_record(cell_path(source, cell), cell_identity(cell, spec, recipe))
        if record is None:
            return None
        cells.append(record)
    builds = {record["zoo"] for record in cells}
    if len(builds) != 1 or builds == {zoos[preset]["zoo"]}:
        return None
    (build,) = builds
    identity = {**recipe, "zoo": build}
    record = _vouched_zoo_record(zoo_record_path(source, identity, preset), identity)
    return ReferenceBuild(source, build, cells, record) if record is not None else None


@dataclass
class ChapterGrid:
    """What :func:`chapter_grid` shows: ``table`` (:func:`grid_table`) and ``cells`` with ``reference_rows`` (the
    pretrained, expert and MTL rows of the zoo they were computed on), from this zoo or, when ``reference`` is
    set, the reference build's, with ``sample`` comparing the cells recomputed here."""

    table: pd.DataFrame
    cells: list[dict[str, Any]]
    reference_rows: dict[str, dict[str, float]]
    adopted: int
    computed: int
    source: Path
    reference: ReferenceBuild | None = None
    #: Per recomputed cell (row label and seed): its average on the reference build and on this zoo, and the
    #: difference, in points.
    sample: pd.DataFrame | None = None

    def describe(self, *, threads: bool = False) -> str:
        """Where the table's numbers come from, in two lines; with ``threads``, a third names the torch threads
        and the device of the first cell."""
        if threads:
            first = self.cells[0]
            return f"{self.describe()};\nwith torch {first['threads']} thread(s) on {first['device']}"
        total = len(self.cells)
        if self.reference is None:
            earlier = total - self.adopted - self.computed
            return (
                f"{total} cells: {self.adopted} read from {self.source} (computed from this zoo with these\n"
                f"settings), {self.computed} computed now, {earlier} from an earlier run"
            )
        return (
            f"{total} cells from the reference build in {self.source} (zoo {self.reference.zoo}):\n"
            f"this machine's zoo differs; shown as computed there, {len(self.sample)} recomputed here to compare"
        )


def committed_results() -> Path:
    """The folder of the committed results (the repository's ``notebooks/results``: the grids chapters 06 and 07
    read) as seen from where the chapter runs: ``results`` in the notebooks' folder, where Colab, ``reproduce``,
    nbval and the book build run the chapters, or ``notebooks/results`` from the repository's root (``papermill
    notebooks/06_reproduce_tables.ipynb ...``), where the chapters found no committed grid and computed every
    cell again (mini's chapter 07: about an hour of CPU). ``notebooks/results`` wins where both exist: the README's
    checklist writes its own grids into a ``results`` folder at the root."""
    from_root = Path("notebooks") / "results"
    return from_root if from_root.is_dir() else Path("results")


def chapter_grid(
    specs: GridSpec | Sequence[GridSpec],
    committed: str | os.PathLike[str],
    out: str | os.PathLike[str],
    zoo: Zoo,
    *,
    another_zoo: str = "reference",
    sample: Sequence[str] = ("task_arithmetic",),
) -> ChapterGrid:
    """A chapter's grid, in this process: the cells of ``specs`` (grids of ``zoo``'s preset alone) that the
    committed grid folder ``committed`` holds for this zoo and settings are copied into ``out``, and the rest
    are computed there.

    When this machine's zoo is another build of the same recipe (another processor's kernels) and
    ``committed`` holds every cell from one build with its zoo record (:func:`reference_build`), ``another_zoo``
    decides: ``"reference"`` shows the reference build's cells and rows as they are and recomputes here only
    the cells of the ``sample`` methods (first seed), to compare; ``"compute"`` computes every cell on this zoo
    (the mini preset's full grid: about half an hour of CPU). ``committed`` is never written.

    Raises:
        SurgeryBookError: an unknown ``another_zoo``, or a grid of another preset.
    """
    if another_zoo not in ("reference", "compute"):
        raise SurgeryBookError(
            f"another_zoo={another_zoo!r} is not a choice", 'use "reference" (the default) or "compute"'
        )
    specs = [specs] if isinstance(specs, GridSpec) else list(specs)
    preset = zoo.preset.name
    if not specs or any(spec.presets != (preset,) for spec in specs):
        raise SurgeryBookError(
            f"chapter_grid takes grids of the zoo's preset {preset!r} alone, not {[s.presets for s in specs]}",
            "give each GridSpec presets=(zoo.preset.name,)",
        )
    committed, out = Path(committed), Path(out)
    if out.resolve() == committed.resolve() or committed.resolve() in out.resolve().parents:
        raise SurgeryBookError(
            f"chapter_grid would write its cells into the committed grid {committed} (out={out})",
            "give an output folder outside it: the committed cells are only read",
        )
    zoos = {preset: zoo_identity(zoo)}
    inline = SubmitOptions(executor="inline")

    def run(spec: GridSpec) -> GridRun:
        return run_grid(spec, out, inline, progress=False, zoos={preset: zoo})

    adopted = sum(adopt_cells(spec, committed, out, zoos) for spec in specs)
    missing = any(not finished(out, cell, spec, zoos[preset]) for spec in specs for cell in plan_cells(spec))
    builds = (
        [reference_build(spec, committed, zoos) for spec in specs] if missing and another_zoo == "reference" else []
    )
    if not builds or None in builds or len({build.zoo for build in builds}) != 1:
        runs = [run(spec) for spec in specs]
        cells = [cell for result in runs for cell in result.cells]
        computed = sum(result.computed for result in runs)
        return ChapterGrid(cell_table(cells), cells, zoo.reference_rows(), adopted, computed, committed)
    import pandas as pd

    reference = dataclasses.replace(builds[0], cells=[cell for build in builds for cell in build.cells])
    theirs = {(r["method"], r["version"], r["seed"]): r for r in reference.cells}
    runs = [run(dataclasses.replace(spec, methods=_sampled(spec, sample), seeds=1)) for spec in specs]
    rows = {}
    for mine in (cell for result in runs for cell in result.cells):
        record = theirs[(mine["method"], mine["version"], mine["seed"])]
        rows[f"{mine['label']}, seed {mine['seed']}"] = {
            "reference build": record["average"],
            "this zoo": mine["average"],
            "difference": mine["average"] - record["average"],
        }
    return ChapterGrid(
        reference.table,
        reference.cells,
        reference.record["reference_rows"],
        adopted,
        sum(result.computed for result in runs),
        committed,
        reference,
        pd.DataFrame.from_dict(rows, orient="index"),
    )


def beyond_the_papers_grid(
    preset: str,
    *,
    output_dir: str | os.PathLike[str],
    device: str = "cpu",
    methods: str = "all",
    surgery: str = "none,1,2",
    seed: int = 0,
    seeds: int = 3,
    surgery_steps: int = 1000,
    deep_surgery_steps: int = 100,
    grid_dir: str | os.PathLike[str] | None = None,
    another_zoo: str = "reference",
    committed_root: str | os.PathLike[str] | None = None,
    tune: str = "auto",
) -> tuple[Zoo, ChapterGrid]:
    """Chapter 07's grid (both of its pages), from the chapter's parameters: every method of ``methods``
    (:func:`~surgery_lib.grid.parse_methods`; with ``tune="validation"`` each followed by its tuned twin, and with
    ``"auto"`` so where every task of the zoo has a validation split) alone and with the ``surgery`` versions,
    over ``seeds`` seeds.

    The committed grid ``<committed_root>/grid-<preset>`` (default: :func:`committed_results`,
    found from the notebooks' folder or the repository's root) is only read (:func:`chapter_grid`): its cells computed
    from this very zoo with these settings are copied into ``grid_dir`` (default
    ``<output_dir>/grid/<zoo weights checksum>``, one folder per zoo, so that cells of an earlier run on another
    zoo are never reused), and the missing ones are computed there.

    Returns:
        The zoo and the :class:`ChapterGrid`.
    """
    zoo = build_zoo(preset, device=device, progress=False)
    if tune == "auto":  # a real-CLIP zoo has a validation split only when asked for one (--validation-images)
        tune = "validation" if all(TUNING_SPLIT in zoo.suite[t].images for t in zoo.tasks) else "none"
    folder = Path(grid_dir) if grid_dir else Path(output_dir) / "grid" / zoo.weights_fingerprint()
    spec = GridSpec(
        presets=(preset,),
        methods=parse_methods(methods, tune),
        versions=parse_versions(surgery),
        seeds=seeds,
        first_seed=seed,
        surgery_steps=surgery_steps,
        deep_surgery_steps=deep_surgery_steps,
        device=device,
    )
    committed = Path(committed_root or committed_results()) / f"grid-{preset}"
    return zoo, chapter_grid(spec, committed, folder, zoo, another_zoo=another_zoo)


def _sampled(spec: GridSpec, sample: Sequence[str]) -> tuple[str, ...]:
    return tuple(method for method in spec.methods if method in sample) or spec.methods[:1]


#: How often a local job checks that the ``grid`` command that started it is still alive, in seconds.
PARENT_POLL_S = 0.5


def _watch_grid(process: tuple[int, float]) -> None:
    """Exit this job as soon as the ``grid`` process ``(pid, create_time)`` is gone (kill -9 leaves submitit's
    local controller and its job running otherwise, for the rest of the grid). The create time tells a
    reused pid from the original process."""
    import psutil

    pid, created = process

    def alive() -> bool:
        try:
            return psutil.Process(pid).create_time() == created
        except psutil.Error:
            return False

    def watch() -> None:
        while alive():
            time.sleep(PARENT_POLL_S)
        os._exit(1)  # cells are written atomically and their locks die with the process

    threading.Thread(target=watch, daemon=True, name="watch-grid").start()


def run_cells(cells: Sequence[Cell], spec: GridSpec, out: str, parent: tuple[int, float] | None = None) -> list[str]:
    """Compute ``cells`` (in one process: the job's), skipping finished ones; returns the cells written.

    Zoos are loaded once per preset and each expert's embeddings once per process, so a job with many
    cells of one preset is cheaper per cell than one job per cell. ``parent`` ``(pid, create_time)``: the
    local ``grid`` process; the job stops when it dies.
    """
    import torch

    if parent is not None:
        _watch_grid(parent)

    if spec.threads:
        torch.set_num_threads(spec.threads)
    written, zoos, identities = [], {}, {}
    for cell in cells:
        path = cell_path(Path(out), cell)
        with entry_lock(path, f"grid cell {cell.name}"):  # a duplicate job (a resubmission) waits, then skips
            if cell.preset not in zoos:
                zoos[cell.preset] = _load_zoo(spec, cell.preset)
                identities[cell.preset] = zoo_identity(zoos[cell.preset])
                record_zoo(zoos[cell.preset], out)
            if finished(Path(out), cell, spec, identities[cell.preset]):
                continue
            record = _compute(zoos[cell.preset], cell, spec)
            write_json(_sealed({**record, **cell_identity(cell, spec, identities[cell.preset])}), path)
            written.append(cell.name)
    return written


def _load_zoo(spec: GridSpec, preset: str) -> Zoo:
    options = spec.setting_options.get(get_preset(preset).setting)
    return build_zoo(preset, device=spec.device, cache_dir=spec.cache_dir, progress=False, options=options)


def _compute(zoo: Zoo, cell: Cell, spec: GridSpec) -> dict[str, Any]:
    """The record of ``cell``: :func:`~surgery_lib.grid.compute_cell` (the engine ``table`` uses too) with the
    grid's schedule, plus where it ran."""
    import torch

    config = SurgeryConfig(steps=spec.steps(cell.version), adam=spec.adam)
    record, _ = compute_cell(zoo, cell.method, cell.version, cell.seed, config=config, device=spec.device)
    return {
        **dataclasses.asdict(cell),
        **record,
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "device": str(spec.device or zoo.preset.default_device),
        "zoo": zoo.weights_fingerprint(),
    }


@dataclass
class SubmitOptions:
    """How the jobs run. ``cells_per_job`` None: local and inline run every cell in ``jobs`` processes
    (default 1, so a 2-core machine is not oversubscribed); Slurm gets one job per cell."""

    executor: str = "local"
    jobs: int = 1
    cells_per_job: int | None = None
    timeout_min: int = 60
    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    mem_gb: int | None = None
    array_parallelism: int = 64
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise SurgeryBookError(f"unknown executor {self.executor!r}", f"use one of: {', '.join(EXECUTORS)}")
        if self.jobs < 1 or (self.cells_per_job is not None and self.cells_per_job < 1) or self.timeout_min < 1:
            raise SurgeryBookError(
                "--jobs, --cells-per-job and --timeout-min must be 1 or more", "pass positive numbers"
            )
        # Checked here, not left to sbatch: a falsy 0 would be dropped silently and -5 sent as "--mem=-5GB".
        slurm = {
            "--cpus-per-job": self.cpus_per_job,
            "--mem-gb": self.mem_gb,
            "--array-parallelism": self.array_parallelism,
        }
        for flag, value in slurm.items():
            if value is not None and value < 1:
                raise SurgeryBookError(
                    f"{flag} {value} is less than 1",
                    f"pass {flag} 1 or more, or leave it out for the default",
                )
        if self.gpus_per_job < 0:
            raise SurgeryBookError(f"--gpus-per-job {self.gpus_per_job} is negative", "pass 0 or more GPUs per job")


def batches(cells: Sequence[Cell], submit: SubmitOptions) -> list[list[Cell]]:
    """The cells of each job: ``cells_per_job`` consecutive cells each, or (local/inline by default)
    ``jobs`` round-robin shares, so every job sees every preset's cells in order."""
    if not cells:
        return []
    if submit.cells_per_job is None and submit.executor == "slurm":
        size = 1
    elif submit.cells_per_job is None:
        count = min(submit.jobs, len(cells))
        return [list(cells[i::count]) for i in range(count)]
    else:
        size = submit.cells_per_job
    return [list(cells[i : i + size]) for i in range(0, len(cells), size)]


def _executor(out: Path, submit: SubmitOptions):
    """The submitit executor of ``submit.executor``, built directly (submitit's AutoExecutor needs the
    ``pkg_resources`` module that current setuptools no longer ships)."""
    import submitit

    folder = out / "submitit" / "%j"
    if submit.executor == "slurm":
        executor = submitit.SlurmExecutor(folder=folder)
        parameters: dict[str, Any] = {
            "time": submit.timeout_min,
            "job_name": "surgery-book-grid",
            "array_parallelism": submit.array_parallelism,
        }
        if submit.gpus_per_job:
            parameters["gpus_per_node"] = submit.gpus_per_job
        if submit.partition:
            parameters["partition"] = submit.partition
        if submit.cpus_per_job:
            parameters["cpus_per_task"] = submit.cpus_per_job
        if submit.mem_gb:
            parameters["mem"] = f"{submit.mem_gb}GB"
    else:
        executor, parameters = submitit.LocalExecutor(folder=folder), {"timeout_min": submit.timeout_min}
    parameters.update(submit.extra)
    executor.update_parameters(**parameters)
    return executor


def _kill_local_jobs(jobs: Sequence[Any]) -> None:
    """Stop submitit's local jobs with their whole process tree (controller and task), with SIGKILL.

    submitit's own ``cancel`` sends SIGINT to the controller, which a controller that inherited an ignored SIGINT
    never sees (the whole local grid then ran on after the command was stopped: seen under ``make test`` started
    in the background), and its tasks bypass SIGTERM on purpose (Slurm sends it before preemption). SIGKILL is
    safe here: cells are written atomically and their locks die with the process.
    """
    import psutil

    for job in jobs:
        try:
            controller = psutil.Process(int(job.job_id))
            tree = [*controller.children(recursive=True), controller]
        except (psutil.Error, ValueError):
            continue  # already finished
        for process in tree:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(tree, timeout=10)


def _claim_folder(out: Path, spec: GridSpec) -> None:
    """Record ``spec``'s settings in ``out/grid.json``, or refuse a folder that holds a grid with others."""
    path = out / "grid.json"
    if path.exists():
        try:
            recorded = read_json(path)
        except CorruptFileError:
            recorded = None
        if isinstance(recorded, dict) and recorded.get("settings") != spec.settings():
            raise SurgeryBookError(
                f"{out} holds a grid computed with other settings ({recorded.get('settings')}, not {spec.settings()})",
                "pass another --out, or the same --surgery-steps and --deep-surgery-steps as before",
            )
    out.mkdir(parents=True, exist_ok=True)
    described = {k: v for k, v in dataclasses.asdict(spec).items() if k != "setting_options"}
    write_json({"settings": spec.settings(), "spec": described}, path)


@dataclass
class GridRun:
    """A finished :func:`run_grid`: the table, the folder's cell records, and what this run computed."""

    table: pd.DataFrame
    cells: list[dict[str, Any]]
    computed: int
    seconds: float
    files: list[Path]


def _this_process() -> tuple[int, float]:
    import psutil

    return os.getpid(), psutil.Process().create_time()


class _Identities(dict):
    """Preset -> :func:`zoo_identity`, loading a preset's zoo only when a cell file needs vouching for."""

    def __init__(self, spec: GridSpec, zoos: Mapping[str, Zoo] | None) -> None:
        super().__init__({preset: zoo_identity(zoo) for preset, zoo in (zoos or {}).items()})
        self.spec = spec

    def __missing__(self, preset: str) -> dict[str, str]:
        self[preset] = zoo_identity(_load_zoo(self.spec, preset))
        return self[preset]

    def done(self, out: Path, cell: Cell) -> bool:
        # A cell without a file needs no zoo: the first run of a grid does not load one in this process.
        return cell_path(out, cell).is_file() and finished(out, cell, self.spec, self[cell.preset])


def run_grid(
    spec: GridSpec,
    out: str | os.PathLike[str],
    submit: SubmitOptions | None = None,
    *,
    progress: bool = True,
    zoos: Mapping[str, Zoo] | None = None,
) -> GridRun:
    """Compute every cell of ``spec`` that ``out`` does not hold yet through submitit, then collect the table.

    A cell file is reused only if it vouches for itself (:func:`vouched_record`): same cell, settings, preset
    hash, zoo folder and weights, unedited; any other is computed again. To check that, this process loads
    the zoo of a preset whose cell files exist (pass ``zoos``, preset -> loaded zoo, to reuse one).

    Raises:
        SurgeryBookError: a folder holding other settings, an unknown executor, failed jobs (naming
            their cells and logs; the finished cells are kept, so the same command resumes), or a cell
            overwritten meanwhile by a run on another zoo.
        KeyboardInterrupt, SystemExit: an interruption; local jobs are cancelled, Slurm jobs run on.
    """
    submit = submit or SubmitOptions()
    if submit.executor == "slurm" and shutil.which("sbatch") is None:  # before anything is written or loaded
        raise SurgeryBookError(
            "--executor slurm needs Slurm's sbatch, which is not on this machine's PATH",
            "run the command on a Slurm login node, or use --executor local",
        )
    if spec.device is not None:  # a typo or a missing GPU failed every job; a Slurm node may have a GPU this one lacks
        resolve_device(spec.device, here=submit.executor != "slurm")
    out = Path(out)
    started = time.perf_counter()
    _claim_folder(out, spec)
    identities = _Identities(spec, zoos)
    todo = [cell for cell in plan_cells(spec) if not identities.done(out, cell)]
    jobs = batches(todo, submit)
    failures: list[tuple[list[Cell], Any, BaseException]] = []
    computed = 0  # cells this command's jobs wrote: another run sharing the folder may write some of ``todo``
    if (
        jobs and submit.executor == "inline"
    ):  # this process, cell by cell (submitit's debug executor would open pdb on errors)
        for batch in tqdm(jobs, desc="grid (inline)", unit="job", disable=not progress):
            try:
                computed += len(run_cells(batch, spec, str(out)))
            except Exception as exc:  # noqa: BLE001  (reported below with the cells it left unfinished)
                failures.append((batch, None, exc))
    elif jobs:
        executor = _executor(out, submit)
        # Local jobs stop with this process even when it is killed with SIGKILL; Slurm jobs run on by design.
        parent = _this_process() if submit.executor == "local" else None
        submitted = executor.map_array(
            run_cells, jobs, [spec] * len(jobs), [str(out)] * len(jobs), [parent] * len(jobs)
        )
        import submitit

        bar = tqdm(total=len(todo), desc=f"grid ({submit.executor})", unit="cell", disable=not progress)
        try:
            with bar:
                for job in submitit.helpers.as_completed(submitted):
                    batch = jobs[submitted.index(job)]
                    try:
                        computed += len(job.result())
                    except Exception as exc:  # noqa: BLE001  (submitit re-raises the job's error with its traceback)
                        failures.append((batch, job, exc))
                    bar.update(len(batch))
        except BaseException:
            # Ctrl-C or SIGTERM: local jobs are this machine's processes and stop with the command (finished
            # cells are kept); Slurm jobs run on, and the same command collects them later.
            if submit.executor == "local":
                _kill_local_jobs(submitted)
            raise
    if failures:
        names = ", ".join(cell.name for batch, _, _ in failures for cell in batch if not identities.done(out, cell))
        exc = failures[0][2]
        first = f"{type(exc).__name__}: {exc}" if submit.executor == "inline" else job_error_line(str(exc))
        logs = "" if submit.executor == "inline" else f"read the job logs in {out / 'submitit'}, "
        raise SurgeryBookError(
            f"{len(failures)} grid job(s) failed; unfinished cells: {names}. First error: {first}",
            f"{logs}fix the cause and run the same command again (finished cells are kept)",
        )
    cells = []
    for cell in plan_cells(spec):
        record = vouched_record(cell_path(out, cell), cell_identity(cell, spec, identities[cell.preset]))
        if record is None:
            raise SurgeryBookError(
                f"the cell {cell.name} in {out} is missing or was not computed from this zoo with these settings "
                "(another run on another zoo or preset wrote to the same folder meanwhile)",
                "give each grid its own --out and run the command again (it recomputes that cell)",
            )
        cells.append(record)
    table = grid_table(cells)
    files = write_grid_table(table, out / "table")
    return GridRun(table, cells, computed, time.perf_counter() - started, files)


#: A traceback's exception line: an optional module path, then a name ending as exception names do.
_EXCEPTION_LINE = re.compile(r"(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit))(?:: (.*))?")


def job_error_line(message: str) -> str:
    """The error a failed job raised, in one line, from submitit's message for it (the job's traceback, then
    the paths of its logs): the last exception line of the traceback, the project's own errors without their
    class name; the message's last line if it holds none."""
    lines = message.strip().splitlines() or ["(no message)"]
    for line in reversed(lines):
        match = _EXCEPTION_LINE.fullmatch(line.strip())
        if match:
            name, text = match.groups()
            return text if name == SurgeryBookError.__name__ and text else f"{name}: {text}" if text else name
    return lines[-1].strip()


#: The table of a grid's cell records: one summariser for ``grid`` and ``table`` (:func:`~surgery_lib.grid.cell_table`).
grid_table = cell_table


def write_grid_table(table: pd.DataFrame, stem: Path) -> list[Path]:
    """``<stem>.csv`` (four decimals), ``.md`` (:func:`~surgery_lib.grid.readable_grid`) and ``.json`` (NaN as
    null), atomically."""
    shown = readable_grid(table).reset_index()
    return list(write_table(table, stem, decimals=4, markdown=shown, records=True))
