"""The surgery-book command line, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys

from surgery_lib.cli import main


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "surgery_lib", *args], capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_unknown_preset_prints_one_clear_line_and_exits_2():
    result = run("zoo", "--preset", "huge")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown preset 'huge'") and "Fix:" in lines[0]


def test_unwritable_cache_prints_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("data", "--preset", "smoke", "--cache-dir", str(blocker / "sub"))
    assert result.returncode == 2
    assert "is not writable" in result.stderr and "--cache-dir" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


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


def test_module_and_console_script_agree():
    from pathlib import Path

    script = Path(sys.executable).with_name("surgery-book")
    via_module = run("presets", "--json")
    via_script = subprocess.run([str(script), "presets", "--json"], capture_output=True, text=True, timeout=600)
    assert via_module.returncode == 0 and set(json.loads(via_module.stdout)) >= {"smoke", "mini", "base"}
    assert via_script.stdout == via_module.stdout
