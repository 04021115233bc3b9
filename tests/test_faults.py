"""Bad input and hostile files: nothing outside the project's own files is deleted or read, no silent
non-finite results, and JSON output stays standard JSON."""

from __future__ import annotations

import json
import shutil

import pytest

from surgery_lib.cli import main, to_json
from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.merging import MergeOptions, merge
from surgery_lib.presets import PRESETS
from surgery_lib.settings import build_zoo
from surgery_lib.settings.clip.checkpoints import load_converted
from surgery_lib.settings.offline.zoo import MANIFEST, clear_zoo


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
    models = [entry["file"] for entry in json.loads((zoo_dir / MANIFEST).read_text())["models"].values()]
    clear_zoo(zoo_dir)
    assert not (zoo_dir / MANIFEST).exists() and not any((zoo_dir / name).exists() for name in models)
    assert not list((zoo_dir / "merges").glob("*.safetensors"))
    assert (zoo_dir / "notes.txt").read_text() == "mine"


def test_a_converted_manifest_may_not_name_files_outside_its_folder(tmp_path):
    folder = tmp_path / "ViT-B-32"
    folder.mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"not yours")
    manifest = {"files": {"pretrained": {"file": "../secret.safetensors", "sha256": "0" * 64}}, "tasks": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SurgeryBookError, match="outside its folder"):
        load_converted(folder)


def test_preset_names_cannot_leave_the_cache():
    with pytest.raises(SurgeryBookError, match="invalid preset name"):
        PRESETS.register("../../../../x", PRESETS["smoke"])


def test_a_merge_that_overflows_is_an_error_not_garbage(smoke_zoo):
    with pytest.raises(SurgeryBookError, match="task_arithmetic merge produced NaN or infinite weights.*scale"):
        merge(smoke_zoo, "task_arithmetic", MergeOptions(scale=1e308), device="cpu", progress=False)


@pytest.mark.parametrize("argv", [["merge", "--method", "ties", "--scale", "nan"], ["merge", "--method", "task_arithmetic", "--scale", "inf"],
                                  ["surgery", "--lr", "nan"]])  # fmt: skip
def test_non_finite_options_are_one_line_errors(argv, capsys, tmp_path):
    assert main([*argv, "--preset", "smoke", "--quiet", "--cache-dir", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())  # rejected before any data or zoo was touched
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is not a finite number" in error


def test_json_output_is_standard_json():
    text = to_json({"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads(text) == {"a": None, "b": [1.5, None], "c": {"d": None}} and "NaN" not in text
