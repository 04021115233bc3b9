"""The grid as jobs: planning, batching, submitit's local executor, resuming after an interruption with
identical numbers, a folder that refuses other settings, failed jobs reported by cell, and which cells of a
committed grid a chapter may read."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import psutil
import pytest
import torch

from surgery_lib.cli import main
from surgery_lib.cluster import (
    Cell,
    GridSpec,
    SubmitOptions,
    adopt_cells,
    batches,
    beyond_the_papers_grid,
    cell_identity,
    cell_path,
    chapter_grid,
    committed_results,
    job_error_line,
    plan_cells,
    reference_build,
    run_grid,
    vouched_record,
    zoo_identity,
    zoo_record_path,
)
from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.storage import config_hash, read_json, write_json
from surgery_lib.merging import MERGE_METHODS, MergeMethod
from surgery_lib.presets import PRESETS, get_preset

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: Numbers only: where and how fast a cell ran differs between runs.
MACHINE_COLUMNS = {"seconds", "peak_rss_mib", "peak_gpu_gib"}
COMMITTED_MINI_GRID = Path(__file__).resolve().parents[1] / "notebooks" / "results" / "grid-mini"


def test_cells_cover_seeds_only_where_they_change_the_result():
    spec = GridSpec(presets=("smoke",), methods=("task_arithmetic", "dare_ties"), versions=(0, 1, 2), seeds=3)
    cells = plan_cells(spec)
    # task arithmetic alone is deterministic: 1 cell; DARE draws its drops from the seed: 3; surgery: 3 each.
    assert sum(c.method == "task_arithmetic" and c.version == 0 for c in cells) == 1
    assert sum(c.method == "dare_ties" and c.version == 0 for c in cells) == 3
    assert len(cells) == 1 + 3 + 2 * 2 * 3
    assert len({c.name for c in cells}) == len(cells)


def test_jobs_get_round_robin_shares_locally_and_one_cell_each_on_slurm():
    cells = [Cell("smoke", "task_arithmetic", v, s) for v in (1, 2) for s in range(3)]
    assert [len(b) for b in batches(cells, SubmitOptions(jobs=4))] == [2, 2, 1, 1]
    assert batches(cells, SubmitOptions(jobs=1)) == [cells]
    assert [len(b) for b in batches(cells, SubmitOptions(executor="slurm"))] == [1] * 6
    assert [len(b) for b in batches(cells, SubmitOptions(executor="slurm", cells_per_job=4))] == [4, 2]
    with pytest.raises(SurgeryBookError, match="unknown executor"):
        SubmitOptions(executor="kubernetes")
    for resources in ({"cpus_per_job": 0}, {"mem_gb": -5}, {"array_parallelism": 0}):  # sbatch's "-5GB" before
        with pytest.raises(SurgeryBookError, match="is less than 1"):
            SubmitOptions(executor="slurm", **resources)
    with pytest.raises(SurgeryBookError, match="--gpus-per-job -1 is negative"):
        SubmitOptions(executor="slurm", gpus_per_job=-1)


def _grid_command(out, cache_dir):
    return [
        sys.executable,
        "-m",
        "surgery_lib",
        "grid",
        "--presets",
        "smoke",
        "--methods",
        "task_arithmetic,tsv,dare_ties",
        "--surgery",
        "none,1,2",
        "--seeds",
        "2",
        "--surgery-steps",
        "100",
        "--deep-surgery-steps",
        "150",
        "--out",
        str(out),
        "--cache-dir",
        str(cache_dir),
        "--executor",
        "local",
        "--jobs",
        "1",
        "--threads",
        "1",
        "--quiet",
    ]


def _numbers(out):
    return [
        {k: v for k, v in row.items() if k not in MACHINE_COLUMNS}
        for row in json.loads((out / "table.json").read_text())
    ]


@pytest.mark.heavy
def test_an_interrupted_local_grid_resumes_to_the_same_numbers(smoke_zoo, cache_dir, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(_grid_command(reference, cache_dir), env=ONE_THREAD, check=True, capture_output=True, timeout=600)
    cells = list((reference / "cells").glob("*.json"))
    assert (
        len(cells) == 3 + 2 * 3 * 2 + 1
    )  # alone: task arithmetic, TSV-M, DARE x 2 seeds; surgery: 3 methods x 2 versions x 2 seeds

    interrupted = tmp_path / "interrupted"
    run = subprocess.Popen(
        _grid_command(interrupted, cache_dir),
        env=ONE_THREAD,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not list((interrupted / "cells").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    jobs = psutil.Process(run.pid).children(recursive=True)
    run.send_signal(signal.SIGTERM)  # what Slurm, timeout and docker stop send
    run.communicate(timeout=120)
    _, alive = psutil.wait_procs(jobs, timeout=60)
    assert not alive, "a grid job outlived the interrupted command"
    done = len(list((interrupted / "cells").glob("*.json")))
    # SurgeryV2 cells take seconds each, so the grid is far from done when the first cell appears.
    assert 1 <= done < len(cells), f"the interruption came after {done} of {len(cells)} cells"

    resumed = subprocess.run(
        _grid_command(interrupted, cache_dir), env=ONE_THREAD, check=True, capture_output=True, text=True, timeout=600
    )
    assert f"{len(cells) - done} cells computed" in resumed.stdout
    assert _numbers(interrupted) == _numbers(reference)
    record = json.loads(cell_path(interrupted, Cell("smoke", "tsv", 1, 1)).read_text())
    assert record["seconds"] > 0 and record["peak_rss_mib"] > 0 and record["threads"] == 1 and record["steps"] == 100


@pytest.mark.heavy
def test_local_jobs_stop_when_the_grid_command_is_killed_outright(smoke_zoo, cache_dir, tmp_path):
    out = tmp_path / "killed"
    command = [
        *_grid_command(out, cache_dir),
        "--surgery-steps",
        "5000",
        "--deep-surgery-steps",
        "5000",
    ]  # minutes of work left
    run = subprocess.Popen(command, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((out / "cells").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    jobs = psutil.Process(run.pid).children(recursive=True)
    assert jobs, "the grid started no local job"
    run.kill()  # SIGKILL: no handler runs, nothing cancels the jobs
    run.wait(timeout=60)
    _, alive = psutil.wait_procs(jobs, timeout=15)
    for process in alive:
        process.kill()
    assert not alive, f"{len(alive)} local job process(es) outlived the killed grid command"


def test_a_finished_grid_is_reused_and_other_settings_are_refused(smoke_zoo, cache_dir, tmp_path, capsys):
    spec = GridSpec(
        presets=("smoke",),
        methods=("task_arithmetic",),
        versions=(0, 1),
        seeds=1,
        surgery_steps=10,
        cache_dir=str(cache_dir),
    )
    first = run_grid(spec, tmp_path, SubmitOptions(executor="inline"), progress=False)
    again = run_grid(spec, tmp_path, SubmitOptions(executor="inline"), progress=False)
    assert (first.computed, again.computed) == (2, 0)
    # Cells another run sharing the folder finished after this one planned them: its jobs skip them under
    # their locks, and it reports them as reused, not as computed.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("surgery_lib.cluster._Identities.done", lambda self, out, cell: False)
        assert run_grid(spec, tmp_path, SubmitOptions(executor="inline"), progress=False).computed == 0
    assert again.table.equals(first.table)
    assert {p.suffix for p in first.files} == {".csv", ".md", ".json"}
    other = [
        "grid",
        "--presets",
        "smoke",
        "--methods",
        "task_arithmetic",
        "--surgery",
        "none,1",
        "--seeds",
        "1",
        "--surgery-steps",
        "20",
        "--out",
        str(tmp_path),
        "--cache-dir",
        str(cache_dir),
        "--executor",
        "inline",
        "--quiet",
    ]
    assert main(other) == 2
    assert "holds a grid computed with other settings" in capsys.readouterr().err


def test_failed_jobs_name_their_cells_and_keep_the_finished_ones(smoke_zoo, cache_dir, tmp_path):
    def fail(*args):
        raise RuntimeError("this method always fails")

    MERGE_METHODS.register("always_fails", MergeMethod("always_fails", "always fails", fail))
    try:
        spec = GridSpec(
            presets=("smoke",), methods=("task_arithmetic", "always_fails"), versions=(0,), cache_dir=str(cache_dir)
        )
        with pytest.raises(SurgeryBookError, match="unfinished cells: smoke__always_fails__v0__s0.*always fails"):
            run_grid(spec, tmp_path, SubmitOptions(executor="inline", cells_per_job=1), progress=False)
    finally:
        del MERGE_METHODS["always_fails"]
    assert cell_path(tmp_path, Cell("smoke", "task_arithmetic", 0)).is_file()


def _submitit_failure(error: BaseException) -> str:
    """The message submitit's ``job.result()`` raises for a job that raised ``error``: its traceback, then the
    paths of its logs (the layout of ``submitit.core.core.Job.exception``)."""
    try:
        raise error
    except BaseException:
        trace = traceback.format_exc()
    return (
        f"Job (task=0) failed during processing with trace:\n----------------------\n{trace}\n"
        "----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n"
        "  - /grid/submitit/7/7_0_log.err\n  - /grid/submitit/7/7_0_log.out"
    )


def test_a_failed_local_job_is_reported_by_its_error_not_by_a_log_path():
    ours = SurgeryBookError("tsv_tuned needs a validation split", "give the suite one")
    assert job_error_line(_submitit_failure(ours)) == "tsv_tuned needs a validation split. Fix: give the suite one."
    assert job_error_line(_submitit_failure(RuntimeError("out of memory"))) == "RuntimeError: out of memory"
    assert job_error_line(_submitit_failure(KeyboardInterrupt())) == "KeyboardInterrupt"
    assert job_error_line("killed by the scheduler\n") == "killed by the scheduler"


def test_a_tuned_method_on_a_preset_without_a_validation_split_fails_before_any_job(tmp_path, monkeypatch):
    smoke = get_preset("smoke")
    bare = dataclasses.replace(smoke, name="smoke-bare", suite=dataclasses.replace(smoke.suite, validation_per_task=0))
    monkeypatch.setitem(PRESETS, bare.name, bare)
    GridSpec(presets=(bare.name,), methods=("tsv",))  # the fixed-value method needs none
    with pytest.raises(SurgeryBookError, match="tsv_tuned chooses its hyper-parameters on labelled validation"):
        GridSpec(presets=("smoke", bare.name), methods=("tsv", "tsv_tuned"))
    out = tmp_path / "grid"
    assert main(["grid", "--presets", bare.name, "--methods", "tsv", "--tune", "validation", "--out", str(out)]) == 2
    assert not out.exists()


def test_partial_rank_correlation_removes_what_the_control_explains():
    import pandas as pd

    from surgery_lib.evaluation import partial_rank_correlation

    control = pd.Series(range(10), dtype=float)
    # x and y both follow the control: they correlate perfectly, but nothing is left once it is held fixed.
    x, y = control * 2, control**3
    assert x.corr(y, method="spearman") == pytest.approx(1.0)
    assert partial_rank_correlation(x, y, control) != partial_rank_correlation(
        x, y, control
    )  # NaN: no residual variance
    # x = control + 0.6 [1, -1, 1, ...] swaps each pair of ranks: what is left beyond the control is the swap.
    wiggle = pd.Series([1.0, -1.0] * 5)
    assert partial_rank_correlation(control + 0.6 * wiggle, control + 0.7 * wiggle, control) == pytest.approx(1.0)
    assert (
        partial_rank_correlation(control + 0.6 * wiggle, control - 0.6 * wiggle, control) < -0.8
    )  # the opposite swaps


def test_the_first_seed_shifts_every_seeded_cell():
    spec = GridSpec(presets=("smoke",), methods=("task_arithmetic",), versions=(0, 1), seeds=2, first_seed=5)
    assert [(c.version, c.seed) for c in plan_cells(spec)] == [(0, 5), (1, 5), (1, 6)]


def _identity(record):
    return {key: record[key] for key in ("preset_hash", "zoo_folder", "zoo")}


def test_cells_of_another_zoo_or_other_settings_are_not_adopted(tmp_path):
    spec = GridSpec(
        presets=("mini",),
        methods=("task_arithmetic",),
        versions=(0,),
        seeds=1,
        surgery_steps=1000,
        deep_surgery_steps=100,
    )
    record = read_json(cell_path(COMMITTED_MINI_GRID, Cell("mini", "task_arithmetic", 0)))
    identity = _identity(record)
    for changed in ("zoo", "zoo_folder", "preset_hash"):
        assert adopt_cells(spec, COMMITTED_MINI_GRID, tmp_path / changed, {"mini": {**identity, changed: "other"}}) == 0
    other = GridSpec(
        presets=("mini",),
        methods=("task_arithmetic",),
        versions=(0,),
        seeds=1,
        surgery_steps=999,
        deep_surgery_steps=100,
    )
    assert adopt_cells(other, COMMITTED_MINI_GRID, tmp_path / "other-settings", {"mini": identity}) == 0
    assert adopt_cells(spec, COMMITTED_MINI_GRID, tmp_path / "same", {"mini": identity}) == 1
    assert read_json(cell_path(tmp_path / "same", Cell("mini", "task_arithmetic", 0))) == record

    edited = tmp_path / "edited"
    (edited / "cells").mkdir(parents=True)
    write_json({**record, "average": 99.0}, cell_path(edited, Cell("mini", "task_arithmetic", 0)))
    assert adopt_cells(spec, edited, tmp_path / "from-edited", {"mini": identity}) == 0


@pytest.mark.parametrize("folder", ["grid-mini", "grid-mini-per-task"])
def test_every_committed_cell_vouches_for_itself(folder):
    """The chapters adopt these files: each must carry its own cell, its folder's settings and an intact digest."""
    source = COMMITTED_MINI_GRID.parent / folder
    settings = read_json(source / "grid.json")["settings"]
    spec = GridSpec(
        presets=("mini",),
        methods=("task_arithmetic",),
        surgery_steps=settings["surgery_steps"],
        deep_surgery_steps=settings["deep_surgery_steps"],
        adam=settings["adam"],
    )
    assert spec.settings() == settings
    paths = sorted((source / "cells").glob("*.json"))
    assert paths
    for path in paths:
        record = read_json(path)
        cell = Cell(record["preset"], record["method"], record["version"], record["seed"])
        assert cell_path(source, cell) == path
        assert vouched_record(path, cell_identity(cell, spec, _identity(record))) == record, path.name


