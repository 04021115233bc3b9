"""Bad input and hostile files: nothing outside the project's own files is deleted or read, no silent
non-finite results, and JSON output stays standard JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from surgery_lib.cli import main, to_json
from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.merging import MergeOptions, merge
from surgery_lib.presets import PRESETS
from surgery_lib.settings import build_zoo
from surgery_lib.settings.clip.checkpoints import load_converted
from surgery_lib.settings.offline.zoo import MANIFEST, clear_zoo

ROOT = Path(__file__).resolve().parents[1]


def test_rebuild_refuses_a_folder_that_is_not_a_zoo(tmp_path):
    (tmp_path / "thesis.tex").write_text("four years of work")
    (tmp_path / "notes").mkdir()
    with pytest.raises(SurgeryBookError, match="not a zoo directory.*nothing was deleted"):
        build_zoo("smoke", zoo_dir=tmp_path, rebuild=True, progress=False)
    assert (tmp_path / "thesis.tex").read_text() == "four years of work" and (tmp_path / "notes").is_dir()


def test_rebuild_deletes_only_the_zoos_own_files(smoke_zoo, tmp_path):
    zoo_dir = tmp_path / "zoo"
    shutil.copytree(smoke_zoo.directory, zoo_dir)
    (zoo_dir / "notes.txt").write_text("mine")
    (zoo_dir / "merges").mkdir(exist_ok=True)
    (zoo_dir / "merges" / "task_arithmetic-0.safetensors").write_bytes(b"cached")
    (zoo_dir / "checkpoints").mkdir()
    (zoo_dir / "checkpoints" / "pretrained.pt").write_bytes(b"half-trained")
    models = [entry["file"] for entry in json.loads((zoo_dir / MANIFEST).read_text())["models"].values()]
    clear_zoo(zoo_dir)
    assert not (zoo_dir / MANIFEST).exists() and not any((zoo_dir / name).exists() for name in models)
    assert not list((zoo_dir / "merges").glob("*.safetensors"))
    assert not list((zoo_dir / "checkpoints").iterdir())
    assert (zoo_dir / "notes.txt").read_text() == "mine"


def test_a_converted_manifest_may_not_name_files_outside_its_folder(tmp_path):
    folder = tmp_path / "ViT-B-32"
    folder.mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"not yours")
    manifest = {"files": {"pretrained": {"file": "../secret.safetensors", "sha256": "0" * 64}}, "tasks": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SurgeryBookError, match="outside its folder"):
        load_converted(folder)
    manifest["files"]["pretrained"]["file"] = "pretrained.safetensors"  # inside, but not copied along
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SurgeryBookError, match="names 'pretrained.safetensors', which is not in the folder"):
        load_converted(folder)


def test_preset_names_cannot_leave_the_cache():
    with pytest.raises(SurgeryBookError, match="invalid preset name"):
        PRESETS.register("../../../../x", PRESETS["smoke"])


def test_a_merge_that_overflows_is_an_error_not_garbage(smoke_zoo):
    with pytest.raises(SurgeryBookError, match="task_arithmetic merge produced NaN or infinite weights.*scale"):
        merge(smoke_zoo, "task_arithmetic", MergeOptions(scale=1e308), device="cpu", progress=False)


@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "--method", "ties", "--scale", "nan"],
        ["merge", "--method", "task_arithmetic", "--scale", "inf"],
        ["surgery", "--lr", "nan"],
    ],
)
def test_non_finite_options_are_one_line_errors(argv, capsys, tmp_path):
    assert main([*argv, "--preset", "smoke", "--quiet", "--cache-dir", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())  # rejected before any data or zoo was touched
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is not a finite number" in error


def test_json_output_is_standard_json():
    text = to_json({"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads(text) == {"a": None, "b": [1.5, None], "c": {"d": None}} and "NaN" not in text


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["merge", "--method", "adamerging_task", "--steps", "-5"], "--steps -5 is outside [1, inf]"),
        (["merge", "--method", "adamerging_task", "--batch-size", "0"], "--batch-size 0 is outside [1, inf]"),
        (["merge", "--method", "ties", "--keep-fraction", "1.5"], "--keep-fraction 1.5 is outside (0, 1]"),
        (["merge", "--method", "dare_ties", "--drop-rate", "1"], "--drop-rate 1.0 is outside [0, 1)"),
        (["merge", "--method", "regmean", "--seed", str(2**70)], "--seed"),
        (["surgery", "--seed", "-5"], "--seed -5 is outside [0, 4294967295]"),  # a bound one can type back
        (["table", "--surgery-steps", "200"], "--surgery none has no surgery rows to read --surgery-steps"),  # ignored
        (["table", "--adam", "per-task", "--seeds", "3"], "--surgery none has no surgery rows to read --adam"),
        (["table", "--seeds", "1000000000"], "--seeds 1000000000 asks for 1,000,000,000 runs"),  # planned: OOM
        (
            ["table", "--methods", "dare_task_arithmetic", "--seed", "4294967295", "--seeds", "2"],
            "uses the seeds 4294967295 to 4294967296, outside [0, 4294967295]",  # was: after the first seed's merge
        ),
        (["merge", "--method", "regmean", "--seed", "-1"], "--seed -1 is outside [0, 4294967295]"),
        (
            ["merge", "--method", "task_arithmetic", "--keep-fraction", "0.5"],
            "task_arithmetic does not read --keep-fraction",
        ),
        (["surgery", "--rank", "0"], "--rank 0 is outside [1, inf]"),
        (["surgery", "--surgery-steps", "0"], "--surgery-steps 0 is outside"),
        (["surgery", "--merge", "weight_averaging", "--scale", "0.5"], "weight_averaging does not read --scale"),
        (["bench", "--versions", "3"], "--versions '3' names no surgery version"),
        (["bench", "--versions", "abc"], "--versions 'abc'"),
        (["bench", "--adam", "shared,foo"], "unknown optimiser semantics 'foo'"),  # before the zoo is built
        (["bench", "--pipeline", "--adamerging-steps", "0"], "--adamerging-steps 0 is outside [1, inf]"),  # was: late
        (["surgery", "--online", "--surgery-steps", "200"], "the online variant does not read --surgery-steps"),
        (["surgery", "--online", "--version", "2"], "SurgeryV2 has no online variant here"),  # was: after the zoo
        (["bench", "--scale", "0.1"], "has no synthetic test sets to read --scale"),  # was: ignored
        (["bench", "--adamerging-steps", "5"], "runs no AdaMerging to read --adamerging-steps"),
        (
            ["bench", "--pipeline", "--adam", "per-task"],
            "--pipeline times its fixed stages, with no stage to read --adam",
        ),
    ],
)
def test_out_of_range_options_are_one_line_errors_never_silent_substitutes(argv, flag, capsys, tmp_path):
    assert main([*argv, "--preset", "smoke", "--quiet", "--cache-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and flag in error
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "flag, value",
    [("--cpus-per-job", "0"), ("--mem-gb", "-5"), ("--gpus-per-job", "-1"), ("--array-parallelism", "0")],
)
def test_slurm_resources_below_one_are_refused_before_any_job(flag, value, capsys, tmp_path):
    """A falsy --cpus-per-job 0 was dropped silently and --mem-gb -5 reached sbatch as "-5GB"."""
    argv = ["grid", "--presets", "smoke", "--executor", "slurm", flag, value, "--out", str(tmp_path / "grid")]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{flag} {value} is outside" in error
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv, problem",
    [
        (
            ["--gpus-per-job", "1"],
            "--executor local runs no Slurm job to read --gpus-per-job. Fix: add --executor slurm",
        ),
        (["--executor", "inline", "--partition", "gpu"], "--executor inline runs no Slurm job to read --partition"),
        # one process or one job per cell whatever --jobs said (the inline cells were split and run in turn)
        (["--executor", "inline", "--jobs", "4"], "--executor inline starts no local processes to read --jobs"),
        (["--executor", "slurm", "--jobs", "4"], "--executor slurm starts no local processes to read --jobs"),
        (["--surgery", "none,1", "--deep-surgery-steps", "100"], "has no SurgeryV2 cells to read --deep-surgery-steps"),
        (
            ["--surgery", "none", "--surgery-steps", "100"],
            "--surgery none has no surgery cells to read --surgery-steps",
        ),
        (["--surgery", "none", "--adam", "per-task"], "--surgery none has no surgery cells to read --adam"),
    ],
)
def test_a_grid_option_no_cell_or_job_reads_is_refused(argv, problem, capsys, tmp_path):
    """Each was ignored: a grid without the GPUs, the steps or the semantics the command line asked for."""
    grid = ["grid", "--presets", "smoke", "--methods", "task_arithmetic", "--out", str(tmp_path / "grid")]
    assert main([*grid, *argv, "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and problem in error and not any(tmp_path.iterdir())


@pytest.mark.parametrize("device, problem", [("banana", "unsupported device 'banana'"), ("cuda", "sees no GPU")])
@pytest.mark.parametrize("executor", ["inline", "local"])
def test_a_grid_on_a_device_this_machine_lacks_is_refused_before_any_job(device, problem, executor, capsys, tmp_path):
    """Every job failed on it, after the folder was claimed and the jobs started: a grid folder left behind."""
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = ["grid", "--presets", "smoke", "--methods", "task_arithmetic", "--surgery", "none", "--device", device]
    argv += ["--executor", executor, "--out", str(tmp_path / "grid"), "--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and problem in error and not any(tmp_path.iterdir())


def test_a_slurm_grid_checks_the_device_name_only():
    """The jobs of a Slurm grid run on its nodes, which may have the GPU the login node lacks."""
    from surgery_lib.models import resolve_device

    assert resolve_device("cuda:1", here=False) == torch.device("cuda", 1)
    with pytest.raises(SurgeryBookError, match="unsupported device 'banana'"):
        resolve_device("banana", here=False)


def test_a_benchmark_larger_than_the_free_memory_is_refused_before_allocating(capsys):
    assert main(["bench", "--vit-b32", "--scale", "1e9", "--device", "cpu", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and re.search(r"need [0-9,.]+ GiB, this machine has [0-9.]+ GiB free", error)
    assert "bench --scale" in error
    # Where the experts, not the images, exceed the memory, the fix asks for fewer tasks.
    from surgery_lib.benchmark import synthetic_clip_zoo

    with pytest.raises(
        SurgeryBookError, match=r"Fix: ask for fewer tasks \(each clip-vit-l-14 expert holds 1\.13 GiB\)"
    ):
        synthetic_clip_zoo("clip-vit-l-14", {f"task{i}": 2 for i in range(100_000)})


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["--tasks", "9"], "--tasks '9' is not a list of task counts from 1 to 8"),
        (["--tasks", "0,1"], "--tasks '0,1'"),
        (["--tasks", "one"], "--tasks 'one'"),
        (["--steps", "0", "--device", "cpu"], "--steps 0 is below 1"),
        (["--precisions", "fp8", "--device", "cpu"], "unknown precision 'fp8'"),
        (["--preset", "clip-vit-xl"], "unknown preset 'clip-vit-xl'"),
        pytest.param(
            ["--device", "cuda"],
            "CUDA was requested but this torch build sees no GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_the_gpu_memory_script_checks_its_options_before_building_anything(argv, problem, capsys, monkeypatch):
    from surgery_lib.core.errors import run_script

    spec = importlib.util.spec_from_file_location("v2_memory", ROOT / "bench" / "gpu" / "v2_memory.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "synthetic_clip_zoo", None)  # building a zoo would be a TypeError, not this error
    assert run_script(lambda: script.main(argv)) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ") and problem in error and "Fix: " in error


@pytest.mark.parametrize(
    "script",
    [
        "train_step",
        "data_parallel_probe",
        "kept_share",
        "tangent_probe",
        "task_count",
        "tuning_merges",
        "gpu/v2_memory",
    ],
)
def test_every_bench_script_reports_bad_input_in_one_line(script, capsys, monkeypatch):
    path = ROOT / "bench" / f"{script}.py"
    assert path.read_text().rstrip().endswith('if __name__ == "__main__":\n    sys.exit(run_script(main))')
    monkeypatch.syspath_prepend(str(path.parent))  # as `python bench/...py` puts the script's folder first
    # Their first step sets torch's thread count: in this worker that would change the bits of every later build.
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.run_script(lambda: module.main(["--preset", "nope"])) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: unknown preset 'nope'. Fix: use one of: ")
    with pytest.raises(SystemExit) as exit_info:  # a mistyped option: one line too, naming the option meant
        module.main(["--presetz", "mini"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert "unrecognized arguments: --presetz mini. Fix: did you mean '--preset'? " in error


@pytest.mark.parametrize(
    "script, argv, problem",
    [
        (
            "train_step",
            ["--threads", "1,a"],
            "argument --threads: '1,a' is not a comma-separated list of whole numbers",
        ),
        ("kept_share", ["--sizes", "2,x"], "argument --sizes: '2,x' is not a comma-separated list of whole numbers"),
        ("kept_share", ["--lr-scale", "x"], "argument --lr-scale: 'x' is not a comma-separated list of numbers"),
        ("kept_share", ["--threads", "0"], "argument --threads: '0' is not a whole number of at least 1"),
        ("task_count", ["--sizes", "0,2"], "'0,2' is not a comma-separated list of whole numbers of at least 1"),
        ("tangent_probe", ["--lr-scale", ","], "argument --lr-scale: ',' is not a comma-separated list of numbers"),
        ("recipe_probe", ["--name", "x", "--scales", "0.3,nan"], "argument --scales: '0.3,nan' is not a comma"),
        ("recipe_probe", ["--name", "x", "--scales", "0.3,y"], "argument --scales: '0.3,y' is not a comma-separated"),
        ("data_parallel_probe", ["--rounds", "0"], "argument --rounds: '0' is not a whole number of at least 1"),
        ("tuning_merges", ["--methods", "tsv,ties"], "argument --methods: 'ties' names no merge prepared at a scale"),
    ],
)
def test_the_bench_scripts_list_options_are_checked_as_they_are_parsed(script, argv, problem, capsys, monkeypatch):
    """Each was a ValueError traceback from inside the script (kept_share's after its zoo was built), or for a
    count of 0 a RuntimeError from torch.set_num_threads or a run that measured nothing."""
    path = ROOT / "bench" / f"{script}.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as `python bench/...py` puts the script's folder first
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and problem in error and "Fix: " in error


@pytest.mark.parametrize("device", ["tpu", "meta", "mps", "cdua", "cuda:x"])
def test_unsupported_devices_are_one_line_errors(device, capsys, tmp_path):
    assert main(["zoo", "--preset", "smoke", "--device", device, "--quiet", "--cache-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"unsupported device {device!r}" in error


def test_output_paths_are_checked_before_the_work_starts(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert (
        main(["table", "--preset", "smoke", "--quiet", "--cache-dir", str(tmp_path / "cache"), "--out", str(blocker)])
        == 2
    )
    assert "output folder" in capsys.readouterr().err
    assert (
        main(
            ["surgery", "--preset", "smoke", "--quiet", "--cache-dir", str(tmp_path / "cache"), "--save", str(tmp_path)]
        )
        == 2
    )
    assert "is a folder" in capsys.readouterr().err
    assert (
        main(
            [
                "surgery",
                "--preset",
                "smoke",
                "--quiet",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--save",
                str(blocker / "modules.safetensors"),
            ]
        )
        == 2
    )
    assert "cannot write" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # nothing was computed


@pytest.mark.parametrize(
    "change, message",
    [
        (("encoder", "width", 0), "encoder.width = 0 is invalid"),
        (("recipe", "batch_size", 0), "recipe.batch_size = 0 is invalid"),
        (("recipe", "expert_steps", -3), "recipe.expert_steps = -3 is invalid"),
        (("encoder", "layers", "four"), "encoder.layers = 'four' is invalid.*an integer"),
        (("recipe", "expert_lr", float("nan")), "recipe.expert_lr = nan is invalid.*finite"),
        (("encoder", "heads", 3), "encoder.heads = 3 is invalid.*divisor"),
        (("encoder", "width", 16_384), "encoder.width = 16384 is invalid.*at most 4,096"),
        (("encoder", "image_size", 100_000), "encoder.image_size = 100000 is invalid.*at most 1,024"),
        (
            ("encoder", "image_size", 1024),
            "encoder.patch_size = 8 is invalid.*at most 4096 tokens at image size 1024 .this one: 16,384",
        ),
        (("encoder", "layers", 128), "encoder = '.*parameters' is invalid.*at most 4,000,000,000 parameters"),
        (("suite", "tasks", []), r"suite.tasks = \[\] is invalid.*at least one task"),
        (("suite", "tasks", ["mnist", "mnist"]), "suite.tasks = .* is invalid.*each task once"),
        ((None, "suite", None), "suite = None is invalid.*a suite and a recipe section together"),
        ((None, "setting_config", "ViT-B-32"), "setting_config = 'ViT-B-32' is invalid.*a JSON object"),
        ((None, "setting_config", {"surgery_v2_rank": 0}), "setting_config.surgery_v2_rank = 0 is invalid.*1 to 4,096"),
        ((None, "setting", "quantum"), "setting = 'quantum' is invalid.*one of clip, offline"),
        ((None, "name", "x" * 300), "preset name 'xxxxxxxxxxxxxxxxxxxx'... has 300 characters.*at most 64"),
    ],
)
def test_hostile_preset_files_are_refused_naming_the_field(change, message, tmp_path):
    from surgery_lib.presets import register_presets_from_file

    data = PRESETS["smoke"].to_dict()
    data["name"] = "hostile"
    part, field, value = change
    if part == "encoder" and field == "layers":
        data["encoder"]["width"] = 4096  # 128 blocks of width 4096: 25.8 G parameters, 103 GB in fp32
    (data[part] if part else data)[field] = value
    path = tmp_path / "presets.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SurgeryBookError, match=message):
        register_presets_from_file(path)
    assert "hostile" not in PRESETS


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder", "huge"])
def test_a_preset_file_is_read_only_when_it_is_a_regular_file_of_bounded_size(kind, tmp_path):
    import os

    from surgery_lib.presets import register_presets_from_file

    path = {
        "fifo": tmp_path / "presets.fifo",
        "dev-zero": "/dev/zero",
        "folder": tmp_path,
        "huge": tmp_path / "huge.json",
    }[kind]
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer for ever
    if kind == "huge":
        path.write_text(json.dumps([PRESETS["smoke"].to_dict()] * 2000))
    expected = "more than|bytes .at most 1,000,000" if kind == "huge" else "not a regular file"
    with pytest.raises(SurgeryBookError, match=f"cannot read presets from .*({expected})"):
        register_presets_from_file(path)


def test_an_offline_preset_with_another_image_size_is_refused_before_any_work(tmp_path, monkeypatch):
    import dataclasses
    import types

    import psutil

    from surgery_lib.models import check_fits

    preset = PRESETS["smoke"]
    other = dataclasses.replace(preset, name="sixty-four", encoder=dataclasses.replace(preset.encoder, image_size=64))
    with pytest.raises(SurgeryBookError, match="encoder.image_size = 64, but the offline suite's images are 32 x 32"):
        build_zoo(other, cache_dir=tmp_path, progress=False)
    assert not any(tmp_path.rglob("*.safetensors")) and not any(tmp_path.rglob("*.npz"))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=512 * 2**20))  # 512 MiB free
    check_fits(preset.encoder)
    with pytest.raises(
        SurgeryBookError, match=r"303,966,208 parameters needs 1\.1 GiB, this machine has 0\.5 GiB free"
    ):
        check_fits(PRESETS["clip-vit-l-14"].encoder)


def _one_line_error(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and ". Fix: " in err, err
    return err


@pytest.mark.parametrize(
    "case", ["slurm", "link-loop", "long-name", "zoo-dir-file", "reproduce-file", "kernel", "notebook", "foreign-lock"]
)
def test_paths_and_environments_that_cannot_work_are_one_line_errors(case, tmp_path, capsys, monkeypatch):
    long_name = "x" * 300
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "a-file").write_text("")
    grid = [
        "grid",
        "--presets",
        "smoke",
        "--methods",
        "task_arithmetic",
        "--surgery",
        "none",
        "--executor",
        "inline",
        "--quiet",
    ]
    reproduce = ["reproduce", "--preset", "smoke", "--notebooks", "00", "--quiet"]
    if case == "slurm":
        monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
        argv, expected = [*grid, "--executor", "slurm", "--out", str(tmp_path / "g")], "needs Slurm's sbatch"
    elif case == "link-loop":
        argv, expected = (
            [*grid, "--out", str(tmp_path / "loop" / "grid")],
            "Too many levels of symbolic links.*remove the symbolic link loop",
        )
    elif case == "long-name":
        argv, expected = (
            [*grid, "--out", str(tmp_path / long_name)],
            "File name too long.*shorter folder and file names",
        )
    elif case == "zoo-dir-file":
        argv, expected = (
            ["zoo", "--preset", "smoke", "--zoo-dir", str(tmp_path / "a-file"), "--quiet"],
            "a-file.*pass a folder path",
        )
    elif case == "reproduce-file":
        argv, expected = [*reproduce, "--out", str(tmp_path / "a-file")], "cannot write into .*a-file.*not a file"
    elif (
        case == "foreign-lock"
    ):  # a shared cache whose lock file another user created with mode 0600 (root cannot see it)
        import errno

        import filelock

        def acquire(self, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", self.lock_file)

        monkeypatch.setattr(filelock.FileLock, "acquire", acquire)
        argv, expected = (
            ["data", "--preset", "smoke", "--cache-dir", str(tmp_path / "shared"), "--quiet"],
            r"Permission denied \(.*\.lock\).*writable for this user",
        )
    elif case == "kernel":
        argv, expected = (
            [*reproduce, "--out", str(tmp_path / "o"), "--kernel", "no-such-kernel"],
            "no Jupyter kernel named 'no-such-kernel'",
        )
    else:
        source = tmp_path / "notebooks"
        source.mkdir()
        (source / "00_broken.ipynb").write_text('{"cells": [')
        argv, expected = (
            [*reproduce, "--out", str(tmp_path / "o"), "--source", str(source)],
            "00_broken.ipynb is not a readable notebook",
        )
    assert re.search(expected, _one_line_error(argv, capsys))
    assert not (tmp_path / "g").exists() and not (tmp_path / "o" / "summary.json").exists()


def test_integers_of_thousands_of_digits_are_a_damaged_file_not_a_traceback(tmp_path):
    from surgery_lib.cluster import Cell, GridSpec, cell_identity, vouched_record
    from surgery_lib.core.storage import CorruptFileError, read_json
    from surgery_lib.presets import register_presets_from_file

    path = tmp_path / "file.json"
    path.write_text(HUGE_INTEGER)
    with pytest.raises(CorruptFileError, match="invalid JSON"):
        read_json(path)
    with pytest.raises(SurgeryBookError, match="cannot read presets from .*invalid JSON"):
        register_presets_from_file(path)
    cell = Cell("smoke", "task_arithmetic", 0)
    identity = cell_identity(cell, GridSpec(presets=("smoke",), methods=("task_arithmetic",)), {"zoo": "z"})
    assert vouched_record(path, identity) is None  # a grid computes such a cell again


def test_a_deeply_nested_preset_file_is_a_clear_error(tmp_path):
    from surgery_lib.presets import register_presets_from_file

    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(SurgeryBookError, match="nested too deeply"):
        register_presets_from_file(path)


def test_a_diverging_surgery_is_an_error_not_garbage(smoke_zoo):
    from surgery_lib.merging import task_arithmetic
    from surgery_lib.surgery import SurgeryConfig, run_surgery

    merged = task_arithmetic(smoke_zoo.pretrained, smoke_zoo.experts, 0.3)
    for version in (1, 2):
        with pytest.raises(SurgeryBookError, match="surgery loss became .* training diverged.*--lr"):
            run_surgery(
                smoke_zoo,
                merged,
                version=version,
                config=SurgeryConfig(rank=4, steps=20, lr=1e30, eval_every=0),
                device="cpu",
                progress=False,
            )


HUGE_INTEGER = '{"format": ' + "9" * 5000 + "}"  # beyond the 4,300 digits Python parses


@pytest.mark.parametrize(
    "manifest", [[], {"models": []}, {"models": {"pretrained": {"file": "pretrained.safetensors"}}}, HUGE_INTEGER]
)
def test_a_malformed_zoo_manifest_starts_the_zoo_afresh(manifest, smoke_zoo, tmp_path, monkeypatch, caplog):
    from surgery_lib.settings.offline import zoo as zoo_module

    assert zoo_module._well_formed(json.loads((smoke_zoo.directory / MANIFEST).read_text()))
    zoo_dir = tmp_path / "zoo"
    shutil.copytree(smoke_zoo.directory, zoo_dir)
    (zoo_dir / MANIFEST).write_text(manifest if manifest is HUGE_INTEGER else json.dumps(manifest))

    class Retraining(Exception):
        pass

    def pretrain(*args, **kwargs):
        raise Retraining  # reached: the build went on from scratch instead of failing on the manifest

    monkeypatch.setattr(zoo_module, "pretrain", pretrain)
    with pytest.raises(Retraining):
        build_zoo("smoke", zoo_dir=zoo_dir, cache_dir=smoke_zoo.directory.parent.parent, progress=False)
    assert ("invalid JSON" if manifest is HUGE_INTEGER else "not a zoo manifest") in caplog.text


def test_a_malformed_converted_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(SurgeryBookError, match="not a converted-checkpoint manifest"):
        load_converted(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {}, "tasks": []}))
    with pytest.raises(SurgeryBookError, match="no usable entry for pretrained"):
        load_converted(tmp_path)


def _rewrite_keeping_metadata(path, change):
    """Rewrite a safetensors file with ``change(tensors)`` applied but its old metadata (checksum included):
    what a flipped byte or an edit by hand leaves behind."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_every_tensor_file_carries_a_checksum_that_reading_verifies(tmp_path):
    import torch

    from surgery_lib.core.storage import CorruptFileError, load_tensors, save_tensors

    path = tmp_path / "file.safetensors"
    save_tensors({"w": torch.arange(6.0).view(2, 3), "scalar": torch.tensor(2.0)}, path, {"note": "kept"})
    tensors, metadata = load_tensors(path)
    assert metadata == {"note": "kept"} and torch.equal(tensors["w"], torch.arange(6.0).view(2, 3))
    _rewrite_keeping_metadata(path, lambda t: t["w"].__setitem__((0, 0), 1e-45))
    with pytest.raises(CorruptFileError, match="differ from the checksum"):
        load_tensors(path)


def test_a_damaged_merge_cache_is_recomputed_not_used(smoke_zoo, tmp_path, caplog):
    import dataclasses

    import torch

    from surgery_lib.merging import cached_merge, merge_cache_path

    zoo = dataclasses.replace(smoke_zoo, directory=tmp_path)
    first = cached_merge(zoo, "task_arithmetic", MergeOptions(), device="cpu", progress=False)
    path = merge_cache_path(zoo, "task_arithmetic", MergeOptions(), zoo.tasks)
    key = next(k for k in first.state if first.state[k].is_floating_point())
    _rewrite_keeping_metadata(path, lambda t: t[f"state/{key}"].mul_(-1))
    again = cached_merge(zoo, "task_arithmetic", MergeOptions(), device="cpu", progress=False)
    assert "recomputing the task_arithmetic merge" in caplog.text
    assert all(torch.equal(again.state[k], v) for k, v in first.state.items())


def test_changed_labels_in_the_data_cache_are_detected_and_regenerated(smoke_suite, cache_dir, tmp_path, caplog):
    import torch

    from surgery_lib.settings import load_suite

    shutil.copytree(cache_dir / "data", tmp_path / "data")
    task = smoke_suite.task_names[0]
    path = next((tmp_path / "data").rglob(f"{task}-*.safetensors"))
    _rewrite_keeping_metadata(path, lambda t: t["test_labels"].zero_())
    suite = load_suite("smoke", cache_dir=tmp_path, progress=False)
    assert "differ from the checksum" in caplog.text
    assert torch.equal(suite[task].labels["test"], smoke_suite[task].labels["test"])


def test_temporaries_of_a_killed_write_are_removed_by_the_next_one(tmp_path):
    import os
    import time

    from surgery_lib.core.storage import write_json

    target = tmp_path / "manifest.json"
    stale, live, other = (
        tmp_path / ".manifest.json.ab12cd.tmp",
        tmp_path / ".manifest.json.ef34gh.tmp",
        tmp_path / ".other.json.x.tmp",
    )
    for path in (stale, live, other):
        path.write_text("partial")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    write_json({"ok": True}, target)
    assert json.loads(target.read_text()) == {"ok": True}
    assert not stale.exists() and live.exists() and other.exists()  # only this file's, and only abandoned ones


def test_a_folder_written_atomically_is_swapped_in_whole_or_not_at_all(tmp_path):
    import os
    import time

    from surgery_lib.core.storage import atomic_directory

    target = tmp_path / "ViT-B-32"
    with atomic_directory(target) as folder:
        (folder / "manifest.json").write_text("first")
    assert (target / "manifest.json").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_directory(target) as folder:
        (folder / "manifest.json").write_text("half")
        raise RuntimeError("the fifth expert is broken")
    assert (
        sorted(p.name for p in target.iterdir()) == ["manifest.json"]
        and (target / "manifest.json").read_text() == "first"
    )
    stale = tmp_path / ".ViT-B-32.killed.partial"
    stale.mkdir()
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    with atomic_directory(target) as folder:
        (folder / "pretrained.safetensors").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["pretrained.safetensors"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ViT-B-32"]  # no temporaries, the killed run's removed
    (tmp_path / "a-file").write_text("")
    with (
        pytest.raises(SurgeryBookError, match="a-file exists and is not a folder"),
        atomic_directory(tmp_path / "a-file"),
    ):
        pass


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
    ],
)
def test_a_full_disk_is_one_clear_error_naming_the_folder(error, tmp_path, monkeypatch):
    import safetensors.torch
    import torch

    from surgery_lib.core.storage import save_tensors

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(SurgeryBookError, match=f"disk is full.*free space in {tmp_path}"):
        save_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert not list(tmp_path.iterdir())  # no temporary left behind


