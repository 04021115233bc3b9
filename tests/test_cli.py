"""The surgery-book command line, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgery_lib.cli import main
from surgery_lib.core.storage import load_tensors
from surgery_lib.finetuning import attention_parameter


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "surgery_lib", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_unknown_preset_prints_one_clear_line_and_exits_2():
    result = run("zoo", "--preset", "huge")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown preset 'huge'") and "Fix:" in lines[0]


def exit_status_and_error(argv, capsys):
    """``main(argv)``'s exit status and what it wrote to stderr, in-process (a subprocess per case cost 2 s of
    `make check` each; the process level is checked above): a SurgeryBookError returns its status, and a usage
    error exits, as argparse does."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (  # given to a subcommand, an unknown option is that subcommand's error, with the option it resembles
            ["surgery", "--method", "ties"],
            "error: surgery-book surgery: unrecognized arguments: --method ties. Fix: did you mean '--merge'? "
            "`surgery-book surgery --help` lists every option and what it takes.",
        ),
        (["presets", "--jsn"], "surgery-book presets: unrecognized arguments: --jsn. Fix: did you mean '--json'? "),
        (["surgey"], "invalid choice: 'surgey' (choose from 'presets', "),
        (["surgey"], "Fix: did you mean 'surgery'? `surgery-book --help` lists"),
        (["merge", "--preset", "smoke"], "surgery-book merge: the following arguments are required: --method. Fix: "),
        (["zoo", "extra"], "unrecognized arguments: extra. Fix: drop it; `surgery-book zoo --help` lists"),
        (["surgery", "--rank", "abc"], "surgery-book surgery: argument --rank: invalid int value: 'abc'. Fix: "),
        (["zoo", "--preset", "smokey"], "unknown preset 'smokey'. Fix: did you mean 'smoke'? Else use one of: smoke, "),
        (["merge", "--method", "task_arithmetc"], "Fix: did you mean 'task_arithmetic'? Else use one of: "),
    ],
)
def test_usage_errors_are_one_line_naming_the_closest_option_or_name(argv, expected, capsys):
    status, error = exit_status_and_error(argv, capsys)
    assert status == 2
    assert error.count("\n") == 1 and error.startswith("error: ") and expected in error


def test_help_still_prints_the_whole_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["presets", "--help"])
    assert exit_info.value.code == 0 and "usage: surgery-book presets [-h] [--json]" in capsys.readouterr().out


def test_unwritable_cache_prints_one_clear_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    status, error = exit_status_and_error(["data", "--preset", "smoke", "--cache-dir", str(blocker / "sub")], capsys)
    assert status == 2
    assert "is not writable" in error and "--cache-dir" in error
    assert error.count("\n") == 1 and list(tmp_path.iterdir()) == [blocker]


def test_zoo_json_matches_the_manifest(smoke_zoo, cache_dir, capsys):
    assert main(["zoo", "--preset", "smoke", "--cache-dir", str(cache_dir), "--json", "--quiet"]) == 0
    payload = json.loads(capsys.readouterr().out)
    table = smoke_zoo.accuracy_table().round(2)
    assert payload["preset"] == "smoke"
    assert payload["accuracy"]["individual (expert)"] == table.loc["individual (expert)"].to_dict()