def test_a_cell_file_that_cannot_vouch_for_itself_is_computed_again(smoke_zoo, cache_dir, tmp_path):
    spec = GridSpec(presets=("smoke",), methods=("task_arithmetic", "ties"), versions=(0,), cache_dir=str(cache_dir))
    inline = SubmitOptions(executor="inline")
    first = run_grid(spec, tmp_path, inline, progress=False)
    ta, ties = (cell_path(tmp_path, Cell("smoke", m, 0)) for m in ("task_arithmetic", "ties"))
    assert first.computed == 2

    measured = ["seconds", "peak_rss_mib", "peak_gpu_gib"]  # what a recomputed cell measures afresh

    def rerun():
        again = run_grid(spec, tmp_path, inline, progress=False)
        assert again.table.drop(columns=measured).equals(first.table.drop(columns=measured))
        return again.computed

    record = read_json(ta)
    write_json({**record, "average": 99.0}, ta)  # edited numbers
    assert rerun() == 1
    ta.write_bytes(ties.read_bytes())  # another cell's file under this cell's name
    assert rerun() == 1
    forged = {**read_json(ta), "zoo": "0" * 12}  # another zoo's cell, its digest recomputed to match
    write_json({**forged, "digest": config_hash({k: v for k, v in forged.items() if k != "digest"})}, ta)
    assert rerun() == 1
    assert rerun() == 0

    # Without grid.json a rerun with another schedule is not refused, and still reuses nothing computed under the old one.
    (tmp_path / "grid.json").unlink()
    other = GridSpec(
        presets=("smoke",),
        methods=("task_arithmetic", "ties"),
        versions=(0,),
        surgery_steps=20,
        cache_dir=str(cache_dir),
    )
    assert run_grid(other, tmp_path, inline, progress=False).computed == 2