# The checkpoint reader against hostile files: every failure is the one-line error naming the file, fast.


def _save(obj, path):
    import torch

    torch.save(obj, path)
    return path


def test_a_module_graph_with_shared_children_or_a_cycle_is_walked_once(tmp_path):
    import time

    from torch import nn

    from surgery_lib.settings.clip.checkpoints import (
        load_image_encoder_state,
        module_tensors,
        read_pickled_checkpoint,
    )

    leaf = nn.Linear(2, 2)
    node = leaf
    for _ in range(60):  # every level holds the level below twice: 2^60 paths through 61 modules
        parent = nn.Module()
        parent.a, parent.b = node, node
        node = parent
    started = time.perf_counter()
    state = module_tensors(read_pickled_checkpoint(_save(node, tmp_path / "shared.pt")))
    assert time.perf_counter() - started < 10 and len(state) == 2  # the leaf's weight and bias, once
    first, second = nn.Module(), nn.Module()
    first.child, second.child = second, first  # a cycle
    with pytest.raises(SurgeryBookError, match="holds no CLIP image encoder"):
        load_image_encoder_state(_save(first, tmp_path / "cycle.pt"))
    deep = nn.Linear(1, 1)
    for _ in range(100):
        wrapper = nn.Module()
        wrapper.inner = deep
        deep = wrapper
    with pytest.raises(SurgeryBookError, match="deeper than 64 levels"):
        module_tensors(read_pickled_checkpoint(_save(deep, tmp_path / "deep.pt")))


