"""`surgery-book reproduce`: papermill execution into an output folder, artifacts, summary, failures."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import nbformat
import pytest

from surgery_lib.cli import main
from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.reproduce import (
    check_parameters,
    earlier_runs,
    find_notebooks,
    reproduce,
    run_fingerprint,
    shared_inputs,
)


def _notebook(path, body: str) -> None:
    notebook = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell('preset = "mini"\ndevice = "cpu"\nseed = 0\noutput_dir = "outputs/x"')
    parameters.metadata["tags"] = ["parameters"]
    notebook.cells = [nbformat.v4.new_markdown_cell("# test"), parameters, nbformat.v4.new_code_cell(body)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


WRITE_TABLE = """
from pathlib import Path
Path(output_dir).mkdir(parents=True, exist_ok=True)
(Path(output_dir) / "table.csv").write_text(f"preset,seed\\n{preset},{seed}\\n")
"""


def test_reproduce_executes_into_out_with_parameters_and_summary(tmp_path):
    source = tmp_path / "notebooks"
    source.mkdir()
    _notebook(source / "01_first.ipynb", WRITE_TABLE)
    _notebook(source / "02_second.ipynb", WRITE_TABLE)
    (source / "scratch.ipynb").write_text("not a numbered notebook, ignored")
    out = tmp_path / "out"
    runs = reproduce("smoke", out, seed=7, source=source, progress=False)
    assert [r.notebook for r in runs] == ["01_first.ipynb", "02_second.ipynb"]
    assert (out / "01_first" / "table.csv").read_text() == "preset,seed\nsmoke,7\n"
    assert runs[0].artifacts == ["01_first/table.csv"]
    executed = nbformat.read(out / "notebooks" / "01_first.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    source_cells = nbformat.read(source / "01_first.ipynb", as_version=4).cells
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in source_cells)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "smoke" and [n["status"] for n in summary["notebooks"]] == ["ok", "ok"]
    assert "| 02_second.ipynb | ok |" in (out / "summary.md").read_text()


def test_reproduce_names_the_failing_notebook_and_cell(tmp_path, capsys):
    source = tmp_path / "notebooks"
    source.mkdir()
    _notebook(source / "01_ok.ipynb", "x = 1")
    _notebook(source / "02_broken.ipynb", "raise ValueError('deliberate')")
    status = main(
        ["reproduce", "--preset", "smoke", "--out", str(tmp_path / "out"), "--source", str(source), "--quiet"]
    )
    error = capsys.readouterr().err
    assert status == 2
    assert "02_broken.ipynb failed in cell" in error and "ValueError: deliberate" in error
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [n["status"] for n in summary["notebooks"]] == ["ok", "failed"]


@pytest.mark.heavy  # five papermill runs
def test_a_rerun_into_the_same_folder_reuses_what_finished_there_and_only_that(tmp_path, capsys, monkeypatch, caplog):
    """A run killed or failed part-way resumes: finished notebooks are reused while their source, parameters,
    library code and files are as they were; the rest, and anything that changed, runs again."""
    source, out, log = tmp_path / "notebooks", tmp_path / "out", tmp_path / "executions.txt"
    source.mkdir()
    counted = f"{WRITE_TABLE}\nwith open({str(log)!r}, 'a') as f:\n    f.write(output_dir.split('/')[-1] + '\\n')"
    _notebook(source / "01_first.ipynb", counted)
    _notebook(source / "02_second.ipynb", "raise ValueError('deliberate')")
    arguments = ["reproduce", "--preset", "smoke", "--out", str(out), "--source", str(source), "--quiet"]

    def executed() -> list[str]:
        names = log.read_text().split() if log.exists() else []
        log.unlink(missing_ok=True)
        return names

    assert main(arguments) == 2 and executed() == ["01_first"]
    _notebook(source / "02_second.ipynb", counted)  # the failing notebook fixed
    capsys.readouterr()
    assert main(arguments) == 0 and executed() == ["02_second"]
    printed = capsys.readouterr().out
    assert "01_first.ipynb" in printed and "(reused: finished there by an earlier run)" in printed
    assert "pass another --out to run them all again" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [n["status"] for n in summary["notebooks"]] == ["reused", "ok"]
    assert summary["notebooks"][0]["artifacts"] == ["01_first/table.csv"]

    assert main(arguments) == 0 and executed() == []  # everything finished: nothing runs
    assert main([*arguments, "--seed", "3", "--notebooks", "02"]) == 0 and executed() == ["02_second"]  # another seed
    summary = json.loads((out / "summary.json").read_text())  # still the whole folder's: 01 is kept
    assert [(n["notebook"], n["status"]) for n in summary["notebooks"]] == [
        ("01_first.ipynb", "reused"),
        ("02_second.ipynb", "ok"),
    ]
    assert main([*arguments, "--seed", "3"]) == 0 and executed() == ["01_first"]
    (out / "02_second" / "table.csv").unlink()  # an output deleted since
    assert main([*arguments, "--seed", "3"]) == 0 and executed() == ["02_second"]
    _notebook(source / "01_first.ipynb", counted + "\n# edited")  # the source edited
    assert main([*arguments, "--seed", "3"]) == 0 and executed() == ["01_first"]
    # What else a fingerprint covers, without a kernel each: the committed results and the library's version.
    notebook, parameters = source / "01_first.ipynb", {"preset": "smoke", "seed": 3}
    before = run_fingerprint(notebook, "smoke", parameters, None, shared_inputs(source))
    (source / "results").mkdir()
    (source / "results" / "grid.csv").write_text("committed results a chapter reads")
    with_results = run_fingerprint(notebook, "smoke", parameters, None, shared_inputs(source))
    monkeypatch.setattr("surgery_lib.reproduce.__version__", "9.9.9")
    assert len({before, with_results, run_fingerprint(notebook, "smoke", parameters)}) == 3
    assert run_fingerprint(notebook, "smoke", parameters, "other-kernel") != run_fingerprint(
        notebook, "smoke", parameters
    )

    (out / "summary.json").write_text("{not json")  # a damaged summary: run everything, say why
    with caplog.at_level(logging.WARNING):
        assert earlier_runs(out) == {}
    assert "summary.json cannot be read" in caplog.text and "running every notebook again" in caplog.text
    for other_shape in ('{"notebooks": [1, 2]}', '{"notebooks": "01_first.ipynb"}', "[]", '{"notebooks": [{}]}'):
        (out / "summary.json").write_text(other_shape)
        assert earlier_runs(out) == {}, other_shape
    (out / "summary.json").unlink()
    (out / "summary.json").mkdir()  # not even a file
    assert earlier_runs(out) == {}


@pytest.mark.heavy  # two processes, one papermill run
def test_two_runs_into_one_folder_take_turns_and_the_second_reuses_the_first(tmp_path):
    """Started together, the second waits for the first instead of executing the same notebook into the same
    files and replacing its summary; then it reuses what the first finished."""
    source, out, log = tmp_path / "notebooks", tmp_path / "out", tmp_path / "executions.txt"
    source.mkdir()
    slow = f"{WRITE_TABLE}\nimport time\nwith open({str(log)!r}, 'a') as f:\n    f.write('run\\n')\ntime.sleep(2)"
    _notebook(source / "01_first.ipynb", slow)
    command = [sys.executable, "-m", "surgery_lib", "reproduce", "--preset", "smoke", "--out", str(out)]
    command += ["--source", str(source), "--quiet"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs = [subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    printed = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert log.read_text() == "run\n"  # executed once
    assert sum("(reused: finished there by an earlier run)" in text for text in printed) == 1
    summary = json.loads((out / "summary.json").read_text())  # written last by the second run
    assert [(n["notebook"], n["status"]) for n in summary["notebooks"]] == [("01_first.ipynb", "reused")]
    assert (out / "01_first" / "table.csv").read_text() == "preset,seed\nsmoke,0\n"


def test_reproduce_refuses_bad_input(tmp_path):
    with pytest.raises(SurgeryBookError, match="no notebooks"):
        find_notebooks(tmp_path)
    source = tmp_path / "notebooks"
    source.mkdir()
    _notebook(source / "01_only.ipynb", "x = 1")
    with pytest.raises(SurgeryBookError, match="unknown notebook"):
        find_notebooks(source, ["07"])
    assert [p.name for p in find_notebooks(source, ["01"])] == ["01_only.ipynb"]
    # A chapter's continuation page shares its number: the number runs both, the name one.
    _notebook(source / "01_only_more.ipynb", "x = 2")
    assert [p.name for p in find_notebooks(source, ["01"])] == ["01_only.ipynb", "01_only_more.ipynb"]
    assert [p.name for p in find_notebooks(source, ["01_only_more"])] == ["01_only_more.ipynb"]
    assert [p.name for p in find_notebooks(source, [" 01_only_more", ""])] == ["01_only_more.ipynb"]  # "a, b"
    for nothing in ([], [""], ["", " "]):  # `--notebooks "$UNSET"` ran every notebook
        with pytest.raises(SurgeryBookError, match="--notebooks names no notebook. Fix: pass numbers or names"):
            find_notebooks(source, nothing)
    with pytest.raises(SurgeryBookError, match="unknown preset"):
        reproduce("nope", tmp_path / "out", source=source, progress=False)
    with pytest.raises(SurgeryBookError, match="over the sources"):
        reproduce("smoke", tmp_path, source=tmp_path / "notebooks", progress=False)
    for seed in (-1, 2**32):  # reached the kernels: the first notebook that seeds a merge failed, the ones before ran
        with pytest.raises(SurgeryBookError, match=rf"--seed {seed} is outside \[0, 4294967295\]"):
            reproduce("smoke", tmp_path / "out", seed=seed, source=source, progress=False)
    with pytest.raises(SurgeryBookError, match="unsupported device 'banana'"):  # was: in the first notebook's kernel
        reproduce("smoke", tmp_path / "out", device="banana", source=source, progress=False)
    assert not (tmp_path / "out").exists()


def test_parameters_are_checked_against_the_notebooks_before_any_kernel_starts(tmp_path):
    source = tmp_path / "notebooks"
    source.mkdir()
    _notebook(source / "01_first.ipynb", "x = 1")
    declared = 'steps = 10\nnames = "a,b"\nrate = 0.5\nflag = False\nfolder = None'
    notebook = nbformat.read(source / "01_first.ipynb", as_version=4)
    notebook.cells[1].source += "\n" + declared
    nbformat.write(notebook, source / "02_second.ipynb")
    notebooks = find_notebooks(source)
    given = {"steps": 3, "names": 16, "rate": 2, "flag": True, "folder": "/data"}
    assert check_parameters(notebooks, given) == {**given, "names": "16"}  # a number for a text is its text
    refused = [
        (
            {"stepz": 3},
            "no notebook run here has a parameter 'stepz'. Fix: did you mean 'steps'? Else use one of: flag, folder, names, "
            "rate, steps",
        ),
        ({"seed": 3}, "-p seed is set by reproduce itself. Fix: pass --seed instead"),
        ({"output_dir": "x"}, "pass --out instead"),
        ({"steps": "ten"}, "-p steps 'ten' is not a whole number, as 02_second's steps is (default 10)"),
        ({"steps": 2.5}, "is not a whole number"),
        ({"steps": True}, "is not a whole number"),
        ({"rate": "fast"}, "is not a number"),
        ({"flag": 1}, "is not True or False"),
    ]
    for parameters, message in refused:
        with pytest.raises(SurgeryBookError, match=re.escape(message)):
            reproduce("smoke", tmp_path / "out", source=source, parameters=parameters, progress=False)
    assert not (tmp_path / "out").exists()  # refused before the first kernel, nothing written
    with pytest.raises(
        SurgeryBookError, match="has a parameter 'steps'. Fix: drop -p steps: these notebooks take only"
    ):
        check_parameters(notebooks[:1], {"steps": 3})  # only the notebooks that run count


def test_a_chapter_parameter_is_checked_against_what_the_chapters_run_before_any_kernel_starts(tmp_path, monkeypatch):
    """Chapter 04's ablation page parsed its ranks in its sixth cell, chapter 06's variants page its data sizes in
    its sixteenth: a mistyped value failed there, after every notebook before it had run (an hour on a GPU for a
    CLIP preset). A relative grid_dir and a seed whose seeds run past the largest are settled here too."""
    source = tmp_path / "notebooks"
    source.mkdir()
    _notebook(source / "01_first.ipynb", "x = 1")
    notebook = nbformat.read(source / "01_first.ipynb", as_version=4)
    declared = ["ranks = '4,16,64'", "surgery_steps = 1000", "methods = 'all'", "grid_dir = None", "tsne_task = 'auto'"]
    notebook.cells[1].source += "\n" + "\n".join(declared)
    nbformat.write(notebook, source / "01_first.ipynb")
    notebooks = find_notebooks(source)
    monkeypatch.chdir(tmp_path)
    given = {"ranks": 16, "surgery_steps": 10, "methods": "tsv", "grid_dir": "results/grid-b32", "tsne_task": "dtd"}
    assert check_parameters(notebooks, given) == {  # no preset's tasks given: any task name
        "ranks": "16",
        "surgery_steps": 10,
        "methods": "tsv",
        # The kernels run in the notebooks' folder: a relative grid_dir meant notebooks/results/grid-b32 there,
        # where the chapter computed every cell instead of reading the grid the user had computed.
        "grid_dir": str(tmp_path / "results" / "grid-b32"),
        "tsne_task": "dtd",
    }
    refused = [
        ({"ranks": "4,x"}, "-p ranks '4,x' is not a comma-separated list of whole numbers of at least 1"),
        ({"surgery_steps": 0}, "-p surgery_steps 0 is not a whole number of at least 1"),
        ({"methods": "tiez"}, "-p methods 'tiez': unknown merging method 'tiez'"),
        ({"grid_dir": 2024}, "-p grid_dir 2024 is not None or a folder path"),
        # smoke's tasks are mnist and shapes: chapter 04 failed on this, after its merges
        ({"tsne_task": "signs"}, "-p tsne_task 'signs' names no task signs of this preset (its tasks: mnist, shapes)"),
    ]
    for parameters, message in refused:
        with pytest.raises(SurgeryBookError, match=re.escape(message)):
            reproduce("smoke", tmp_path / "out", source=source, parameters=parameters, progress=False)
    assert not (tmp_path / "out").exists()
    seeds = nbformat.read(source / "01_first.ipynb", as_version=4)
    seeds.cells[1].source += "\nseeds = 3"  # chapter 07's: seed, seed + 1, seed + 2
    nbformat.write(seeds, source / "02_second.ipynb")
    with pytest.raises(
        SurgeryBookError, match=re.escape("02_second: --seed 4294967295 with -p seeds 3 uses the seeds")
    ):
        reproduce("smoke", tmp_path / "out", seed=2**32 - 1, source=source, progress=False)
    assert not (tmp_path / "out").exists()
    assert check_parameters(find_notebooks(source), {"seeds": 1}, seed=2**32 - 1) == {"seeds": 1}