def _reseal(path, **changes):
    record = {**read_json(path), **changes}
    write_json({**record, "digest": config_hash({k: v for k, v in record.items() if k != "digest"})}, path)


def test_the_committed_grid_is_a_reference_build_on_another_build_of_its_zoo_only(tmp_path):
    """Another processor builds the same recipe into other weights: its chapters show the committed cells as the
    reference build's, and only when every cell is there, unedited, from one build, with that build's zoo record."""
    grid = read_json(COMMITTED_MINI_GRID / "grid.json")
    spec = GridSpec(
        **{
            **grid["spec"],
            "presets": tuple(grid["spec"]["presets"]),
            "methods": tuple(grid["spec"]["methods"]),
            "versions": tuple(grid["spec"]["versions"]),
        }
    )
    sample = read_json(cell_path(COMMITTED_MINI_GRID, Cell("mini", "task_arithmetic", 0)))
    built_here = _identity(sample)
    elsewhere = {**built_here, "zoo": "another0zoo0"}

    reference = reference_build(spec, COMMITTED_MINI_GRID, {"mini": elsewhere})
    assert reference is not None and reference.zoo == built_here["zoo"]
    assert len(reference.cells) == len(plan_cells(spec)) == len(list((COMMITTED_MINI_GRID / "cells").glob("*.json")))
    assert set(reference.record["reference_rows"]) == {"pretrained + probe", "individual (expert)", "traditional MTL"}
    assert reference.table.loc[("mini", "task arithmetic"), "average"] == pytest.approx(sample["average"])
    assert reference_build(spec, COMMITTED_MINI_GRID, {"mini": built_here}) is None  # this zoo's: adopted instead
    for changed in ("zoo_folder", "preset_hash"):  # another recipe or preset
        assert reference_build(spec, COMMITTED_MINI_GRID, {"mini": {**elsewhere, changed: "other"}}) is None
    other_schedule = dataclasses.replace(spec, surgery_steps=999)
    assert reference_build(other_schedule, COMMITTED_MINI_GRID, {"mini": elsewhere}) is None

    def broken(name, damage):
        copy = tmp_path / name
        shutil.copytree(COMMITTED_MINI_GRID, copy)
        damage(copy)
        return reference_build(spec, copy, {"mini": elsewhere})

    ta = Cell("mini", "task_arithmetic", 0)
    assert broken("edited", lambda d: write_json({**sample, "average": 99.0}, cell_path(d, ta))) is None
    assert broken("missing", lambda d: cell_path(d, ta).unlink()) is None
    assert broken("two-builds", lambda d: _reseal(cell_path(d, ta), zoo="third0build0")) is None
    assert broken("no-zoo-record", lambda d: zoo_record_path(d, built_here, "mini").unlink()) is None
    assert broken("untouched", lambda d: None) is not None