def test_a_view_larger_than_its_storage_is_refused_before_copying(tmp_path):
    import torch
    from torch import nn

    from surgery_lib.settings.clip.checkpoints import load_image_encoder_state

    module = nn.Module()
    module.register_buffer("expanded", torch.zeros(4).as_strided((10**6,), (0,)))  # 16 bytes of storage describing 4 MB
    with pytest.raises(SurgeryBookError, match="describes 4,000,000 bytes over a storage of 16"):
        load_image_encoder_state(_save(module, tmp_path / "expanded.pt"))


@pytest.mark.parametrize(
    "payload, what",
    [
        (b"\x80\x04\x8e" + (2**40).to_bytes(8, "little"), "declares 1,099,511,627,776 bytes"),  # BINBYTES8 of 1 TiB
        (
            b"\x80\x04N" + b"r" + (2**32 - 1).to_bytes(4, "little") + b".",
            "holds no CLIP image encoder",
        ),  # memo index 2^32 - 1
        (
            b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nX\x01\x00\x00\x00a\x85R.",
            "TypeError",
        ),  # an allowed global, bad arguments
        (b"\x80\x02cbuiltins\nbytearray\nK\x05\x85R.", "refers to builtins.bytearray"),  # not needed by any checkpoint
    ],
)
def test_hostile_raw_pickles_are_one_line_errors(payload, what, tmp_path):
    import time

    from surgery_lib.settings.clip.checkpoints import load_image_encoder_state

    path = tmp_path / "hostile.pt"
    path.write_bytes(payload)
    started = time.perf_counter()
    with pytest.raises(SurgeryBookError, match=what) as error:
        load_image_encoder_state(path)
    assert str(path) in str(error.value) and time.perf_counter() - started < 10