def test_zoo_table_is_markdown(smoke_zoo, cache_dir, capsys):
    assert main(["zoo", "--preset", "smoke", "--cache-dir", str(cache_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| pretrained + probe" in out and "| traditional MTL" in out and "average" in out


def test_data_and_presets_commands(cache_dir, capsys):
    assert main(["presets"]) == 0
    assert "mini" in capsys.readouterr().out
    assert main(["data", "--preset", "smoke", "--cache-dir", str(cache_dir), "--json", "--quiet"]) == 0
    cards = json.loads(capsys.readouterr().out)["cards"]
    assert set(cards) == {"mnist", "shapes", "pretraining_mix"}


@pytest.mark.heavy
def test_module_and_console_script_agree():
    from pathlib import Path

    script = Path(sys.executable).with_name("surgery-book")
    via_module = run("presets", "--json")
    via_script = subprocess.run([str(script), "presets", "--json"], capture_output=True, text=True, timeout=600)
    assert via_module.returncode == 0 and set(json.loads(via_module.stdout)) >= {"smoke", "mini", "base"}
    assert via_script.stdout == via_module.stdout


def test_merge_surgery_and_bench_commands(smoke_zoo, cache_dir, capsys):
    common = ["--preset", "smoke", "--cache-dir", str(cache_dir), "--json", "--quiet"]
    assert main(["merge", "--method", "ties", *common]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert set(merged["accuracy"]) == {"TIES-merging (disjoint sum)", "individual (expert)"}
    # The process holds at least the zoo's weights; no GPU peak on a CPU run.
    assert merged["peak_memory"]["rss_mib"] > 1 and merged["peak_memory"]["gpu_gib"] is None
    assert main(["surgery", "--merge", "task_arithmetic", "--surgery-steps", "20", "--rank", "4", *common]) == 0
    surgery = json.loads(capsys.readouterr().out)
    assert surgery["parameters_per_task"] == 2 * 64 * 4
    assert set(surgery["table"]) == {"accuracy before", "accuracy after", "bias before", "bias after"}
    assert main(["bench", "--iterations", "2", *common]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in bench["results"]] == ["V1", "V2"]


def test_unknown_method_exits_2(capsys):
    status, error = exit_status_and_error(["merge", "--preset", "smoke", "--method", "dare"], capsys)
    assert status == 2 and error.count("\n") == 1 and "unknown merging method 'dare'" in error


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_surgery_reports_its_optimiser_semantics(smoke_zoo, cache_dir, capsys):
    common = [
        "--preset",
        "smoke",
        "--cache-dir",
        str(cache_dir),
        "--json",
        "--quiet",
        "--surgery-steps",
        "4",
        "--rank",
        "4",
    ]
    results = {}
    for adam in ("shared", "per-task"):
        assert main(["surgery", "--merge", "task_arithmetic", "--adam", adam, *common]) == 0
        results[adam] = _strict_json(capsys.readouterr().out)
        assert results[adam]["adam"] == adam
    assert (
        results["shared"]["table"]["accuracy after"] != results["per-task"]["table"]["accuracy after"]
        or results["shared"]["table"]["bias after"] != results["per-task"]["table"]["bias after"]
    )
    assert results["shared"]["steps"] == 4 and not results["shared"]["online"]
    online = [*common[:6], "--rank", "4", "--online"]  # --surgery-steps is refused with --online
    assert main(["surgery", "--merge", "task_arithmetic", *online]) == 0
    streamed = _strict_json(capsys.readouterr().out)
    assert streamed["online"] and streamed["steps"] is None  # was 1000: steps the online run never took


@pytest.mark.heavy
def test_table_prints_the_surgery_grid_with_seeds(smoke_zoo, cache_dir, capsys):
    argv = [
        "table",
        "--preset",
        "smoke",
        "--cache-dir",
        str(cache_dir),
        "--quiet",
        "--surgery",
        "none,1,2",
        "--seeds",
        "2",
        "--surgery-steps",
        "4",
        "--steps",
        "2",
    ]
    assert main([*argv, "--json"]) == 0
    payload = _strict_json(capsys.readouterr().out)
    rows = payload["accuracy"]
    assert {
        "task arithmetic",
        "task arithmetic + Surgery",
        "task arithmetic + SurgeryV2",
        "task-wise AdaMerging++ + SurgeryV2",
        "individual (expert)",
    } <= set(rows)
    assert rows["task arithmetic"]["std"] is None and rows["task arithmetic + Surgery"]["std"] >= 0
    assert rows["task arithmetic + Surgery"]["bias"] < rows["task arithmetic"]["bias"]
    assert payload["seeds"] == 2 and payload["adam"] == "shared"
    assert main(argv) == 0
    assert "± " in capsys.readouterr().out


def test_bad_surgery_versions_are_one_line_errors(capsys):
    status, error = exit_status_and_error(["table", "--preset", "smoke", "--surgery", "none,3"], capsys)
    assert status == 2 and error.count("\n") == 1 and "unknown surgery versions 'none,3'" in error


def test_method_lists_name_the_papers_rows_every_method_or_each_registered_name_once():
    from surgery_lib.core.errors import SurgeryBookError
    from surgery_lib.grid import parse_methods
    from surgery_lib.merging import MAIN_TABLE, MERGE_METHODS

    assert parse_methods("papers") == MAIN_TABLE
    assert parse_methods("all") == tuple(name for name in MERGE_METHODS if not name.endswith("_tuned"))
    assert len(parse_methods("all")) == 18  # the tuned twins come with --tune validation
    assert parse_methods("tsv, task_arithmetic,tsv") == ("tsv", "task_arithmetic")
    assert parse_methods("tsv,ties,tsv_tuned", tune="validation") == ("tsv", "tsv_tuned", "ties")
    assert parse_methods("papers", tune="validation")[3:5] == ("task_arithmetic", "task_arithmetic_tuned")
    with pytest.raises(SurgeryBookError, match="unknown merging method 'dare'"):
        parse_methods("tsv,dare")
    with pytest.raises(SurgeryBookError, match="--tune 'test'"):
        parse_methods("tsv", tune="test")


def test_tune_validation_merges_the_tuned_twin_and_prints_what_it_chose(smoke_zoo, cache_dir, capsys):
    from surgery_lib.cli import main

    common = ["merge", "--preset", "smoke", "--cache-dir", str(cache_dir), "--quiet"]
    assert main([*common, "--method", "iso_c", "--tune", "validation", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["method"] == "iso_c_tuned" and payload["tuned"]["merges_evaluated"] == 30
    assert payload["tuned"]["chosen"]["scale"] in payload["tuned"]["grid"]["scale"]
    assert "Iso-C (isotropic, common subspace), tuned" in payload["accuracy"]
    assert main([*common, "--method", "task_arithmetic", "--tune", "validation"]) == 0
    assert "chosen on the validation split" in capsys.readouterr().out
    table = ["table", "--preset", "smoke", "--cache-dir", str(cache_dir), "--quiet", "--json", "--methods", "iso_c"]
    assert main([*table, "--tune", "validation"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows["accuracy"]) >= {"Iso-C (isotropic, common subspace)", "Iso-C (isotropic, common subspace), tuned"}
    assert rows["tuned"] == {"iso_c_tuned": payload["tuned"]["chosen"]}  # the same search, read from the cache
    assert main([*common, "--method", "ties", "--tune", "validation"]) == 2  # a usage error, as every bad flag
    assert "ties has no hyper-parameters its official code searches" in capsys.readouterr().err
    assert main([*common, "--method", "tsv", "--tune", "validation", "--scale", "0.5"]) == 2
    assert "tsv_tuned does not read --scale" in capsys.readouterr().err


def test_a_registered_method_reaches_merge_and_table_without_touching_the_cli(smoke_zoo, cache_dir, capsys):
    common = ["--preset", "smoke", "--cache-dir", str(cache_dir), "--json", "--quiet"]
    assert main(["merge", "--method", "dare_task_arithmetic", "--drop-rate", "0.3", "--seed", "1", *common]) == 0
    assert "DARE + task arithmetic" in _strict_json(capsys.readouterr().out)["accuracy"]
    assert main(["table", "--methods", "weight_averaging,dare_ties", *common]) == 0
    rows = _strict_json(capsys.readouterr().out)["accuracy"]
    assert {"weight averaging", "DARE + TIES-merging"} <= set(rows) and "task arithmetic" not in rows
    assert main(["table", "--methods", "dare", *common]) == 2
    assert "unknown merging method 'dare'" in capsys.readouterr().err


def test_table_repairs_every_method_of_an_explicit_list(smoke_zoo, cache_dir, capsys):
    common = [
        "--preset",
        "smoke",
        "--cache-dir",
        str(cache_dir),
        "--json",
        "--quiet",
        "--surgery",
        "none,1",
        "--surgery-steps",
        "4",
    ]
    assert main(["table", "--methods", "tsv,task_arithmetic", *common]) == 0
    rows = _strict_json(capsys.readouterr().out)["accuracy"]
    assert {"TSV-M (task singular vectors) + Surgery", "task arithmetic + Surgery"} <= set(rows)


def test_zoo_finetune_builds_another_zoo_whose_experts_move_attention_only(smoke_zoo, cache_dir, capsys):
    assert (
        main(
            ["zoo", "--preset", "smoke", "--cache-dir", str(cache_dir), "--finetune", "attention", "--json", "--quiet"]
        )
        == 0
    )
    payload = json.loads(capsys.readouterr().out)
    assert payload["directory"] != str(smoke_zoo.directory)  # its own zoo, next to the full fine-tunes
    expert, _ = load_tensors(Path(payload["directory"]) / "expert-mnist.safetensors")
    moved = {k for k in expert if not torch.equal(expert[k], smoke_zoo.pretrained[k])}
    assert moved and all(attention_parameter(k) for k in moved)


def test_finetune_options_are_checked_before_anything_is_built(tmp_path, monkeypatch, capsys):
    # In-process (a subprocess per case cost 2 s of `make check` each): the cache stays empty, so nothing was built.
    monkeypatch.setenv("SURGERY_BOOK_CACHE", str(tmp_path))
    refused = [
        (["--preset", "clip-vit-b-32", "--finetune", "lora"], "reads published experts"),
        (["--preset", "smoke", "--lora-rank", "8"], "add --finetune lora"),
        (["--preset", "smoke", "--finetune", "lora", "--lora-rank", "0"], "recipe.expert_lora_rank = 0 is invalid"),
    ]
    for arguments, message in refused:
        assert main(["zoo", *arguments]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1 and message in error, error
    assert list(tmp_path.iterdir()) == []


def test_a_closed_pipe_ends_the_command_quietly():
    result = subprocess.run(
        f"{sys.executable} -m surgery_lib presets --json | head -c 10",
        shell=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert len(result.stdout) == 10
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_a_closed_stdout_is_reported_before_any_work():
    result = subprocess.run(
        f"{sys.executable} -m surgery_lib presets >&-", shell=True, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 2
    assert (
        result.stderr
        == "error: standard output is closed, so the result would be lost. Fix: redirect it to a file or a pipe.\n"
    )


def test_a_terminal_that_cannot_encode_the_tables_gets_ascii(smoke_zoo, cache_dir, tmp_path):
    import os

    # DARE alone is computed once per seed, so two seeds give a mean and a std: "average ± std" in the table.
    command = [
        sys.executable,
        "-m",
        "surgery_lib",
        "grid",
        "--presets",
        "smoke",
        "--methods",
        "dare_task_arithmetic",
        "--surgery",
        "none",
        "--seeds",
        "2",
        "--executor",
        "inline",
        "--out",
        str(tmp_path),
        "--cache-dir",
        str(cache_dir),
        "--quiet",
    ]
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode("ascii")  # would raise on any non-ASCII byte
    assert " +/- " in out and "Traceback" not in result.stderr.decode()


def test_kernels_see_the_cache_and_presets_as_absolute_paths(monkeypatch, tmp_path):
    import os

    from surgery_lib.core.storage import CACHE_ENV, exported_cache

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CACHE_ENV, "relative-cache")
    monkeypatch.setenv("SURGERY_BOOK_PRESETS", "mine.json")
    with exported_cache(None, "SURGERY_BOOK_PRESETS"):
        assert os.environ[CACHE_ENV] == str(tmp_path / "relative-cache")
        assert os.environ["SURGERY_BOOK_PRESETS"] == str(tmp_path / "mine.json")
    assert os.environ[CACHE_ENV] == "relative-cache" and os.environ["SURGERY_BOOK_PRESETS"] == "mine.json"
    with exported_cache("other"):
        assert os.environ[CACHE_ENV] == str(tmp_path / "other")


@pytest.mark.parametrize(
    ("command", "kept"),
    [
        ("zoo", "finished models, merges and grid cells are kept, and a zoo model in training"),
        ("bench", "nothing half-written is left"),
        ("convert", "nothing half"),
    ],
)
def test_an_interrupted_command_says_what_it_kept(monkeypatch, capsys, command, kept):
    import surgery_lib.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"_cmd_{command}", interrupted)
    argv = {"convert": ["convert", "--model", "ViT-B-32", "--source", "unused", "--out", "unused"]}.get(
        command, [command]
    )
    assert main(argv) == 130
    assert capsys.readouterr().err.startswith(f"interrupted: {kept}")


def test_an_interrupted_rebuild_says_to_resume_without_rebuild(monkeypatch, capsys):
    import surgery_lib.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_zoo", interrupted)
    assert main(["zoo", "--preset", "smoke", "--rebuild"]) == 130
    assert capsys.readouterr().err.rstrip().endswith("run the command again without --rebuild to resume")