def test_a_chapter_shows_a_reference_build_and_recomputes_only_its_sample(smoke_zoo, cache_dir, tmp_path):
    spec = GridSpec(presets=("smoke",), methods=("task_arithmetic", "ties"), versions=(0, 1), cache_dir=str(cache_dir))
    committed = tmp_path / "committed"
    first = chapter_grid(spec, tmp_path / "nothing", committed, smoke_zoo)
    assert first.reference is None and first.computed == 4 and first.adopted == 0
    assert first.reference_rows == smoke_zoo.reference_rows()
    # The same cells as another build of this zoo would have left them: another weights checksum, resealed.
    built_here = zoo_identity(smoke_zoo)
    for path in [*(committed / "cells").glob("*.json"), zoo_record_path(committed, built_here, "smoke")]:
        _reseal(path, zoo="another0zoo0")
    zoo_record_path(committed, built_here, "smoke").rename(
        zoo_record_path(committed, {**built_here, "zoo": "another0zoo0"}, "smoke")
    )
    before = {path: path.read_bytes() for path in committed.rglob("*") if path.is_file()}

    shown = chapter_grid(spec, committed, tmp_path / "shown", smoke_zoo)
    assert shown.reference is not None and shown.reference.zoo == "another0zoo0"
    assert shown.computed == 2 and list(shown.sample.index) == [
        "task arithmetic, seed 0",
        "task arithmetic + Surgery, seed 0",
    ]
    assert (shown.sample["difference"] == 0).all()  # the same numbers under another checksum
    numbers = [*smoke_zoo.tasks, "average", "bias"]
    assert shown.table[numbers].equals(first.table[numbers])
    assert "reference build" in shown.describe() and "2 recomputed here" in shown.describe()
    assert {path: path.read_bytes() for path in committed.rglob("*") if path.is_file()} == before

    everything = chapter_grid(spec, committed, tmp_path / "all", smoke_zoo, another_zoo="compute")
    assert everything.reference is None and everything.computed == 4 and everything.sample is None
    with pytest.raises(SurgeryBookError, match="another_zoo='sometimes' is not a choice"):
        chapter_grid(spec, committed, tmp_path / "bad", smoke_zoo, another_zoo="sometimes")
    for inside in (committed, committed / "cells" / "mine"):  # the committed cells are inputs only
        with pytest.raises(SurgeryBookError, match="would write its cells into the committed grid"):
            chapter_grid(spec, committed, inside, smoke_zoo, another_zoo="compute")
    assert {path: path.read_bytes() for path in committed.rglob("*") if path.is_file()} == before