def test_a_batch_larger_than_a_task_takes_the_task_once_per_batch():
    from surgery_lib.surgery.schedule import official_iterations

    iterations = list(official_iterations([3, 5], steps=4, batch_size=10**6))
    assert len(iterations) == 2  # 2 batches per iteration, 4 steps
    for iteration in iterations:
        assert [[len(batch) for batch in task] for task in iteration.batches] == [[3], [5]]


@pytest.mark.parametrize(("umask", "file_mode", "folder_mode"), [(0o002, 0o664, 0o775), (0o077, 0o600, 0o700)])
def test_written_files_and_folders_get_the_permissions_the_umask_gives(umask, file_mode, folder_mode, tmp_path):
    """A cache shared by a group (umask 002) must be readable by the next user; tempfile made every model,
    merge, embedding and output private (0600 and 0700), whatever the umask."""
    import os
    import stat

    from surgery_lib.core.storage import atomic_directory, process_umask, save_tensors, write_json

    previous = os.umask(umask)
    try:
        assert process_umask() == umask
        save_tensors({"w": torch.ones(2)}, tmp_path / "model.safetensors")
        write_json({"a": 1}, tmp_path / "manifest.json")
        with atomic_directory(tmp_path / "outputs") as folder:
            (folder / "table.csv").write_text("x\n")
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "manifest.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == file_mode, name
    assert stat.S_IMODE((tmp_path / "outputs").stat().st_mode) == folder_mode
    assert stat.S_IMODE((tmp_path / "outputs" / "table.csv").stat().st_mode) == file_mode


@pytest.mark.parametrize(
    "first_seed, seeds, problem",
    [(0, 0, "0 seeds"), (0, 10**9, "asks for 1,000,000,000 runs"), (2**32 - 2, 3, "uses the seeds 4294967294 to")],
)
def test_a_grid_with_too_many_seeds_or_seeds_past_the_largest_is_refused_when_planned(first_seed, seeds, problem):
    from surgery_lib.cluster import GridSpec
    from surgery_lib.grid import MAX_SEEDS, check_seeds, surgery_grid

    for plan in (
        lambda: GridSpec(presets=("smoke",), methods=("task_arithmetic",), seeds=seeds, first_seed=first_seed),
        lambda: surgery_grid(None, ("task_arithmetic",), (1,), seeds, first_seed=first_seed),  # before the zoo
    ):
        with pytest.raises(SurgeryBookError, match=re.escape(problem)):
            plan()
    check_seeds(0, MAX_SEEDS)
    check_seeds(2**32 - 1 - (MAX_SEEDS - 1), MAX_SEEDS)  # the last valid seed is 2**32 - 1


@pytest.mark.parametrize(
    "argv",
    [
        ["zoo", "--preset", "smoke", "--zoo-dir", ""],
        ["zoo", "--preset", "smoke", "--zoo-dir", "", "--rebuild"],
        ["data", "--preset", "smoke", "--cache-dir", ""],
        ["table", "--preset", "smoke", "--out", " "],
        ["grid", "--presets", "smoke", "--out", ""],
        ["surgery", "--preset", "smoke", "--save", ""],
        ["reproduce", "--preset", "smoke", "--out", ""],
        ["reproduce", "--preset", "smoke", "--out", "run", "--source", ""],
        ["convert", "--model", "ViT-B-32", "--source", "", "--out", "converted"],
        ["convert", "--model", "ViT-B-32", "--source", "checkpoints", "--out", ""],
        ["zoo", "--preset", "clip-vit-b-32", "--checkpoints", ""],
        ["zoo", "--preset", "clip-vit-b-32", "--data-source", "local", "--data-root", ""],
    ],
)
def test_an_empty_path_is_refused_before_anything_is_written_in_the_current_folder(argv, capsys, monkeypatch, tmp_path):
    # `--out "$OUT"` with OUT unset: Path("") is the current folder, where a zoo or a grid landed among the user's files
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SURGERY_BOOK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    flag = next(word for word, value in zip(argv, argv[1:]) if not value.strip())
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert f"argument {flag}: an empty path. Fix: pass a path" in error
    assert list(tmp_path.iterdir()) == []