def test_chapter_07s_grid_from_its_parameters_reads_the_committed_cells_into_a_folder_per_zoo(
    smoke_zoo, cache_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("SURGERY_BOOK_CACHE", str(cache_dir))  # where the chapter's build_zoo finds the smoke zoo
    chapter = dict(methods="task_arithmetic,ties,task_arithmetic", surgery="none,1", seeds=1, tune="none")
    committed = tmp_path / "results" / "grid-smoke"
    _, first = beyond_the_papers_grid(  # the committed grid, computed as chapter 07 would
        "smoke", output_dir=tmp_path, grid_dir=committed, committed_root=tmp_path / "nowhere", **chapter
    )
    assert (first.adopted, first.computed) == (0, 4)

    zoo, shown = beyond_the_papers_grid(
        "smoke", output_dir=tmp_path / "out", committed_root=tmp_path / "results", **chapter
    )
    assert zoo.weights_fingerprint() == smoke_zoo.weights_fingerprint()
    assert (shown.adopted, shown.computed, len(shown.cells)) == (4, 0, 4)  # the repeated name is one method
    assert sorted(shown.table.loc["smoke"]["method"].unique()) == ["task_arithmetic", "ties"]
    assert (tmp_path / "out" / "grid" / zoo.weights_fingerprint() / "cells").is_dir()
    assert shown.describe(threads=True).endswith(f"with torch {torch.get_num_threads()} thread(s) on cpu")
    _, more = beyond_the_papers_grid(
        "smoke", output_dir=tmp_path / "out", committed_root=tmp_path / "nowhere", **{**chapter, "seeds": 2}
    )
    assert (more.adopted, more.computed, len(more.cells)) == (0, 2, 6)  # one more seed of each surgery cell


def test_chapter_07_adds_the_tuned_twins_where_the_zoo_has_a_validation_split(
    smoke_zoo, cache_dir, tmp_path, monkeypatch
):
    import dataclasses

    from surgery_lib import cluster
    from surgery_lib.core.taskdata import Suite

    monkeypatch.setenv("SURGERY_BOOK_CACHE", str(cache_dir))
    chapter = dict(methods="task_arithmetic,ties", surgery="none", seeds=1, committed_root=tmp_path / "nowhere")
    _, auto = beyond_the_papers_grid("smoke", output_dir=tmp_path / "auto", **chapter)
    assert list(auto.table.loc["smoke"]["method"]) == ["task_arithmetic", "task_arithmetic_tuned", "ties"]
    tasks = {
        t: dataclasses.replace(d, images={s: x for s, x in d.images.items() if s != "validation"})
        for t, d in smoke_zoo.suite.tasks.items()
    }
    without = dataclasses.replace(smoke_zoo, suite=Suite(smoke_zoo.suite.config, tasks, smoke_zoo.suite.mix))
    monkeypatch.setattr(cluster, "build_zoo", lambda *args, **kwargs: without)  # a real-CLIP zoo without one
    _, fixed = beyond_the_papers_grid("smoke", output_dir=tmp_path / "fixed", **chapter)
    assert list(fixed.table.loc["smoke"]["method"]) == ["task_arithmetic", "ties"]


def test_a_name_given_twice_is_one_grid_axis_entry_and_an_empty_axis_is_an_error():
    spec = GridSpec(presets=("smoke", "smoke"), methods=("ties", "task_arithmetic", "ties"), versions=(0, 1, 0))
    assert spec.presets == ("smoke",) and spec.methods == ("ties", "task_arithmetic") and spec.versions == (0, 1)
    with pytest.raises(SurgeryBookError, match=r"invalid grid: presets \[\].*--presets mini"):
        GridSpec(presets=(), methods=("ties",))
    assert main(["grid", "--presets", ",", "--methods", "ties", "--out", "unused"]) == 2
    with pytest.raises(SurgeryBookError, match=r"an empty grid: methods \[\], versions \[0\]"):
        GridSpec(presets=("smoke",), methods=(), versions=(0,))


def test_the_librarys_grid_counts_a_method_given_twice_once(smoke_zoo):
    """surgery_grid computed a repeated method's cells twice and reported a std of 0 for its one seed."""
    from surgery_lib.grid import surgery_grid

    grid = surgery_grid(smoke_zoo, ["task_arithmetic", "task_arithmetic"], (0, 0), 1, progress=False)
    assert list(grid.table.index[-1:]) == ["task arithmetic"] and math.isnan(grid.table.loc["task arithmetic", "std"])
    refused = [
        ([], (0,), r"an empty grid: methods \[\]"),  # was: the reference rows alone
        (["ties"], (), r"versions \[\]"),
        ("ties", (0,), r"methods='ties' is a string, not a list"),  # was: "unknown merging method 't'"
        (["ties"], (3,), r"unknown surgery versions \[3\]"),
    ]
    for methods, versions, problem in refused:
        with pytest.raises(SurgeryBookError, match=problem):
            surgery_grid(smoke_zoo, methods, versions, 1, progress=False)


def test_table_and_grid_compute_a_cell_with_one_engine(smoke_zoo, cache_dir, tmp_path):
    """The same (method, version, seed) through `surgery-book table` (surgery_grid) and `surgery-book grid`
    (run_grid): DARE draws its drops from the seed, so a merge per seed in both, and the same schedule."""
    from surgery_lib.grid import surgery_grid
    from surgery_lib.surgery.v1 import SurgeryConfig

    methods, versions = ("dare_task_arithmetic", "task_arithmetic"), (0, 1, 2)
    table = surgery_grid(
        smoke_zoo,
        methods,
        versions,
        seeds=2,
        first_seed=3,
        repaired=None,
        reference_rows=False,
        config=SurgeryConfig(steps=6),
        device="cpu",
        progress=False,
    ).table
    spec = GridSpec(
        presets=("smoke",),
        methods=methods,
        versions=versions,
        seeds=2,
        first_seed=3,
        surgery_steps=6,
        device="cpu",
        cache_dir=str(cache_dir),
    )
    grid = run_grid(spec, tmp_path, SubmitOptions(executor="inline"), progress=False).table.loc["smoke"]
    assert list(table.index) == list(grid.index) and len(table) == 6
    columns = [*smoke_zoo.tasks, "average", "std", "bias"]
    assert table[columns].equals(grid[columns].astype(float)), (table[columns], grid[columns])
    assert grid.loc["DARE + task arithmetic", "seeds"] == 2  # one merge per seed, in both


def test_a_chapter_finds_the_committed_results_from_the_notebooks_folder_or_the_repository_root(tmp_path, monkeypatch):
    """Run from the repository's root (``papermill notebooks/06_reproduce_tables.ipynb ...``), chapters 06 and 07
    looked for ./results, found nothing and computed every cell of their grids again."""
    monkeypatch.chdir(tmp_path)
    assert committed_results() == Path("results")  # nothing committed: the chapters compute their cells
    (tmp_path / "notebooks" / "results").mkdir(parents=True)
    assert committed_results() == Path("notebooks", "results")  # from the repository's root
    (tmp_path / "results" / "grid-b32").mkdir(parents=True)  # the README's checklist: `grid --out results/grid-b32`
    assert committed_results() == Path("notebooks", "results")
    monkeypatch.chdir(tmp_path / "notebooks")
    assert committed_results() == Path("results")  # from the notebooks' folder (Colab, reproduce, nbval)