def test_the_lock_of_a_folder_given_as_dot_lies_beside_it_not_in_it(monkeypatch, tmp_path):
    from surgery_lib.core.storage import entry_lock

    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path / "mine")
    with entry_lock("."):
        assert (tmp_path / ".mine.lock").exists()
    assert list((tmp_path / "mine").iterdir()) == []  # was: "..lock" inside the user's folder
    with pytest.raises(SurgeryBookError, match="root"), entry_lock("/"):  # was: "/..lock"
        pass


def test_a_blank_cache_variable_means_the_default_and_a_blank_cache_dir_is_refused(monkeypatch, tmp_path):
    from surgery_lib.core.storage import cache_root, exported_cache

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))  # where platformdirs puts the default
    monkeypatch.setenv("SURGERY_BOOK_CACHE", " ")
    assert cache_root() == tmp_path / "user-cache" / "surgery-book"  # was: a folder named " " here
    for blank in ("", "  "):
        with pytest.raises(SurgeryBookError, match="an empty cache directory"):
            cache_root(blank)
    assert [p.name for p in tmp_path.iterdir()] == ["user-cache"]
    with exported_cache(None):  # what notebook kernels inherit: still blank, not the folder "<here>/ "
        assert os.environ["SURGERY_BOOK_CACHE"] == " "
